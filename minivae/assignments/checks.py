"""The parent's side of every check: inputs, truth, comparisons.

Everything here runs in the grader's own process and never in a child.  A
check builds float64 inputs from the run's seed, asks the child (see
:mod:`.runner`) to run one of the student's functions on them, and judges the
raw arrays that come back:

* each output must be a plain ``numpy.ndarray`` of dtype float64 and the
  expected shape;
* backward passes are compared with central finite differences of the
  grader's own forward (:mod:`.reference`), with a random upstream gradient;
  forward passes with the reference formulas;
* the arguments as the child holds them after the call must equal what was
  sent (a backward may not modify its inputs or the upstream gradient);
* on one large input, a backward must answer within a generous multiple of
  the reference backward's time (finite differences would take hundreds of
  times longer);
* ``vae_backward`` runs the student's ``VAE.loss`` with every exercised op
  answered by the parent's reference ops (the child only holds opaque cache
  handles), against finite differences of the reference package's own loss.

A new op exercise needs only an entry in :data:`OP_CHECKS` (its input maker)
and its forward/backward pair in :mod:`.reference`.
"""
from __future__ import annotations

import io
import json
import time

import numpy as np

from . import cases
from . import reference as ref
from .exercises import BY_ID
# finite differences and tolerances as the student's check.py has them (one source: a pass there is a pass here)
from .harness import GRAD_TOL, H, VALUE_TOL, numerical_gradient
from .sandbox import ChildError, text_of

COST_FACTOR = 50      # a backward may take this many times the reference backward on the large input ...
COST_SLACK_S = 2.0    # ... plus this many seconds (start-up, transfer, a busy machine)


class Fail(Exception):
    """A wrong output: ``Fail(quantity, message)``."""

    def __init__(self, quantity, message, status="fail", err=None):
        super().__init__(message)
        self.quantity, self.message, self.status, self.err = quantity, message, status, err


class Judge:
    """Comparisons of one check; ``worst`` is the largest relative error seen."""

    def __init__(self):
        self.worst = 0.0
        self.checked = 0

    def compare(self, name, got, want, tol):
        want = np.asarray(want, dtype=np.float64)
        if got.shape != want.shape:
            self.worst = None
            raise Fail(name, f"{name} has shape {got.shape}, expected {want.shape}")
        self.checked += 1
        if want.size == 0:
            return 0.0
        if not np.all(np.isfinite(got)):
            self.worst = None
            raise Fail(name, f"{name} contains NaN or inf")
        diff = np.abs(got - want)
        i = np.unravel_index(int(np.argmax(diff)), diff.shape)
        err = float(diff[i]) / max(float(np.max(np.abs(got) + np.abs(want))), 1e-300)
        if self.worst is not None:
            self.worst = max(self.worst, err)
        if not err <= tol:
            self.worst = err if self.worst is None else max(self.worst, err)
            raise Fail(name, f"{name} is wrong: rel error {err:.2e} > {tol:.0e}; at index "
                             f"{tuple(int(k) for k in i)} got {float(got[i]):.6g}, expected {float(want[i]):.6g}",
                       err=err)
        return err


rng_for = cases.rng_for


# --------------------------------------------------------------- replies
def _status(reply):
    st = text_of(reply.get("status"))
    if st == "ok":
        return
    msg = text_of(reply.get("message")) or ""
    if st == "not_implemented":
        raise Fail(None, f"NotImplementedError: {msg}" if msg else "NotImplementedError", "not_implemented")
    if st == "fail":              # the child's tripwire: a backward that ran a forward op
        raise Fail(None, msg or "failed", "fail")
    raise Fail(None, msg or "the student's process answered without a status", "error")


def take_array(reply, key, shape, name):
    """The plain float64 array ``key`` of the reply, of the given shape, or Fail naming ``name``."""
    if "type:" + key in reply:
        raise Fail(name, f"{name} should be a numpy array of shape {tuple(shape)}, got "
                         f"{text_of(reply['type:' + key]) or 'something else'}")
    if "num:" + key in reply:
        raise Fail(name, f"{name} should be a numpy array of shape {tuple(shape)}, got a number")
    if "len:" + key in reply:
        raise Fail(name, f"{name} should be one array of shape {tuple(shape)}, got a "
                         f"{int(reply['len:' + key])}-tuple")
    if key not in reply:
        raise Fail(name, f"{name} is missing from the result")
    a = reply[key]
    if a.dtype != np.float64:
        raise Fail(name, f"{name} has dtype {a.dtype}, expected float64 (the inputs are float64)")
    if a.shape != tuple(shape):
        raise Fail(name, f"{name} has shape {a.shape}, expected {tuple(shape)}")
    return a


