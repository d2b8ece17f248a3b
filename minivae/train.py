"""The training loop, as a library function (the CLI's ``train`` only parses flags).

    from minivae.train import TrainSettings, train
    s = TrainSettings.from_recipe("default", epochs=2, n_train=5000)
    history = train(s, "runs/quick")

What a run does
---------------
1. Data: the train and test splits from ``settings.data_dir`` (``$MINIVAE_DATA``
   or the embedded MNIST when None), scaled to [0, 1] and checked once (no NaN
   or inf; inside [0, 1] for a Bernoulli likelihood).  ``n_train``/``n_test``
   keep the first rows only; ``valid`` holds out that many random training
   rows.  Binarization (Bernoulli likelihood):

   * ``dynamic``: every minibatch is re-sampled, x ~ Bernoulli(pixel), each
     time it is used (the usual choice in the likelihood literature);
   * ``static``: the training set is binarized once with ``seed``;
   * ``none``: the grey levels are used as Bernoulli "soft targets".

   The test (and validation) images are binarized once with the fixed seed
   ``test_seed`` (12345), independent of the training seed, so evaluation
   numbers are comparable between runs.
2. Randomness: ``np.random.SeedSequence(seed)`` spawns four independent NumPy
   Generators: ``init`` (weights), ``shuffle`` (minibatch order),
   ``binarize`` (dynamic binarization) and ``eps`` (the reparameterization
   noise, used as ``model.rng``).  Their states are saved in every
   checkpoint, so ``resume=True`` continues bit-for-bit: the same seed and
   backend give the same history on CPU, interrupted or not.
3. Each step: ``model.loss(xb, beta=beta_t, validate=False)`` then
   ``optimizer.step``.  The KL warm-up is *per step*:
   ``beta_t = beta * min(1, t / (warmup * steps_per_epoch))`` with t the
   0-based global step, so beta rises linearly from 0 and reaches ``beta``
   at the start of epoch ``warmup + 1``.  The learning rate is set per epoch
   from the recipe's schedule (:func:`minivae.recipes.lr_at_epoch`).
4. Each epoch: one printed line (train and test negative ELBO in nats per
   image, their reconstruction and KL parts, the time), ``history.json`` and
   ``history.csv``, and ``checkpoint.npz``, all written atomically.  The
   train numbers are the averages over the epoch's minibatches as they were
   trained (true ELBO, beta = 1 in the sum, even during warm-up); the test
   numbers use one fixed eps draw (seed ``test_seed``).
5. A NaN or inf loss, or a finite one above ``MAX_LOSS`` (1e6 nats per
   example, far beyond any real model: the untrained default VAE starts at
   about 550), stops the run (:class:`TrainingDiverged`, naming the epoch
   and step) before the bad step is applied or saved; Ctrl-C or SIGTERM
   raises :class:`TrainingInterrupted`.  Either way the last complete
   checkpoint stays on disk, the message names the epoch that is in it, and
   history.json/csv are rewritten from the checkpoint's own record.
6. At the end: ``results.json`` (the final test report, with the
   importance-weighted bound when ``iw_k > 0``), then the figures.

One writer per run folder: the run holds an exclusive lock (``fcntl.flock``
on ``out_dir/.lock``, which names the holder's PID) from start to end, so a
second run or resume into the same folder stops at once with a one-line
error.  Data provenance: the run records the resolved data folder and the
size and SHA-256 of each data file (``settings["data"]``); a resume or an
evaluation reads that same data (from any folder that holds the same files),
or refuses.

``conditional=True`` trains a conditional VAE of p(x|y) on the dataset's labels (an IDX labels file, or
the ``y`` of ``<split>.npz``): the number of classes K is the largest training label + 1, recorded in the
model's config (``n_classes``), and every label must lie in 0..K-1.  Each step is then
``model.loss(xb, y=yb, ...)`` on the readable path (the fast path is unconditional only), and every
reported number is a bound on log p(x|y); the figures add ``class_grid.png``.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import errno
import functools
import inspect
import io
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import evaluate
from .backend import get_array_module, get_xp, to_numpy
from .checkpoint import (CheckpointError, atomic_write, load_checkpoint, restore_rngs, save_checkpoint,
                         stale_temp_files)
from .config import VAEConfig
from .data import BINARIZE, DataError, binarize, check_data, default_data_dir, embedded_dir, fingerprint, \
    image_shape, load_mnist, split_validation, static_binarize
from .model import VAE
from .optim import make_optimizer
from .recipes import get_recipe, lr_at_epoch, output_bias_init

CHECKPOINT = "checkpoint.npz"
TEST_SEED = 12345
# settings that may change when a run is resumed (everything else must match the checkpoint)
RESUME_MUTABLE = ("epochs", "iw_k", "figures", "backend", "threads")
_DEVICE_STYLE_LOOP = False
# A finite loss above this (nats per example) stops training like a NaN: no model of this package on
# data in [0, 1] gets there (the untrained 784-400-20 VAE starts near 550 nats; even a fixed-variance
# Gaussian with obs_var = 1e-3 on MNIST stays below 4e5), so reaching it means the run has diverged
# (e.g. a negative Adam eps gave 1.5e32).
MAX_LOSS = 1e6
# the run's own files: a folder holding any of these is "not empty" for a new run
RUN_FILES = (CHECKPOINT, "history.json", "history.csv", "results.json", "settings.json", "figures")
LOCK_FILE = ".lock"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf (or above MAX_LOSS); the run stopped and the last good checkpoint was kept."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) during training; the message says where the last checkpoint is.

    ``signum`` is ``signal.SIGINT`` or ``signal.SIGTERM``.
    """

    def __init__(self, message, signum=signal.SIGINT):
        super().__init__(message)
        self.signum = signum


