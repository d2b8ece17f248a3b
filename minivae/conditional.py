"""Conditioning on a label: the one-hot code and the concatenation op pair.

A conditional VAE (Sohn, Lee & Yan 2015) models p(x|y) for a class label y in 0..K-1:

    p(z)      = N(0, I)                      the prior does not depend on y
    p(x|z, y) = decoder([z, onehot(y)])      the decoder reads z and the label
    q(z|x, y) = encoder(x, onehot(y))        the label joins the encoder's first dense layer

so both networks get the label as K extra input columns: ``[h, onehot(y)]`` (N, H + K).  The ELBO is the
same as the VAE's, now a bound on log p(x|y):

    log p(x|y) >= E_q(z|x,y)[log p(x|z, y)] - KL(q(z|x, y) || p(z)).

The label is data, like x: nothing is learned about it, so the backward of the concatenation hands a
gradient to h only (the model drops the label's slice).  :func:`concat_backward` still returns both slices,
so the gradient check covers the whole op.
"""
from __future__ import annotations

import numpy as np

from .backend import get_array_module, to_numpy


def one_hot(y, n_classes, dtype, xp=np):
    """Rows of the K x K identity: ``onehot(y)[n, k] = 1 if y_n = k else 0``, shape (N, K), on ``xp``."""
    return xp.eye(int(n_classes), dtype=dtype)[xp.asarray(y)]


def check_labels(y, n_classes, n=None, name="y"):
    """Integer class indices (N,) in 0..K-1 as an int64 host array; ValueError (one line) otherwise.

    ``n`` is the number of rows the labels must match (None: any).
    """
    try:
        a = np.asarray(to_numpy(y))
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be integer class labels (N,), got {type(y).__name__}") from None
    if a.ndim != 1:
        raise ValueError(f"{name} must be integer class labels of shape (N,), got shape {a.shape}")
    if a.dtype.kind not in "iu":
        if a.dtype.kind != "f" or not (np.isfinite(a).all() and (a == np.round(a)).all()):
            raise ValueError(f"{name} must be integer class labels, got dtype {a.dtype}")
    if n is not None and len(a) != n:
        raise ValueError(f"{name} has {len(a)} labels for {n} examples")
    if a.size and (a.min() < 0 or a.max() >= n_classes):
        bad = a[(a < 0) | (a >= n_classes)][0]
        raise ValueError(f"{name} holds label {bad:g}, outside 0..{n_classes - 1} ({n_classes} classes)")
    return a.astype(np.int64)


def concat_forward(a, b):
    """Concatenate along the feature axis: ``out = [a, b]``.

    Shapes: a (N, A), b (N, B) -> out (N, A + B), with out[:, :A] = a and out[:, A:] = b.
    """
    xp = get_array_module(a)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"cannot concatenate {a.shape[0]} rows with {b.shape[0]} rows")
    return xp.concatenate([a, b.astype(a.dtype, copy=False)], axis=1), a.shape[1]


def concat_backward(dout, cache):
    """Gradients of the concatenation: a slice.

    Each output entry is exactly one input entry (out_{n,j} = a_{n,j} for j < A and b_{n,j-A} otherwise),
    so with upstream G = dL/dout (N, A + B):

        dL/da = G[:, :A]         (N, A)
        dL/db = G[:, A:]         (N, B)

    Returns ``(da, db)``.  In the conditional VAE b is the one-hot label (data), and its gradient is dropped.
    """
    A = cache
    da = dout[:, :A]           # dL/da_nj = G_nj       (the columns that came from a)
    db = dout[:, A:]           # dL/db_nj = G_n,A+j    (the columns that came from b)
    return da, db


def outer_forward(a, b):
    """The outer product of two rows, flattened: ``out = vec(a ⊗ b)``, a bilinear op.

        out_{n, i·B + k} = a_{n,i} b_{n,k}

    Shapes: a (N, A), b (N, B) -> out (N, A·B), row-major (a's index i is the slow one).  With b the one-hot
    label, the block k of out is a copy of a for the rows of class k and zero elsewhere, so a dense layer after
    it applies a different weight matrix W_k to each class: the label *selects* the map instead of adding a bias.
    """
    xp = get_array_module(a)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"cannot take the outer product of {a.shape[0]} rows with {b.shape[0]} rows")
    b = b.astype(a.dtype, copy=False)
    N, A, B = a.shape[0], a.shape[1], b.shape[1]
    return (a[:, :, None] * b[:, None, :]).reshape(N, A * B), (a, b)


def outer_backward(dout, cache):
    """Gradients of the flattened outer product.

    out_{n,(i,k)} = a_{n,i} b_{n,k} is linear in each factor, so with upstream G = dL/dout (N, A·B) viewed as
    (N, A, B):

        dL/da_{n,i} = sum_k G_{n,i,k} b_{n,k}       (N, A)
        dL/db_{n,k} = sum_i G_{n,i,k} a_{n,i}       (N, B)

    Returns ``(da, db)``.  In the conditional VAE b is the one-hot label (data), and its gradient is dropped.
    """
    a, b = cache
    G = dout.reshape(a.shape[0], a.shape[1], b.shape[1])
    da = (G * b[:, None, :]).sum(axis=2)     # dL/da_ni = sum_k G_nik b_nk   (the block of class y_n, for one-hot b)
    db = (G * a[:, :, None]).sum(axis=1)     # dL/db_nk = sum_i G_nik a_ni
    return da, db