def take_tuple(reply, key, n, names, what):
    if n == 1:
        return [key]
    got = reply.get("len:" + key)
    if got is None or int(got) != n:
        desc = f"a {int(got)}-tuple" if got is not None else (text_of(reply.get("type:" + key)) or "one array")
        raise Fail(names[0], f"{what} should return {n} values ({', '.join(names)}), got {desc}")
    return [f"{key}.{i}" for i in range(n)]


def encode_args(args, out, prefix="a"):
    """Arguments (arrays, tuples, None, numbers) -> request arrays and a JSON spec."""
    spec = []
    for i, a in enumerate(args):
        key = f"{prefix}.{i}"
        if isinstance(a, tuple):
            spec.append(encode_args(a, out, key))
        elif a is None:
            spec.append("none")
        elif isinstance(a, (int, float)) and not isinstance(a, bool):
            spec.append({"number": a})
        else:
            out[key] = np.ascontiguousarray(a)
            spec.append("array")
    return spec


def _leaves(args, prefix="after"):
    for i, a in enumerate(args):
        key = f"{prefix}.{i}"
        if isinstance(a, tuple):
            yield from _leaves(a, key)
        elif isinstance(a, np.ndarray):
            yield key, a


def call(child, fn, args, timeout, ops=None):
    """The child runs ``fn(*args)``; ``ops`` ({qualified name: reference op}) are answered by the parent."""
    req = {"job": np.array("call"), "fn": np.array(fn)}
    req["spec"] = np.array(json.dumps(encode_args(args, req)))
    rep = child.request(req, timeout, handler=_with_ops(req, ops))
    _status(rep)
    return rep


def needed_ops(ex_id):
    """{qualified name: reference op} of the exercises that ``ex_id``'s solution calls (``needs`` in
    exercises.py): masked_dense_backward calls dense_backward.  The parent answers them during its check (as it
    answers the ops of vae_backward), so an unfinished or wrong dense_backward does not fail masked_dense_backward
    too, and the reference's code of the other exercise never enters the child."""
    return {f"minivae.{cases.BACKWARD[n][0]}:{n}": getattr(ref, n) for n in BY_ID[ex_id].needs}


NEEDED_OP_CALLS = 8      # calls of the needed ops in one request: a backward calls each once


def _with_ops(req, ops):
    """Add the proxy list of ``ops`` to the request; return the handler that answers them (None without ops)."""
    if not ops:
        return None
    req["proxy"] = np.array([f"{q}/{N_OUT.get(q.split(':')[1], 1)}" for q in ops])
    return OpServer(NEEDED_OP_CALLS, ops, what="the backward called")


def no_side_effects(reply, args, names):
    """The arguments after the call must equal what was sent."""
    for key, sent in _leaves(args):
        after = reply.get(key)
        if after is None or after.shape != sent.shape or not np.array_equal(after, sent, equal_nan=True):
            idx = key.split(".")[1:]
            what = names.get(idx[0], f"argument {idx[0]}") + ("" if len(idx) == 1 else f" (cache item {'.'.join(idx[1:])})")
            whose = what if what.startswith("the ") else f"its input {what}"
            raise Fail(what, f"the function modified {whose}; a backward must leave its inputs and "
                             f"the upstream gradient unchanged (work on new arrays, e.g. dx = dy * mask, not "
                             f"dx = dy; dx[...] = 0)")




# ------------------------------------------------------------ op checks
class OpCase:
    """One backward case: ``forward(*inputs) -> (out, cache)`` and the names of the input gradients."""

    def __init__(self, label, forward, inputs, names):
        self.label, self.forward, self.inputs, self.names = label, forward, inputs, names


