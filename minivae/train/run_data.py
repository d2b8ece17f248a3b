"""A run's data: the splits it reads, preprocessed once, and where a recorded run finds them again.

:class:`Data` holds a run's arrays (grey train/test/valid, the evaluation copies binarized once with
``test_seed``); :func:`run_data_dir` finds the data a recorded run was trained on by its fingerprint, and
:func:`evaluation_data` gives the test set as the run evaluates it (for ``eval`` and the figures).
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from ..data import (DataError, check_data, default_data_dir, embedded_dir, fingerprint, image_shape, load_mnist,
                    split_validation, static_binarize)
from ..networks import get_architecture


def load_split(split, data_dir=None):
    """(x float32 (N, D), y int64 (N,)) of one split.

    A data folder holds either the four IDX files (MNIST layout) or
    ``train.npz`` / ``test.npz`` with an ``x`` array (N, D) (or (N, H, W)) of
    floats and an optional ``y``; the latter is for real-valued data.
    """
    d = Path(data_dir) if data_dir is not None else default_data_dir()
    if not d.is_dir():
        raise DataError(f"{d}: data directory not found")
    key = (split, str(d.resolve()), tuple(sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size)
                                                 for p in d.iterdir() if p.is_file())))
    return _load_split_cached(key)


@functools.lru_cache(maxsize=4)
def _load_split_cached(key):
    """Read-only arrays of one split (cached: tests and lessons train many small runs)."""
    x, y = _read_split(key[0], Path(key[1]))
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def _read_split(split, d):
    npz = d / f"{split}.npz"
    if npz.exists():
        try:
            with np.load(npz, allow_pickle=False) as z:
                x = np.asarray(z["x"])
                y = np.asarray(z["y"]) if "y" in z.files else np.zeros(len(x), dtype=np.int64)
        except (OSError, ValueError, KeyError, EOFError) as exc:
            raise DataError(f"{npz}: cannot read ({type(exc).__name__}: {exc})") from None
        if x.ndim < 2 or y.ndim != 1 or len(y) != len(x):
            raise DataError(f"{npz}: expected x (N, D) and y (N,), got shapes {x.shape} and {y.shape}")
        if x.size == 0:
            raise DataError(f"{npz}: x holds no images (shape {x.shape}); expected at least one image of at least "
                            "one value")
        for name, a in (("x", x), ("y", y)):
            if a.dtype.kind not in "biuf":         # complex, text, dates...: no silent conversion
                raise DataError(f"{npz}: {name} has dtype {a.dtype}; expected real numbers")
        if y.dtype.kind == "f":                    # labels are whole numbers: never truncate 7.7 to 7 or NaN to -9e18
            bad = np.flatnonzero(~np.isfinite(y) | (y != np.round(y)) | (np.abs(y) > 2 ** 53))
            if bad.size:
                raise DataError(f"{npz}: y holds labels that are not whole numbers (row {int(bad[0])}: "
                                f"{float(y[bad[0]])!r}, {bad.size} in all); labels must be integers")
        return x.reshape(len(x), -1).astype(np.float32), y.astype(np.int64)
    return load_mnist(split, d)


class Data:
    """Preprocessed arrays of a run: grey train/test/valid, and the evaluation copies."""

    def __init__(self, settings):
        s = settings
        x_tr, y_tr = load_split("train", s.data_dir)
        x_te, y_te = load_split("test", s.data_dir)
        src = s.data_dir or str(default_data_dir())
        if x_tr.shape[1] != x_te.shape[1]:
            raise DataError(f"{src}: train images have {x_tr.shape[1]} values, test images {x_te.shape[1]}")
        self.n_classes = class_count(s.data_dir, y_tr, y_te) if s.conditional or s.labels else None
        if s.n_train:
            x_tr, y_tr = x_tr[:s.n_train], y_tr[:s.n_train]
        if s.n_test:
            x_te, y_te = x_te[:s.n_test], y_te[:s.n_test]
        check_data(x_tr, s.likelihood, f"{src} (train)")
        check_data(x_te, s.likelihood, f"{src} (test)")
        x_va = y_va = None
        if s.valid:
            if s.valid >= len(x_tr):
                raise ValueError(f"valid={s.valid} leaves no training images (only {len(x_tr)})")
            x_tr, y_tr, x_va, y_va = split_validation(x_tr, y_tr, s.valid, seed=s.seed)
        self.labelled = self.y_partial = None
        if s.labels:            # M2 (minivae.m2): s.labels / K labelled digits per class, the rest unlabelled (-1)
            from ..m2 import UNLABELLED, choose_labelled
            self.labelled = choose_labelled(y_tr, s.labels, self.n_classes, s.seed)
            self.y_partial = np.full(len(y_tr), UNLABELLED, dtype=np.int64)
            self.y_partial[self.labelled] = y_tr[self.labelled]
        dt = np.dtype(s.dtype)
        self.x_train, self.y_train = x_tr.astype(dt), y_tr
        self.x_test, self.y_test = x_te.astype(dt), y_te
        self.x_valid, self.y_valid = (x_va.astype(dt), y_va) if x_va is not None else (None, None)
        self.x_dim = x_tr.shape[1]
        shapes = {split: image_shape(s.data_dir, split) for split in ("train", "test")}
        if None not in shapes.values() and shapes["train"] != shapes["test"]:      # same D, other H x W
            raise DataError(f"{src}: train images have shape {shapes['train'][1:]}, test images "
                            f"{shapes['test'][1:]}; both splits must hold images of one shape")
        self.image_shape = shapes["train"] if get_architecture(s.arch).image else None   # (1, H, W) or None
        if s.binarize == "static":
            self.x_train = static_binarize(self.x_train, seed=s.seed)
        if s.binarize != "none":   # evaluation data: binarized once, with a seed independent of the run's
            self.test_eval = static_binarize(self.x_test, seed=s.test_seed)
            self.valid_eval = static_binarize(self.x_valid, seed=s.test_seed + 1) if x_va is not None else None
        else:
            self.test_eval, self.valid_eval = self.x_test, self.x_valid


def run_data_dir(settings, data_dir=None, where="the run"):
    """The data folder a recorded run must use: the one it was trained on, checked by its fingerprint.

    ``settings.data`` is the provenance that :func:`train` recorded.  ``data_dir``
    (``--data-dir``) may point at any folder holding the same files (the embedded MNIST
    included); without it the recorded folder is used, or the embedded MNIST when it holds
    the same files (the package moved).  Different or missing data: DataError, one line.
    A run recorded before provenance existed uses ``data_dir`` or its ``data_dir`` setting.
    """
    s = settings
    rec = s.data
    if not rec:
        return data_dir if data_dir is not None else s.data_dir
    want = rec.get("files")
    if data_dir is not None:
        got = fingerprint(data_dir)
        if got["files"] != want:
            raise DataError(f"{where} was trained on other data than {got['path']} (recorded: {rec.get('path')}, "
                            f"files {_describe(want)}; found {_describe(got['files'])})")
        return str(data_dir)
    for cand in (rec.get("path"), str(embedded_dir())):
        if cand and Path(cand).is_dir():
            try:
                if fingerprint(cand)["files"] == want:
                    return cand
            except DataError:
                continue
    raise DataError(f"{where} was trained on the data in {rec.get('path')}, which is missing or has changed "
                    f"(recorded files {_describe(want)}); pass --data-dir with the same files")


def _describe(files):
    return ", ".join(f"{k} ({v[0]} bytes, sha256 {v[1][:12]})" for k, v in sorted((files or {}).items()))


def class_count(data_dir, y_train, y_test):
    """K, the number of classes of a conditional run: the largest training label + 1.

    Raises :class:`DataError` (one line) when a split has no labels (a ``<split>.npz`` without ``y``; a
    missing IDX labels file or a wrong label count already fails in :func:`load_split`) or when a label
    lies outside 0..K-1.
    """
    d = Path(data_dir) if data_dir is not None else default_data_dir()
    for split in ("train", "test"):
        npz = d / f"{split}.npz"
        if npz.exists():
            with np.load(npz, allow_pickle=False) as z:
                if "y" not in z.files:
                    raise DataError(f"{npz}: no labels (an array y); a conditional run needs one label per image")
    if not len(y_train):
        raise DataError(f"{d}: no training labels")
    lo = float(np.min(y_train))
    if lo < 0:                        # K = max + 1 would then count no class at all ("outside 0..-1")
        raise DataError(f"{d / 'train.npz'}: label {lo:g} is negative: labels are class indices 0..K-1")
    K = int(y_train.max()) + 1
    if K > len(y_train):              # labels are class indices 0..K-1: a label past the image count is no class
        raise DataError(f"{d / 'train.npz'}: label {int(y_train.max())} is out of range: labels are class indices "
                        f"0..K-1 and this would make {K} classes for {len(y_train)} training images")
    for split, y in (("train", y_train), ("test", y_test)):
        check_split_labels(y, K, f"{d} ({split} labels)")
    return K


def check_split_labels(y, n_classes, name):
    """Raise :class:`DataError` naming ``name`` when a label lies outside 0..n_classes-1."""
    from ..conditional import check_labels
    try:
        check_labels(y, n_classes, name="the labels")
    except ValueError as exc:
        raise DataError(f"{name}: {exc}") from None


def label_kwargs(model, y):
    """``{"y": y}`` for a conditional model, ``{}`` for an unconditional one (which takes no labels)."""
    return {"y": y} if model.config.n_classes is not None else {}


def evaluation_data(settings, data_dir=None, n=None, where="the run"):
    """The test set as a run evaluates it: (x_eval, x_grey, y) for ``eval``/figures."""
    s = settings
    d = run_data_dir(s, data_dir, where)
    x, y = load_split("test", d)
    n = n or s.n_test
    if n:
        x, y = x[:n], y[:n]
    check_data(x, s.likelihood, f"{d or default_data_dir()} (test)")
    x = x.astype(np.dtype(s.dtype))
    x_eval = static_binarize(x, seed=s.test_seed) if s.binarize != "none" else x
    return x_eval, x, y
