"""A run's folder: one writer at a time, a fresh or resumable folder, and the history files.

    out/.lock            held (fcntl.flock) by the run writing here, for its whole duration (:class:`RunLock`)
    out/checkpoint.npz   the last complete epoch (minivae.checkpoint, written atomically)
    out/history.json     one record per epoch, and history.csv, the same as a table (:func:`write_history`)
    out/settings.json    the run's settings;  out/results.json  the final report;  out/figures/

A new run needs a new or empty folder (or ``force``, :func:`check_fresh_folder`).  Whoever takes the lock (a run,
and every command that reads a run's checkpoint, :func:`tidy_run_folder`) first removes the temporary files that a
killed writer left in the folder and its figures/ (:func:`minivae.atomic.stale_temp_files`: minivae's own names
only, of writers that are gone).
"""
from __future__ import annotations

import csv
import errno
import io
import json
import math
import os
import re
import time
from pathlib import Path

import numpy as np

from ..atomic import stale_temp_files
from ..checkpoint import CheckpointError, atomic_write, load_checkpoint

CHECKPOINT = "checkpoint.npz"
# the run's own files: a folder holding any of these is "not empty" for a new run
RUN_FILES = (CHECKPOINT, "history.json", "history.csv", "results.json", "settings.json", "figures")
LOCK_FILE = ".lock"
# the pictures a run writes into figures/ (minivae.figures.run_figures), and the files `sample` writes there by
# default (samples.png, samples-2.npz, samples_label3.png...): --force removes these names, never others
FIGURE_FILES = ("reconstructions.png", "samples.png", "class_grid.png", "loss_curves.png", "interpolation.png",
                "neighbourhood.png", "manifold.png", "latent_scatter.png")
_SAMPLE_FILE = re.compile(r"samples(_label\d+)?(-\d+)?\.(png|npz)")
_TEMP_FILE = re.compile(r"\.(.+)\.\d+\.[^.]+\.tmp")          # atomic_write's .<name>.<pid>.<random>.tmp


def is_figure_file(name):
    """True if ``name`` (or the temporary file ``name`` stands for) is a file minivae writes into figures/."""
    temp = _TEMP_FILE.fullmatch(name)
    name = temp.group(1) if temp else name
    return name in FIGURE_FILES or _SAMPLE_FILE.fullmatch(name) is not None


class RunLocked(RuntimeError):
    """Another process holds the run folder's lock."""


class RunLock:
    """An exclusive lock on a run folder for the whole run: ``fcntl.flock`` on ``folder/.lock``.

    The lock file holds the holder's PID, for the error message of the second
    writer.  The kernel drops the lock when the process ends, however it ends
    (even SIGKILL), so a lock is never stale.  Where ``fcntl`` does not exist
    (Windows) runs are not locked.
    """

    def __init__(self, folder, create=True):
        self.folder = Path(folder)
        self.create = create             # False: only a folder that has a lock file already (a run's) is locked
        self.fd = None
        self.removed = []                # the stale temporary files removed on acquiring (stale_temp_files)

    def acquire(self):
        """Take the lock (RunLocked if another process holds it), then remove the temporary files that writers
        killed without a chance to clean up left in the folder and its figures/ (:attr:`removed` lists them).
        ``create=False``: a folder without a lock file raises FileNotFoundError, and nothing is created."""
        try:
            import fcntl
        except ImportError:              # Windows: no flock, so no way to know the folder is ours: nothing removed
            return self
        if self.create:
            self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / LOCK_FILE
        fd = os.open(path, os.O_RDWR | (os.O_CREAT if self.create else 0), 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            try:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            finally:
                os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunLocked(f"{self.folder} is in use by another minivae run (PID {holder}); wait for it "
                                "to end or choose another output folder") from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        self.removed = remove_stale(self.folder)
        return self

    def release(self):
        if self.fd is not None:
            import fcntl
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def new_run_dir(base, prefix):
    """Create and return a fresh folder ``base/prefix-YYYYMMDD-HHMMSS-ffffff`` (``-2``, ``-3``... on a clash).

    ``os.mkdir`` fails if the folder exists, so two runs started at the same
    microsecond still get two folders.
    """
    base = Path(base)
    base.mkdir(parents=True, exist_ok=True)
    now = time.time()
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now)) + f"-{int(now % 1 * 1e6):06d}"
    for i in range(1, 10000):
        d = base / (f"{prefix}-{stamp}" + (f"-{i}" if i > 1 else ""))
        try:
            os.mkdir(d)
            return d
        except FileExistsError:
            continue
    raise OSError(f"{base}: could not create a new run folder")