# the inputs come from cases.py, which the student's check.py draws from too
_gauss, _away_from_zero, _distinct = cases.gauss, cases.away_from_zero, cases.distinct


def _maker(ex_id):
    """The exercise's cases (cases.py) with the grader's reference forward bound to them."""
    def make(rng, big):
        out = []
        for c in cases.BACKWARD[ex_id][1](rng, big):
            fwd = getattr(ref, c.fwd)
            out.append(OpCase(c.label, lambda *ins, fwd=fwd, extra=c.extra: fwd(*ins, *extra), c.inputs, c.names))
        return out
    make.__name__ = f"_{ex_id}"
    return make


# exercise id -> (qualified backward function, input maker(rng, big) -> [OpCase])
OP_CHECKS = {ex: (f"minivae.{module}:{ex}", _maker(ex)) for ex, (module, _) in cases.BACKWARD.items()}
_dense, _relu, _reparam, _bern, _conv = (OP_CHECKS[e][1] for e in (
    "dense_backward", "relu_backward", "reparameterize_backward", "bernoulli_nll_backward", "conv2d_backward"))

# the reference backward of each exercise, for the cost check (from reference.OP_PAIRS)
REF_BACKWARD = {f"{p}_backward": getattr(ref, f"{p}_backward") for p in ref.OP_PAIRS
                if f"{p}_backward" in OP_CHECKS}


def check_op_backward(ex_id, child, judge, seed, timeout):
    fn, make = OP_CHECKS[ex_id]
    rng = rng_for(seed, ex_id)
    for case in make(rng, False):
        out, cache = case.forward(*case.inputs)
        dout = rng_for(seed, f"{ex_id}/dout{case.label}").standard_normal(np.shape(out))   # a random upstream gradient
        nums = [numerical_gradient(lambda: np.asarray(case.forward(*case.inputs)[0]), x, dout)
                for x in case.inputs]
        rep = call(child, fn, (dout, cache), timeout, needed_ops(ex_id))
        keys = take_tuple(rep, "r", len(case.names), case.names, fn.split(":")[1])
        for name, key, x, num in zip(case.names, keys, case.inputs, nums):
            got = take_array(rep, key, x.shape, name + case.label)
            judge.compare(name + case.label, got, num, GRAD_TOL)
        no_side_effects(rep, (dout, cache), {"0": "the upstream gradient", "1": "cache"})


def check_cost(ex_id, child, judge, seed, timeout):
    """The student's backward on one large input: its answer must be right (against the reference backward,
    exact up to round-off) and come within a generous multiple of the reference backward's time."""
    fn, make = OP_CHECKS[ex_id]
    back = REF_BACKWARD[ex_id]
    rng = rng_for(seed, ex_id + "/large")
    (case,) = make(rng, True)[:1]
    out, cache = case.forward(*case.inputs)
    dout = rng.standard_normal(np.shape(out))
    t_ref = min(_timed(lambda: back(dout, cache)) for _ in range(3))
    want = back(dout, cache)
    want = list(want) if isinstance(want, tuple) else [want]
    t0 = time.perf_counter()
    t_fwd = _timed(lambda: case.forward(*case.inputs))
    req = {"job": np.array("call"), "fn": np.array(fn), "result_only": np.array(1)}
    req["spec"] = np.array(json.dumps(encode_args((dout, cache), req)))
    handler = _with_ops(req, needed_ops(ex_id))
    buf = io.BytesIO()
    np.savez(buf, **req)
    np.savez(io.BytesIO(), **{f"r.{i}": w for i, w in enumerate(want)})
    t_transfer = 2 * (time.perf_counter() - t0 - t_fwd)
    limit = COST_FACTOR * t_ref + t_transfer + COST_SLACK_S
    n_in = sum(int(x.size) for x in case.inputs)
    try:
        rep = child.request(req, min(limit, timeout), handler=handler)
    except ChildError as e:
        if str(e) != "timeout":
            raise
        raise Fail(None, f"too slow: on a large input ({n_in} input entries) the backward took more than "
                         f"{limit:.1f} s, where the reference backward takes {t_ref * 1e3:.1f} ms and one forward "
                         f"pass {t_fwd * 1e3:.1f} ms. Backpropagation costs a small multiple of the forward pass; "
                         f"finite differences (or loops over entries) cost one forward pass per input entry. "
                         f"Derive the gradient and compute it with whole-array operations.") from None
    _status(rep)
    keys = take_tuple(rep, "r", len(case.names), case.names, fn.split(":")[1])
    for name, key, x, w in zip(case.names, keys, case.inputs, want):
        what = f"{name} (large input, {n_in} entries)"
        judge.compare(what, take_array(rep, key, x.shape, what), w, GRAD_TOL)


