"""How many threads the fast path runs on, set in one place: NumPy's BLAS, numba's kernels, the split step.

    from minivae.fast import threads
    with threads.using(4):          # BLAS and the fused kernels on 4 threads until the block ends
        ...

``train``, ``eval`` and ``sample`` (``--threads N``) run inside :func:`using`.  What N sets:

* NumPy's BLAS (OpenBLAS, MKL, BLIS, Accelerate...), through threadpoolctl, which finds the BLAS that
  NumPy has loaded on every OS;
* numba's threads for the fused kernels of :mod:`minivae.fast.cpu_kernels` (at most the cores numba
  started with, ``NUMBA_NUM_THREADS``; a larger N still sets BLAS);
* the dense fast path's step (:class:`~minivae.fast.FastTrainer` takes :func:`count`), and the conv ops'
  fused copies.

Without N (``using(None)``), the fast path uses every core the process may run on, and BLAS keeps its own
setting: all cores, unless the environment says otherwise (``OPENBLAS_NUM_THREADS``, ``OMP_NUM_THREADS``).

The fused kernels give the same bits on any thread count (every sum they split is split into fixed blocks
added in a fixed order).  BLAS need not: OpenBLAS splits a large product differently on another thread
count, which can change a float32 run's last bits.  So a run is reproduced bit for bit with the same seed,
backend and thread count.
"""
from __future__ import annotations

import contextlib
import os

from . import cpu_kernels

_COUNT = [None]          # the count set by using(); None: every core
_BLAS = []               # [(set, get) or None], found on first use


def all_cores():
    """The number of CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):                 # macOS, Windows: no affinity mask
        return max(1, os.cpu_count() or 1)


def check_count(n):
    """``n`` as an int >= 1; ValueError (one line) otherwise."""
    if isinstance(n, bool) or not isinstance(n, (int, float)) or int(n) != n or n < 1:
        raise ValueError(f"threads must be a positive integer, got {n!r}")
    return int(n)


def count():
    """The thread count in effect: the one :func:`using` set, else every core."""
    return _COUNT[0] if _COUNT[0] is not None else all_cores()


def set_numba_threads(n):
    """Threads for the parallel kernels launched from the calling thread (numba's setting is per thread),
    at most the ``NUMBA_NUM_THREADS`` numba started with.  Without numba, nothing."""
    if cpu_kernels.AVAILABLE:
        cpu_kernels.start_threads()
        numba = cpu_kernels.numba
        numba.set_num_threads(max(1, min(int(n), numba.config.NUMBA_NUM_THREADS)))


def numba_threads():
    """The calling thread's numba thread count (1 without numba)."""
    return cpu_kernels.numba.get_num_threads() if cpu_kernels.AVAILABLE else 1


# ----------------------------------------------------------------------------
# BLAS, through threadpoolctl
# ----------------------------------------------------------------------------
def _find_blas():
    """(set(n), get()) for the thread count of NumPy's BLAS, through threadpoolctl; None if unavailable."""
    if _BLAS:
        return _BLAS[0]
    found = None
    try:
        from threadpoolctl import ThreadpoolController
        libs = ThreadpoolController().select(user_api="blas").lib_controllers
        if libs:
            def fset(n, libs=libs):
                for lib in libs:
                    lib.set_num_threads(int(n))

            def fget(lib=libs[0]):
                return int(lib.get_num_threads())
            found = (fset, fget)
    except Exception:                                  # threadpoolctl missing or no BLAS found
        found = None
    _BLAS.append(found)
    return found


def blas_control_available():
    """True if the thread count of NumPy's BLAS can be set (as ``using(n)`` and the split step need)."""
    return _find_blas() is not None


def blas_threads():
    """NumPy's BLAS thread count now, or None when it cannot be read."""
    found = _find_blas()
    return None if found is None else found[1]()


def set_blas_threads(n):
    """Set BLAS's thread count (process-wide); returns the previous one.  Needs :func:`blas_control_available`.

    The plain global setter: OpenBLAS's per-thread setter (``openblas_set_num_threads_local``) changed the
    count seen by every thread in the OpenBLAS NumPy ships (benchmarks/README.md, "Notes from the code")."""
    fset, fget = _find_blas()
    prev = fget()
    if prev != n:
        fset(n)
    return prev


def set_count(n):
    """Set the fast path's thread count (None: every core) until changed again; returns the previous setting.
    BLAS is left alone (:func:`using` sets both, for a block)."""
    prev = _COUNT[0]
    _COUNT[0] = None if n is None else check_count(n)
    return prev


@contextlib.contextmanager
def using(n=None):
    """While active: the fast path on ``n`` threads (None: every core), BLAS on ``n`` when given.

    Sets numba's count for the calling thread and, when ``n`` is given, BLAS's (process-wide); both are
    restored when the block ends.  Yields the count in effect."""
    n = None if n is None else check_count(n)
    prev_count = _COUNT[0]
    prev_numba = numba_threads()
    prev_blas = set_blas_threads(n) if n is not None and blas_control_available() else None
    _COUNT[0] = n
    try:
        set_numba_threads(count())
        yield count()
    finally:
        _COUNT[0] = prev_count
        if cpu_kernels.AVAILABLE:
            cpu_kernels.numba.set_num_threads(prev_numba)
        if prev_blas is not None:
            set_blas_threads(prev_blas)
