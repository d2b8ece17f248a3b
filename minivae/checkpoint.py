"""Checkpoints: one ``.npz`` file per run, written atomically, read without pickle.

Layout of the archive (every entry is a plain array; text is a 0-d unicode array):

    format            "minivae-checkpoint-1"
    config            VAEConfig as JSON
    epoch             number of completed epochs (int64)
    param/<name>      every model parameter (enc.0.W, ..., dec.out.b), host NumPy
    opt/meta          JSON: optimizer name, step count t, current lr
    opt/<i>.<state>   the optimizer's state arrays (Adam m and v, SGD velocity, ...)
    rng               JSON: {name: bit_generator.state} of every NumPy Generator of the run
    settings          JSON of the training settings (see minivae.train.TrainSettings)
    history           JSON list of per-epoch records

The file is loaded with ``np.load(path, allow_pickle=False)``, so opening a
checkpoint never executes code.  Writing goes to a temporary file in the same
folder, which is flushed, fsync'ed and then renamed over the old file with
``os.replace`` (atomic on POSIX and Windows): a crash or Ctrl-C while saving
leaves the previous complete checkpoint in place.
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np

from .backend import to_numpy

FORMAT = "minivae-checkpoint-1"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not match what was asked of it."""


# the package's one atomic writer lives in minivae.atomic; these names stay importable from here
from .atomic import TMP_SUFFIX, WriteError, _umask, atomic_write, stale_temp_files  # noqa: E402,F401


def _text(s):
    return np.array(str(s))


def rng_states(rngs):
    """JSON text of ``{name: generator.bit_generator.state}``."""
    return json.dumps({k: g.bit_generator.state for k, g in rngs.items()})


def restore_rngs(rngs, text, where="checkpoint"):
    """Set each Generator in ``rngs`` to the state saved under its name (``where``: the file, for messages)."""
    states = json.loads(text)
    for k, g in rngs.items():
        if k not in states:
            raise CheckpointError(f"{where}: corrupt field rng: no state for the generator {k!r}")
        try:
            g.bit_generator.state = states[k]
        except (TypeError, ValueError, KeyError, OverflowError) as exc:
            raise CheckpointError(f"{where}: corrupt field rng.{k}: not a state of a {type(g.bit_generator).__name__}"
                                  f" ({type(exc).__name__}: {exc})") from None


def save_checkpoint(path, model, optimizer=None, rngs=None, settings=None, epoch=0, history=None):
    """Write a checkpoint atomically to ``path`` (see the module docstring).

    ``history`` must hold one record per finished epoch, 1..``epoch``: the reader refuses anything else, so the writer
    refuses it first (a ``ValueError`` before any byte is written, never a checkpoint that cannot be loaded back)."""
    from .checkpoint_schema import SchemaError, validate_history_epochs
    try:
        validate_history_epochs(list(history or []), int(epoch))
    except SchemaError as exc:
        raise ValueError(f"save_checkpoint: {exc}") from None
    arrays = {
        "format": _text(FORMAT),
        "config": _text(model.config.to_json()),
        "epoch": np.array(int(epoch), dtype=np.int64),
        "settings": _text(json.dumps(settings or {}, sort_keys=True)),
        "history": _text(json.dumps(history or [])),
        "rng": _text(rng_states(rngs or {})),
    }
    for name, value in model.params.items():
        arrays["param/" + name] = to_numpy(value)
    if optimizer is not None:
        sd = optimizer.state_dict()
        meta = {"name": type(optimizer).__name__.lower(), "t": int(sd["t"]), "lr": float(sd["lr"])}
        arrays["opt/meta"] = _text(json.dumps(meta))
        for key, value in sd.items():
            if key not in ("t", "lr"):
                arrays["opt/" + key] = np.asarray(value)
    return atomic_write(path, lambda f: np.savez(f, **arrays))