def _timed(f):
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


# ------------------------------------------------------- forward checks
def take_like(reply, key, like, name):
    """The reply's tree under ``key`` in the layout of ``like`` (tuples, arrays, numbers), or Fail naming it."""
    if isinstance(like, tuple):
        n = reply.get("len:" + key)
        if n is None or int(n) != len(like):
            raise Fail(name, f"{name} should be a {len(like)}-tuple, like the backward expects")
        return tuple(take_like(reply, f"{key}.{i}", item, f"{name} item {i}") for i, item in enumerate(like))
    if isinstance(like, np.ndarray):
        a = take_array(reply, key, like.shape, name) if like.dtype == np.float64 else reply.get(key)
        if a is None or a.shape != like.shape or a.dtype.kind not in "biuf":
            raise Fail(name, f"{name} should be an array of shape {like.shape}")
        return a
    got = reply.get("num:" + key)
    if got is None or got.ndim != 0 or got.dtype.kind not in "biuf" or got.item() != like:
        raise Fail(name, f"{name} should be the number {like!r}")
    return like


def check_cache(judge, reply, key, ref_cache, names, backward, dout_shape, seed, label, fn):
    """The cache a forward returned: every item as the reference's, and the reference backward, run on it,
    gives the gradients it gives on the reference's own cache (the engine's unchanged backward reads it)."""
    keys = take_tuple(reply, key, len(ref_cache), names, f"the cache of {fn}")
    cache = []
    for k, want, name in zip(keys, ref_cache, names):
        what = f"{name} (in the cache){label}"
        if isinstance(want, np.ndarray):
            got = take_array(reply, k, want.shape, what)
            judge.compare(what, got, want, VALUE_TOL)
            cache.append(got)
        else:
            cache.append(take_like(reply, k, want, what))
    dout = rng_for(seed, f"cache{label}").standard_normal(dout_shape)
    want = backward(dout, ref_cache)
    with np.errstate(all="ignore"):
        got = backward(dout, tuple(cache))
    want, got = (list(w) if isinstance(w, tuple) else [w] for w in (want, got))
    for i, (g, w) in enumerate(zip(got, want)):
        judge.compare(f"gradient {i} of the reference {backward.__name__} from your cache{label}", np.asarray(g), w,
                      VALUE_TOL)


def check_reparameterize_forward(child, judge, seed, timeout):
    for label, mu, logvar, eps in cases.reparameterize_forward(rng_for(seed, "reparameterize_forward")):
        shape = eps.shape
        args = (mu, logvar, eps)
        rep = call(child, "minivae.gaussian:reparameterize_forward", args, timeout)
        z_want = ref.reparameterize_forward(mu, logvar, eps)[0]
        k_out, k_cache = take_tuple(rep, "r", 2, ["z", "cache"], "reparameterize_forward")
        judge.compare("z" + label, take_array(rep, k_out, shape, "z" + label), z_want, VALUE_TOL)
        no_side_effects(rep, args, {"0": "mu", "1": "logvar", "2": "eps"})
        check_cache(judge, rep, k_cache, ref.reparameterize_forward(mu, logvar, eps)[1], ["sigma", "eps"],
                    ref.reparameterize_backward, shape, seed, label, "reparameterize_forward")


def check_kl_forward(child, judge, seed, timeout):
    mu, logvar = cases.kl_forward(rng_for(seed, "kl_forward"))
    rep = call(child, "minivae.gaussian:kl_forward", (mu, logvar), timeout)
    kl_want, cache_want = ref.kl_forward(mu, logvar)
    k_out, k_cache = take_tuple(rep, "r", 2, ["kl", "cache"], "kl_forward")
    judge.compare("kl", take_array(rep, k_out, kl_want.shape, "kl"), kl_want, VALUE_TOL)
    no_side_effects(rep, (mu, logvar), {"0": "mu", "1": "logvar"})
    check_cache(judge, rep, k_cache, cache_want, ["mu", "var"], ref.kl_backward, kl_want.shape, seed, "", "kl_forward")


