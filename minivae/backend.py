"""The array backend: NumPy by default, CuPy on request.

Rules (the whole library follows them):

* Pure functions never consult global state: they find ``xp`` from their
  inputs with :func:`get_array_module`.
* Objects that *create* arrays (a ``VAE``, an optimizer) take the backend
  once, when they are built, and keep it.
* The *default* backend for new objects is, in order: the innermost
  :func:`use_backend` block, then :func:`set_backend`, then the environment
  variable ``MINIVAE_BACKEND``, then ``"numpy"``.  The environment is read
  when a backend is asked for, never at import time.
* Asking for CuPy without a usable GPU raises :class:`BackendError`.  There
  is no silent fallback to NumPy.
* Random numbers always come from a NumPy ``Generator`` on the host and are
  copied to the device (:func:`asarray`), so both backends see the same
  draws for the same seed.
"""
from __future__ import annotations

import contextlib
import os
import threading

import numpy as np

BACKENDS = ("numpy", "cupy")

_state = threading.local()
_global = {"name": None}


class BackendError(RuntimeError):
    """Raised when a backend is unknown or cannot be used on this machine."""


def _check_name(name):
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")
    return name


def cupy_available():
    """True when CuPy imports and sees at least one usable CUDA device."""
    try:
        import cupy  # noqa: F401
    except Exception:
        return False
    try:
        return bool(cupy.is_available())
    except Exception:
        return False


def get_xp(name):
    """Return the array module for backend ``name`` ("numpy" or "cupy")."""
    _check_name(name)
    if name == "numpy":
        return np
    try:
        import cupy
    except Exception as exc:  # ImportError, or a broken CUDA install
        raise BackendError(
            f"backend 'cupy' was requested but CuPy cannot be imported ({type(exc).__name__}: {exc}); "
            "install CuPy on a machine with an NVIDIA GPU: from a clone of minivae, pip install -e '.[cuda12x]' (or .[cuda13x])"
        ) from None
    if not cupy_available():
        raise BackendError("backend 'cupy' was requested but no usable CUDA GPU was found (cupy.is_available() is False)")
    return cupy


def get_backend():
    """Name of the backend new models and optimizers will use by default."""
    stack = getattr(_state, "stack", None)
    if stack:
        return stack[-1]
    if _global["name"] is not None:
        return _global["name"]
    env = os.environ.get("MINIVAE_BACKEND", "").strip().lower()
    if env:
        return _check_name(env)
    return "numpy"


def set_backend(name):
    """Set the default backend for objects created from now on.

    Pass ``None`` to go back to the environment/NumPy default.  Checking
    happens here, so ``set_backend("cupy")`` on a machine with no GPU raises.
    """
    if name is not None:
        get_xp(_check_name(name))
    _global["name"] = name


@contextlib.contextmanager
def use_backend(name):
    """Context manager: new objects created inside use backend ``name``."""
    get_xp(_check_name(name))
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    stack.append(name)
    try:
        yield get_xp(name)
    finally:
        stack.pop()


def get_array_module(*arrays):
    """``cupy`` if any argument is a CuPy array, else ``numpy``.

    This is how pure functions find ``xp``: the backend follows the data.
    """
    for a in arrays:
        mod = type(a).__module__
        if mod.startswith("cupy"):
            import cupy
            return cupy
    return np


def backend_name(xp):
    """"numpy" or "cupy" for an array module."""
    return "cupy" if xp.__name__.startswith("cupy") else "numpy"


def to_numpy(x):
    """Bring an array (or 0-d array / Python number) to the host as NumPy."""
    if type(x).__module__.startswith("cupy"):
        return x.get()
    return np.asarray(x)


def asarray(x, xp=np, dtype=None):
    """Put host or device data on backend ``xp`` with ``dtype``."""
    if xp is np:
        return np.asarray(to_numpy(x), dtype=dtype)
    return xp.asarray(x, dtype=dtype)


def resolve_dtype(dtype):
    """Accept "float32"/"float64" (or NumPy dtypes) and return a NumPy dtype."""
    dt = np.dtype(dtype)
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"dtype must be float32 or float64, got {dt}")
    return dt
