"""Dense (affine) layer and elementwise activations, as forward/backward pairs.

Convention (CS231n style): ``op_forward(...) -> (out, cache)`` and
``op_backward(dout, cache) -> grads``.  ``dout`` is dL/d(out) for some scalar
loss L; every backward returns dL/d(input) with the input's shape.

Shapes: ``N`` batch, ``D_in``/``D_out`` layer widths.  Rows are examples.

The regions between ``### BEGIN SOLUTION`` and ``### END SOLUTION`` are the
course exercises: in a student copy, each holds a stub for you to replace.
"""
from __future__ import annotations

from .backend import get_array_module


# ----------------------------------------------------------------------------
# dense
# ----------------------------------------------------------------------------
def dense_forward(x, W, b):
    """Affine map ``y = x @ W + b``.

    Shapes: x (N, D_in), W (D_in, D_out), b (D_out,) -> y (N, D_out).
    """
    y = x @ W
    y += b
    return y, (x, W)


def dense_backward(dy, cache):
    """Gradients of the affine map.

    With y_nj = sum_i x_ni W_ij + b_j and upstream G = dL/dy (N, D_out):

    Derivation (dL/dx (N, D_in), dL/dW (D_in, D_out) and dL/db (D_out,) from G):
        dL/dx = G @ W.T          (N, D_in)
        dL/dW = x.T @ G          (D_in, D_out)
        dL/db = sum_n G_n        (D_out,)
    (end of derivation)

    Returns ``(dx, dW, db)``.
    """
    x, W = cache
    ### BEGIN SOLUTION dense_backward
    dx = dy @ W.T              # dL/dx_ni = sum_j G_nj W_ij
    dW = x.T @ dy              # dL/dW_ij = sum_n x_ni G_nj
    db = dy.sum(axis=0)        # dL/db_j  = sum_n G_nj
    ### END SOLUTION
    return dx, dW, db


# ----------------------------------------------------------------------------
# activations (elementwise; any shape)
# ----------------------------------------------------------------------------
def relu_forward(x):
    """ReLU: ``y = max(x, 0)``."""
    xp = get_array_module(x)
    y = xp.maximum(x, 0)
    return y, x


def relu_backward(dy, cache):
    """ReLU backward: y = max(x, 0), dy (N, D) -> dx (N, D).

    Derivation (dy/dx, and from it dL/dx):
    dy/dx = 1[x > 0]  (we take the derivative at the kink x = 0 to be 0).
    (end of derivation)

    Finite differences are wrong within ``h`` of the kink, so gradient
    checks keep inputs away from 0.
    """
    x = cache
    ### BEGIN SOLUTION relu_backward
    dx = dy * (x > 0)          # dL/dx = dL/dy * 1[x > 0]
    ### END SOLUTION
    return dx


def leaky_relu_forward(x, alpha=0.01):
    """LeakyReLU: ``y = x`` for x > 0, ``alpha * x`` otherwise."""
    xp = get_array_module(x)
    y = xp.where(x > 0, x, x * alpha)
    return y, (x, alpha)


def leaky_relu_backward(dy, cache):
    """dy/dx = 1 for x > 0, alpha otherwise."""
    x, alpha = cache
    xp = get_array_module(x)
    return xp.where(x > 0, dy, dy * alpha)


def tanh_forward(x):
    """``y = tanh(x)``; cache the output (its backward needs only y)."""
    xp = get_array_module(x)
    y = xp.tanh(x)
    return y, y


def tanh_backward(dy, cache):
    """tanh backward: y = tanh(x), dy (N, D) -> dx (N, D); the cache is y.

    Derivation (dy/dx in terms of y):
    dy/dx = 1 - tanh(x)**2 = 1 - y**2.
    (end of derivation)
    """
    y = cache
    ### BEGIN SOLUTION tanh_backward
    dx = dy * (1 - y * y)      # dL/dx = dL/dy * (1 - y^2)
    ### END SOLUTION
    return dx


def sigmoid(x):
    """Overflow-safe logistic function ``1 / (1 + exp(-x))``.

    Why: ``exp(-x)`` overflows to inf for x < -88 in float32 (-709 in float64)
    and NumPy warns.  We only ever exponentiate a non-positive number:

        e = exp(-|x|)  in (0, 1]
        sigmoid(x) = 1 / (1 + e)   for x >= 0
                   = e / (1 + e)   for x <  0
    """
    xp = get_array_module(x)
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1, e) / (1 + e)


def sigmoid_forward(x):
    """``y = sigmoid(x)`` (stable, see :func:`sigmoid`)."""
    y = sigmoid(x)
    return y, y


def sigmoid_backward(dy, cache):
    """sigmoid backward: y = sigmoid(x), dy (N, D) -> dx (N, D); the cache is y.

    Derivation (dy/dx in terms of y):
    dy/dx = sigmoid(x) * (1 - sigmoid(x)) = y * (1 - y).
    (end of derivation)
    """
    y = cache
    ### BEGIN SOLUTION sigmoid_backward
    dx = dy * y * (1 - y)      # dL/dx = dL/dy * y (1 - y)
    ### END SOLUTION
    return dx


def softplus(x):
    """Overflow-safe ``log(1 + exp(x))``.

    Why: exp(x) overflows for large x.  Use the identity
        log(1 + e^x) = max(x, 0) + log(1 + e^{-|x|}),
    where the exponent is never positive, and log1p keeps precision when
    e^{-|x|} is tiny.
    """
    xp = get_array_module(x)
    return xp.maximum(x, 0) + xp.log1p(xp.exp(-xp.abs(x)))


def softplus_forward(x):
    """``y = softplus(x) = log(1 + exp(x))`` (stable)."""
    return softplus(x), x


def softplus_backward(dy, cache):
    """d softplus(x)/dx = sigmoid(x)."""
    x = cache
    return dy * sigmoid(x)


def identity_forward(x):
    """``y = x`` (the output layer of a Gaussian mean, for example)."""
    return x, None


def identity_backward(dy, cache):
    """dy/dx = 1."""
    return dy


# ----------------------------------------------------------------------------
# The registry: the hidden nonlinearities a VAEConfig can name
# ----------------------------------------------------------------------------
ACTIVATIONS = {}   # name -> (forward, backward)


def register_activation(name, forward, backward):
    """Make ``name`` a hidden activation: one op pair, ``forward(x) -> (y, cache)`` and
    ``backward(dy, cache) -> dx``, elementwise on any shape.  VAEConfig, the model (reference and fast
    path) and the command line accept it from then on; nothing else needs to change."""
    if not (callable(forward) and callable(backward)):
        raise TypeError(f"activation {name!r}: forward and backward must be functions")
    ACTIVATIONS[name] = (forward, backward)
    return forward, backward


register_activation("relu", relu_forward, relu_backward)
register_activation("leaky_relu", leaky_relu_forward, leaky_relu_backward)
register_activation("tanh", tanh_forward, tanh_backward)
register_activation("sigmoid", sigmoid_forward, sigmoid_backward)
register_activation("softplus", softplus_forward, softplus_backward)


def activation(name):
    """Return the ``(forward, backward)`` pair for an activation name: a registered one, or ``"identity"``
    (an op pair too, but no hidden nonlinearity, so not one a config can name)."""
    if name == "identity":
        return identity_forward, identity_backward
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}: choose one of {', '.join(ACTIVATIONS)}") from None