def check_bernoulli_nll_forward(child, judge, seed, timeout):
    for label, logits, x in cases.bernoulli_nll_forward(rng_for(seed, "bernoulli_nll_forward")):
        rep = call(child, "minivae.likelihoods:bernoulli_nll_forward", (logits, x), timeout)
        want, cache_want = ref.bernoulli_nll_forward(logits, x)
        k_out, k_cache = take_tuple(rep, "r", 2, ["nll", "cache"], "bernoulli_nll_forward")
        judge.compare("nll" + label, take_array(rep, k_out, want.shape, "nll" + label), want, VALUE_TOL)
        no_side_effects(rep, (logits, x), {"0": "logits", "1": "x"})
        check_cache(judge, rep, k_cache, cache_want, ["logits", "x"], ref.bernoulli_nll_backward, want.shape, seed,
                    label, "bernoulli_nll_forward")


def check_conv_transpose2d_forward(child, judge, seed, timeout):
    for label, x, W, b, s, p in cases.conv_transpose2d_forward(rng_for(seed, "conv_transpose2d_forward")):
        args = (x, W, b, s, p)
        rep = call(child, "minivae.conv:conv_transpose2d_forward", args, timeout)
        y_want, cache_want = ref.conv_transpose2d_forward(x, W, b, s, p)
        k_out, k_cache = take_tuple(rep, "r", 2, ["y", "cache"], "conv_transpose2d_forward")
        judge.compare("y" + label, take_array(rep, k_out, y_want.shape, "y" + label), y_want, VALUE_TOL)
        no_side_effects(rep, args, {"0": "x", "1": "W", "2": "b"})
        check_cache(judge, rep, k_cache, cache_want, ["X", "W", "x_shape", "stride", "padding"],
                    ref.conv_transpose2d_backward, y_want.shape, seed, label, "conv_transpose2d_forward")


def check_adam_step(child, judge, seed, timeout):
    shapes, p0, grads, lr, betas, eps = cases.adam_step(rng_for(seed, "adam_step"))
    steps = len(grads)
    req = {"job": np.array("adam"), "names": np.array(list(shapes)), "lr": np.array(lr),
           "betas": np.array(betas), "eps": np.array(eps), "steps": np.array(steps)}
    for k in shapes:
        req[f"p0/{k}"] = p0[k]
        for t in range(steps):
            req[f"g/{t}/{k}"] = grads[t][k]
    rep = child.request(req, timeout)
    _status(rep)
    history = ref.adam_run([p0[k] for k in shapes], [[g[k] for k in shapes] for g in grads], lr, betas, eps)
    for t in range(steps):
        for i, k in enumerate(shapes):
            for s, j, what in (("p", 0, f"{k} after step {t + 1}"), ("m", 1, f"m[{k}] after step {t + 1}"),
                               ("v", 2, f"v[{k}] after step {t + 1}")):
                judge.compare(what, take_array(rep, f"{s}/{t}/{k}", shapes[k], what), history[t][j][i], VALUE_TOL)


# ------------------------------------------------------------ vae_backward
VAE_CASES = cases.VAE_CASES

# every op the check's MLP VAE calls, answered by the parent inside vae_backward (from reference.OP_PAIRS)
PROXIED_OPS = {f"minivae.{ref.OP_PAIRS[p][0]}:{p}_{d}": getattr(ref, f"{p}_{d}")
               for p in ref.VAE_PAIRS for d in ("forward", "backward")}
N_OUT = {f"{p}_backward": n for p, (_, n) in ref.OP_PAIRS.items()}
MAX_OP_ENTRIES = 1 << 21          # entries of one proxied op's inputs, and of its result
MAX_OP_CALLS = 4000               # proxied op calls in one vae request, at most (see op_call_limit)
MAX_CACHE_BYTES = 128 << 20       # the caches the parent keeps for one child


