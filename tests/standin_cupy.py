"""A stand-in for CuPy on a machine without a GPU: NumPy arrays that *say* they live on the device.

The library finds an array's backend from its type's module (``minivae.backend.get_array_module``: a type
from a module named ``cupy...`` is a device array).  This module makes a module object called ``cupy`` whose
arrays are a NumPy subclass declared in that module, and whose functions are NumPy's, with their array
results turned into such arrays.  Put in ``sys.modules["cupy"]`` (:func:`installed`), it lets the CuPy code
paths of the library run on the CPU: a NumPy array that reaches code expecting the model's (device) arrays is
then caught exactly as on a GPU, where it is a ``TypeError`` (a 0-d one, or one inside a list such as
``cupy.concatenate``'s, too); nothing here makes a host array pass as a device one.  The other way round,
``np.asarray(a device array)`` in the library is a ``TypeError`` as on CuPy (:func:`installed`): a device
array reaches the host by ``.get()`` or ``cupy.asnumpy`` only.

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


def _host_arrays(values):
    # into lists and tuples too: cupy.concatenate([device, host]) is refused as well ("Only cupy arrays can be
    # concatenated")
    found = []
    for v in values:
        if isinstance(v, (list, tuple)):
            found += _host_arrays(v)
        elif type(v) is np.ndarray:
            found.append(v)
    return found


def _refuse_host(values, what):
    # CuPy refuses host arrays in device operations ("Unsupported type <class 'numpy.ndarray'>"): no implicit
    # copies.  So does the stand-in, so that a host array where a device one belongs fails here as on a GPU.
    if _host_arrays(values):
        raise TypeError(f"Unsupported type <class 'numpy.ndarray'> in {what} (a host array among device arrays)")


class ndarray(np.ndarray):
    """A NumPy array that claims to be a device array (its type's module is ``cupy``)."""

    def get(self):
        return self.view(np.ndarray).copy()   # a host copy, as cupy.ndarray.get()

    def __array_ufunc__(self, ufunc, method, *inputs, **kw):
        out = kw.get("out", ())
        _refuse_host(list(inputs) + list(out), f"{ufunc.__name__}.{method}" if method != "__call__" else ufunc.__name__)
        base = lambda v: v.view(np.ndarray) if isinstance(v, ndarray) else v  # noqa: E731
        if out:
            kw["out"] = tuple(base(v) for v in out)
        res = getattr(ufunc, method)(*[base(v) for v in inputs], **kw)
        if out:
            return out[0] if len(out) == 1 else out
        return _dev(res)


ndarray.__module__ = "cupy"


def _dev(a):
    if type(a) is np.ndarray:
        return a.view(ndarray)
    if isinstance(a, tuple):
        return tuple(_dev(v) for v in a)
    return a


_CONVERTERS = {"asarray", "array", "ascontiguousarray", "asanyarray"}


_NUMPY_CONVERTERS = {name: getattr(np, name) for name in _CONVERTERS}


def _wrap(fn, name):
    def call(*args, **kw):
        if name not in _CONVERTERS:
            _refuse_host(list(args) + list(kw.values()), f"cupy.{name}")
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
        return a.get() if isinstance(a, ndarray) else _NUMPY_CONVERTERS["array"](a)

    mod.asnumpy = asnumpy

    def _getattr(name):
        obj = _NUMPY_CONVERTERS.get(name) or getattr(np, name)   # AttributeError for what NumPy does not have either
        if isinstance(obj, type) or not callable(obj):
            return obj
        return _wrap(obj, name)

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


def _on_views(fn):
    """A kernel twin works on plain NumPy views of the (stand-in) device arrays it is given, as a kernel does."""
    def call(*args):
        return fn(*[a.view(np.ndarray) if isinstance(a, ndarray) else a for a in args])
    return call


FAST_KERNELS = {k: _on_views(f) for k, f in {
    "bias_relu": _bias_relu, "relu_bwd": _relu_bwd, "reparam": _reparam, "latent_bwd": _latent_bwd,
    "kl_terms": _kl_terms, "bernoulli": _bernoulli, "adam": _adam}.items()}


def _no_implicit_copy(fn):
    # CuPy refuses np.asarray(a device array) ("Implicit conversion to a NumPy array is not allowed"): a device
    # array reaches the host only by .get() or cupy.asnumpy.  NumPy lets the stand-in's arrays (a NumPy
    # subclass) through, so np.asarray, np.array, ... refuse them here when the library calls them (NumPy's own
    # Python code calls them too, where CuPy would have taken the call over: those pass)
    def call(a, *args, **kw):
        if isinstance(a, ndarray) and sys._getframe(1).f_globals.get("__name__", "").startswith("minivae"):
            raise TypeError("Implicit conversion to a NumPy array is not allowed. Please use `.get()` to construct "
                            "a NumPy array explicitly.")
        return fn(a, *args, **kw)
    call.__name__ = fn.__name__
    return call


@contextlib.contextmanager
def installed(monkeypatch):
    """``sys.modules["cupy"]`` is the stand-in, and FastTrainer's CuPy kernels are the NumPy twins."""
    from minivae.fast import ops_cupy
    mod = make_module()
    monkeypatch.setitem(sys.modules, "cupy", mod)
    for name, fn in _NUMPY_CONVERTERS.items():          # np.asarray(device array): a TypeError, as on CuPy
        monkeypatch.setattr(np, name, _no_implicit_copy(fn))
    monkeypatch.setenv("MINIVAE_CONV_KERNELS", "0")      # conv's CUDA im2col/col2im cannot run here: the CuPy slices do
    saved = dict(ops_cupy._BUILT)
    ops_cupy._BUILT.clear()
    ops_cupy._BUILT.update(FAST_KERNELS)
    try:
        yield mod
    finally:
        ops_cupy._BUILT.clear()
        ops_cupy._BUILT.update(saved)
