"""The training loop: epochs of minibatch steps, the end-of-epoch evaluation, checkpoints, the final report.

The run's settings are :mod:`minivae.train.settings`, its folder :mod:`minivae.train.run_folder`, its data
:mod:`minivae.train.run_data`; :mod:`minivae.train` says what a run does, step by step.
"""
from __future__ import annotations

import contextlib
import inspect
import math
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np

from .. import evaluate, signals
from ..backend import get_array_module, get_xp, to_numpy
from ..atomic import WriteError
from ..checkpoint import CheckpointError, atomic_write, load_checkpoint, restore_rngs, save_checkpoint
from ..data import binarize, default_data_dir, embedded_dir, fingerprint
from ..model import build_model
from ..networks import get_architecture
from ..recipes import lr_at_epoch, output_bias_init
from .run_data import Data, label_kwargs, run_data_dir
from .run_folder import (CHECKPOINT, LOCK_FILE, RunLock, check_fresh_folder, json_text,
                         missing_checkpoint, remove_run_files, removed_line, sync_history, write_history)
from .settings import TrainSettings, check_resume, describe

# A finite loss above this (nats per example) stops training like a NaN: no model of this package on
# data in [0, 1] gets there (the untrained 784-400-20 VAE starts near 550 nats; even a fixed-variance
# Gaussian with obs_var = 1e-3 on MNIST stays below 4e5), so reaching it means the run has diverged
# (e.g. a negative Adam eps gave 1.5e32).
MAX_LOSS = 1e6
# NumPy checks every step's loss as it comes; CuPy keeps the losses on the device and checks them every
# CHECK_EVERY steps (the tests force this device-style loop on NumPy to check that both agree)
CHECK_EVERY = 50
_DEVICE_STYLE_LOOP = False


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf (or above MAX_LOSS); the run stopped and the last good checkpoint was kept."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) during training; the message says where the last checkpoint is.

    ``signum`` is ``signal.SIGINT`` or ``signal.SIGTERM``.
    """

    def __init__(self, message, signum=signal.SIGINT):
        super().__init__(message)
        self.signum = signum


# SIGTERM unwinds exactly like Ctrl-C (minivae.signals); the old private name stays for callers that catch it
_Terminated = signals.Terminated


# ------------------------------------------------------------------- helpers
def make_rngs(seed):
    init, shuffle, binar, eps = np.random.SeedSequence(int(seed)).spawn(4)
    return {"init": np.random.default_rng(init), "shuffle": np.random.default_rng(shuffle),
            "binarize": np.random.default_rng(binar), "eps": np.random.default_rng(eps)}


def beta_at(settings, step, steps_per_epoch):
    """KL weight at 0-based global ``step``: linear per step from ``beta_start`` to ``beta`` over ``warmup``
    epochs, then ``beta``.  beta_start = 0 is the classic KL warm-up; beta_start > beta anneals the weight down
    (a strong KL pressure at first, which keeps the class out of z in a conditional VAE)."""
    if not settings.warmup:
        return float(settings.beta)
    t = min(1.0, step / (settings.warmup * steps_per_epoch))
    b0 = float(getattr(settings, "beta_start", 0.0) or 0.0)
    return b0 + (float(settings.beta) - b0) * t


def loss_kwargs(settings, model):
    """Extra objective keyword arguments for ``model.loss`` (only the ones that are set)."""
    kw = {}
    if settings.iwae_k is not None:
        kw["iwae_k"] = int(settings.iwae_k)
    if settings.free_bits is not None:
        kw["free_bits"] = float(settings.free_bits)
    if settings.iwae_grad not in (None, "iwae"):
        kw["iwae_grad"] = settings.iwae_grad
    if kw:
        params = inspect.signature(model.loss).parameters
        any_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        for k in kw:
            if k not in params and not any_kw:
                raise ValueError(f"this version of minivae's VAE.loss has no {k!r} option")
    return kw


EPOCH_COLUMNS = "per epoch: -ELBO in nats/image on train[, valid] and test (= recon + KL), lr, beta, seconds"


def format_epoch(rec, epochs):
    """One epoch's line, at most 100 columns (the columns are named once, by :data:`EPOCH_COLUMNS`)."""
    line = f"epoch {rec['epoch']:>{len(str(epochs))}}/{epochs}  train {rec['train_neg_elbo']:.3f}  "
    if "valid_neg_elbo" in rec:
        line += f"valid {rec['valid_neg_elbo']:.3f}  "
    line += f"test {rec['test_neg_elbo']:.3f} = {rec['test_recon']:.3f} + {rec['test_kl']:.3f}"
    if "test_error" in rec:
        line += f"  error {100 * rec['test_error']:.2f}%"
    return line + f"  lr {rec['lr']:.2g}  beta {rec['beta']:.2g}  {rec['time_s']:.1f}s"