class _Terminated(KeyboardInterrupt):
    """Raised by the SIGTERM handler so that SIGTERM unwinds exactly like Ctrl-C."""


class RunLocked(RuntimeError):
    """Another process holds the run folder's lock."""


class RunLock:
    """An exclusive lock on a run folder for the whole run: ``fcntl.flock`` on ``folder/.lock``.

    The lock file holds the holder's PID, for the error message of the second
    writer.  The kernel drops the lock when the process ends, however it ends
    (even SIGKILL), so a lock is never stale.  Where ``fcntl`` does not exist
    (Windows) runs are not locked.
    """

    def __init__(self, folder):
        self.folder = Path(folder)
        self.fd = None

    def acquire(self):
        try:
            import fcntl
        except ImportError:              # Windows: no flock
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
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


@dataclass
class TrainSettings:
    """Everything that defines a training run (saved as JSON in every checkpoint)."""

    recipe: str = "default"
    # model
    arch: str = "mlp"          # "mlp", "conv" or "conv-pool" (minivae.networks)
    conditional: bool = False  # a conditional VAE of p(x|y) on the dataset's labels (minivae.conditional)
    hidden: tuple = (400,)
    latent: int = 20
    activation: str = "relu"
    likelihood: str = "bernoulli"
    obs_var: float = 1.0
    dec_logvar_min: float | None = None   # floor on a learned decoder log-variance (VAEConfig)
    dtype: str = "float32"
    # data
    binarize: str = "dynamic"
    data_dir: str | None = None
    n_train: int | None = None
    n_test: int | None = None
    valid: int = 0
    test_seed: int = TEST_SEED
    data: dict | None = None   # provenance, set by train(): {"path": resolved folder, "files": {name: [size, sha256]}}
    # optimisation
    optimizer: str = "adam"
    lr: float = 1e-3
    adam_eps: float = 1e-8
    momentum: float = 0.9
    weight_decay: float = 0.0
    clip_norm: float | None = None
    batch_size: int = 128
    epochs: int = 10
    schedule: list | None = None
    init_output_bias: bool = False
    # objective
    beta: float = 1.0
    warmup: int = 0
    iwae_k: int | None = None
    free_bits: float | None = None
    # run
    seed: int = 0
    backend: str = "numpy"
    iw_k: int = 0
    figures: bool = True
    fast: bool = True          # use minivae.fast.FastTrainer where it supports the run (same math, tested)
    threads: int | None = None # fast path on NumPy: 1 or 2 Python threads for Adam (None: 2 if the machine
                               # has 2 CPUs or more); the parameters are bit-identical either way

    @classmethod
    def from_recipe(cls, name="default", **overrides):
        """A recipe's fields (:mod:`minivae.recipes`), then ``overrides`` (None values are ignored)."""
        fields = get_recipe(name)
        fields["recipe"] = name
        arch = overrides.get("arch")
        if arch is not None and arch != fields.get("arch", "mlp") and overrides.get("hidden") is None:
            fields["hidden"] = VAEConfig(arch=arch).hidden     # another arch: its own dense widths
        fields.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(fields)

    @classmethod
    def from_dict(cls, d):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown training settings: {', '.join(sorted(unknown))}")
        return cls(**d)

    def __post_init__(self):
        if isinstance(self.hidden, (int, np.integer)):
            self.hidden = (int(self.hidden),)
        self.hidden = tuple(int(h) for h in self.hidden)
        if self.schedule is not None:
            self.schedule = [[int(p), float(lr)] for p, lr in self.schedule]
        if self.data_dir is not None:
            self.data_dir = str(self.data_dir)

    def to_dict(self):
        d = dataclasses.asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    def validate(self):
        """Raise ValueError with a one-line reason for an impossible setting."""
        def need(cond, msg):
            if not cond:
                raise ValueError(msg)
        need(self.binarize in BINARIZE, f"binarize must be one of {', '.join(BINARIZE)}, got {self.binarize!r}")
        need(self.binarize == "none" or self.likelihood == "bernoulli",
             f"binarize={self.binarize!r} only makes sense with the Bernoulli likelihood; use binarize='none'")
        need(int(self.epochs) == self.epochs and self.epochs >= 0, f"epochs must be >= 0, got {self.epochs}")
        need(int(self.batch_size) == self.batch_size and self.batch_size >= 1,
             f"batch size must be positive, got {self.batch_size}")
        for name in ("lr", "adam_eps", "momentum", "weight_decay", "beta", "obs_var"):
            v = getattr(self, name)
            need(isinstance(v, (int, float)) and math.isfinite(v), f"{name} must be a finite number, got {v!r}")
        for name in ("clip_norm", "free_bits", "dec_logvar_min"):
            v = getattr(self, name)
            need(v is None or (isinstance(v, (int, float)) and math.isfinite(v)),
                 f"{name} must be a finite number, got {v!r}")
        need(self.lr > 0, f"learning rate must be positive, got {self.lr}")
        need(self.adam_eps > 0, f"adam_eps must be positive, got {self.adam_eps}")
        need(0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(self.beta >= 0, f"beta must be >= 0, got {self.beta}")
        need(self.warmup >= 0, f"warmup must be >= 0 epochs, got {self.warmup}")
        need(self.valid >= 0, f"valid must be >= 0, got {self.valid}")
        need(self.iw_k >= 0, f"iw_k must be >= 0, got {self.iw_k}")
        need(self.threads in (None, 1, 2), f"threads must be 1 or 2, got {self.threads!r}")
        for name in ("n_train", "n_test"):
            v = getattr(self, name)
            need(v is None or v >= 1, f"{name} must be positive, got {v}")
        need(self.clip_norm is None or self.clip_norm > 0, f"clip_norm must be positive, got {self.clip_norm}")
        need(self.iwae_k is None or self.iwae_k >= 1, f"iwae_k must be >= 1, got {self.iwae_k}")
        need(self.free_bits is None or self.free_bits >= 0, f"free_bits must be >= 0, got {self.free_bits}")
        need(not (self.iwae_k is not None and self.free_bits),
             "free bits cannot be combined with the IWAE objective (the IWAE bound has no separate KL term)")
        config = self.model_config(784)       # checks hidden/latent/activation/likelihood/dtype
        from .limits import check_fits, training_bytes
        check_fits(training_bytes(config, self.batch_size, self.iwae_k), f"training {_arch(config)}")
        return self

    def model_config(self, x_dim, image_shape=None, n_classes=None):
        """The model's config for data of ``x_dim`` values per image; the conv archs record ``image_shape``,
        a conditional run its number of classes ``n_classes``."""
        conv = self.arch != "mlp"
        return VAEConfig(x_dim=x_dim, hidden=self.hidden, z_dim=self.latent, activation=self.activation,
                         likelihood=self.likelihood, dtype=self.dtype, obs_var=self.obs_var, arch=self.arch,
                         dec_logvar_min=self.dec_logvar_min,
                         image_shape=image_shape if conv else None,
                         n_classes=n_classes if self.conditional else None)

    def make_optimizer(self):
        kw = dict(weight_decay=self.weight_decay, clip_norm=self.clip_norm)
        if self.optimizer == "adam":
            kw["eps"] = self.adam_eps
        elif self.optimizer == "sgd":
            kw["momentum"] = self.momentum
        return make_optimizer(self.optimizer, self.lr, **kw)


def _arch(config):
    return "-".join(str(v) for v in (config.x_dim, *config.hidden, config.z_dim)) + " VAE"


# ---------------------------------------------------------------------- data
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
        if x.ndim < 2 or len(y) != len(x):
            raise DataError(f"{npz}: expected x (N, D) and y (N,), got shapes {x.shape} and {y.shape}")
        for name, a in (("x", x), ("y", y)):
            if a.dtype.kind not in "biuf":         # complex, text, dates...: no silent conversion
                raise DataError(f"{npz}: {name} has dtype {a.dtype}; expected real numbers")
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
        self.n_classes = class_count(s.data_dir, y_tr, y_te) if s.conditional else None
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
        dt = np.dtype(s.dtype)
        self.x_train, self.y_train = x_tr.astype(dt), y_tr
        self.x_test, self.y_test = x_te.astype(dt), y_te
        self.x_valid, self.y_valid = (x_va.astype(dt), y_va) if x_va is not None else (None, None)
        self.x_dim = x_tr.shape[1]
        self.image_shape = image_shape(s.data_dir) if s.arch != "mlp" else None    # (1, H, W) or None
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
    K = int(y_train.max()) + 1
    for split, y in (("train", y_train), ("test", y_test)):
        check_split_labels(y, K, f"{d} ({split} labels)")
    return K


def check_split_labels(y, n_classes, name):
    """Raise :class:`DataError` naming ``name`` when a label lies outside 0..n_classes-1."""
    from .conditional import check_labels
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


# ------------------------------------------------------------------- helpers
def make_rngs(seed):
    init, shuffle, binar, eps = np.random.SeedSequence(int(seed)).spawn(4)
    return {"init": np.random.default_rng(init), "shuffle": np.random.default_rng(shuffle),
            "binarize": np.random.default_rng(binar), "eps": np.random.default_rng(eps)}


def beta_at(settings, step, steps_per_epoch):
    """KL weight at 0-based global ``step`` (linear per-step warm-up over ``warmup`` epochs)."""
    if not settings.warmup:
        return float(settings.beta)
    return float(settings.beta) * min(1.0, step / (settings.warmup * steps_per_epoch))


def loss_kwargs(settings, model):
    """Extra objective keyword arguments for ``model.loss`` (only the ones that are set)."""
    kw = {}
    if settings.iwae_k is not None:
        kw["iwae_k"] = int(settings.iwae_k)
    if settings.free_bits is not None:
        kw["free_bits"] = float(settings.free_bits)
    if kw:
        params = inspect.signature(model.loss).parameters
        any_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        for k in kw:
            if k not in params and not any_kw:
                raise ValueError(f"this version of minivae's VAE.loss has no {k!r} option")
    return kw


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


def format_epoch(rec, epochs):
    line = (f"epoch {rec['epoch']:>3}/{epochs}  "
            f"train -ELBO {rec['train_neg_elbo']:8.3f} (recon {rec['train_recon']:8.3f}, KL {rec['train_kl']:7.3f})  "
            f"test -ELBO {rec['test_neg_elbo']:8.3f} (recon {rec['test_recon']:8.3f}, KL {rec['test_kl']:7.3f})")
    if "valid_neg_elbo" in rec:
        line += f"  valid -ELBO {rec['valid_neg_elbo']:8.3f}"
    return line + f"  lr {rec['lr']:.3g}  beta {rec['beta']:.3g}  {rec['time_s']:.1f}s"


def _check_resume(settings, ckpt):
    # a setting the checkpoint predates counts as saved with its default value
    saved = dict(TrainSettings().to_dict(), **ckpt.settings)
    now = settings.to_dict()
    # the data is checked by its fingerprint (run_data_dir), not by the folder's name
    skip = RESUME_MUTABLE + (("data_dir", "data") if saved.get("data") else ())
    diffs = [f"{k}={saved.get(k)!r} (this run: {now[k]!r})" for k in now
             if k not in skip and json.dumps(saved.get(k)) != json.dumps(now[k])]
    if diffs:
        raise CheckpointError(f"{ckpt.path}: the checkpoint was trained with different settings: " + "; ".join(diffs))


# ---------------------------------------------------------------------- train
def train(settings, out_dir, resume=False, progress=True, log=print, force=False):
    """Train a VAE as ``settings`` says, writing everything under ``out_dir``.

    ``resume=True`` continues from ``out_dir/checkpoint.npz`` (settings must
    match it, except ``epochs``, ``iw_k``, ``figures`` and ``backend``; the data
    must be the recorded data) and gives exactly the numbers of an
    uninterrupted run.  Without ``resume`` the folder must be new or empty, or
    ``force=True`` (which starts over, replacing the run's files).  The folder
    is locked for the whole run (:class:`RunLock`).  ``progress`` shows tqdm
    bars (only when stderr is a terminal); the header line and one line per
    epoch go to ``log`` either way.  Returns the history: a list of per-epoch dicts.
    """
    s = settings.validate()
    out = Path(out_dir)
    created = not out.exists()
    try:
        with _SigtermAsInterrupt(), RunLock(out), _conv_threads(step_threads(s)):
            return _train_locked(s, out, resume, progress, log, force)
    except BaseException:
        # a run that failed before writing anything leaves no folder behind
        if created and out.is_dir() and [p.name for p in out.iterdir()] == [LOCK_FILE]:
            try:
                (out / LOCK_FILE).unlink()
                out.rmdir()
            except OSError:
                pass
        raise


def _check_fresh_folder(out, force):
    ckpt_path = out / CHECKPOINT
    if not out.is_dir():
        return
    if ckpt_path.exists() and not force:
        raise CheckpointError(f"{out} already holds a run ({CHECKPOINT}); pass resume (--resume) to continue it, "
                              "force (--force) to start over, or choose another output folder")
    present = sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE and not p.name.endswith(".tmp"))
    if present and not force:
        raise CheckpointError(f"{out} is not empty (it holds {', '.join(present[:5])}"
                              f"{', ...' if len(present) > 5 else ''}); pass force (--force) to overwrite the "
                              "run's files, or choose another output folder")


