"""Convolution-family ops as forward/backward pairs: conv2d, its adjoint conv_transpose2d, max-pooling, upsampling.

Layout NCHW.  Weights use PyTorch's layouts, so numbers compare one to one:

* conv2d            x (N, C, H, W),      W (F, C, KH, KW),         b (F,)     -> y (N, F, OH, OW)
                    OH = (H + 2·padding - KH) // stride + 1   (OW likewise)
* conv_transpose2d  x (N, C_in, H, W),   W (C_in, C_out, KH, KW),  b (C_out,) -> y (N, C_out, OH, OW)
                    OH = (H - 1)·stride - 2·padding + KH
* maxpool2d         window = stride = ``size``;  OH = H // size
* upsample_nearest2d                      OH = H · scale

Convolution as a matrix product (im2col)
---------------------------------------
Every output pixel of a convolution is a dot product of the filter with one KH×KW patch of every input
channel.  :func:`im2col` copies all those patches into the columns of one matrix

    col[(c, i, j), (oh, ow, n)] = xpad[n, c, oh·s + i, ow·s + j]          col: (C·KH·KW, OH·OW·N)

and the whole convolution becomes one GEMM with the filters flattened to rows, Wm = W.reshape(F, C·KH·KW):

    Y = Wm · col + b          Y: (F, OH·OW·N), then transposed to (N, F, OH, OW)

Derivation (conv2d's backward from the dense layer's):
The backward follows from the dense layer's (Y = Wm·col is a dense layer with the roles of rows/columns swapped):

    dWm  = dY · colᵀ                     (F, C·KH·KW)     summed over every (oh, ow, n): over the batch too
    dcol = Wmᵀ · dY                      (C·KH·KW, OH·OW·N)
    dx   = col2im(dcol)                  (N, C, H, W)     each patch entry added back where it was copied from
    db   = Σ_{n, oh, ow} dy[n, f, oh, ow]                 (F,)
(end of derivation)

:func:`col2im` is the adjoint (transpose) of :func:`im2col`: im2col copies one input pixel into several
columns, so col2im *adds* the several column entries back into that pixel (a scatter-add).

Transposed convolution is the adjoint of convolution
----------------------------------------------------
For fixed W, conv2d (bias 0) is a linear map A: x -> y.  The transposed convolution is Aᵀ, defined by

    ⟨A x, y⟩ = ⟨x, Aᵀ y⟩       for all x, y.

Derivation (conv_transpose2d from conv2d's dx):
Aᵀ is exactly what conv2d's backward computes for dx: Aᵀ y = col2im(Wmᵀ · y).  So conv_transpose2d's
*forward* is conv2d's dx (col2im of Wᵀ·x), and its *backward* (for dx) is conv2d's forward.
(end of derivation)
This is why its weight layout is (C_in, C_out, KH, KW): it is the (F, C, KH, KW) weight of the conv2d it
transposes, and why its output size H_out is the conv2d input size that maps back to H.

Speed
-----
No Python loop over pixels and no ``np.add.at``: im2col and col2im loop over the KH·KW kernel offsets only,
each step one strided-slice copy (or add) of a whole (C, OH, OW, N) block.  The batch is the *last* index of
a column, (oh, ow, n), chosen by measurement (batch 128, float32, the MNIST conv shapes): every slice then
moves contiguous runs of N numbers, where the batch-outer order (n, oh, ow) moved runs of 7-14 numbers with a
stride of 2 and spent most of its time in loop overhead.  Both GEMMs stay plain 2-D
products of contiguous matrices.  Only xp functions CuPy also has are used, so the same code runs on the GPU.
The fast path can install faster copies that give the same bits (below); benchmarks/README.md ("The conv
VAE") has the measurements.

The regions between ``### BEGIN SOLUTION`` and ``### END SOLUTION`` are course exercises: in a
student copy, each holds a stub for you to replace.
"""
from __future__ import annotations

import numpy as np  # noqa: F401  (for the exercises' code; the solutions use xp, the data's module)

from .backend import get_array_module


# ----------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------
def _shape(a):
    return tuple(int(d) for d in a.shape)


def _check_x(op, x, channels="C"):
    if x.ndim != 4:
        raise ValueError(f"{op}: x must have shape (N, {channels}, H, W), got {_shape(x)}")