def using_threads(n):
    """While active: BLAS and the fused kernels on ``n`` threads (None: every core), through
    :func:`minivae.fast.threads.using`; yields the count.  A copy of minivae without the fast package (a
    course assignment's) keeps the libraries' own settings and yields ``n``."""
    try:
        from ..fast import threads
    except ImportError:
        return contextlib.nullcontext(n)
    return threads.using(n)


# ---------------------------------------------------------------------- train
def train(settings, out_dir, resume=False, progress=True, log=print, force=False):
    """Train a VAE as ``settings`` says, writing everything under ``out_dir``.

    ``resume=True`` continues from ``out_dir/checkpoint.npz`` (settings must
    match it, except ``epochs``, ``iw_k``, ``figures``, ``backend`` and ``threads``;
    the data must be the recorded data) and gives exactly the numbers of an
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
        with signals.handled(), RunLock(out) as lock, using_threads(s.threads) as threads:
            if lock.removed:
                log(removed_line(out, lock.removed))
            return _train_locked(s, out, resume, progress, log, force, threads)
    except BaseException:
        # a run that failed before writing anything leaves no folder behind
        if created and out.is_dir() and [p.name for p in out.iterdir()] == [LOCK_FILE]:
            try:
                (out / LOCK_FILE).unlink()
                out.rmdir()
            except OSError:
                pass
        raise


def _file_identity(path):
    """(inode, size, mtime) of a file, or None when there is none: a file renamed over it has another."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _train_locked(s, out, resume, progress, log, force, threads):
    ckpt_path = out / CHECKPOINT
    ckpt, replace = _open_run_folder(s, out, resume, force)
    get_xp(s.backend)               # BackendError early if cupy is asked for without a GPU
    data = Data(s)
    config = s.model_config(data.x_dim, data.image_shape, data.n_classes)
    from ..limits import check_fits, training_bytes
    check_fits(training_bytes(config, s.batch_size, s.iwae_k), f"training {describe(config)}",
               "choose a smaller --batch-size, --hidden, --latent" + (" or --iwae-k" if s.iwae_k else ""))
    rngs = make_rngs(s.seed)
    model = build_model(config, rng=rngs["init"], backend=s.backend)
    model.rng = rngs["eps"]
    opt = s.make_optimizer()
    step = _Step(s, model, opt, data.y_train, threads)
    if data.labelled is not None:
        step.semi_supervised(s, data, rngs)
    history, start = [], 0
    if ckpt is not None:
        history, start = _restore(ckpt, config, model, opt, rngs, s, math.ceil(len(data.x_train) / s.batch_size))
    _check_work(s, config, data, out, ckpt.epoch if ckpt is not None else 0, log)
    if ckpt is not None:
        write_history(out, history)        # history.json/csv from the checkpoint's own record
    else:
        _start_fresh(s, model, data)
    out.mkdir(parents=True, exist_ok=True)
    # a run folder is a run or nothing: settings.json is written with the session's first checkpoint (a run that
    # fails before it leaves no file behind), and an --epochs 0 run saves its untrained model as epoch 0.  The files
    # of the run that --force replaces go only then, so a forced run that fails early leaves the old run whole.
    settings_written = []

    def save(epoch, hist):
        save_checkpoint(ckpt_path, model, opt, rngs, s.to_dict(), epoch, hist)
        if not settings_written:
            old = [name for name in replace if name not in (CHECKPOINT, "settings.json")]
            if replace:
                remove_run_files(out, old)
                log(f"replaced the earlier run's files in {out}: {', '.join(replace)}")
            atomic_write(out / "settings.json", lambda f: f.write(json_text(s.to_dict())), mode="w")
            settings_written.append(True)

    n = len(data.x_train)
    spe = math.ceil(n / s.batch_size)
    x_train = model.xp.asarray(data.x_train)         # on the model's backend (NumPy: the same array, no copy)
    step.use_graph(s, x_train, log)
    where = {"epoch": start + 1, "step": 0}

    # the checkpoint a --force run found in the folder: until this run writes its first one (a new file, renamed
    # over it), that file is the earlier run's, kept whole, and not this run's progress
    earlier = _file_identity(ckpt_path) if not resume else None

    def last_ckpt():
        # the epoch actually in the file (an interrupt during the save leaves the previous one)
        try:
            epoch = load_checkpoint(ckpt_path).epoch
        except CheckpointError:
            return "no checkpoint was written yet"
        if earlier is not None and _file_identity(ckpt_path) == earlier:
            return (f"this run wrote no checkpoint yet; the earlier run's {ckpt_path} (epoch {epoch}) is kept as it "
                    "was")
        return f"last good checkpoint kept at {ckpt_path} (epoch {epoch})"

    if start < s.epochs:
        src = "the embedded MNIST" if Path(s.data_dir) == embedded_dir() else s.data_dir
        log(f"training {model!r} on {n} images ({data.x_dim} values each) from {src}, {spe} steps per epoch; "
            f"writing to {out}")
        log(EPOCH_COLUMNS)
    try:
        for epoch in range(start, s.epochs):
            signals.check()                     # (the CuPy graph runs a whole epoch between two checks)
            where["epoch"] = epoch + 1
            t0 = time.perf_counter()
            rec = _train_epoch(s, epoch, spe, x_train, model, opt, step, rngs, where, last_ckpt, progress)
            where["step"] = "during the end-of-epoch evaluation"
            rec.update(_evaluate_epoch(s, epoch, model, data, last_ckpt))
            rec.update({"lr": opt.lr, "beta": beta_at(s, (epoch + 1) * spe - 1, spe), "steps": spe,
                        "time_s": time.perf_counter() - t0})
            where["step"] = "while saving the checkpoint"
            save(epoch + 1, history + [rec])
            history.append(rec)
            where["step"] = "while writing the history"
            write_history(out, history)
            log(format_epoch(rec, s.epochs))
        signals.check()                         # a signal swallowed during the last epoch's evaluation or save
    except KeyboardInterrupt as exc:
        signum = signals.signal_of(exc)
        at = where["step"]
        at = f"step {at}" if isinstance(at, int) else at
        msg = f"{'terminated (SIGTERM)' if signum == signal.SIGTERM else 'interrupted'} at epoch {where['epoch']}, " \
              f"{at}; {last_ckpt()}"
        sync_history(out, ckpt_path)
        raise TrainingInterrupted(msg, signum) from None
    except TrainingDiverged:
        sync_history(out, ckpt_path)
        raise
    except OSError as exc:          # a full disk, ulimit -f, a folder made read-only: the file, where, what is kept
        sync_history(out, ckpt_path)
        raise WriteError(exc.errno, f"{_one_line(exc)}; training stopped at epoch {where['epoch']}, {last_ckpt()}",
                         getattr(exc, "path", None)) from None
    finally:
        step.close()

    if ckpt is None and s.epochs == 0:
        save(0, [])                           # an untrained run is still a run: resume, eval and sample work
    elif not settings_written:                # resumed at its last epoch: --iw-k, --no-figures may have changed
        atomic_write(out / "settings.json", lambda f: f.write(json_text(s.to_dict())), mode="w")
    try:
        if history:
            write_history(out, history)
        finish(model, s, data, out, progress=progress, log=log)
    except OSError as exc:
        raise WriteError(exc.errno, f"{_one_line(exc)}; the {len(history)} epochs trained are complete in {ckpt_path}"
                         , getattr(exc, "path", None)) from None
    return history