def _op_entries(name, args):
    """How many entries the op's result would have (before computing it); ValueError if implausible."""
    leaves = []

    def walk(a):
        for x in a:
            if isinstance(x, (tuple, list)):
                walk(x)
            elif isinstance(x, np.ndarray):
                leaves.append(x)
    walk(args)
    for a in leaves:
        if a.ndim > 4 or a.size > MAX_OP_ENTRIES:
            raise ValueError(f"an argument of shape {a.shape} is larger than the check's model ever makes")
    if name.endswith("dense_forward"):
        x, W = args[0], args[1]
        if x.ndim < 1 or W.ndim != 2:
            raise ValueError("dense_forward takes x (N, D_in) and W (D_in, D_out)")
        return int(np.prod(x.shape[:-1])) * W.shape[1]
    if name.endswith("dense_backward"):
        dy, (x, W) = args[0], args[1]
        if dy.ndim < 1 or W.ndim != 2 or x.ndim < 1:
            raise ValueError("dense_backward takes dy (N, D_out) and the cache (x, W)")
        return int(np.prod(dy.shape[:-1])) * W.shape[0] + x.shape[-1] * dy.shape[-1]
    # elementwise ops and their reductions: at most the broadcast of the arguments (each axis, counted from the
    # right, as long as the longest of them: an upper bound even where the shapes do not broadcast)
    ndim = max((a.ndim for a in leaves), default=0)
    dims = [max((a.shape[a.ndim - k] for a in leaves if a.ndim >= k), default=1) for k in range(1, ndim + 1)]
    return int(np.prod(dims, dtype=np.float64))


class OpServer:
    """Answers the child's op calls with the reference ops; caches stay here, the child gets handles.

    Bounded: each call's arguments and result (:data:`MAX_OP_ENTRIES`), the number of calls
    (:data:`MAX_OP_CALLS`) and the bytes of the caches kept (:data:`MAX_CACHE_BYTES`)."""

    def __init__(self, max_calls=None, ops=None, what="the model called the ops"):
        self.caches = {}
        self.calls = 0
        self.cache_bytes = 0
        self.max_calls = MAX_OP_CALLS if max_calls is None else min(int(max_calls), MAX_OP_CALLS)
        self.ops = PROXIED_OPS if ops is None else ops       # the ops it answers, by qualified name
        self.what = what

    def _decode(self, spec, msg, prefix="a"):
        args = []
        for i, s in enumerate(spec if isinstance(spec, list) else []):
            key = f"{prefix}.{i}"
            if s == "handle":
                h = int(msg[key])
                if h not in self.caches:
                    raise ValueError("unknown cache handle (a cache must come from the matching forward)")
                args.append(self.caches[h])
            elif s == "array":
                a = msg[key]
                if a.dtype.kind not in "biuf":
                    raise ValueError(f"argument {i} is not a numeric array")
                args.append(a.astype(np.float64, copy=False))
            elif s == "none":
                args.append(None)
            elif isinstance(s, list):
                args.append(tuple(self._decode(s, msg, key)))
            else:
                raise ValueError("bad argument")
        return args

    def __call__(self, msg):
        name = text_of(msg.get("op")) or ""
        self.calls += 1
        if self.calls > self.max_calls:
            raise Fail(None, f"{self.what} more than {self.max_calls} times for one loss and its "
                             "gradients (one forward and one backward pass call each op once or twice): finite "
                             "differences, repeated forward passes or a loop over entries instead of the chain rule")
        try:
            fn = self.ops[name]
            spec = json.loads(text_of(msg.get("spec")) or "[]")
            args = self._decode(spec, msg)
            if _op_entries(name, args) > MAX_OP_ENTRIES:
                raise ValueError("its result would be larger than the check's model ever makes")
            with np.errstate(all="ignore"):
                result = fn(*args)
        except Exception as e:          # noqa: BLE001 -- the student's chain passed something wrong
            return {"error": np.array(f"{name.split(':')[-1]}: {type(e).__name__}: {e}"[:500])}
        if name.endswith("_forward"):
            out, cache = result
            size = _nbytes(cache)
            if self.cache_bytes + size > MAX_CACHE_BYTES:
                return {"error": np.array(f"{name.split(':')[-1]}: the caches of this check passed "
                                          f"{MAX_CACHE_BYTES >> 20} MiB (one forward pass keeps a few: finite "
                                          "differences or repeated forward passes?)")}
            self.cache_bytes += size
            h = len(self.caches) + 1
            self.caches[h] = cache
            return {"out.0": np.asarray(out), "handle": np.array(h)}
        outs = result if isinstance(result, tuple) else (result,)
        return {f"out.{i}": np.asarray(o) for i, o in enumerate(outs)}