class Checkpoint:
    """The parsed contents of a checkpoint file (all on the host)."""

    def __init__(self, path, config, params, epoch, settings, history, rng, opt_meta, opt_state):
        self.path, self.config, self.params, self.epoch = path, config, params, epoch
        self.settings, self.history, self.rng = settings, history, rng
        self.opt_meta, self.opt_state = opt_meta, opt_state

    def build_model(self, backend="numpy"):
        """A :class:`~minivae.model.VAE` (or the model of the config's kind) on ``backend`` holding the saved
        parameters."""
        from .model import build_model
        model = build_model(self.config, rng=0, backend=backend)       # a VAE, or the kind the config names
        missing = set(model.params) - set(self.params)
        extra = set(self.params) - set(model.params)
        if missing or extra:
            raise CheckpointError(f"{self.path}: parameters do not match the saved config "
                                  f"(missing {sorted(missing)}, unexpected {sorted(extra)})")
        for name, value in self.params.items():
            try:
                model.params[name] = value.astype(model.dtype, copy=False)
            except ValueError as exc:
                raise CheckpointError(f"{self.path}: {exc}") from None
        return model

    def load_optimizer(self, optimizer, params, steps=None, lr=None):
        """Restore ``optimizer``'s state (it must be of the saved kind).

        A resumed run passes what the state must be after ``self.epoch`` finished epochs: ``steps``, the
        optimizer steps they took (Adam's bias correction counts them), and ``lr``, the learning rate of the last
        one (its schedule's).  A state that is of the right types but not that (a hand-edited ``t``, a learning
        rate no schedule gave, a negative sum of squares) is refused in one line naming the field and the
        value it must have, instead of a resume that silently trains differently."""
        if self.opt_meta is None:
            raise CheckpointError(f"{self.path}: no optimizer state saved")
        name = type(optimizer).__name__.lower()
        if self.opt_meta["name"] != name:
            raise CheckpointError(f"{self.path}: saved with optimizer {self.opt_meta['name']!r}, "
                                  f"this run uses {name!r}")
        t, saved_lr = self.opt_meta["t"], self.opt_meta["lr"]
        if steps is not None and t != steps:
            raise CheckpointError(f"{self.path}: corrupt field opt/meta.t: expected {steps} (the optimizer steps of "
                                  f"the {self.epoch} finished epoch{'s' if self.epoch != 1 else ''}), got {t}")
        if lr is not None and not (saved_lr > 0 and abs(saved_lr - lr) <= 1e-12 * abs(lr)):
            raise CheckpointError(f"{self.path}: corrupt field opt/meta.lr: expected {lr!r} (the learning rate of "
                                  f"epoch {self.epoch} in this run's settings), got {saved_lr!r}")
        for key, v in self.opt_state.items():
            if key.split(".")[-1] in getattr(optimizer, "nonneg_state", ()) and v.size and v.min() < 0:
                raise CheckpointError(f"{self.path}: corrupt field opt/{key}: expected entries >= 0 (a sum of "
                                      f"squared gradients), got a minimum of {v.min()!r}")
        d = dict(self.opt_state, t=self.opt_meta["t"], lr=self.opt_meta["lr"])
        try:
            optimizer.load_state_dict(d, params)
        except (ValueError, TypeError, KeyError) as exc:
            raise CheckpointError(f"{self.path}: corrupt field opt: {exc}") from None
        return optimizer


