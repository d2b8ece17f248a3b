"""The schema of a checkpoint's metadata: every field's type and range, checked when the file is loaded.

A checkpoint's JSON parts (``config``, ``settings``, ``history``, ``rng``, ``opt/meta``) come from a file that
may be damaged or edited by hand.  :func:`validate` checks each field against the tables below, so any
corruption ends in one :class:`~minivae.checkpoint.CheckpointError` naming the field and the file,
``runs/a/checkpoint.npz: corrupt field settings.test_seed: expected an integer >= 0, got 'x'``, instead of a
traceback somewhere in the code that later uses it.

A field a checkpoint lacks takes its default (an older checkpoint stays loadable); an unknown field is refused
by the dataclasses themselves (``TrainSettings.from_dict``, ``VAEConfig.from_dict``).
"""
from __future__ import annotations

import math
import numbers


class SchemaError(ValueError):
    """One field of a checkpoint is not what the schema says; ``str`` is ``field: expected ..., got ...``."""


# ------------------------------------------------------------------ field kinds: check(value) -> None or a reason
def _is_int(v):
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_num(v):
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def integer(lo=None):
    def check(v):
        if not _is_int(v) or (lo is not None and v < lo):
            return "an integer" + (f" >= {lo}" if lo is not None else "")
    return check


def number(positive=False, nonneg=False, below=None):
    """A finite number (> 0 with ``positive``, >= 0 with ``nonneg``, and < ``below`` if given)."""
    def check(v):
        if not _is_num(v) or (positive and v <= 0) or (nonneg and v < 0) or (below is not None and v >= below):
            if below is not None and nonneg:
                return f"a finite number in [0, {below:g})"
            return "a finite number" + (" > 0" if positive else " >= 0" if nonneg else "") + \
                (f" < {below:g}" if below is not None else "")
    return check


def text(v):
    if not isinstance(v, str):
        return "a string"


def choice(*options):
    """One of a fixed set of names (a field the code uses as is, e.g. ``np.dtype(settings.dtype)``)."""
    def check(v):
        if v not in options:
            return "one of " + ", ".join(repr(o) for o in options)
    return check


DTYPES = ("float32", "float64")                 # minivae.config: training dtypes
BINARIZE = ("none", "dynamic", "static")        # minivae.data.BINARIZE (test_checkpoint checks they agree)
BACKENDS = ("numpy", "cupy")                    # minivae.backend.BACKENDS


def boolean(v):
    if not isinstance(v, bool):
        return "true or false"


def optional(check):
    def opt(v):
        if v is not None and check(v):
            return check(v) + " or null"
    return opt


def int_list(lo=1, length=None):
    def check(v):
        if not isinstance(v, (list, tuple)) or not v or (length is not None and len(v) != length) \
                or not all(_is_int(h) and h >= lo for h in v):
            n = f"{length} " if length is not None else ""
            return f"a list of {n}integers >= {lo}"
    return check


def schedule(v):
    if not isinstance(v, list) or not all(isinstance(p, list) and len(p) == 2 and _is_int(p[0]) and p[0] >= 0
                                          and _is_num(p[1]) and p[1] > 0 for p in v):
        return "a list of [epoch >= 0, learning rate > 0] pairs"


def data_record(v):
    if not isinstance(v, dict) or not isinstance(v.get("path"), str) or not isinstance(v.get("files"), dict) \
            or not all(isinstance(k, str) and isinstance(f, list) and len(f) == 2 and _is_int(f[0]) and f[0] >= 0
                       and isinstance(f[1], str) for k, f in v["files"].items()):
        return 'an object {"path": folder, "files": {name: [size, sha256]}}'


# ---------------------------------------------------------------------------------------------- the tables
SETTINGS = {
    "recipe": text, "arch": text, "conditional": boolean, "label_decoder": text, "label_encoder": text, "hidden": int_list(1), "latent": integer(1),
    "activation": text, "likelihood": text, "obs_var": number(positive=True), "dec_logvar_min": optional(number()),
    "dtype": choice(*DTYPES), "binarize": choice(*BINARIZE), "data_dir": optional(text), "n_train": optional(integer(1)),
    "n_test": optional(integer(1)), "valid": integer(0), "test_seed": integer(0), "data": optional(data_record),
    "optimizer": text, "lr": number(positive=True), "adam_eps": number(positive=True), "momentum": number(nonneg=True, below=1),
    "weight_decay": number(nonneg=True), "clip_norm": optional(number(positive=True)), "batch_size": integer(1),
    "epochs": integer(0), "schedule": optional(schedule), "init_output_bias": boolean, "beta": number(nonneg=True),
    "warmup": integer(0), "beta_start": number(nonneg=True), "iwae_k": optional(integer(1)), "free_bits": optional(number(nonneg=True)),
    "seed": integer(0), "backend": choice(*BACKENDS), "iw_k": integer(0), "figures": boolean, "fast": boolean,
    "threads": optional(integer(1)), "decoder": text, "flow": optional(text), "iwae_grad": text,
    "prior": optional(text), "stochastic_layers": integer(1), "latent2": optional(integer(1)),
    "labels": optional(integer(1)), "alpha": optional(number(nonneg=True)),
}

