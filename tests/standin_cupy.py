"""A stand-in for CuPy on a machine without a GPU: NumPy arrays that *say* they live on the device.

The library finds an array's backend from its type's module (``minivae.backend.get_array_module``: a type
from a module named ``cupy...`` is a device array).  This module makes a module object called ``cupy`` whose
arrays are a NumPy subclass declared in that module, and whose functions are NumPy's, with their array
results turned into such arrays.  Put in ``sys.modules["cupy"]`` (:func:`installed`), it lets the CuPy code
paths of the library run on the CPU: a NumPy array that reaches code expecting the model's (device) arrays is
then caught exactly as on a GPU, where it is a ``TypeError``; nothing here makes a host array pass as a
device one.

The fused CuPy kernels of :mod:`minivae.fast` are C++ and cannot run here; :data:`FAST_KERNELS` are NumPy
twins of them (the same formulas as their ``operation`` strings), so FastTrainer's CuPy path runs too.  What
this checks is the *flow* of the CuPy path (which arrays go where, on which backend); the CUDA code itself is
compiled by tests/test_nvrtc.py and run by the gpu-marked tests.
"""
from __future__ import annotations

import contextlib
import sys
import types

import numpy as np


class ndarray(np.ndarray):
    """A NumPy array that claims to be a device array (its type's module is ``cupy``)."""

    def get(self):
        return np.array(self)                 # a host copy, as cupy.ndarray.get()


ndarray.__module__ = "cupy"


def _dev(a):
    if type(a) is np.ndarray:
        return a.view(ndarray)
    if isinstance(a, tuple):
        return tuple(_dev(v) for v in a)
    return a


def _wrap(fn):
    def call(*args, **kw):
        return _dev(fn(*args, **kw))
    call.__name__ = getattr(fn, "__name__", "fn")
    return call


def make_module():
    """A fresh stand-in ``cupy`` module."""
    mod = types.ModuleType("cupy")
    mod.ndarray = ndarray
    mod.is_available = lambda: True
    mod.__version__ = "stand-in"

    def asnumpy(a):
        return np.array(a)

    mod.asnumpy = asnumpy

    def _getattr(name):
        obj = getattr(np, name)                # AttributeError for what NumPy does not have either
        if isinstance(obj, type) or not callable(obj):
            return obj
        return _wrap(obj)

    mod.__getattr__ = _getattr
    return mod


# ---------------------------------------------------------------- NumPy twins of minivae.fast's CuPy kernels
def _bias_relu(b, a):
    np.maximum(a + b, a.dtype.type(0), out=a)


def _relu_bwd(h, d):
    d[...] = np.where(h > 0, d, d.dtype.type(0))


def _reparam(mu, lv, eps, sig, z):
    np.exp(lv.dtype.type(0.5) * lv, out=sig)
    np.add(mu, sig * eps, out=z)


def _latent_bwd(dz, mu, lv, sig, eps, c, dmu, dlv):
    t = dz.dtype.type
    np.add(dz, c * mu, out=dmu)
    np.add(dz * eps * (t(0.5) * sig), c * (t(0.5) * (np.exp(lv) - t(1))), out=dlv)


def _kl_terms(mu, lv):
    t = mu.dtype.type
    return _dev(np.asarray(t(0.5) * (mu * mu + np.exp(lv) - t(1) - lv).sum(dtype=mu.dtype)))


def _bernoulli(lg, x, invn, d, nll):
    t = lg.dtype.type
    e = np.exp(-np.abs(lg))
    r = t(1) / (t(1) + e)
    np.multiply(np.where(lg >= 0, r, e * r) - x, invn, out=d)
    np.add(np.maximum(lg, t(0)) + np.log1p(e), -x * lg, out=nll)


def _adam(g, b1, c1, b2, c2, lr_t, eps_t, p, m, v):
    m[...] = b1 * m + c1 * g
    v[...] = b2 * v + c2 * (g * g)
    p -= lr_t * m / (np.sqrt(v) + eps_t)


FAST_KERNELS = {"bias_relu": _bias_relu, "relu_bwd": _relu_bwd, "reparam": _reparam, "latent_bwd": _latent_bwd,
                "kl_terms": _kl_terms, "bernoulli": _bernoulli, "adam": _adam}


@contextlib.contextmanager
def installed(monkeypatch):
    """``sys.modules["cupy"]`` is the stand-in, and FastTrainer's CuPy kernels are the NumPy twins."""
    from minivae import fast
    mod = make_module()
    monkeypatch.setitem(sys.modules, "cupy", mod)
    saved = dict(fast._KERNELS)
    fast._KERNELS.clear()
    fast._KERNELS.update(FAST_KERNELS)
    try:
        yield mod
    finally:
        fast._KERNELS.clear()
        fast._KERNELS.update(saved)