def _clean_stale(out, log):
    stale = stale_temp_files(out)
    for p in stale:
        p.unlink()
    if stale:
        log(f"removed {len(stale)} temporary file(s) left in {out} by an interrupted write: "
            + ", ".join(p.name for p in stale))


@contextlib.contextmanager
def _conv_threads(n):
    """While active: the conv ops' im2col/col2im copies on ``n`` threads (:func:`minivae.conv.set_threads`;
    the same bits for any n), as the dense fast path's step uses ``--threads``; restored afterwards."""
    from . import conv
    prev = conv.get_threads()
    conv.set_threads(n)
    try:
        yield
    finally:
        conv.set_threads(prev)


class _SigtermAsInterrupt:
    """While active (main thread only), SIGTERM raises :class:`_Terminated`, so it unwinds like Ctrl-C."""

    def __enter__(self):
        self.prev = None
        if threading.current_thread() is threading.main_thread():
            def handler(signum, frame):
                raise _Terminated()
            try:
                self.prev = signal.signal(signal.SIGTERM, handler)
            except (ValueError, OSError):
                self.prev = None
        return self

    def __exit__(self, *exc):
        if self.prev is not None:
            signal.signal(signal.SIGTERM, self.prev)


def _train_locked(s, out, resume, progress, log, force):
    from tqdm import tqdm

    ckpt_path = out / CHECKPOINT
    ckpt = None
    if resume:
        if not ckpt_path.exists():
            raise CheckpointError(f"{ckpt_path}: checkpoint not found; nothing to resume")
        ckpt = load_checkpoint(ckpt_path)
        _check_resume(s, ckpt)
        saved = TrainSettings.from_dict(dict(TrainSettings().to_dict(), **ckpt.settings))
        if saved.data:          # the recorded data (or the same files elsewhere), else a one-line refusal
            s.data_dir = run_data_dir(saved, s.data_dir if s.data_dir != saved.data_dir else None,
                                      where=str(ckpt_path))
            s.data = saved.data
        else:
            s.data = fingerprint(s.data_dir if s.data_dir is not None else default_data_dir())
    else:
        _check_fresh_folder(out, force)
        d = Path(s.data_dir) if s.data_dir is not None else default_data_dir()
        s.data = fingerprint(d)
        s.data_dir = s.data["path"]                   # resolved: $MINIVAE_DATA is read once, here
    _clean_stale(out, log)

    xp = get_xp(s.backend)          # BackendError early if cupy is asked for without a GPU
    data = Data(s)
    config = s.model_config(data.x_dim, data.image_shape, data.n_classes)
    from .limits import check_fits, training_bytes
    check_fits(training_bytes(config, s.batch_size, s.iwae_k), f"training {_arch(config)}")
    rngs = make_rngs(s.seed)
    model = VAE(config, rng=rngs["init"], backend=s.backend)
    model.rng = rngs["eps"]
    opt = s.make_optimizer()
    obj_kw = loss_kwargs(s, model)
    trainer = fast_trainer(s, model, opt, obj_kw)
    adam_step = None if trainer is not None else fused_adam(s)
    history, start = [], 0
    if ckpt is not None:
        if ckpt.config.to_dict() != config.to_dict():
            raise CheckpointError(f"{ckpt.path}: saved model {ckpt.config.to_dict()} does not match this run's "
                                  f"{config.to_dict()}")
        loaded = ckpt.build_model(s.backend)
        model.params.flat[...] = loaded.flat
        ckpt.load_optimizer(opt, model.params)
        restore_rngs(rngs, ckpt.rng)
        history, start = list(ckpt.history), ckpt.epoch
        write_history(out, history)        # history.json/csv from the checkpoint's own record
    else:
        if force:
            for name in (CHECKPOINT, "history.json", "history.csv", "results.json"):
                if (out / name).exists():
                    (out / name).unlink()
        if s.init_output_bias:
            out_b = model.net.dec_heads[0].name + ".b"        # dec.out.b; one bias per channel for conv
            b = output_bias_init(data.x_train.reshape(len(data.x_train), model.params[out_b].size, -1).mean(axis=2)
                                 if s.arch != "mlp" else data.x_train)
            model.params[out_b] = b.reshape(model.params[out_b].shape).astype(model.dtype)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "settings.json", lambda f: f.write(json_text(s.to_dict())), mode="w")

    n = len(data.x_train)
    spe = math.ceil(n / s.batch_size)
    # numpy: check the loss and update the bar every step; cupy: keep the losses on the device and
    # synchronise every 50 steps (the tests force the device-style loop on numpy to check both agree)
    on_host = s.backend == "numpy" and not _DEVICE_STYLE_LOOP
    runner = None
    if not on_host:
        x_dev = xp.asarray(data.x_train)
        if trainer is not None:     # CuPy: the whole step as one CUDA graph where it applies (else logs why not)
            runner = _graph_runner(s, trainer, n, x_dev, log)
    rand_dtype = np.float32 if model.dtype == np.float32 else np.float64
    where = {"epoch": start + 1, "step": 0}

    def last_ckpt():
        # the epoch actually in the file (an interrupt during the save leaves the previous one)
        try:
            epoch = load_checkpoint(ckpt_path).epoch
        except CheckpointError:
            return "no checkpoint was written yet"
        return f"last good checkpoint kept at {ckpt_path} (epoch {epoch})"

    if start < s.epochs:
        src = "the embedded MNIST" if Path(s.data_dir) == embedded_dir() else s.data_dir
        log(f"training {model!r} on {n} images ({data.x_dim} values each) from {src}, {spe} steps per epoch; "
            f"writing to {out}")
    try:
        for epoch in range(start, s.epochs):
            where["epoch"] = epoch + 1
            opt.lr = lr_at_epoch(s.schedule, epoch, s.lr)
            batches = [np.asarray(b) for b in _batches(n, s.batch_size, rngs["shuffle"])]
            t0 = time.perf_counter()
            tot = [0.0, 0.0, 0.0] if on_host else xp.zeros(3, dtype=np.float64)
            lossbuf = None if on_host else xp.empty(spe, dtype=np.float64)
            # disable=None: no bar when stderr is not a terminal (piped logs stay clean)
            bar = tqdm(total=spe, desc=f"epoch {epoch + 1}/{s.epochs}", leave=False,
                       disable=None if progress else True, file=sys.stderr, dynamic_ncols=True,
                       mininterval=0.5)
            run_sum, last_shown = 0.0, 0
            try:
                if runner is not None:      # the epoch as graph replays: the same draws, one sync at the end
                    losses = runner.train_epoch(x_dev, batches, rngs["binarize"], model.rng,
                                                [beta_at(s, epoch * spe + k, spe) for k in range(spe)])
                    lossbuf, where["step"] = losses[:, 0], spe
                    tot = (losses * xp.asarray([len(b) for b in batches], dtype=np.float64)[:, None]).sum(axis=0)
                    _check_finite(lossbuf, 0, spe, epoch, last_ckpt)
                    bar.update(spe)
                for step, idx in enumerate(batches if runner is None else ()):
                    where["step"] = step + 1
                    beta_t = beta_at(s, epoch * spe + step, spe)
                    if on_host:
                        xb = data.x_train[idx]
                        if s.binarize == "dynamic":
                            xb = binarize(xb, rngs["binarize"])
                    else:
                        xb = x_dev[xp.asarray(idx)]
                        if s.binarize == "dynamic":
                            u = rngs["binarize"].random(xb.shape, dtype=rand_dtype)
                            xb = (xp.asarray(u) < xb).astype(model.dtype)
                    if trainer is not None:
                        # the same eps draws as model.loss would take from model.rng (on the host, as every
                        # random number: minivae.backend), put on the model's backend; then loss, grads, update
                        eps = xp.asarray(model.rng.standard_normal((len(idx), model.config.z_dim), dtype=model.dtype))
                        loss = trainer.step(xb, eps, beta=beta_t)
                        parts = trainer.parts
                    else:
                        loss, grads = model.loss(xb, beta=beta_t, validate=False, **obj_kw,
                                                 **label_kwargs(model, data.y_train[idx]))
                        parts = model.parts
                    nb = len(idx)
                    if on_host:
                        lv = float(loss)
                        if not abs(lv) <= MAX_LOSS:              # NaN, inf, or absurdly large
                            raise TrainingDiverged(f"loss became {lv:.6g} at epoch {epoch + 1}, step {step + 1}"
                                                   f"{_absurd(lv)}; training stopped, {last_ckpt()}")
                        tot[0] += lv * nb
                        tot[1] += float(parts["recon"]) * nb
                        tot[2] += float(parts["kl"]) * nb
                        run_sum += lv
                        bar.update(1)
                        bar.set_postfix(loss=f"{run_sum / (step + 1):.3f}", refresh=False)
                    else:
                        lossbuf[step] = loss
                        tot[0] += loss * nb
                        tot[1] += parts["recon"] * nb
                        tot[2] += parts["kl"] * nb
                        if (step + 1) % 50 == 0 or step + 1 == spe:
                            _check_finite(lossbuf, last_shown, step + 1, epoch, last_ckpt)
                            bar.update(step + 1 - last_shown)
                            bar.set_postfix(loss=f"{float(lossbuf[:step + 1].mean()):.3f}", refresh=False)
                            last_shown = step + 1
                    if trainer is None and not (adam_step and adam_step(opt, model.params, grads)):
                        opt.step(model.params, grads)
            finally:
                bar.close()
            tot = [float(v) for v in (tot if on_host else to_numpy(tot))]
            rec = {"epoch": epoch + 1, "train_loss": tot[0] / n, "train_neg_elbo": (tot[1] + tot[2]) / n,
                   "train_recon": tot[1] / n, "train_kl": tot[2] / n}
            where["step"] = "during the end-of-epoch evaluation"
            for name, x, y in (("test", data.test_eval, data.y_test), ("valid", data.valid_eval, data.y_valid)):
                if x is None:
                    continue
                ev = evaluate.negative_elbo(model, x, np.random.default_rng(s.test_seed), batch_size=1000,
                                            **label_kwargs(model, y))
                if not all(abs(v) <= MAX_LOSS for v in ev.values()):
                    raise TrainingDiverged(f"{name} loss became {ev['loss']:.6g} after epoch {epoch + 1}"
                                           f"{_absurd(ev['loss'])}; training stopped, {last_ckpt()}")
                rec.update({f"{name}_neg_elbo": ev["loss"], f"{name}_recon": ev["recon"],
                            f"{name}_kl": ev["kl"]})
            rec.update({"lr": opt.lr, "beta": beta_at(s, (epoch + 1) * spe - 1, spe), "steps": spe,
                        "time_s": time.perf_counter() - t0})
            where["step"] = "while saving the checkpoint"
            save_checkpoint(ckpt_path, model, opt, rngs, s.to_dict(), epoch + 1, history + [rec])
            history.append(rec)
            where["step"] = "while writing the history"
            write_history(out, history)
            log(format_epoch(rec, s.epochs))
    except KeyboardInterrupt as exc:
        signum = signal.SIGTERM if isinstance(exc, _Terminated) else signal.SIGINT
        step = where["step"]
        step = f"step {step}" if isinstance(step, int) else step
        msg = f"{'terminated (SIGTERM)' if signum == signal.SIGTERM else 'interrupted'} at epoch {where['epoch']}, " \
              f"{step}; {last_ckpt()}"
        _sync_history(out, ckpt_path)
        raise TrainingInterrupted(msg, signum) from None
    except TrainingDiverged:
        _sync_history(out, ckpt_path)
        raise
    finally:
        if trainer is not None:
            trainer.close()
        if runner is not None:
            runner.close()

    if history:
        write_history(out, history)
    finish(model, s, data, out, progress=progress, log=log)
    return history