CONFIG = {
    "x_dim": integer(1), "hidden": int_list(1), "z_dim": integer(1), "activation": text, "likelihood": text,
    "dtype": choice(*DTYPES), "obs_var": number(positive=True), "arch": text, "image_shape": optional(int_list(1, length=3)),
    "dec_logvar_min": optional(number()), "n_classes": optional(integer(1)), "label_decoder": text,
    "label_encoder": text,
    "kind": text, "decoder": text, "flow": optional(text), "prior": optional(text),
    "z2_dim": integer(1), "hidden2": int_list(1), "classes": integer(2),   # the model kinds of minivae.model
}

BIT_GENERATORS = ("PCG64", "PCG64DXSM", "Philox", "SFC64", "MT19937")

OPT_META = {"name": text, "t": integer(0), "lr": number(nonneg=True)}


def _fields(doc, table, where, required=()):
    if not isinstance(doc, dict):
        raise SchemaError(f"{where}: expected a JSON object, got {_show(doc)}")
    for name in required:
        if name not in doc:
            raise SchemaError(f"{where}.{name}: missing")
    for name, value in doc.items():
        check = table.get(name)        # an unknown name is for the dataclass to refuse (TrainSettings.from_dict)
        reason = check(value) if check is not None else None
        if reason:
            raise SchemaError(f"{where}.{name}: expected {reason}, got {_show(value)}")


def _show(v):
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def validate_config(doc):
    _fields(doc, CONFIG, "config", required=("x_dim",))


def validate_settings(doc):
    _fields(doc, SETTINGS, "settings")


def validate_history(doc):
    if not isinstance(doc, list):
        raise SchemaError(f"history: expected a list of per-epoch objects, got {_show(doc)}")
    for i, rec in enumerate(doc):
        if not isinstance(rec, dict):
            raise SchemaError(f"history[{i}]: expected an object, got {_show(rec)}")
        if not _is_int(rec.get("epoch")) or rec["epoch"] < 1:
            raise SchemaError(f"history[{i}].epoch: expected an integer >= 1, got {_show(rec.get('epoch'))}")
        for k, v in rec.items():
            if v is not None and not isinstance(v, (numbers.Real, str)):
                raise SchemaError(f"history[{i}].{k}: expected a number, got {_show(v)}")


def validate_history_epochs(history, epoch):
    """The history holds one record per finished epoch, in order: epochs 1..``epoch`` (a resume appends to it, so a
    missing or extra record would make the run's history skip or repeat an epoch)."""
    got = [rec.get("epoch") for rec in history]
    if len(got) != epoch or got != list(range(1, epoch + 1)):      # the length first: epoch may be huge
        shown = ", ".join(map(str, got[:6])) + (", ..." if len(got) > 6 else "")
        raise SchemaError(f"history: expected one record per epoch 1..{epoch} (the checkpoint's epoch is {epoch}), "
                          f"got {len(got)} record(s) for epochs [{shown}]")


def validate_rng(doc):
    if not isinstance(doc, dict):
        raise SchemaError(f"rng: expected an object of generator states, got {_show(doc)}")
    for name, state in doc.items():
        if not isinstance(state, dict) or not isinstance(state.get("bit_generator"), str) \
                or not isinstance(state.get("state"), dict):
            raise SchemaError(f"rng.{name}: expected a NumPy bit-generator state (an object with bit_generator "
                              f"and state), got {_show(state)}")
        import numpy as np
        kind = state["bit_generator"]
        if kind not in BIT_GENERATORS:
            raise SchemaError(f"rng.{name}.bit_generator: expected one of {', '.join(BIT_GENERATORS)}, got {kind!r}")
        try:                      # the state must be one the generator accepts (checked on a throw-away one)
            getattr(np.random, kind)().state = state
        except (TypeError, ValueError, KeyError, OverflowError) as exc:
            raise SchemaError(f"rng.{name}: not a valid {kind} state ({type(exc).__name__}: {exc})") from None


def validate_opt_meta(doc):
    _fields(doc, OPT_META, "opt/meta", required=("name", "t", "lr"))


def validate(config, settings, history, rng, opt_meta):
    """Raise :class:`SchemaError` naming the first field of the parsed metadata that is out of its type or range."""
    validate_config(config)
    validate_settings(settings)
    validate_history(history)
    validate_rng(rng)
    if opt_meta is not None:
        validate_opt_meta(opt_meta)
