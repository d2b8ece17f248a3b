"""The local checks of a minivae student copy (copied there as ``check.py``).

``python check.py [EXERCISE ...]`` runs, in one process, the same checks the
grader runs, on the student's own code: backward passes against central
finite differences (float64, random upstream gradient), forward passes and
the Adam step against values recorded from the reference when the copy was
made (``check_expected.npz``), so the formulas are not in the copy.

Locally a backward check takes its cache and its finite differences from the
student's own forward.  So that a wrong forward does not show up as a wrong
backward, the forward's values on the check's inputs are compared with the
recorded ones first; when they differ, the report names that other exercise.
``vae_backward`` runs through the student's own ops; when one of them fails
its own check, the report says so.  (The grader, :mod:`.grading`, uses its
own reference ops there, in a separate process, and grades only the chaining.)

``python harness.py record --student SRC --reference REF --out FILE`` is what
``make`` runs on the reference code to record the expected values.

NumPy and the standard library only: it never imports the checking tools of
the package it checks.
"""
import argparse
import importlib
import importlib.util
import os
import re
import sys
import time
import traceback
from pathlib import Path

import numpy as np

GRAD_TOL = 1e-6      # finite differences vs analytic, float64, h = 1e-5
VALUE_TOL = 1e-9     # forward values vs the reference formula, float64
H = 1e-5
LOCAL_SEED = 0
EXPECTED_FILE = "check_expected.npz"
# {file: [exercise ids in order]}: the region layout of the starter, written here by ``make``.  The grader
# grades every exercise of a file whose markers differ from it as not done; so does this check.
REGIONS = {}
_BEGIN_RE = re.compile(r"^(?P<indent>[ \t]*)### BEGIN SOLUTION(?:[ \t]+(?P<id>\S+))?[ \t]*$")
_END_RE = re.compile(r"^[ \t]*### END SOLUTION[ \t]*$")
_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+\Z")


def region_ids(text):
    """The exercise ids of ``text``'s regions in order, or None when a marker is broken (the grader's rule)."""
    ids, open_ = [], None
    for line in _LINE.findall(text):
        line = line.rstrip("\r\n")
        m = _BEGIN_RE.match(line)
        if m:
            if open_ is not None or not m.group("id"):
                return None
            open_ = m.group("id")
        elif _END_RE.match(line):
            if open_ is None:
                return None
            ids.append(open_)
            open_ = None
        elif line.lstrip().startswith(("### BEGIN SOLUTION", "### END SOLUTION")):
            return None
    return None if open_ is not None else ids


def marker_problems(here):
    """{exercise id: message} for the exercises of every file whose region markers differ from the starter's."""
    bad = {}
    for rel, ids in REGIONS.items():
        try:
            found = region_ids((Path(here) / rel).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            found = None
        if found != ids:
            msg = (f"the exercise markers in {rel} were changed or broken (expected the regions "
                   f"{', '.join(ids)}, each between '### BEGIN SOLUTION <id>' and '### END SOLUTION' on lines of "
                   f"their own); the grader grades every exercise of this file as not done")
            for e in ids:
                bad.setdefault(e, msg)
    return bad
MODULES = ("config", "layers", "gaussian", "likelihoods", "conv", "optim", "model", "made", "flows")
OP_MODULE = {"dense_forward": "layers", "relu_forward": "layers", "tanh_forward": "layers",
             "sigmoid_forward": "layers", "reparameterize_forward": "gaussian", "kl_forward": "gaussian",
             "bernoulli_nll_forward": "likelihoods", "conv2d_forward": "conv", "maxpool2d_forward": "conv",
             "upsample_nearest2d_forward": "conv", "masked_dense_forward": "made",
             "planar_joint_forward": "flows"}


def _load_cases():
    """The check inputs, shared with the grader: its cases.py, or beside check.py in a student copy."""
    if __package__:
        return importlib.import_module(".cases", __package__)
    here = Path(__file__).resolve().parent
    for name in ("check_cases.py", "cases.py"):
        if (here / name).is_file():
            spec = importlib.util.spec_from_file_location("_minivae_check_cases", here / name)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            return mod
    raise ImportError(f"check_cases.py is missing beside {Path(__file__).name}: regenerate the starter with make")


CASES = _load_cases()


class CheckFailed(Exception):
    """Stops one check at the first wrong quantity."""


# ----------------------------------------------------------------------------
# importing the student's package
# ----------------------------------------------------------------------------
def import_student(student_dir):
    """Import ``minivae`` from ``student_dir`` only; return {module name: module}."""
    student_dir = Path(student_dir).resolve()
    here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if p not in ("", ".", here)]
    sys.path.insert(0, str(student_dir))
    # An editable install of the reference (pip install -e) adds a finder *after* the path finder: a module
    # missing from the student copy would silently come from the reference.  Drop such finders.
    sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
    for name in [m for m in sys.modules if m == "minivae" or m.startswith("minivae.")]:
        del sys.modules[name]
    importlib.invalidate_caches()
    pkg = importlib.import_module("minivae")
    origin = Path(pkg.__file__).resolve()
    if student_dir not in origin.parents:
        raise ImportError(f"imported minivae from {origin}, not from {student_dir}: "
                          "the student copy must hold minivae/__init__.py")
    mods = {"minivae": pkg}
    for m in MODULES:
        mods[m] = importlib.import_module(f"minivae.{m}")
        where = Path(mods[m].__file__).resolve()
        if student_dir not in where.parents:
            raise ImportError(f"imported minivae.{m} from {where}, not from {student_dir}")
    return mods


