"""The conv ops' copies (:mod:`minivae.conv`: im2col, col2im, the layout changes) as fused numba kernels.

Each fuses what the NumPy code does in several passes into one, on :func:`minivae.fast.threads.count` threads.
They copy and add exactly what the NumPy code does, in the same order, so the results are the same bits
(``tests/test_conv.py`` checks it).  :func:`install` hands them to :mod:`minivae.conv`
(``conv.use_copy_kernels``); ``import minivae`` does so when this package is there.
"""
from __future__ import annotations

import numpy as np

from .. import conv
from . import conv_cuda, cpu_kernels
from .threads import count, set_numba_threads


def copy_kernel(name, *arrays):
    """The fused kernel ``name`` for these arrays, or None, and :mod:`minivae.conv` runs its NumPy code:
    on CuPy, im2col and col2im as one CUDA kernel each (:mod:`minivae.fast.conv_cuda`); on NumPy, the numba
    kernel when numba is there and every array is a float32/float64 NumPy array of one dtype."""
    if name in conv_cuda.KERNEL_NAMES and conv_cuda.enabled(arrays[0]):
        return conv_cuda.copy_kernel(name)
    if not cpu_kernels.AVAILABLE:
        return None
    dt = arrays[0].dtype
    if any(type(a) is not np.ndarray or a.dtype != dt for a in arrays) or dt not in (np.float32, np.float64):
        return None
    set_numba_threads(count())
    return cpu_kernels.KERNELS[name]


def install():
    """Let :mod:`minivae.conv` use the fused copies (numba's on NumPy arrays, CUDA kernels on CuPy arrays;
    where neither applies, :func:`copy_kernel` answers None and nothing changes)."""
    conv.use_copy_kernels(copy_kernel)