def _check_int(op, name, value, low):
    if int(value) != value or value < low:
        raise ValueError(f"{op}: {name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _out_size(op, H, W, OH, OW, detail):
    if OH < 1 or OW < 1:
        raise ValueError(f"{op}: output size {OH}x{OW} is < 1 for input {H}x{W} ({detail})")
    return OH, OW


# ----------------------------------------------------------------------------
# faster copies (optional)
# ----------------------------------------------------------------------------
# im2col, col2im and the two layout changes below only copy (and add) numbers.  Another implementation that
# makes the same copies in the same order gives the same bits, and the fast path has one: compiled kernels
# that fuse the several NumPy passes into one (minivae.fast.conv_copies, with numba), which it installs here
# with use_copy_kernels().  This module does not import it; without it, the NumPy code below runs, and it is
# the code to read.
_copy_kernels = [None]


def use_copy_kernels(lookup):
    """Install ``lookup(name, *arrays) -> kernel or None``: the faster copy ``name`` ("im2col", "col2im",
    "to_batch_last", "to_batch_first") for these arrays, or None for the NumPy code.  ``None`` uninstalls.
    Returns the previous lookup."""
    prev = _copy_kernels[0]
    _copy_kernels[0] = lookup
    return prev


def _copy_kernel(name, *arrays):
    """The installed kernel ``name`` for these arrays, or None: the caller then runs its NumPy code."""
    lookup = _copy_kernels[0]
    return None if lookup is None else lookup(name, *arrays)


def _relayout(a, axes, name):
    """A new C-contiguous ``a.transpose(axes)``: the fused kernel ``name`` when it applies, else NumPy's copy."""
    xp = get_array_module(a)
    out = xp.empty(tuple(int(a.shape[k]) for k in axes), dtype=a.dtype)
    kernel = _copy_kernel(name, a, out)
    if kernel is not None:
        kernel(a, out)
    else:
        out[...] = a.transpose(axes)
    return out


def to_batch_last(x):
    """(N, C, H, W) -> a new C-contiguous (C, H, W, N): the column order of im2col, batch fastest."""
    return _relayout(x, (1, 2, 3, 0), "to_batch_last")


def to_batch_first(a):
    """(C, H, W, N) -> a new C-contiguous (N, C, H, W): back to the NCHW layout."""
    return _relayout(a, (3, 0, 1, 2), "to_batch_first")


def conv_output_size(H, W, KH, KW, stride=1, padding=0):
    """(OH, OW) of conv2d: OH = (H + 2·padding - KH) // stride + 1 (OW likewise)."""
    return (H + 2 * padding - KH) // stride + 1, (W + 2 * padding - KW) // stride + 1


# ----------------------------------------------------------------------------
# im2col / col2im
# ----------------------------------------------------------------------------
def im2col(x, KH, KW, stride=1, padding=0):
    """Copy every KH×KW patch of ``x`` into a column: the convolution becomes one matrix product.

    Shapes: x (N, C, H, W) -> col (C·KH·KW, OH·OW·N), OH = (H + 2·padding - KH) // stride + 1, with

        col[(c, i, j), (oh, ow, n)] = xpad[n, c, oh·stride + i, ow·stride + j]

    (row index c·KH·KW + i·KW + j, column index (oh·OW + ow)·N + n: the batch runs fastest; ``xpad`` is x
    with ``padding`` zeros on each side of H and W).  Row order (c, i, j) matches ``W.reshape(F, C·KH·KW)``
    for W (F, C, KH, KW).

    One strided-slice copy per kernel offset (i, j): KH·KW copies of a (C, OH, OW, N) block, no loop over
    pixels.  Returns a new C-contiguous array with x's dtype.
    """
    xp = get_array_module(x)
    _check_x("im2col", x)
    N, C, H, W = (int(d) for d in x.shape)
    s, p = stride, padding
    OH, OW = _out_size("im2col", H, W, *conv_output_size(H, W, KH, KW, s, p),
                       f"KH={KH}, KW={KW}, stride={s}, padding={p}")
    col = xp.empty((C, KH, KW, OH, OW, N), dtype=x.dtype)
    kernel = _copy_kernel("im2col", x, col)
    if kernel is not None:                   # the same copies, fused into one pass
        kernel(x, s, p, col)
        return col.reshape(C * KH * KW, OH * OW * N)
    # batch last (C, Hp, Wp, N): every slice below is one (C, OH, OW, N) block of col, runs of N contiguous
    xt = xp.zeros((C, H + 2 * p, W + 2 * p, N), dtype=x.dtype)
    xt[:, p:p + H, p:p + W, :] = x.transpose(1, 2, 3, 0)
    for i in range(KH):
        for j in range(KW):
            # pixels (oh·s + i, ow·s + j) for all oh, ow: a strided slice of the padded input
            col[:, i, j] = xt[:, i:i + s * OH:s, j:j + s * OW:s, :]
    return col.reshape(C * KH * KW, OH * OW * N)


def col2im(col, x_shape, KH, KW, stride=1, padding=0):
    """The adjoint of :func:`im2col`: add every column entry back to the input pixel it was copied from.

    Shapes: col (C·KH·KW, OH·OW·N), x_shape = (N, C, H, W) -> x (N, C, H, W), with

        x[n, c, h, w] = Σ_{i, j, oh, ow : oh·stride + i - padding = h, ow·stride + j - padding = w}
                        col[(c, i, j), (oh, ow, n)]

    A pixel covered by several patches receives the sum of all its copies (scatter-add); entries that fell
    in the padding are dropped.  ⟨im2col(x), col⟩ = ⟨x, col2im(col)⟩ for all x, col.  KH·KW strided-slice
    additions, no loop over pixels, no ``add.at``.  Returns a new C-contiguous array with col's dtype.
    """
    xp = get_array_module(col)
    N, C, H, W = x_shape
    s, p = stride, padding
    OH, OW = conv_output_size(H, W, KH, KW, s, p)
    if tuple(col.shape) != (C * KH * KW, OH * OW * N):
        raise ValueError(f"col2im: col must have shape ({C * KH * KW}, {OH * OW * N}) = (C·KH·KW, OH·OW·N) "
                         f"for x_shape {tuple(x_shape)}, got {_shape(col)}")
    col6 = col.reshape(C, KH, KW, OH, OW, N)
    kernel = _copy_kernel("col2im", col6)
    if kernel is not None:                   # the same additions, in the same order, in one pass
        x = xp.empty((N, C, H, W), dtype=col.dtype)
        kernel(xp.ascontiguousarray(col6), s, p, x)
        return x
    xt = xp.zeros((C, H + 2 * p, W + 2 * p, N), dtype=col.dtype)
    for i in range(KH):
        for j in range(KW):
            # the patches' (i, j) entries go back to pixels (oh·s + i, ow·s + j); overlaps add up
            xt[:, i:i + s * OH:s, j:j + s * OW:s, :] += col6[:, i, j]
    return to_batch_first(xt[:, p:p + H, p:p + W, :])     # drop the padding, back to (N, C, H, W)


def _check_conv(op, x, W, b, stride, padding, transpose):
    stride = _check_int(op, "stride", stride, 1)
    padding = _check_int(op, "padding", padding, 0)
    _check_x(op, x)
    C = int(x.shape[1])
    if W.ndim != 4 or int(W.shape[0] if transpose else W.shape[1]) != C:
        want = f"({C}, C_out, KH, KW)" if transpose else f"(F, {C}, KH, KW)"
        raise ValueError(f"{op}: W must have shape {want} to match x's {C} channels, got {_shape(W)}")
    F = int(W.shape[1] if transpose else W.shape[0])
    if b.ndim != 1 or int(b.shape[0]) != F:
        raise ValueError(f"{op}: b must have shape ({F},), one bias per output channel, got {_shape(b)}")
    return stride, padding


# ----------------------------------------------------------------------------
# conv2d
# ----------------------------------------------------------------------------
def conv2d_forward(x, W, b, stride=1, padding=0):
    """2-D convolution (cross-correlation, as in PyTorch) as one matrix product over patches.

        y[n, f, oh, ow] = b[f] + Σ_{c, i, j} W[f, c, i, j] · xpad[n, c, oh·stride + i, ow·stride + j]

    In matrix form, with col = im2col(x) (C·KH·KW, OH·OW·N) and Wm = W.reshape(F, C·KH·KW):

        Y = Wm · col + b[:, None]     (F, OH·OW·N)  ->  y (N, F, OH, OW)

    Shapes: x (N, C, H, W), W (F, C, KH, KW), b (F,) -> y (N, F, OH, OW), OH = (H + 2p - KH) // s + 1.
    Returns ``(y, cache)``; the cache holds col, so the backward does not redo im2col.
    """
    op = "conv2d_forward"
    stride, padding = _check_conv(op, x, W, b, stride, padding, transpose=False)
    N, C, H, Wd = (int(d) for d in x.shape)
    F, _, KH, KW = (int(d) for d in W.shape)
    OH, OW = _out_size(op, H, Wd, *conv_output_size(H, Wd, KH, KW, stride, padding),
                       f"KH={KH}, KW={KW}, stride={stride}, padding={padding}")
    col = im2col(x, KH, KW, stride, padding)                    # (C·KH·KW, OH·OW·N)
    Y = W.reshape(F, C * KH * KW) @ col                          # (F, OH·OW·N)
    Y += b.reshape(F, 1)
    y = to_batch_first(Y.reshape(F, OH, OW, N))                 # (N, F, OH, OW)
    return y, (col, W, (N, C, H, Wd), stride, padding)


def conv2d_backward(dy, cache):
    """Gradients of conv2d, from the matrix form Y = Wm · col + b (a dense layer over patches).

    Derivation (dW, dx and db from G = dy):
    With G = dY = dy as (F, OH·OW·N) (batch last, like col's columns):

        dWm  = G · colᵀ                     (F, C·KH·KW)   -> dW (F, C, KH, KW)   (sums over oh, ow, n)
        dcol = Wmᵀ · G                      (C·KH·KW, OH·OW·N)
        dx   = col2im(dcol)                 (N, C, H, W)    scatter-add of overlapping patches
        db   = Σ_{n, oh, ow} dy[:, f]       (F,)
    (end of derivation)

    Shapes: dy (N, F, OH, OW), the cache (col, W, x_shape, stride, padding) -> dx (N, C, H, W),
    dW (F, C, KH, KW), db (F,).  Returns ``(dx, dW, db)``.
    """
    col, W, x_shape, stride, padding = cache
    xp = get_array_module(dy)                       # noqa: F841 (NumPy or CuPy, for the exercise's code)
    N, C, H, Wd = x_shape
    F, _, KH, KW = (int(d) for d in W.shape)
    ### BEGIN SOLUTION conv2d_backward
    G = to_batch_last(dy).reshape(F, -1)            # dL/dY: (F, OH·OW·N)
    dW = (G @ col.T).reshape(W.shape)               # dL/dWm = G colᵀ: sums over every (oh, ow, n)
    dcol = W.reshape(F, C * KH * KW).T @ G          # dL/dcol = Wmᵀ G: (C·KH·KW, OH·OW·N)
    dx = col2im(dcol, x_shape, KH, KW, stride, padding)   # dL/dx: each patch entry added back to its pixel
    db = G.sum(axis=1)                              # dL/db_f = Σ_{n, oh, ow} G[f, ·]
    ### END SOLUTION
    return dx, dW, db


# ----------------------------------------------------------------------------
# conv_transpose2d: the adjoint of conv2d
# ----------------------------------------------------------------------------
def conv_transpose2d_forward(x, W, b, stride=1, padding=0):
    """Transposed convolution: the adjoint of conv2d, i.e. conv2d's dx applied to x.

    Think of the conv2d that maps a (C_out, OH, OW) image to a (C_in, H, W) one with weight W, which then
    has layout (F=C_in, C=C_out, KH, KW).
    Derivation (y as conv2d's dx):
    Its input-gradient is col2im(Wmᵀ · G); the transposed convolution applies exactly that to x:

        X    = x as (C_in, H·W·N)          (batch last, the column order of im2col)
        col  = Wmᵀ · X                      (C_out·KH·KW, H·W·N),  Wm = W.reshape(C_in, C_out·KH·KW)
        y    = col2im(col) + b              (N, C_out, OH, OW),    OH = (H - 1)·stride - 2·padding + KH

    Equivalently: each input pixel x[n, c, h, w] stamps the kernel W[c, :, :, :] scaled by its value onto
    the output at (h·stride - padding, w·stride - padding), and overlapping stamps add.
    (end of derivation)

    Shapes: x (N, C_in, H, W), W (C_in, C_out, KH, KW), b (C_out,) -> y (N, C_out, OH, OW).
    Returns ``(y, cache)``.
    """
    op = "conv_transpose2d_forward"
    stride, padding = _check_conv(op, x, W, b, stride, padding, transpose=True)
    xp = get_array_module(x, W, b)                  # noqa: F841 (NumPy or CuPy, for the exercise's code)
    N, Cin, H, Wd = (int(d) for d in x.shape)
    _, Cout, KH, KW = (int(d) for d in W.shape)
    OH, OW = _out_size(op, H, Wd, (H - 1) * stride - 2 * padding + KH, (Wd - 1) * stride - 2 * padding + KW,
                       f"KH={KH}, KW={KW}, stride={stride}, padding={padding}")
    ### BEGIN SOLUTION conv_transpose2d_forward
    X = to_batch_last(x).reshape(Cin, H * Wd * N)   # (C_in, H·W·N)
    col = W.reshape(Cin, Cout * KH * KW).T @ X      # Wmᵀ X: (C_out·KH·KW, H·W·N), conv2d's dcol
    y = col2im(col, (N, Cout, OH, OW), KH, KW, stride, padding)   # scatter-add the stamps: (N, C_out, OH, OW)
    y += b.reshape(1, Cout, 1, 1)
    ### END SOLUTION
    return y, (X, W, (N, Cin, H, Wd), stride, padding)


def conv_transpose2d_backward(dy, cache):
    """Gradients of the transposed convolution: its dx is conv2d's forward (the adjoint of the adjoint).

    With col = im2col(dy) (C_out·KH·KW, H·W·N) (the patches of dy that each input pixel stamped onto),
    X = x as (C_in, H·W·N) and Wm = W.reshape(C_in, C_out·KH·KW), the forward was y = col2im(Wmᵀ X) + b, so

        dX  = Wm · col                      (C_in, H·W·N)   -> dx (N, C_in, H, W)   = conv2d(dy, W) without bias
        dWm = X · colᵀ                      (C_in, C_out·KH·KW)   (sums over h, w, n)
        db  = Σ_{n, oh, ow} dy[:, c]        (C_out,)

    (col2im's adjoint is im2col, and (Wmᵀ X)'s gradients are those of a dense layer.)  Returns ``(dx, dW, db)``.
    """
    X, W, x_shape, stride, padding = cache
    N, Cin, H, Wd = x_shape
    _, Cout, KH, KW = (int(d) for d in W.shape)
    col = im2col(dy, KH, KW, stride, padding)      # (C_out·KH·KW, H·W·N): its column count is H·W·N exactly
    Wm = W.reshape(Cin, Cout * KH * KW)
    dX = Wm @ col                                  # dL/dX = Wm col: conv2d's forward of dy
    dx = to_batch_first(dX.reshape(Cin, H, Wd, N))
    dW = (X @ col.T).reshape(W.shape)              # dL/dWm = X colᵀ: sums over every (h, w, n)
    db = dy.sum(axis=(0, 2, 3))                    # dL/db_c = Σ_{n, oh, ow} dy[n, c, oh, ow]
    return dx, dW, db


# ----------------------------------------------------------------------------
# max-pooling (window = stride = size)
# ----------------------------------------------------------------------------
def maxpool2d_forward(x, size=2):
    """Max over non-overlapping size×size windows (stride = size), as PyTorch's MaxPool2d(size).

        y[n, c, oh, ow] = max_{0 <= i, j < size} x[n, c, oh·size + i, ow·size + j]

    Shapes: x (N, C, H, W) -> y (N, C, H // size, W // size); rows/columns beyond OH·size are dropped (floor).
    The windows are a view of shape (N, C, OH, size, OW, size); we loop over the size² offsets (i, j), each a
    strided (N, C, OH, OW) slice, never over pixels.  The cache keeps ``arg`` (N, C, OH, OW): for every window
    the offset a = i·size + j of its *first* maximum in row-major order, the one element that receives the
    gradient (PyTorch's rule on ties).  Returns ``(y, cache)``.
    """
    op = "maxpool2d_forward"
    k = _check_int(op, "size", size, 1)
    _check_x(op, x)
    xp = get_array_module(x)
    N, C, H, W = (int(d) for d in x.shape)
    OH, OW = _out_size(op, H, W, H // k, W // k, f"size={k}")
    win = x[:, :, :OH * k, :OW * k].reshape(N, C, OH, k, OW, k)   # win[:, :, oh, i, ow, j]
    y = win[:, :, :, 0, :, 0].copy()                               # (N, C, OH, OW)
    for a in range(1, k * k):
        xp.maximum(y, win[:, :, :, a // k, :, a % k], out=y)
    # offsets in decreasing order, so the smallest offset holding the max is written last: the first maximum
    arg = xp.full((N, C, OH, OW), k * k - 1, dtype=xp.int32)
    for a in range(k * k - 2, -1, -1):
        arg[win[:, :, :, a // k, :, a % k] == y] = a
    return y, (arg, (N, C, H, W), k)


def maxpool2d_backward(dy, cache):
    """Gradient of max-pooling: dx from dy, through the element each window selected.

    Derivation (dx from dy):
    The max passes its gradient to the element it selected, and nothing to the others.
    Within a window, y = x_a with a = argmax; so ∂y/∂x_{ij} = 1 if i·size + j = a, else 0, and

        dx[n, c, oh·size + i, ow·size + j] = dy[n, c, oh, ow] · 1[i·size + j = arg[n, c, oh, ow]]

    On ties only the first maximum (row-major) gets it, as in PyTorch; pixels outside every window get 0.
    (end of derivation)
    Shapes: dy (N, C, OH, OW) -> dx (N, C, H, W).  One masked copy per window offset.
    """
    arg, x_shape, k = cache
    xp = get_array_module(dy)
    N, C, H, W = x_shape
    OH, OW = int(dy.shape[2]), int(dy.shape[3])
    ### BEGIN SOLUTION maxpool2d_backward
    dx = xp.zeros((N, C, H, W), dtype=dy.dtype)
    dwin = dx[:, :, :OH * k, :OW * k].reshape(N, C, OH, k, OW, k)   # only splits axes: a view of dx
    for a in range(k * k):
        # dL/dx at window offset a = dy where a is the argmax, 0 elsewhere
        xp.multiply(dy, arg == a, out=dwin[:, :, :, a // k, :, a % k])
    ### END SOLUTION
    return dx


# ----------------------------------------------------------------------------
# nearest-neighbour upsampling
# ----------------------------------------------------------------------------
def upsample_nearest2d_forward(x, scale=2):
    """Repeat every pixel into a scale×scale block (PyTorch's Upsample(scale_factor, mode="nearest")).

        y[n, c, h·scale + i, w·scale + j] = x[n, c, h, w]         0 <= i, j < scale

    Shapes: x (N, C, H, W) -> y (N, C, H·scale, W·scale).  A broadcast to (N, C, H, scale, W, scale) and a
    reshape.  Returns ``(y, cache)``.
    """
    op = "upsample_nearest2d_forward"
    s = _check_int(op, "scale", scale, 1)
    _check_x(op, x)
    xp = get_array_module(x)
    N, C, H, W = (int(d) for d in x.shape)
    _out_size(op, H, W, H * s, W * s, f"scale={s}")
    y = xp.broadcast_to(x[:, :, :, None, :, None], (N, C, H, s, W, s)).reshape(N, C, H * s, W * s)
    return y, ((N, C, H, W), s)


def upsample_nearest2d_backward(dy, cache):
    """Gradient of nearest-neighbour upsampling: dx from dy.

    Derivation (dx from dy):
    Each input pixel was copied to scale² outputs, so its gradient is the *sum* of their gradients.

        dx[n, c, h, w] = Σ_{0 <= i, j < scale} dy[n, c, h·scale + i, w·scale + j]
    (end of derivation)

    Shapes: dy (N, C, H·scale, W·scale) -> dx (N, C, H, W).  scale² strided additions (faster than a
    reduction over the two short block axes).
    """
    (N, C, H, W), s = cache
    ### BEGIN SOLUTION upsample_nearest2d_backward
    blocks = dy.reshape(N, C, H, s, W, s)              # blocks[:, :, h, i, w, j] = dy[:, :, h·s + i, w·s + j]
    dx = blocks[:, :, :, 0, :, 0].copy()
    for a in range(1, s * s):
        dx += blocks[:, :, :, a // s, :, a % s]         # dL/dx = Σ_{i, j} dL/dy over the block x was copied to
    ### END SOLUTION
    return dx