def _absurd(v):
    return f" (above {MAX_LOSS:g} nats per example: diverged)" if math.isfinite(v) else ""


def _sync_history(out, ckpt_path):
    """Rewrite history.json/csv from the checkpoint on disk, so the two agree after an interrupt."""
    try:
        ck = load_checkpoint(ckpt_path)
    except CheckpointError:
        return
    try:
        write_history(out, ck.history)
    except (OSError, KeyboardInterrupt):
        pass


def fast_trainer(settings, model, opt, obj_kw):
    """A :class:`minivae.fast.FastTrainer` when the run can use it, else None (the readable path).

    The fast path computes the same loss, gradients and update as ``model.loss`` + ``opt.step``
    (the test suite checks it op by op); it covers the plain (beta-)ELBO with one sample
    and the Bernoulli or fixed-variance Gaussian likelihood.  A course assignment's copy of minivae has
    no ``fast.py``, so training there runs the student's code.
    """
    if not settings.fast or obj_kw:
        return None
    try:
        from .fast import FastPathError, FastTrainer, check_supported
    except ImportError:
        return None
    try:
        check_supported(model.config)
        return FastTrainer(model, opt, threads=step_threads(settings))     # (CuPy: FastTrainer makes no pool)
    except FastPathError:
        return None


def _graph_runner(settings, trainer, n, x_dev, log):
    """minivae.cuda_graph's runner for this CuPy run, or None (the reason is logged); None without the module
    (a course assignment's copy)."""
    try:
        from .cuda_graph import runner_for_training
    except ImportError:
        return None
    return runner_for_training(trainer, settings, n, x_dev, log)