def _one_line(exc):
    return " ".join(str(exc).split()) or type(exc).__name__


def _check_work(s, config, data, out, start, log):
    """Before the first step: refuse a run whose training (IWAE K included) and final IW bound cannot finish,
    or whose checkpoint cannot fit on the disk (minivae.limits); log the estimate of a long one."""
    from ..limits import check_disk, check_work, iw_macs, model_bytes, training_macs
    check_disk(model_bytes(config, 4), out, f"training {describe(config)} (its checkpoint)",
               "free some space or choose another --out")
    k = f" with --iwae-k {s.iwae_k}" if s.iwae_k else ""
    macs = training_macs(config, len(data.x_train), max(0, s.epochs - start), s.iwae_k, n_labelled=s.labels or 0) + \
        (iw_macs(config, len(data.test_eval), s.iw_k) if s.iw_k else 0)
    left = max(0, s.epochs - start)
    note = check_work(macs, f"training {describe(config)} for {left} epoch{'s' if left != 1 else ''} on "
                            f"{len(data.x_train)} images{k}" + (f" and its --nll-k {s.iw_k} bound" if s.iw_k else ""),
                      "choose fewer epochs, a smaller --iwae-k or --nll-k, or fewer images", s.backend)
    if note:
        log(f"estimate: {note}")