def _nbytes(value):
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    return 64


def op_call_limit(n_params):
    """Proxied op calls allowed for one loss and its gradients: a forward pass calls at most one op per
    parameter array and a few more (reparameterization, KL, likelihood), the backward as many again; twice
    that is allowed.  Finite differences need two forward passes per parameter entry."""
    return 4 * (int(n_params) + 4)


def proxy_list():
    out = []
    for qual in PROXIED_OPS:
        fn = qual.split(":")[1]
        out.append(f"{qual}/{N_OUT.get(fn, 1)}")
    return out


def check_vae_backward(child, judge, seed, timeout):
    from minivae.config import VAEConfig          # the installed reference package (trusted)
    from minivae.model import VAE
    rng = rng_for(seed, "vae_backward")
    deadline = time.monotonic() + timeout
    for kwargs, N, S, beta, obj in VAE_CASES:
        cfg = dict(kwargs, dtype="float64")
        model = VAE(VAEConfig(**cfg), rng=np.random.default_rng(rng.integers(2 ** 31)))
        x, eps = cases.vae_inputs(rng, model.params, kwargs["x_dim"], kwargs["z_dim"], N, S)
        names = list(model.params)
        loss_kwargs = dict(obj, beta=beta, n_samples=S)
        req = {"job": np.array("vae"), "config": np.array(json.dumps(cfg)), "names": np.array(names),
               "kwargs": np.array(json.dumps(loss_kwargs)), "x": x, "eps": eps, "proxy": np.array(proxy_list())}
        for k in names:
            req[f"param/{k}"] = np.array(model.params[k])
        rep = child.request(req, max(deadline - time.monotonic(), 0.1),
                            handler=OpServer(op_call_limit(len(names))))
        _status(rep)

        def f():
            return np.asarray(model.loss(x, eps=eps.copy(), backward=False, **loss_kwargs)[0], dtype=np.float64)

        case = (f"{kwargs['likelihood']} VAE, hidden={kwargs['hidden']}, S={S}, beta={beta}"
                + "".join(f", {k}={v}" for k, v in obj.items()))
        wrong = []
        for name in names:
            p = model.params[name]
            num = numerical_gradient(f, p, np.float64(1.0))
            try:
                got = take_array(rep, f"grad/{name}", p.shape, name)
                judge.compare(name, got, num, GRAD_TOL)
            except Fail as e:
                wrong.append(e)
        if wrong:         # name the worst one, so the message and worst_rel_error agree
            worst = max(wrong, key=lambda w: float("inf") if w.err is None else w.err)
            raise Fail(worst.quantity, f"{len(wrong)} wrong gradient(s) ({case}): "
                                       f"{', '.join(w.quantity for w in wrong)}; worst: {worst.message}", err=worst.err)
    check_vae_cost(child, judge, rng, deadline)


# the cost case of vae_backward: a model of MNIST's size, where finite differences of the loss would take
# hundreds of thousands of forward passes
VAE_COST_CASE = (dict(x_dim=784, hidden=(256,), z_dim=16, activation="relu", likelihood="bernoulli"), 64, 1, 1.0)
VAE_PROXY_SLACK_S = 5.0     # the op calls' round trips to the parent (a few dozen, each well under 0.1 s)


