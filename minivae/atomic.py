"""The one way minivae writes a file: atomically, beside its destination, never over its own input.

Every output of every command goes through :func:`atomic_write` (checkpoints, histories, settings,
results, ``eval --json``, samples, figures through :func:`save_figure`, downloads, the lessons' scripts
and notebooks through :func:`copy_file`).  It writes a temporary file ``.<name>.<random>.tmp`` in the
destination's folder (``.<name>.<pid>.<random>.tmp``), flushes and fsyncs it, then renames it onto the destination with ``os.replace``
(atomic on POSIX and Windows).  So a write that fails (a full disk, ``ulimit -f``, Ctrl-C, SIGTERM, an
exception inside the writer) leaves the previous file exactly as it was, and removes its temporary file; the
temporary file of a writer killed without a chance to clean up (SIGKILL) is removed by the next write of the same
file (:func:`remove_dead_temp_files`), and by the next command that takes its run folder's lock
(:func:`stale_temp_files`, :class:`minivae.train.RunLock`).

A failed write is a :class:`WriteError`: an ``OSError`` (same ``errno``) whose one-line message names the
file, e.g. ``cannot write runs/a/checkpoint.npz (No space left on device)``.

:func:`check_not_input` refuses an output path that is one of the files a command reads
(``eval --json RUN/checkpoint.npz`` would otherwise replace the checkpoint it evaluates).
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

TMP_SUFFIX = ".tmp"
# the exact name of atomic_write's temporary file: "." + the destination's name + "." + the writer's PID + "." +
# mkstemp's 8 random characters (a-z, 0-9, _) + ".tmp"; the only files that stale_temp_files may remove
TEMP_NAME = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)\.[a-z0-9_]{8}\.tmp")


class WriteError(OSError):
    """Writing an output file failed; the message names the file and the reason, the old file is intact."""

    def __init__(self, errno_, message, path):
        super().__init__(errno_, message)
        self.message, self.path = message, path

    def __str__(self):
        return self.message


def _umask():
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path, write, mode="wb"):
    """Call ``write(fileobj)`` on a temp file beside ``path``, fsync, then rename onto ``path``.

    The one atomic-write helper of the package.  The temporary file is ``.<name>.<random>.tmp`` in the
    same folder; it is removed if ``write`` raises (including KeyboardInterrupt and the SIGTERM of
    :mod:`minivae.signals`).  The final file gets the permissions the umask gives a new file
    (0666 & ~umask), like any file ``open`` creates, not the 0600 of ``tempfile.mkstemp``.  An ``OSError``
    of the file system (ENOSPC, EFBIG under ``ulimit -f``, EACCES...) becomes a :class:`WriteError`
    naming ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_dead_temp_files(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=TMP_SUFFIX, dir=path.parent)
    except OSError as exc:
        raise _write_error(exc, path) from None
    try:
        try:
            os.fchmod(fd, 0o666 & ~_umask())
        except (AttributeError, OSError):       # no fchmod (Windows): keep mkstemp's mode
            pass
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        from .signals import deferred
        with deferred():                # a second Ctrl-C cannot leave the temporary file behind
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        if isinstance(exc, OSError) and not isinstance(exc, WriteError) and type(exc).__module__ == "builtins":
            raise _write_error(exc, path) from None
        raise
    try:  # make the rename itself durable (POSIX only; harmless to skip elsewhere)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return path


def _write_error(exc, path):
    reason = exc.strerror or str(exc) or type(exc).__name__
    return WriteError(exc.errno, f"cannot write {path} ({reason}); the previous file, if any, is unchanged",
                      Path(path))


def save_figure(fig, path, **kwargs):
    """``fig.savefig`` through :func:`atomic_write` (PNG unless ``path`` says otherwise, 100 dpi, tight)."""
    path = Path(path)
    kw = dict(dpi=100, bbox_inches="tight", format=(path.suffix[1:] or "png"))
    kw.update(kwargs)
    return atomic_write(path, lambda f: fig.savefig(f, **kw))


def copy_file(src, dst):
    """Copy ``src`` to ``dst`` through :func:`atomic_write`."""
    import shutil

    def write(f):
        with open(src, "rb") as s:
            shutil.copyfileobj(s, f)
    return atomic_write(dst, write)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):          # another user's process, or no way to ask: assume alive
        return True
    return True


# a temporary file is another writer's until it has not changed for this long (a writer in another PID namespace
# sharing the folder looks dead to os.kill, but it keeps writing)
STALE_AFTER_S = 600.0


def _untouched_for(p, seconds):
    import time
    try:
        return time.time() - p.stat().st_mtime > seconds
    except OSError:
        return False


def remove_dead_temp_files(path):
    """Remove the temporary files ``.<name>.<pid>.<random>.tmp`` of ``path`` whose writer ``pid`` is gone (a
    SIGKILL, a power loss) and that have not changed for STALE_AFTER_S: the next write of the same file cleans up
    after it.  A live writer's file is kept.
    Returns the removed paths."""
    path = Path(path)
    removed = []
    prefix = f".{path.name}."
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return removed
    for p in entries:
        name = p.name
        if not (name.startswith(prefix) and name.endswith(TMP_SUFFIX)):
            continue
        pid = name[len(prefix):-len(TMP_SUFFIX)].split(".")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)) and _untouched_for(p, STALE_AFTER_S):
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass
    return removed


def stale_temp_files(folder):
    """The temporary files that :func:`atomic_write` left in ``folder`` when its writer was killed without a chance
    to clean up (SIGKILL, power loss): names that match :data:`TEMP_NAME` exactly, whose writer PID is not a live
    process (nor this one).  Nothing else is ever listed: a file of the user's own named ``.notes.tmp``, or
    ``.x.123.abc.tmp``, is not minivae's.

    The caller must hold the folder's run lock (:class:`minivae.train.RunLock`) before removing them: that says no
    run writes there now, and the PID says no other command's write is under way.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for p in sorted(folder.iterdir()):
        m = TEMP_NAME.fullmatch(p.name)
        if m and int(m["pid"]) != os.getpid() and not _alive(int(m["pid"])) and p.is_file() and not p.is_symlink():
            found.append(p)
    return found


def same_file(a, b):
    """True if the paths ``a`` and ``b`` name one file (through links and ``..`` too); False if either is missing."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def check_not_input(out, inputs, flag):
    """ValueError (one line) if the output ``out`` is one of the files in ``inputs`` (the command's own input).

    ``flag`` names the option that chose ``out`` (``--json``, ``--out``).  ``inputs`` may hold folders:
    an output inside one of them is refused only if it is one of the files there that the command reads,
    so give files where you can.
    """
    for src in inputs:
        if src is not None and same_file(out, src):
            raise ValueError(f"{flag} {out} is {src}, a file this command reads; writing there would replace "
                             "its own input: choose another path")
    return out
