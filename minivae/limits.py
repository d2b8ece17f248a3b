"""Memory limits: refuse, with one line, a request that cannot fit before anything is allocated.

Every command that is asked for N of something works in chunks (sampling, grids,
IWAE training over K, evaluation), so its memory does not grow with N.  What is
left to check is the model itself: its parameters (and, for training, their
gradients and the optimizer's state) must fit.  ``--hidden 100000000`` asks for
a 784 x 1e8 weight matrix, 313 GB in float32; it is refused here, before NumPy
tries (a ``MemoryError`` traceback at best, the kernel's OOM killer at worst).
"""
from __future__ import annotations

import math
import os

import numpy as np


def available_bytes():
    """Memory this process may still use: MemAvailable (Linux), else the physical memory, else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def num_params(config):
    """Number of parameters of a VAE with this config (from the shapes alone, nothing allocated)."""
    from .model import param_shapes
    return sum(math.prod(shape) for _, shape in param_shapes(config))


def model_bytes(config, copies=1):
    """Bytes of ``copies`` arrays the size of the model's parameters."""
    return copies * num_params(config) * np.dtype(config.dtype).itemsize


def training_bytes(config, batch_size, iwae_k=None):
    """A rough upper bound of what training holds: 6 parameter-sized arrays (parameters, gradients,
    Adam's m and v, the fast step's scratch, the checkpoint's copy) and the activations of one
    chunk of rows (the IWAE bound works in chunks of samples, see ``VAE._iwae_chunk``)."""
    item = np.dtype(config.dtype).itemsize
    widths = config.x_dim * 4 + sum(config.hidden) * 4 + config.z_dim * 8
    rows = int(batch_size) * min(int(iwae_k or 1), 64)
    return model_bytes(config, 6) + rows * widths * item


def _size(n):
    for unit in ("bytes", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000.0


def check_fits(nbytes, what):
    """ValueError (one line) if ``nbytes`` is more than the memory available now."""
    avail = available_bytes()
    if avail is not None and nbytes > avail:
        raise ValueError(f"{what} needs about {_size(nbytes)} of memory, more than the {_size(avail)} available "
                         "on this machine; choose a smaller model")
    return nbytes
