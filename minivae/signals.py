"""Ctrl-C and SIGTERM, handled one way by every command.

While :func:`handled` is active (the CLI wraps every command in it; :func:`minivae.train.train` too), SIGINT
raises :class:`Interrupted` and SIGTERM raises :class:`Terminated`, both ``KeyboardInterrupt``: the stack
unwinds through every ``finally`` and every atomic write (which removes its temporary file), and the CLI
prints one line and exits with 128 + the signal number (130, 143), as a shell reports a killed process.

An exception raised by a signal handler can be lost: Python runs the handler at the next bytecode of the
main thread, which may be inside a ``__del__``, a weakref callback or a library's ``except Exception``.  numba's
first compilation is such a place, and a bad one: LLVM calls back into Python through ctypes, the exception is
printed as "Exception ignored ..." and dropped, and the compilation is left broken.  So the handler always
records the signal, raises nothing while numba or llvmlite code is on the stack, and :func:`check` raises it at
the next safe point (each training step, each chunk of ``eval``'s IW bound and of ``sample``, the end of every
command): a signal is never swallowed, and never breaks a compilation.
"""
from __future__ import annotations

import contextlib
import signal
import threading

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class Interrupted(KeyboardInterrupt):
    """Raised for SIGINT (Ctrl-C) while :func:`handled` is active; ``signum`` says which signal."""

    signum = signal.SIGINT


class Terminated(Interrupted):
    """Raised for SIGTERM while :func:`handled` is active."""

    signum = signal.SIGTERM


_pending = None        # the signal number of a signal that arrived, until handled() ends
_depth = 0


# Code that must never see the handler's exception: numba compiling a kernel runs Python callbacks from LLVM (ctypes),
# where an exception is printed and dropped and leaves the compilation broken ("no compiled object yet"); there the
# signal is only recorded, and check() raises it at the next safe point, once the compilation is done.
DEFER_IN = ("numba", "llvmlite")


def _in_deferring_code(frame):
    while frame is not None:
        if str(frame.f_globals.get("__name__", "")).startswith(DEFER_IN):
            return True
        frame = frame.f_back
    return False


def _handler(signum, frame):
    global _pending
    _pending = signum
    if _in_deferring_code(frame):
        return
    raise Terminated() if signum == signal.SIGTERM else Interrupted()


def pending():
    """The number of the signal received inside :func:`handled`, or None."""
    return _pending


def check():
    """Raise the recorded signal's exception again (its first one may have been swallowed); else nothing."""
    if _pending is not None:
        raise Terminated() if _pending == signal.SIGTERM else Interrupted()


def signal_of(exc):
    """SIGTERM or SIGINT: the signal a KeyboardInterrupt stands for (a plain one is Ctrl-C)."""
    return getattr(exc, "signum", None) or signal.SIGINT


@contextlib.contextmanager
def handled():
    """SIGINT and SIGTERM raise :class:`Interrupted` / :class:`Terminated` inside the block (main thread only;
    elsewhere, and when already active, it changes nothing).  The previous handlers come back at the end."""
    global _pending, _depth
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if _depth:
        _depth += 1
        try:
            yield
        finally:
            _depth -= 1
        return
    prev = {}
    _pending = None
    try:
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                prev[s] = signal.signal(s, _handler)
            except (ValueError, OSError):
                pass
        _depth += 1
        yield
    finally:
        _depth -= 1
        for s, h in prev.items():
            signal.signal(s, h)
        _pending = None


@contextlib.contextmanager
def deferred():
    """Hold SIGINT and SIGTERM back (``pthread_sigmask``) for a short cleanup that must finish, e.g. removing a
    temporary file; a signal that arrives meanwhile is delivered, and raises, right after the block."""
    sigs = {signal.SIGINT, signal.SIGTERM}
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    except (AttributeError, OSError, ValueError):       # no sigmask (Windows): nothing to hold back
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
