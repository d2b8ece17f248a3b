"""Gradient checking: compare a hand-derived backward with finite differences.

The recipe (use float64 throughout):

1. Pick inputs away from kinks (ReLU at 0) and a *random* upstream gradient
   ``dout``.  With a random ``dout`` the scalar being differentiated is
   ``L = sum(out * dout)``, so every output entry matters with a different
   weight and a backward that, say, transposes the wrong thing cannot pass
   by symmetry (an all-ones dout would hide many such bugs).
2. Numerically, for every input entry x_i:
       dL/dx_i ~ (L(x + h e_i) - L(x - h e_i)) / (2 h)         (error O(h^2))
3. Score with the relative error of the whole array,

       rel_error(a, n) = max_i |a_i - n_i| / max_i (|a_i| + |n_i|),

   and ask for something like 1e-7 in float64.  Normalising by the array's
   largest entry (rather than entry by entry) keeps the score meaningful when
   some true gradients are exactly 0 (a dead ReLU unit): there both numbers
   are pure round-off, and an entrywise ratio of two round-off errors is noise.

``numerical_gradient`` and ``rel_error`` are the two tools; ``check_op`` and
``check_model`` run the whole comparison and raise :class:`GradientCheckError`
with a readable report (which gradient, the worst entry, both values).
"""
from __future__ import annotations

import numpy as np

from .backend import get_array_module, to_numpy


class GradientCheckError(AssertionError):
    """A backward pass disagrees with finite differences."""


def rel_error(a, b, tiny=1e-300):
    """max_i |a_i - b_i| / max_i (|a_i| + |b_i|): 0 means identical, 1 unrelated."""
    return _worst(a, b, tiny)[0]


def _worst(a, n, tiny=1e-300):
    """(rel_error, index of the worst entry, a there, n there)."""
    a, n = to_numpy(a).astype(np.float64), to_numpy(n).astype(np.float64)
    if a.shape != n.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {n.shape}")
    if a.size == 0:
        return 0.0, (), 0.0, 0.0
    diff = np.abs(a - n)
    idx = np.unravel_index(int(np.argmax(np.where(np.isnan(diff), np.inf, diff))), diff.shape)
    scale = max(float(np.max(np.abs(a) + np.abs(n))), tiny)
    err = float(diff[idx]) / scale
    idx = tuple(int(i) for i in idx)
    return err, idx, float(a[idx]), float(n[idx])


def numerical_gradient(f, x, dout=None, h=1e-5):
    """Central-difference gradient of ``sum(f() * dout)`` with respect to ``x``.

    ``f`` takes no arguments and reads ``x``, which is perturbed in place
    (and restored).  With ``dout=None``, ``f`` must return a scalar.
    Returns an array shaped like ``x``.
    """
    xp = get_array_module(x)
    grad = xp.zeros_like(x)
    flat_x = x.reshape(-1)
    flat_g = grad.reshape(-1)
    if not x.flags.c_contiguous:
        raise ValueError("x must be C-contiguous so it can be perturbed in place")

    def scalar():
        out = f()
        if dout is None:
            return float(to_numpy(out))
        return float(to_numpy((out * dout).sum()))

    for i in range(flat_x.size):
        old = flat_x[i].item()
        flat_x[i] = old + h
        fp = scalar()
        flat_x[i] = old - h
        fm = scalar()
        flat_x[i] = old
        flat_g[i] = (fp - fm) / (2 * h)
    return grad


def check_op(forward, backward, inputs, names=None, rng=None, tol=1e-7, h=1e-5):
    """Check an op pair ``forward(*inputs) -> (out, cache)``, ``backward(dout, cache)``.

    ``backward`` must return one gradient per input (a single array when there
    is one input).  Uses a random upstream gradient ``dout``.  Returns
    ``{name: rel_error}`` and raises :class:`GradientCheckError` on failure.
    """
    rng = np.random.default_rng(0) if rng is None else rng
    names = names or [f"x{i}" for i in range(len(inputs))]
    out, cache = forward(*inputs)
    xp = get_array_module(out)
    dout = xp.asarray(rng.standard_normal(out.shape), dtype=out.dtype)
    grads = backward(dout, cache)
    if not isinstance(grads, (tuple, list)):
        grads = (grads,)
    if len(grads) != len(inputs):
        raise GradientCheckError(f"backward returned {len(grads)} gradients for {len(inputs)} inputs")
    report = {}
    for name, x, g in zip(names, inputs, grads):
        if tuple(g.shape) != tuple(x.shape):
            raise GradientCheckError(f"gradient for {name} has shape {tuple(g.shape)}, expected {tuple(x.shape)}")
        num = numerical_gradient(lambda: forward(*inputs)[0], x, dout, h)
        report[name] = _assert_close(name, g, num, tol)
    return report


def _assert_close(name, analytic, numeric, tol):
    err, idx, a, n = _worst(analytic, numeric)
    if not err <= tol:   # also catches NaN
        raise GradientCheckError(
            f"gradient check failed for {name}: rel error {err:.3e} > {tol:.0e} at index {idx} "
            f"(analytic {a:.8g}, numerical {n:.8g})")
    return err


def check_model(model, x, eps=None, beta=1.0, n_samples=1, tol=1e-7, h=1e-5, max_entries=None, rng=None,
                loss_kwargs=None, y=None):
    """Check every parameter of ``model.loss`` against finite differences.

    ``eps`` is fixed (drawn once if None) so the loss is a deterministic
    function of the parameters.  ``max_entries`` checks only that many random
    entries per parameter (all by default).  ``y``: the labels (N,) of a conditional model.
    Returns ``{name: rel_error}``; raises :class:`GradientCheckError` naming the first bad parameter.
    """
    rng = np.random.default_rng(0) if rng is None else rng
    loss_kwargs = dict(loss_kwargs or {})
    if y is not None:
        loss_kwargs["y"] = y
    if eps is None:
        eps = rng.standard_normal((n_samples, np.shape(x)[0], model.config.z_dim))
    _, grads = model.loss(x, eps=eps, beta=beta, n_samples=n_samples, **loss_kwargs)
    grads = {k: to_numpy(v).copy() for k, v in grads.items()}

    def f():
        return model.loss(x, eps=eps, beta=beta, n_samples=n_samples, backward=False, **loss_kwargs)[0]

    report = {}
    for name, p in model.params.items():
        flat_p = p.reshape(-1)
        if max_entries is None or flat_p.size <= max_entries:
            idxs = np.arange(flat_p.size)
        else:
            idxs = rng.choice(flat_p.size, size=max_entries, replace=False)
        num = np.zeros(len(idxs))
        for j, i in enumerate(idxs):
            old = float(flat_p[i])
            flat_p[i] = old + h
            fp = float(to_numpy(f()))
            flat_p[i] = old - h
            fm = float(to_numpy(f()))
            flat_p[i] = old
            num[j] = (fp - fm) / (2 * h)
        report[name] = _assert_close(name, grads[name].reshape(-1)[idxs], num, tol)
    return report
