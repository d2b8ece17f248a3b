"""im2col and col2im on CuPy as one kernel each (installed into :mod:`minivae.conv` by
:mod:`minivae.fast.conv_copies`, with the calling convention of its numba kernels).

The NumPy code of :func:`minivae.conv.im2col` is KH·KW strided-slice copies plus a padded, transposed copy of
the input; on a GPU each of those is a kernel launch (18 for a 4×4 kernel), and a conv layer's step runs
im2col or col2im two or three times.  Here each is one kernel, one thread per output element:

* im2col: ``col[(c, i, j), (oh, ow, n)] = x[n, c, oh·s + i - p, ow·s + j - p]`` (0 in the padding), read
  straight from the NCHW input (no padded copy, no transposition);
* col2im: ``x[n, c, h, w] = Σ_{i, j} col[(c, i, j), (oh, ow, n)]`` over the (i, j) whose patch position
  ``oh = (h + p - i) / s`` (and ow) is a whole number in range -- a gather per pixel, so no atomics, and the
  terms are added in the NumPy code's order (i, then j), from 0: the same sum, the same rounding.

float32 and float64 (one spec each, declared in :mod:`minivae.fast.kernels`' registry, compiled by
``tests/test_nvrtc.py`` without a GPU); the gpu-marked tests in tests/test_conv.py compare them with the NumPy
code.  ``MINIVAE_CONV_KERNELS=0`` turns them off (the slice copies run instead).
"""
from __future__ import annotations

import os

import numpy as np

from . import kernels

_IM2COL = r"""
extern "C" __global__ void minivae_im2col_REAL(const REAL* __restrict__ x, REAL* __restrict__ col, int N, int C,
        int H, int W, int KH, int KW, int OH, int OW, int s, int p, long long total)
{
    // col (C, KH, KW, OH, OW, N), C-contiguous: the batch index runs fastest
    long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= total) return;
    long long r = t;
    int n = (int)(r % N); r /= N;
    int ow = (int)(r % OW); r /= OW;
    int oh = (int)(r % OH); r /= OH;
    int j = (int)(r % KW); r /= KW;
    int i = (int)(r % KH);
    int c = (int)(r / KH);
    int h = oh * s + i - p, w = ow * s + j - p;
    col[t] = (h >= 0 && h < H && w >= 0 && w < W) ? x[(((long long)n * C + c) * H + h) * W + w] : (REAL)0;
}
"""

_COL2IM = r"""
extern "C" __global__ void minivae_col2im_REAL(const REAL* __restrict__ col, REAL* __restrict__ x, int N, int C,
        int H, int W, int KH, int KW, int OH, int OW, int s, int p, long long total)
{
    // x (N, C, H, W) from col (C, KH, KW, OH, OW, N): each pixel gathers the patch entries copied from it
    long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= total) return;
    long long r = t;
    int w = (int)(r % W); r /= W;
    int h = (int)(r % H); r /= H;
    int c = (int)(r % C);
    int n = (int)(r / C);
    REAL acc = (REAL)0;
    for (int i = 0; i < KH; ++i) {
        int a = h + p - i;
        if (a < 0 || a % s != 0 || a / s >= OH) continue;
        int oh = a / s;
        for (int j = 0; j < KW; ++j) {
            int b = w + p - j;
            if (b < 0 || b % s != 0 || b / s >= OW) continue;
            int ow = b / s;
            acc += col[((((long long)c * KH + i) * KW + j) * OH + oh) * (long long)OW * N + (long long)ow * N + n];
        }
    }
    x[t] = acc;
}
"""

_TYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
SPECS = kernels.register(__name__, {
    f"{op}_{ct}": kernels.raw(f"minivae_{op}_{ct}", code.replace("REAL", ct))
    for op, code in (("im2col", _IM2COL), ("col2im", _COL2IM)) for ct in ("float", "double")})
_BUILT = {}
THREADS = 256


def enabled(a):
    """True for a CuPy float32/float64 array, unless MINIVAE_CONV_KERNELS=0."""
    if os.environ.get("MINIVAE_CONV_KERNELS", "").strip().lower() in ("0", "off", "no", "false"):
        return False
    return type(a).__module__.startswith("cupy") and a.dtype in _TYPES


def _kernel(op, dtype):
    key = f"{op}_{_TYPES[np.dtype(dtype)]}"
    k = _BUILT.get(key)
    if k is None:
        k = _BUILT[key] = kernels.build(SPECS[key])
    return k


def _launch(op, src, dst, N, C, H, W, KH, KW, OH, OW, s, p):
    total = dst.size
    i32 = np.int32
    _kernel(op, dst.dtype)((max(1, -(-total // THREADS)),), (THREADS,),
                           (src, dst, i32(N), i32(C), i32(H), i32(W), i32(KH), i32(KW), i32(OH), i32(OW), i32(s),
                            i32(p), np.int64(total)))


KERNEL_NAMES = ("im2col", "col2im")


def copy_kernel(name):
    """The kernel ``name`` with :mod:`minivae.conv`'s copy-kernel convention (as the numba kernels):
    ``im2col(x (N, C, H, W), stride, padding, col (C, KH, KW, OH, OW, N))`` and
    ``col2im(col (C, KH, KW, OH, OW, N), stride, padding, x (N, C, H, W))``, each filling its last argument."""
    def im2col_into(x, s, p, col):
        C, KH, KW, OH, OW, N = (int(d) for d in col.shape)
        import cupy as cp
        _launch("im2col", cp.ascontiguousarray(x), col, N, C, int(x.shape[2]), int(x.shape[3]), KH, KW, OH, OW,
                int(s), int(p))

    def col2im_into(col6, s, p, x):
        C, KH, KW, OH, OW, N = (int(d) for d in col6.shape)
        import cupy as cp
        _launch("col2im", cp.ascontiguousarray(col6), x, N, C, int(x.shape[2]), int(x.shape[3]), KH, KW, OH, OW,
                int(s), int(p))

    return {"im2col": im2col_into, "col2im": col2im_into}[name]


def im2col(x, KH, KW, s, p, OH, OW):
    """col (C·KH·KW, OH·OW·N) of the CuPy array x (N, C, H, W): one kernel."""
    import cupy as cp
    N, C, H, W = (int(d) for d in x.shape)
    x = cp.ascontiguousarray(x)
    col = cp.empty((C * KH * KW, OH * OW * N), dtype=x.dtype)
    _launch("im2col", x, col, N, C, H, W, KH, KW, OH, OW, s, p)
    return col


def col2im(col, x_shape, KH, KW, s, p, OH, OW):
    """x (N, C, H, W) from the CuPy col (C·KH·KW, OH·OW·N): one kernel."""
    import cupy as cp
    N, C, H, W = (int(d) for d in x_shape)
    col = cp.ascontiguousarray(col)
    x = cp.empty((N, C, H, W), dtype=col.dtype)
    _launch("col2im", col, x, N, C, H, W, KH, KW, OH, OW, s, p)
    return x