def load_checkpoint(path):
    """Read and check a checkpoint; raises :class:`CheckpointError` with a one-line reason."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    if path.is_dir():
        if (path / "checkpoint.npz").exists():
            path = path / "checkpoint.npz"
        else:
            raise CheckpointError(f"{path}: is a folder without a checkpoint.npz")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if magic != b"PK\x03\x04":            # every .npz is a zip archive; anything else is not ours
        raise CheckpointError(f"{path}: not a checkpoint (not a .npz file)")
    try:
        # our own file object, closed by this ``with`` on every path: np.load leaks the handle it opened itself
        # when the archive is unreadable (a ResourceWarning in the one error line)
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError) as exc:
        raise CheckpointError(f"{path}: not a readable .npz checkpoint ({type(exc).__name__}: {exc})") from None
    for key in ("format", "config", "epoch", "settings", "history", "rng"):
        if key not in data:
            raise CheckpointError(f"{path}: missing {key!r}; not a minivae checkpoint")
    if str(data["format"]) != FORMAT:
        raise CheckpointError(f"{path}: unknown checkpoint format {str(data['format'])!r} (expected {FORMAT!r})")
    for key in ("format", "config", "settings", "history", "rng", "opt/meta"):
        if key in data and (data[key].shape != () or data[key].dtype.kind != "U"):
            raise CheckpointError(f"{path}: corrupt field {key}: expected text, got a {data[key].dtype} array of "
                                  f"shape {data[key].shape}")
    docs = {}
    for key in ("config", "settings", "history", "rng", "opt/meta"):
        if key in data:
            try:
                docs[key] = json.loads(str(data[key]))
            except ValueError as exc:
                raise CheckpointError(f"{path}: corrupt field {key}: not JSON ({exc})") from None
    from .checkpoint_schema import SchemaError, validate
    try:                      # every field by type and range (minivae.checkpoint_schema): one line naming it
        validate(docs["config"], docs["settings"], docs["history"], docs["rng"], docs.get("opt/meta"))
    except SchemaError as exc:
        raise CheckpointError(f"{path}: corrupt field {exc}") from None
    try:
        from .model import config_from_dict
        config = config_from_dict(docs["config"])                      # VAEConfig, or the kind it names
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: corrupt field config ({exc})") from None
    settings, history, rng, opt_meta = docs["settings"], docs["history"], str(data["rng"]), docs.get("opt/meta")
    epoch = data["epoch"]
    if epoch.shape != () or epoch.dtype.kind not in "iu" or int(epoch) < 0:
        raise CheckpointError(f"{path}: corrupt 'epoch' (expected one integer >= 0, got a {epoch.dtype} array "
                              f"of shape {epoch.shape})")
    from .checkpoint_schema import validate_history_epochs
    try:
        validate_history_epochs(history, int(epoch))
    except SchemaError as exc:
        raise CheckpointError(f"{path}: corrupt field {exc}") from None
    if not isinstance(settings, dict) or not isinstance(history, list) or \
            not all(isinstance(r, dict) for r in history):
        raise CheckpointError(f"{path}: corrupt metadata (settings must be a JSON object, history a list of "
                              "objects)")
    params = {k[len("param/"):]: v for k, v in data.items() if k.startswith("param/")}
    # the saved arrays must be the config's, checked from the shapes alone: a corrupt config (hidden=[1e8])
    # is refused here, before anything of its size is allocated
    from .model import param_shapes
    want = dict(param_shapes(config))
    got = {k: tuple(v.shape) for k, v in params.items()}
    if got != {k: tuple(v) for k, v in want.items()}:
        bad = sorted(k for k in set(want) | set(got) if tuple(want.get(k, ())) != got.get(k))
        raise CheckpointError(f"{path}: parameters do not match the saved config {config.to_json()} "
                              f"(first mismatch: {bad[0]!r}: config shape {want.get(bad[0])}, saved shape "
                              f"{got.get(bad[0])})")
    for name, v in params.items():
        if v.dtype.kind != "f":
            raise CheckpointError(f"{path}: parameter {name!r} is {v.dtype}, not floating point")
        if not np.isfinite(v).all():
            raise CheckpointError(f"{path}: parameter {name!r} holds NaN or inf; this checkpoint cannot be "
                                  "evaluated or resumed")
    opt_state = {k[len("opt/"):]: v for k, v in data.items() if k.startswith("opt/") and k != "opt/meta"}
    for name, v in opt_state.items():
        if v.dtype.kind != "f" or not np.isfinite(v).all():
            raise CheckpointError(f"{path}: corrupt field opt/{name}: expected finite floating-point optimizer "
                                  f"state, got a {v.dtype} array" + ("" if v.dtype.kind != "f" else " with NaN or inf"))
    return Checkpoint(path, config, params, int(epoch), settings, history, rng, opt_meta, opt_state)