def check_fresh_folder(out, force):
    """CheckpointError (one line) unless ``out`` is new, empty, or ``force`` lets a new run replace its files.

    A ``settings.json`` alone (no checkpoint) is what a failed run of an older minivae left (a run now writes
    its settings with its first checkpoint): it is no run, and a new run replaces it.  Returns the names of the
    run files the new run must remove first (everything of :data:`RUN_FILES` with ``force``)."""
    ckpt_path = out / CHECKPOINT
    if not out.is_dir():
        return []
    if ckpt_path.exists() and not force:
        raise CheckpointError(f"{out} already holds a run ({CHECKPOINT}); pass resume (--resume) to continue it, "
                              "force (--force) to start over, or choose another output folder")
    present = sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE and not p.name.endswith(".tmp"))
    if present == ["settings.json"]:
        return present
    if present and not force:
        raise CheckpointError(f"{out} is not empty (it holds {', '.join(present[:5])}"
                              f"{', ...' if len(present) > 5 else ''}); pass force (--force) to overwrite the "
                              "run's files, or choose another output folder")
    return [name for name in RUN_FILES if (out / name).exists()] if force else []


def remove_run_files(out, names):
    """Remove the run files ``names`` of ``out``; of ``figures/``, only the pictures a run writes
    (:func:`is_figure_file`) and their temporary files, never a file of another name (the user's own plots), then
    the folder itself if that leaves it empty."""
    for name in names:
        p = out / name
        if name == "figures" and p.is_dir():
            for f in p.iterdir():
                if f.is_file() and is_figure_file(f.name):
                    f.unlink()
            try:
                p.rmdir()
            except OSError:                 # something else lives there: it stays, and so does the folder
                pass
        elif p.is_file() or p.is_symlink():
            p.unlink()


def missing_checkpoint(out):
    """The one-line CheckpointError of ``--resume`` into a folder without a checkpoint."""
    out = Path(out)
    why = "nothing to resume"
    if out.is_dir() and any(p.name in RUN_FILES for p in out.iterdir()):
        why += f" (the run in {out} stopped before its first checkpoint: start it again without --resume)"
    return CheckpointError(f"{out / CHECKPOINT}: checkpoint not found; {why}")


def remove_stale(folder):
    """Remove the stale temporary files of the run folder ``folder`` and of its figures/ (the caller holds its
    lock); returns the removed paths."""
    removed = []
    for d in (Path(folder), Path(folder) / "figures"):
        for p in stale_temp_files(d):
            try:
                p.unlink()
                removed.append(p)
            except OSError:              # gone meanwhile, or a folder we may not write: left as it is
                pass
    return removed


def removed_line(folder, removed):
    """The line that says which stale temporary files were removed from ``folder`` ('' if none)."""
    if not removed:
        return ""
    return (f"removed {len(removed)} temporary file(s) left in {folder} by an interrupted write: "
            + ", ".join(str(p.relative_to(folder)) for p in removed))


def tidy_run_folder(folder):
    """Remove the stale temporary files of a run folder that no run is writing now; returns the removed paths.

    For the commands that read a run's checkpoint (eval, sample, interpolate, manifold): the lock is taken only
    for the cleanup and only when it is free (a run in progress keeps its folder as it is) and the folder is a
    run's (it has a lock file: nothing is created); a folder that cannot be locked (read-only) is left alone."""
    lock = RunLock(folder, create=False)
    try:
        lock.acquire()
    except (RunLocked, OSError):
        return []
    lock.release()
    return lock.removed


def json_text(doc):
    """Strict JSON (``allow_nan=False``): a non-finite float is written as null, never a bare NaN."""
    def clean(v):
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, np.ndarray):
            return clean(v.tolist())
        if isinstance(v, np.generic):
            v = v.item()
        if isinstance(v, float) and not math.isfinite(v):
            return None
        return v
    return json.dumps(clean(doc), indent=1, allow_nan=False)


def write_history(out_dir, history):
    out_dir = Path(out_dir)
    atomic_write(out_dir / "history.json", lambda f: f.write(json_text(history)), mode="w")
    keys = []
    for rec in history:
        keys += [k for k in rec if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    for rec in history:
        w.writerow(rec)
    atomic_write(out_dir / "history.csv", lambda f: f.write(buf.getvalue()), mode="w")


def sync_history(out, ckpt_path):
    """Rewrite history.json/csv from the checkpoint on disk, so the two agree after an interrupt."""
    try:
        ck = load_checkpoint(ckpt_path)
    except CheckpointError:
        return
    try:
        write_history(out, ck.history)
    except (OSError, KeyboardInterrupt):
        pass