def fused_adam(settings):
    """For the readable path (the models FastTrainer does not cover, e.g. the conv VAEs): a function
    ``(opt, params, grads) -> bool`` that makes a plain Adam step in one fused pass when numba is installed
    (:func:`minivae.fast.fused_adam_step`, the same bits as ``opt.step``), or None to always use ``opt.step``."""
    if not settings.fast:
        return None
    try:
        from .fast import fused_adam_step
    except ImportError:             # a course assignment's copy has no fast.py
        return None
    threads = step_threads(settings)
    return lambda opt, params, grads: fused_adam_step(opt, params, grads, threads)


def step_threads(settings):
    """Threads for the fast step on NumPy: ``settings.threads``, or 2 when the machine has 2 CPUs or more.

    Adam is elementwise, so its two halves give the same bits as one pass; with batches of 128 rows
    or more the Bernoulli loss is also summed in two row blocks, which changes the reported loss
    in its last float64 bits only (never the gradients).
    """
    if settings.threads is not None:
        return int(settings.threads)
    return 2 if (os.cpu_count() or 1) >= 2 else 1


def _batches(n, batch_size, rng):
    from .data import minibatches
    return minibatches(n, batch_size, rng)


def _check_finite(lossbuf, start, stop, epoch, last_ckpt):
    xp = get_array_module(lossbuf)
    seg = lossbuf[start:stop]
    bad = xp.flatnonzero(~(xp.abs(seg) <= MAX_LOSS))      # NaN, inf, or above MAX_LOSS
    if bad.size:
        i = int(bad[0])
        lv = float(seg[i])
        raise TrainingDiverged(f"loss became {lv:.6g} at epoch {epoch + 1}, step {start + i + 1}{_absurd(lv)}; "
                               f"training stopped, {last_ckpt()}")


