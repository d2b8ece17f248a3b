"""The masked dense layer of MADE (Germain, Gregor, Murray & Larochelle 2015), as an op pair, and its masks.

A MADE is a dense network whose weights are multiplied by fixed 0/1 masks so that output d depends only on
the inputs before d in a chosen order: its outputs are autoregressive.  minivae uses it twice:

* the autoregressive decoder p(x|z) = prod_d p(x_d | x_<d, z) (:mod:`minivae.families`, ``--decoder made``),
  strong enough to model the digits without z -- the posterior collapse of lesson 26;
* the inverse autoregressive flow step of :mod:`minivae.flows` (Kingma et al. 2016), whose Jacobian is
  triangular because of these masks.

Degrees (the construction of Germain et al. 2015, section 4).  Every unit gets a degree:

    input i (1-based)       deg = i                         i = 1..D_in
    hidden unit k           deg = 1 + floor(k max(1, D_in - 1) / width)   (evenly spread, no randomness)
    output o of group g     deg = o                         o = 1..D_in, one group per output array

A connection is kept when it cannot carry information from an input to an output of the same or a lower
degree:

    input i  -> hidden k    kept when deg_k >= i
    hidden k -> hidden k'   kept when deg_k' >= deg_k
    hidden k -> output o    kept when o > deg_k        (strict: output o never sees input o)

So output o is a function of inputs 1..o-1 only; output 1 of none (a constant, its bias).

Shapes: ``N`` rows, ``D_in`` / ``D_out`` the layer's widths.  The masks are float arrays of the weight's shape
(D_in, D_out), fixed at construction: they are not parameters and get no gradient.
"""
from __future__ import annotations

import numpy as np


# ----------------------------------------------------------------------------
# the masked dense layer
# ----------------------------------------------------------------------------
def masked_dense_forward(x, W, b, mask):
    """y = x @ (M * W) + b, the masked affine map (M a fixed 0/1 mask of W's shape).

    Shapes: x (N, D_in), W and mask (D_in, D_out), b (D_out,) -> y (N, D_out).
    The cache keeps the masked weight M * W (what the backward multiplies by) and the mask.
    """
    Wm = W * mask                                # the weights that exist; M * W zeroes the rest
    y = x @ Wm
    y += b
    return y, (x, Wm, mask)


def masked_dense_backward(dy, cache):
    """Gradients of y = x @ (M * W) + b.

    With y_nj = sum_i x_ni M_ij W_ij + b_j and upstream G = dL/dy (N, D_out):

    Derivation (dL/dx (N, D_in), dL/dW (D_in, D_out) and dL/db (D_out,) from G):
        dL/dx_ni = sum_j G_nj M_ij W_ij         ->  dL/dx = G @ (M * W).T
        dL/dW_ij = M_ij sum_n x_ni G_nj          ->  dL/dW = M * (x.T @ G)
        dL/db_j  = sum_n G_nj                    ->  dL/db = sum_n G_n
    The mask multiplies the weight gradient: a masked-out weight does not exist in the forward pass, so its
    gradient is exactly 0 (and an optimizer step leaves it where it was: it never enters y).
    (end of derivation)

    Returns ``(dx, dW, db)``.
    """
    from .layers import dense_backward   # (imported here: the dense layer's module does not know MADE)
    x, Wm, mask = cache
    # the solution calls dense_backward (layers.py): a starter whose dense_backward is an exercise then carries
    # no second, complete copy of it in this file
    ### BEGIN SOLUTION masked_dense_backward
    dx, dW, db = dense_backward(dy, (x, Wm))    # the dense layer's gradients, with the weight the forward used
    dW = dW * mask                              # a masked-out weight gets 0 (a new array: dW is not modified)
    ### END SOLUTION
    return dx, dW, db


# ----------------------------------------------------------------------------
# degrees and masks
# ----------------------------------------------------------------------------
def hidden_degrees(n_in, width):
    """Degrees of ``width`` hidden units over ``n_in`` ordered inputs, (width,).

    1 + floor(k (n_in - 1) / width): spread evenly over 1..n_in - 1 (Germain et al. draw them at random), so
    every output sees hidden units that read the inputs just before it, whether width is below n_in or not.
    """
    return 1 + (np.arange(width) * max(1, n_in - 1)) // width


def made_masks(n_in, widths, n_groups=1, dtype="float64", xp=np):
    """The masks of a MADE with ``n_in`` ordered inputs, hidden layers of ``widths`` and ``n_groups`` output
    arrays of ``n_in`` entries each (group g's output o at columns g*n_in + o - 1).

    Returns a list of masks, one per weight: (n_in, widths[0]), (widths[0], widths[1]), ...,
    (widths[-1], n_groups * n_in).  See the module docstring for the rules.
    """
    if n_in < 1 or not widths or any(w < 1 for w in widths):
        raise ValueError(f"a MADE needs n_in >= 1 and at least one hidden width >= 1, got {n_in}, {widths}")
    deg_in = np.arange(1, n_in + 1)
    masks, prev = [], deg_in
    for w in widths:
        deg = hidden_degrees(n_in, w)
        masks.append(deg[None, :] >= prev[:, None])                # kept when deg_hidden >= deg_before
        prev = deg
    deg_out = np.tile(deg_in, n_groups)
    masks.append(deg_out[None, :] > prev[:, None])                 # strict: output o sees inputs < o only
    return [xp.asarray(m, dtype=dtype) for m in masks]


def connectivity(masks):
    """(n_in, n_out) 0/1 matrix: entry (i, o) is 1 when output o can depend on input i through the masks.

    The product of the masks, thresholded: a path exists when some chain of kept connections joins i to o.
    For a correct MADE it is strictly upper triangular within each output group (the test suite checks it).
    """
    reach = np.asarray(masks[0], dtype=np.float64)
    for m in masks[1:]:
        reach = (reach @ np.asarray(m, dtype=np.float64)) > 0
    return reach.astype(np.int64)