def check_vae_cost(child, judge, rng, deadline):
    """The student's chain on a large model: the gradients right (against the reference model's backward), in
    a generous multiple of the reference's time, with a bounded number of op calls."""
    from minivae.config import VAEConfig
    from minivae.model import VAE
    kwargs, N, S, beta = VAE_COST_CASE
    cfg = dict(kwargs, dtype="float64")
    model = VAE(VAEConfig(**cfg), rng=np.random.default_rng(rng.integers(2 ** 31)))
    x = rng.uniform(0.05, 0.95, (N, kwargs["x_dim"]))
    eps = rng.standard_normal((S, N, kwargs["z_dim"]))
    names = list(model.params)
    loss_kwargs = dict(beta=beta, n_samples=S)
    t_ref = min(_timed(lambda: model.loss(x, eps=eps.copy(), **loss_kwargs)) for _ in range(2))
    want = {k: np.array(v) for k, v in model.loss(x, eps=eps.copy(), **loss_kwargs)[1].items()}
    req = {"job": np.array("vae"), "config": np.array(json.dumps(cfg)), "names": np.array(names),
           "kwargs": np.array(json.dumps(loss_kwargs)), "x": x, "eps": eps, "proxy": np.array(proxy_list())}
    for k in names:
        req[f"param/{k}"] = np.array(model.params[k])
    limit = COST_FACTOR * t_ref + COST_SLACK_S + VAE_PROXY_SLACK_S
    n_params = sum(int(np.size(v)) for v in model.params.values())
    try:
        rep = child.request(req, max(min(limit, deadline - time.monotonic()), 0.1),
                            handler=OpServer(op_call_limit(len(names))))
    except ChildError as e:
        if str(e) != "timeout":
            raise
        raise Fail(None, f"too slow: on a model with {n_params} parameters the loss and its gradients took more "
                         f"than {limit:.1f} s, where the reference takes {t_ref * 1e3:.1f} ms. Backpropagation "
                         "costs a small multiple of one forward pass; finite differences cost two forward passes "
                         "per parameter. Chain the op backwards.") from None
    _status(rep)
    for name in names:
        what = f"{name} (large model, {n_params} parameters)"
        judge.compare(what, take_array(rep, f"grad/{name}", want[name].shape, what), want[name], GRAD_TOL)


FORWARD_CHECKS = {"reparameterize_forward": check_reparameterize_forward, "kl_forward": check_kl_forward,
                  "conv_transpose2d_forward": check_conv_transpose2d_forward,
                  "bernoulli_nll_forward": check_bernoulli_nll_forward, "adam_step": check_adam_step,
                  "vae_backward": check_vae_backward}


def has_check(ex_id):
    return ex_id in OP_CHECKS or ex_id in FORWARD_CHECKS


class _Budget:
    """``child`` with one deadline for the whole check: ``--timeout`` bounds the exercise, not each request
    (a check with three cases once ran three timeouts long)."""

    def __init__(self, child, deadline):
        self._child, self._deadline = child, deadline

    def request(self, arrays, timeout, handler=None):
        left = max(self._deadline - time.monotonic(), 0.1)      # the time is spent: a short grace, no more
        if handler is None:
            return self._child.request(arrays, min(timeout, left))
        return self._child.request(arrays, min(timeout, left), handler)

    def __getattr__(self, name):
        return getattr(self._child, name)


def run_check(ex_id, child, seed, timeout):
    """Run one exercise's check against ``child``; return the result fields (status, errors, message)."""
    judge = Judge()
    out = {"status": "pass", "passed": True, "worst_rel_error": None, "gradient": None, "message": "ok"}
    deadline = time.monotonic() + timeout
    child = _Budget(child, deadline)
    try:
        if ex_id in OP_CHECKS:
            check_op_backward(ex_id, child, judge, seed, timeout)
            check_cost(ex_id, child, judge, seed, max(deadline - time.monotonic(), 0.1))
        else:
            FORWARD_CHECKS[ex_id](child, judge, seed, timeout)
    except Fail as e:
        out.update(status=e.status, passed=False, gradient=e.quantity, message=e.message)
        if e.status == "fail" and e.err is None:
            judge.worst = None         # a wrong type, shape or side effect: no error is defined
    except ChildError as e:
        if str(e) == "timeout":
            out.update(status="timeout", passed=False,
                       message=f"no result within {timeout:g} s (an endless loop?); the check was stopped")
        else:
            out.update(status="error", passed=False, message=str(e))
    if judge.checked or judge.worst is None:
        out["worst_rel_error"] = judge.worst if judge.checked else None
    out["checked"] = judge.checked
    return out