def _open_run_folder(s, out, resume, force):
    """Check the folder for a resume (its checkpoint, the settings, the recorded data) or a new run (new or
    empty), and record the data's provenance in ``s.data``.  Returns the checkpoint to resume, or None."""
    if not resume:
        replace = check_fresh_folder(out, force)
        d = Path(s.data_dir) if s.data_dir is not None else default_data_dir()
        s.data = fingerprint(d)
        s.data_dir = s.data["path"]                   # resolved: $MINIVAE_DATA is read once, here
        return None, replace
    ckpt_path = out / CHECKPOINT
    if not ckpt_path.exists():
        raise missing_checkpoint(out)
    ckpt = load_checkpoint(ckpt_path)
    if s.epochs < ckpt.epoch:
        raise CheckpointError(f"{ckpt_path} already holds {ckpt.epoch} epoch{'s' if ckpt.epoch != 1 else ''}; "
                              f"resuming it with epochs={s.epochs} "
                              f"(--epochs {s.epochs}) would train nothing and misreport the run: give --epochs "
                              f"{ckpt.epoch} or more")
    check_resume(s, ckpt)
    saved = TrainSettings.from_saved(dict(TrainSettings().to_dict(), **ckpt.settings))
    if saved.data:          # the recorded data (or the same files elsewhere), else a one-line refusal
        s.data_dir = run_data_dir(saved, s.data_dir if s.data_dir != saved.data_dir else None,
                                  where=str(ckpt_path))
        s.data = saved.data
    else:
        s.data = fingerprint(s.data_dir if s.data_dir is not None else default_data_dir())
    return ckpt, []


def _restore(ckpt, config, model, opt, rngs, s, spe):
    """Load a resumed run's parameters, optimizer state and generators; returns (history, epochs done).

    ``spe``: steps per epoch.  The optimizer state must be the one ``ckpt.epoch`` epochs leave: ``spe`` steps
    each, and the learning rate of the last epoch (``s.lr``, or its schedule's; ``s.lr`` before the first)."""
    if ckpt.config.to_dict() != config.to_dict():
        raise CheckpointError(f"{ckpt.path}: saved model {ckpt.config.to_dict()} does not match this run's "
                              f"{config.to_dict()}")
    loaded = ckpt.build_model(s.backend)
    model.params.flat[...] = loaded.flat
    ckpt.load_optimizer(opt, model.params, steps=ckpt.epoch * spe,
                        lr=lr_at_epoch(s.schedule, ckpt.epoch - 1, s.lr) if ckpt.epoch else s.lr)
    restore_rngs(rngs, ckpt.rng, where=str(ckpt.path))
    return list(ckpt.history), ckpt.epoch