def load_reference(path):
    spec = importlib.util.spec_from_file_location("_minivae_grader_reference", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ----------------------------------------------------------------------------
# context: where the truth comes from
# ----------------------------------------------------------------------------
class Context:
    """mode "grade"/"record": truth from the reference module; "local": truth from recorded values."""

    def __init__(self, mode, mods, seed, reference=None, expected=None):
        self.mode, self.mods, self.seed = mode, mods, seed
        self.ref, self.expected = reference, expected
        self.recorded = {}

    def rng(self, key):
        return CASES.rng_for(self.seed, key)

    def op(self, name):
        """A forward op returning ``(out, cache)``: the reference's, or locally the student's own."""
        if self.ref is not None:
            return getattr(self.ref, name)
        return getattr(self.mods[OP_MODULE[name]], name)

    def expect(self, key, compute):
        """The expected value stored under ``key``; ``compute()`` uses the reference module."""
        if self.mode == "local":
            if key not in self.expected:
                raise KeyError(f"{EXPECTED_FILE} has no value {key!r}: regenerate the starter with make")
            return self.expected[key]
        value = np.asarray(compute())
        if value.dtype.kind not in "iu":     # integers (a shape, a stride in a cache) stay integers
            value = value.astype(np.float64)
        if self.mode == "record":
            self.recorded[key] = value
        return value

    def expect_forward(self, key, out):
        """Locally: the student's forward must give the recorded values, else name that exercise."""
        want = self.expect(f"forward/{key}", lambda: out)
        if self.mode == "local":
            name = key.split(" ")[0]
            if want.shape != out.shape or not np.allclose(out, want, rtol=1e-9, atol=1e-12):
                raise CheckFailed((name, f"this check uses your {name}, which gives wrong values on its inputs: "
                                         f"make exercise {name} pass first (the grader uses its own {name} here)"))

    @property
    def patch_model(self):
        return self.ref is not None


class Result:
    def __init__(self):
        self.worst = 0.0
        self.checked = []

    def compare(self, name, got, want, tol):
        """Record rel error of ``got`` against ``want``; raise CheckFailed when wrong."""
        want = np.asarray(want, dtype=np.float64)
        if not hasattr(got, "shape"):
            self.worst = float("inf")        # no error can be computed: reported as None / n/a
            raise CheckFailed((name, f"{name} should be an array of shape {want.shape}, got {type(got).__name__}"))
        got_np = _to_numpy(got)
        if tuple(got_np.shape) != tuple(want.shape):
            self.worst = float("inf")
            raise CheckFailed((name, f"{name} has shape {tuple(got_np.shape)}, expected {tuple(want.shape)}"))
        if got_np.dtype != np.float64:       # the grader's rule: the inputs are float64, so is every answer
            self.worst = float("inf")
            raise CheckFailed((name, f"{name} has dtype {got_np.dtype}, expected float64 (the inputs are float64)"))
        self.checked.append(name)
        if want.size == 0:
            return 0.0
        if not np.all(np.isfinite(got_np)):
            self.worst = float("inf")
            raise CheckFailed((name, f"{name} contains NaN or inf"))
        diff = np.abs(got_np - want)
        i = np.unravel_index(int(np.argmax(diff)), diff.shape)
        err = float(diff[i]) / max(float(np.max(np.abs(got_np) + np.abs(want))), 1e-300)
        self.worst = max(self.worst, err)
        if not err <= tol:
            idx = tuple(int(k) for k in i)
            raise CheckFailed((name, f"{name} is wrong: rel error {err:.2e} > {tol:.0e}; at index {idx} "
                                     f"got {float(got_np[i]):.6g}, expected {float(want[i]):.6g}"))
        return err


def _to_numpy(a):
    if hasattr(a, "get"):      # CuPy
        a = a.get()
    return np.asarray(a)


def _unpack(value, n, names, what):
    if n == 1:
        if isinstance(value, (tuple, list)):
            raise CheckFailed((names[0], f"{what} should return one array ({names[0]}), got a {len(value)}-tuple"))
        return (value,)
    if not isinstance(value, (tuple, list)) or len(value) != n:
        got = f"a {len(value)}-tuple" if isinstance(value, (tuple, list)) else type(value).__name__
        raise CheckFailed((names[0], f"{what} should return {n} values ({', '.join(names)}), got {got}"))
    return tuple(value)


def numerical_gradient(f, x, dout, h=H):
    """Central differences of sum(f() * dout) with respect to x (perturbed in place, restored)."""
    grad = np.zeros_like(x)
    flat, gflat = x.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + h
        fp = float(np.sum(f() * dout))
        flat[i] = old - h
        fm = float(np.sum(f() * dout))
        flat[i] = old
        gflat[i] = (fp - fm) / (2 * h)
    return grad


def _copy(obj):
    if isinstance(obj, np.ndarray):
        return obj.copy()
    if isinstance(obj, tuple):
        return tuple(_copy(o) for o in obj)
    if isinstance(obj, list):
        return [_copy(o) for o in obj]
    return obj


def _leaves(obj, prefix):
    if isinstance(obj, (tuple, list)):
        for i, o in enumerate(obj):
            yield from _leaves(o, prefix + (i,))
    elif hasattr(obj, "shape") and hasattr(obj, "dtype"):
        yield prefix, obj


def no_side_effects(args, saved, names):
    """The arguments after the call must equal what was sent (``saved``: copies taken before); the grader
    compares the arrays it gets back after the call the same way, with the same message."""
    after = dict(_leaves(args, ()))
    for key, before in _leaves(saved, ()):
        now = _to_numpy(after.get(key))
        if now is None or now.shape != before.shape or not np.array_equal(now, _to_numpy(before), equal_nan=True):
            what = names.get(str(key[0]), f"argument {key[0]}") + (
                "" if len(key) == 1 else f" (cache item {'.'.join(map(str, key[1:]))})")
            whose = what if what.startswith("the ") else f"its input {what}"
            raise CheckFailed((what, f"the function modified {whose}; a backward must leave its inputs and "
                                     f"the upstream gradient unchanged (work on new arrays, e.g. dx = dy * mask, not "
                                     f"dx = dy; dx[...] = 0)"))


def _without_forward_ops(mods, backward, args):
    """Call ``backward`` while every ``*_forward`` function of the package raises: a backward that runs a
    forward op (finite differences, all entries nudged at once) fails, here as in the grader."""
    import types
    called, saved = [], []

    def trip(fname):
        def tripped(*a, **k):
            called.append(fname)
            raise RuntimeError(f"{fname} called inside a backward")
        return tripped
    for mod in {id(m): m for m in mods.values()}.values():
        for k, v in list(vars(mod).items()):
            if isinstance(v, types.FunctionType) and v.__name__.endswith("_forward"):
                saved.append((mod, k, v))
                setattr(mod, k, trip(v.__name__))
    try:
        got = backward(*args)
    except Exception:
        if not called:
            raise
    finally:
        for mod, k, v in saved:
            setattr(mod, k, v)
    if called:
        raise CheckFailed((None, f"{backward.__name__} called {called[0]}: a backward must derive its gradient, "
                                 "not run a forward op (finite differences)"))
    return got


def check_op_backward(ctx, res, ex, case, backward):
    """Finite differences of the forward (the reference's, or locally the student's own) against the student's
    backward, on one case of cases.py, with a random upstream gradient."""
    fwd = ctx.op(case.fwd)

    def f(*inputs):
        return fwd(*inputs, *case.extra)
    out, cache = f(*case.inputs)
    out = np.asarray(_to_numpy(out), dtype=np.float64)
    ctx.expect_forward(case.fwd + case.label, out)
    dout = ctx.rng(f"{ex}/dout{case.label}").standard_normal(out.shape)
    nums = [numerical_gradient(lambda: np.asarray(_to_numpy(f(*case.inputs)[0]), dtype=np.float64), x, dout)
            for x in case.inputs]
    args = (dout.copy(), _copy(cache))
    saved = _copy(args)
    got = _without_forward_ops(ctx.mods, backward, args)
    got = _unpack(got, len(case.names), case.names, backward.__name__)
    for name, g, num in zip(case.names, got, nums):
        res.compare(name + case.label, g, num, GRAD_TOL)
    no_side_effects(args, saved, {"0": "the upstream gradient", "1": "cache"})


def cache_items(ctx, res, key, cache, like, names, label=""):
    """Every item of a forward's cache as the reference's (the engine's unchanged backward reads it): arrays
    within VALUE_TOL of the recorded ones, numbers equal; the grader checks the same items, and runs its
    reference backward on the cache."""
    fn = key.split(" ")[0]
    items = _unpack(cache, len(names), names, f"the cache of {fn}")
    for item, want_like, name in zip(items, like, names):
        what = f"{name} (in the cache){label}"
        want = ctx.expect(f"{key}/cache/{name}", lambda: np.asarray(want_like))
        if want.dtype.kind == "f":
            res.compare(what, item, want, VALUE_TOL)
        elif isinstance(item, np.ndarray) or np.asarray(item).shape != want.shape or \
                not np.array_equal(np.asarray(item), want):
            raise CheckFailed((what, f"{what} should be {tuple(want.tolist()) if want.ndim else want.item()!r}"))


# ----------------------------------------------------------------------------
# the checks, one per exercise (their inputs: check_cases.py, the grader's too)
# ----------------------------------------------------------------------------
def _backward_check(ex):
    module, make = CASES.BACKWARD[ex]

    def check(ctx, res):
        back = getattr(ctx.mods[module], ex)
        for case in make(ctx.rng(ex), False):
            check_op_backward(ctx, res, ex, case, back)
    check.__name__ = f"check_{ex}"
    return check


def check_reparameterize_forward(ctx, res):
    f = ctx.mods["gaussian"].reparameterize_forward
    for case, mu, logvar, eps in CASES.reparameterize_forward(ctx.rng("reparameterize_forward")):
        args = (mu.copy(), logvar.copy(), eps.copy())
        z, cache = _unpack(f(*args), 2, ["z", "cache"], "reparameterize_forward")
        want = ctx.expect(f"reparameterize_forward/z{case}", lambda: ctx.ref.reparameterize_forward(mu, logvar, eps)[0])
        res.compare("z" + case, z, want, VALUE_TOL)
        no_side_effects(args, (mu, logvar, eps), {"0": "mu", "1": "logvar", "2": "eps"})
        ref_cache = ctx.ref.reparameterize_forward(mu, logvar, eps)[1] if ctx.ref else (None, None)
        cache_items(ctx, res, f"reparameterize_forward{case}", cache, ref_cache, ["sigma", "eps"], case)


def check_kl_forward(ctx, res):
    mu, logvar = CASES.kl_forward(ctx.rng("kl_forward"))
    args = (mu.copy(), logvar.copy())
    out = ctx.mods["gaussian"].kl_forward(*args)
    kl, cache = _unpack(out, 2, ["kl", "cache"], "kl_forward")
    res.compare("kl", kl, ctx.expect("kl_forward/kl", lambda: ctx.ref.kl_forward(mu, logvar)[0]), VALUE_TOL)
    no_side_effects(args, (mu, logvar), {"0": "mu", "1": "logvar"})
    ref_cache = ctx.ref.kl_forward(mu, logvar)[1] if ctx.ref else (None, None)
    cache_items(ctx, res, "kl_forward", cache, ref_cache, ["mu", "var"])


def check_bernoulli_nll_forward(ctx, res):
    f = ctx.mods["likelihoods"].bernoulli_nll_forward
    for case, logits, x in CASES.bernoulli_nll_forward(ctx.rng("bernoulli_nll_forward")):
        args = (logits.copy(), x.copy())
        nll, cache = _unpack(f(*args), 2, ["nll", "cache"], "bernoulli_nll_forward")
        want = ctx.expect(f"bernoulli_nll_forward/nll{case}", lambda: ctx.ref.bernoulli_nll_forward(logits, x)[0])
        res.compare("nll" + case, nll, want, VALUE_TOL)
        no_side_effects(args, (logits, x), {"0": "logits", "1": "x"})
        ref_cache = ctx.ref.bernoulli_nll_forward(logits, x)[1] if ctx.ref else (None, None)
        cache_items(ctx, res, f"bernoulli_nll_forward{case}", cache, ref_cache, ["logits", "x"], case)


def check_conv_transpose2d_forward(ctx, res):
    f = ctx.mods["conv"].conv_transpose2d_forward
    for case, x, W, b, s, p in CASES.conv_transpose2d_forward(ctx.rng("conv_transpose2d_forward")):
        args = (x.copy(), W.copy(), b.copy(), s, p)
        y, cache = _unpack(f(*args), 2, ["y", "cache"], "conv_transpose2d_forward")
        want = ctx.expect(f"conv_transpose2d_forward/y{case}",
                          lambda: ctx.ref.conv_transpose2d_forward(x, W, b, s, p)[0])
        res.compare("y" + case, y, want, VALUE_TOL)
        no_side_effects(args, (x, W, b), {"0": "x", "1": "W", "2": "b"})
        ref_cache = ctx.ref.conv_transpose2d_forward(x, W, b, s, p)[1] if ctx.ref else (None,) * 5
        cache_items(ctx, res, f"conv_transpose2d_forward{case}", cache, ref_cache,
                    ["X", "W", "x_shape", "stride", "padding"], case)


def check_adam_step(ctx, res):
    shapes, p0, grads_seq, lr, betas, eps = CASES.adam_step(ctx.rng("adam_step"))
    history = None
    if ctx.mode != "local":
        history = ctx.ref.adam_run([p0[k] for k in shapes], [[g[k] for k in shapes] for g in grads_seq], lr, betas, eps)
    opt = ctx.mods["optim"].Adam(lr=lr, betas=betas, eps=eps)
    params = {k: v.copy() for k, v in p0.items()}
    for t, grads in enumerate(grads_seq, start=1):
        opt.step(params, {k: v.copy() for k, v in grads.items()})
        for i, k in enumerate(shapes):
            res.compare(f"{k} after step {t}", params[k],
                        ctx.expect(f"adam_step/p/{k}/{t}", lambda: history[t - 1][0][i]), VALUE_TOL)
            st = opt.state[i] if isinstance(opt.state, list) and len(opt.state) > i else {}
            for s, j in (("m", 1), ("v", 2)):
                if s not in st:
                    raise CheckFailed((f"{s}[{k}]", f"the optimizer state has no {s!r} for {k}"))
                res.compare(f"{s}[{k}] after step {t}", st[s],
                            ctx.expect(f"adam_step/{s}/{k}/{t}", lambda: history[t - 1][j][i]), VALUE_TOL)


def check_vae_backward(ctx, res):
    rng = ctx.rng("vae_backward")
    model_mod, config_mod = ctx.mods["model"], ctx.mods["config"]
    saved = {}
    if ctx.patch_model:       # grade only the model's chaining, with the grader's own ops
        for name in ctx.ref.MODEL_OPS:
            if hasattr(model_mod, name):
                saved[name] = getattr(model_mod, name)
                setattr(model_mod, name, getattr(ctx.ref, name))
    wrong = []                # (parameter, message), every wrong parameter of the first bad case
    try:
        for kwargs, N, S, beta, obj in CASES.VAE_CASES:
            cfg = config_mod.VAEConfig(dtype="float64", **kwargs)
            model = model_mod.VAE(cfg, rng=np.random.default_rng(rng.integers(2 ** 31)))
            if ctx.patch_model:
                model.act_forward, model.act_backward = ctx.ref.ACTIVATIONS[kwargs["activation"]]
            x, eps = CASES.vae_inputs(rng, model.params, kwargs["x_dim"], kwargs["z_dim"], N, S)
            loss_kwargs = dict(obj, beta=beta, n_samples=S)
            _, grads = model.loss(x, eps=eps.copy(), **loss_kwargs)
            grads = {k: _to_numpy(v).copy() for k, v in grads.items()}

            def f():
                return np.asarray(_to_numpy(model.loss(x, eps=eps.copy(), backward=False, **loss_kwargs)[0]),
                                  dtype=np.float64)

            for name, p in model.params.items():
                if name not in grads:
                    raise CheckFailed((name, f"the gradients have no entry {name!r}"))
                num = numerical_gradient(f, p, np.float64(1.0))
                before = res.worst
                try:
                    res.compare(name, grads[name], num, GRAD_TOL)
                except CheckFailed as e:
                    wrong.append(e.args[0] + (res.worst if res.worst > before else float("inf"),))
            if wrong:      # name the worst, so the message agrees with the worst rel error
                case = (f"{kwargs['likelihood']} VAE, hidden={kwargs['hidden']}, S={S}, beta={beta}"
                        + "".join(f", {k}={v}" for k, v in obj.items()))
                worst = max(wrong, key=lambda w: w[2])
                raise CheckFailed((worst[0], f"{len(wrong)} wrong gradient(s) ({case}): "
                                             f"{', '.join(w[0] for w in wrong)}; worst: {worst[1]}"))
    finally:
        for name, fn in saved.items():
            setattr(model_mod, name, fn)


for _ex in CASES.BACKWARD:
    globals()[f"check_{_ex}"] = _backward_check(_ex)
# the exercises whose reference solution calls another's function (exercises.py's ``needs``)
NEEDS = {"masked_dense_backward": ("dense_backward",)}
# every exercise, in the course's order
CHECKS = {ex: globals()[f"check_{ex}"] for ex in (
    "dense_backward", "relu_backward", "tanh_backward", "sigmoid_backward", "reparameterize_forward",
    "reparameterize_backward", "kl_forward", "kl_backward", "bernoulli_nll_forward", "bernoulli_nll_backward",
    "conv2d_backward", "conv_transpose2d_forward", "maxpool2d_backward", "upsample_nearest2d_backward",
    "masked_dense_backward", "planar_joint_backward", "adam_step",
    "vae_backward")}


# ----------------------------------------------------------------------------
# running one check
# ----------------------------------------------------------------------------
def _where(exc, student_dir):
    """'file.py:line' of the innermost frame in the student's code, if any."""
    if student_dir is None:
        return ""
    root = str(Path(student_dir).resolve())
    for fr in reversed(traceback.extract_tb(exc.__traceback__)):
        if os.path.abspath(fr.filename).startswith(root + os.sep):
            return f" (at {os.path.relpath(fr.filename, root)}:{fr.lineno})"
    return ""


def run_check(ctx, exercise_id, student_dir=None):
    res = Result()
    out = {"id": exercise_id, "status": "pass", "passed": True, "worst_rel_error": None, "gradient": None,
           "message": "ok"}
    t0 = time.perf_counter()
    try:
        with np.errstate(all="ignore"):
            CHECKS[exercise_id](ctx, res)
    except CheckFailed as e:
        out.update(status="fail", passed=False, gradient=e.args[0][0], message=e.args[0][1])
    except NotImplementedError as e:
        msg = f"NotImplementedError: {e}" if str(e) else "NotImplementedError"
        other = str(e).split(":")[0][len("exercise "):] if str(e).startswith("exercise ") else exercise_id
        if other != exercise_id:
            msg = f"this check uses exercise {other}, which is not done yet ({msg})"
        out.update(status="not_implemented", passed=False, message=msg)
    except Exception as e:     # the student's code crashed
        out.update(status="error", passed=False,
                   message=f"{type(e).__name__}: {e}{_where(e, student_dir)}".replace("\n", " "))
    if res.checked or res.worst == float("inf"):
        out["worst_rel_error"] = res.worst if np.isfinite(res.worst) else None
    out["checked"] = len(res.checked)
    out["seconds"] = round(time.perf_counter() - t0, 3)
    return out


# ----------------------------------------------------------------------------
# entry points
# ----------------------------------------------------------------------------
def _record(args):
    mods = import_student(args.student)
    ctx = Context("record", mods, LOCAL_SEED, reference=load_reference(args.reference))
    bad = []
    for ex in CHECKS:
        r = run_check(ctx, ex, args.student)
        if not r["passed"]:
            bad.append(f"{ex}: {r['message']}")
    if bad:
        print("the reference code fails its own checks:\n  " + "\n  ".join(bad), file=sys.stderr)
        return 1
    np.savez_compressed(args.out, **ctx.recorded)
    return 0


def _local(argv):
    """``python check.py [EXERCISE ...]`` inside a student copy."""
    here = Path(__file__).resolve().parent
    p = argparse.ArgumentParser(prog="python check.py",
                                description="Run the gradient and forward checks of your exercises.")
    p.add_argument("exercises", nargs="*", help=f"exercise ids (default: all): {', '.join(CHECKS)}")
    args = p.parse_args(argv)
    unknown = [e for e in args.exercises if e not in CHECKS]
    if unknown:
        print(f"error: unknown exercise {', '.join(unknown)}; choose from {', '.join(CHECKS)}", file=sys.stderr)
        return 2
    try:
        mods = import_student(here)
        with np.load(here / EXPECTED_FILE) as z:
            expected = {k: z[k] for k in z.files}
    except Exception as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    ctx = Context("local", mods, LOCAL_SEED, expected=expected)
    passed = 0
    wanted = args.exercises or list(CHECKS)
    results = {}
    broken = marker_problems(here)
    for ex in wanted:
        r = run_check(ctx, ex, here)
        if ex in broken:
            r.update(status="fail", passed=False, gradient=None, message=broken[ex])
        if ex == "vae_backward" and not r["passed"]:
            ops = [e for e in CHECKS if e not in ("vae_backward", "adam_step")   # the MLP VAE's ops, not MADE's or
                   and CASES.BACKWARD.get(e, ("",))[0] not in ("made", "flows")]     # the flows'
            bad = [e for e in ops if not (results.get(e) or run_check(ctx, e, here))["passed"]]
            if bad:
                r["message"] += (f" (locally vae_backward runs through your own ops, and these fail their own "
                                 f"checks: {', '.join(bad)}; the grader uses its own ops here)")
        elif not r["passed"] and NEEDS.get(ex):
            bad = [e for e in NEEDS[ex] if not (results.get(e) or run_check(ctx, e, here))["passed"]]
            if bad:
                r["message"] += (f" (locally {ex} runs your own {', '.join(bad)}, which fails its own check; the "
                                 f"grader uses its own here)")
        results[ex] = r
        passed += r["passed"]
        print(format_line(r))
    print(f"{passed} of {len(wanted)} passed")
    return 0 if passed == len(wanted) else 1


def format_line(r, width=28):
    err = r.get("worst_rel_error")
    err_s = f"{err:.1e}" if isinstance(err, (int, float)) else "n/a"
    status = {"pass": "PASS", "fail": "FAIL", "error": "ERROR", "not_implemented": "TODO",
              "timeout": "TIMEOUT"}.get(r["status"], r["status"].upper())
    line = f"  {r['id']:<{width}} {status:<8} worst rel error {err_s:>7}"
    if not r["passed"]:
        if r.get("gradient"):
            line += f"  wrong: {r['gradient']}"
        line += f"\n  {'':<{width}} {r.get('message', '')}"
    return line


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "record":
        p = argparse.ArgumentParser(prog="harness")
        p.add_argument("mode")
        p.add_argument("--student", required=True)
        p.add_argument("--reference", required=True)
        p.add_argument("--exercise")
        p.add_argument("--result")
        p.add_argument("--out")
        p.add_argument("--seed", type=int, default=1)
        args = p.parse_args(argv)
        return _record(args)
    return _local(argv)


if __name__ == "__main__":
    sys.exit(main())