def finish(model, settings, data, out_dir, progress=True, log=print):
    """Final test report, written to ``results.json`` first, then the figures of a trained model."""
    s = settings
    rep = evaluate.report(model, data.test_eval, np.random.default_rng(s.test_seed), iw_k=s.iw_k,
                          progress=progress, **label_kwargs(model, data.y_test))
    results = {"test": rep}
    if data.valid_eval is not None:
        results["valid"] = evaluate.report(model, data.valid_eval, np.random.default_rng(s.test_seed),
                                           **label_kwargs(model, data.y_valid))
    line = f"final test -ELBO {rep['neg_elbo']:.3f} (recon {rep['recon']:.3f}, KL {rep['kl']:.3f})"
    if rep.get("iw_nll") is not None:
        px = "-log p(x|y)" if model.config.n_classes is not None else "-log p(x)"
        line += f"; IW bound (k={rep['iw_k']}) {px} <= {rep['iw_nll']:.3f}"
    log(line + f" on {rep['n']} test images")
    if rep.get("collapse_warning"):
        log(f"warning: {rep['collapse_warning']}")
    # results first: a figure that fails cannot lose them
    atomic_write(Path(out_dir) / "results.json", lambda f: f.write(json_text(results)), mode="w")
    if s.figures:
        from . import figures
        paths = figures.run_figures(model, data.x_test, data.y_test, out_dir, history_path=Path(out_dir) /
                                    "history.json", seed=s.seed)
        log(f"figures: {', '.join(str(p) for p in paths)}")
    return results