def _start_fresh(s, model, data):
    """A new run: the output bias at the data's logits if asked."""
    if s.init_output_bias:
        # dec.out.b (one bias per channel for an image model); a model kind without dec_heads names its own
        out_b = getattr(model, "output_bias", None) or model.net.dec_heads[0].name + ".b"
        x = data.x_train
        if get_architecture(s.arch).image:
            x = x.reshape(len(x), model.params[out_b].size, -1).mean(axis=2)
        b = output_bias_init(x)
        model.params[out_b] = b.reshape(model.params[out_b].shape).astype(model.dtype)


class _Step:
    """One training step, written once for every backend and path.

    :meth:`loss` computes the loss of a minibatch and its parts; :meth:`update` then applies the optimizer
    (after the caller has checked the loss).  The fast path (:func:`fast_trainer`) does both in one call, in
    :meth:`loss`; the readable path runs ``model.loss`` there and ``opt.step`` (or its fused twin,
    :func:`fused_adam`) in :meth:`update`.
    """

    def __init__(self, settings, model, opt, y_train, threads):
        self.model, self.opt, self.y_train = model, opt, y_train
        self.obj_kw = loss_kwargs(settings, model)
        self.trainer = fast_trainer(settings, model, opt, self.obj_kw, threads)
        self.fused_adam = None if self.trainer is not None else fused_adam(settings, threads)
        self.grads = None
        self.runner = None          # CuPy: whole epochs as CUDA-graph replays (use_graph), else None
        self.m2 = None              # M2's labelled set (semi_supervised)
        self.at = 0                 # the global step of the next loss (set by _train_epoch)

    def semi_supervised(self, settings, data, rngs):
        """M2 (minivae.m2): each step's batch carries its partial labels (-1: unlabelled), and the classifier's
        cross-entropy is taken on a labelled batch appended to it: every labelled digit when they fit in a batch,
        else the next ``batch_size`` of them in a fixed cycle (by the global step, so a resumed run takes the
        same ones), binarized like the batch."""
        self.y_train = data.y_partial
        self.m2 = (data.x_train[data.labelled], data.y_train[data.labelled], settings, rngs)

    def use_graph(self, settings, x_train, log):
        """CuPy with the fast path: capture the whole step as one CUDA graph where it applies
        (:mod:`minivae.fast.cuda_graph`); where it does not, that module logs why and each step runs eagerly."""
        if self.trainer is None or settings.backend != "cupy":
            return
        from ..fast.cuda_graph import runner_for_training
        self.runner = runner_for_training(self.trainer, settings, len(x_train), x_train, log)

    def loss(self, xb, idx, beta):
        """(loss, parts) of the minibatch ``xb`` (rows ``idx`` of the training set) at KL weight ``beta``."""
        model = self.model
        if self.trainer is not None:
            # the same eps draws as model.loss would take from model.rng (on the host, as every random number:
            # minivae.backend), put on the model's backend; then loss, grads, update
            eps = model.xp.asarray(model.rng.standard_normal((len(idx), model.config.z_dim), dtype=model.dtype))
            return self.trainer.step(xb, eps, beta=beta), self.trainer.parts
        if self.m2 is not None:
            x_l, y_l, s, rngs = self.m2
            n = len(y_l)
            rows = np.arange(n) if n <= s.batch_size else (self.at * s.batch_size + np.arange(s.batch_size)) % n
            x_c = model.xp.asarray(x_l[rows])
            if s.binarize == "dynamic":
                x_c = binarize(x_c, rngs["binarize"])
            loss, self.grads = model.loss(xb, validate=False, y=self.y_train[idx], alpha=s.m2_alpha, x_cls=x_c,
                                          y_cls=y_l[rows])
            return loss, model.parts
        loss, self.grads = model.loss(xb, beta=beta, validate=False, **self.obj_kw,
                                      **label_kwargs(model, self.y_train[idx]))
        return loss, model.parts

    def update(self):
        """The optimizer step of the readable path (the fast path's is already done)."""
        if self.grads is None:
            return
        grads, self.grads = self.grads, None
        if not (self.fused_adam and self.fused_adam(self.opt, self.model.params, grads)):
            self.opt.step(self.model.params, grads)

    def close(self):
        if self.trainer is not None:
            self.trainer.close()
        if self.runner is not None:
            self.runner.close()


def _train_epoch(s, epoch, spe, x_train, model, opt, step, rngs, where, last_ckpt, progress):
    """One pass over the training set; returns the epoch's train record (the averages over its minibatches).

    The same code on every backend: the batch comes from ``x_train`` on the model's backend, and each
    step's loss and parts go into a (steps, 3) float64 array there; NumPy checks every step as it comes, CuPy
    every ``CHECK_EVERY`` steps (so nothing waits for the device in between).  The sums are taken on the
    host at the end, in step order.
    """
    from tqdm import tqdm

    xp = model.xp
    n = len(x_train)
    check_every = 1 if s.backend == "numpy" and not _DEVICE_STYLE_LOOP else CHECK_EVERY
    opt.lr = lr_at_epoch(s.schedule, epoch, s.lr)
    batches = [np.asarray(b) for b in _batches(n, s.batch_size, rngs["shuffle"])]
    steps = xp.empty((spe, 3), dtype=np.float64)    # per step: loss, recon, KL
    # disable=None: no bar when stderr is not a terminal (piped logs stay clean)
    bar = tqdm(total=spe, desc=f"epoch {epoch + 1}/{s.epochs}", leave=False,
               disable=None if progress else True, file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
    shown = 0
    try:
        if step.runner is not None:     # the epoch as graph replays: the same draws, one sync at the end
            steps = step.runner.train_epoch(x_train, batches, rngs["binarize"], model.rng,
                                            [beta_at(s, epoch * spe + k, spe) for k in range(spe)])
            where["step"] = spe
            _check_finite(steps[:, 0], 0, spe, epoch, last_ckpt)
            bar.update(spe)
        for i, idx in enumerate(batches if step.runner is None else ()):
            signals.check()                     # a signal whose exception was swallowed (minivae.signals)
            where["step"] = i + 1
            xb = x_train[xp.asarray(idx)]
            if s.binarize == "dynamic":
                xb = binarize(xb, rngs["binarize"])
            step.at = epoch * spe + i
            loss, parts = step.loss(xb, idx, beta_at(s, epoch * spe + i, spe))
            steps[i, 0], steps[i, 1], steps[i, 2] = loss, parts["recon"], parts["kl"]
            if (i + 1) % check_every == 0 or i + 1 == spe:
                _check_finite(steps[:, 0], shown, i + 1, epoch, last_ckpt)
                bar.update(i + 1 - shown)
                bar.set_postfix(loss=f"{float(steps[:i + 1, 0].mean()):.3f}", refresh=False)
                shown = i + 1
            step.update()
    finally:
        bar.close()
    tot = [0.0, 0.0, 0.0]
    for (lv, rv, kv), idx in zip(to_numpy(steps).tolist(), batches):
        tot[0] += lv * len(idx)
        tot[1] += rv * len(idx)
        tot[2] += kv * len(idx)
    return {"epoch": epoch + 1, "train_loss": tot[0] / n, "train_neg_elbo": (tot[1] + tot[2]) / n,
            "train_recon": tot[1] / n, "train_kl": tot[2] / n}


def _evaluate_epoch(s, epoch, model, data, last_ckpt):
    """The test (and validation) negative ELBO after an epoch, with one fixed eps draw (seed ``test_seed``)."""
    rec = {}
    for name, x, y in (("test", data.test_eval, data.y_test), ("valid", data.valid_eval, data.y_valid)):
        if x is None:
            continue
        ev = evaluate.negative_elbo(model, x, np.random.default_rng(s.test_seed), batch_size=1000,
                                    **label_kwargs(model, y))
        if not all(abs(v) <= MAX_LOSS for v in ev.values()):
            raise TrainingDiverged(f"{name} loss became {ev['loss']:.6g} after epoch {epoch + 1}"
                                   f"{_absurd(ev['loss'])}; training stopped, {last_ckpt()}")
        rec.update({f"{name}_neg_elbo": ev["loss"], f"{name}_recon": ev["recon"], f"{name}_kl": ev["kl"]})
        if getattr(model, "semi_supervised", False):          # M2: q(y|x)'s classification error
            rec[f"{name}_error"] = model.error_rate(x, y)
    return rec


def _absurd(v):
    return f" (above {MAX_LOSS:g} nats per example: diverged)" if math.isfinite(v) else ""


def fast_trainer(settings, model, opt, obj_kw, threads=1):
    """A :class:`minivae.fast.FastTrainer` on ``threads`` threads when the run can use it, else None (the
    readable path).

    The fast path computes the same loss, gradients and update as ``model.loss`` + ``opt.step``
    (the test suite checks it op by op); it covers the plain (beta-)ELBO with one sample
    and the Bernoulli or fixed-variance Gaussian likelihood.  A course assignment's copy of minivae has
    no ``minivae/fast/``, so training there runs the student's code.
    """
    if not settings.fast or obj_kw:
        return None
    try:
        from ..fast import FastPathError, FastTrainer, check_supported
    except ImportError:
        return None
    try:
        check_supported(model.config)
        return FastTrainer(model, opt, threads=threads)     # (CuPy: FastTrainer makes no pool)
    except FastPathError:
        return None


def fused_adam(settings, threads=1):
    """For the readable path (the models FastTrainer does not cover, e.g. the conv VAEs): a function
    ``(opt, params, grads) -> bool`` that makes a plain Adam step in one fused pass when numba is installed
    (:func:`minivae.fast.fused_adam_step`, the same bits as ``opt.step``), or None to always use ``opt.step``."""
    if not settings.fast:
        return None
    try:
        from ..fast import fused_adam_step
    except ImportError:             # a course assignment's copy has no minivae/fast/
        return None
    return lambda opt, params, grads: fused_adam_step(opt, params, grads, threads)


def _batches(n, batch_size, rng):
    from ..data import minibatches
    return minibatches(n, batch_size, rng)


def _check_finite(losses, start, stop, epoch, last_ckpt):
    """TrainingDiverged naming the first step in [start, stop) whose loss is NaN, inf or above MAX_LOSS."""
    xp = get_array_module(losses)
    seg = losses[start:stop]
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
    if getattr(model, "semi_supervised", False):              # M2: q(y|x)'s test classification error
        rep["error"] = model.error_rate(data.test_eval, data.y_test)
    results = {"test": rep}
    if data.valid_eval is not None:
        results["valid"] = evaluate.report(model, data.valid_eval, np.random.default_rng(s.test_seed),
                                           **label_kwargs(model, data.y_valid))
    line = f"final test -ELBO {rep['neg_elbo']:.3f} (recon {rep['recon']:.3f}, KL {rep['kl']:.3f})"
    if rep.get("iw_nll") is not None:
        px = "-log p(x|y)" if model.config.n_classes is not None else "-log p(x)"
        line += f"; IW bound (k={rep['iw_k']}) {px} <= {rep['iw_nll']:.3f}"
    log(line + f" on {rep['n']} test images")
    if rep.get("error") is not None:
        log(f"test classification error of q(y|x): {100 * rep['error']:.2f}% ({s.labels} labelled training digits)")
    if rep.get("collapse_warning"):
        log(f"warning: {rep['collapse_warning']}")
    label_acc = None
    if s.figures and model.config.n_classes is not None:
        # does the model draw the digit it is asked for?  The judge (minivae.judge) is trained once on the real
        # training images of the run's data, cached in the run folder; class_grid.png's title shows its verdict
        from ..judge import describe, label_accuracy, load_or_train
        judge = load_or_train(out_dir, s.data_dir, log=log, n_classes=model.config.n_classes)
        label_acc = dict(label_accuracy(model, judge, n_per_label=100, seed=0),
                         judge_test_accuracy=judge.test_accuracy)
        results["label_accuracy"] = label_acc
        log(describe(judge, label_acc))
    # results first: a figure that fails cannot lose them
    atomic_write(Path(out_dir) / "results.json", lambda f: f.write(json_text(results)), mode="w")
    if s.figures:
        from .. import figures
        paths = figures.run_figures(model, data.x_test, data.y_test, out_dir, history_path=Path(out_dir) /
                                    "history.json", seed=s.seed, label_accuracy=label_acc)
        log(f"figures: {', '.join(str(p) for p in paths)}")
    return results
