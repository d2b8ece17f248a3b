"""The grader's judging code (checks.py, reference.py), in this process and fast.

test_assignments.py and test_grader_attacks.py grade real student copies through the sandbox (a child
process per exercise): they test the whole path, in seconds per test.  Here the child is replaced by
``InProcessChild``, which answers each request with the runner's own code (``runner.build``, ``flatten``,
``job_adam``) in this process, through the same ``.npz`` round trip, so each check takes milliseconds and
every verdict can be tested: a correct student passes every exercise, and every kind of wrong answer
(a wrong value, an ignored upstream gradient, a wrong shape, dtype or tuple, a side effect, a crash, a
slow backward) fails the right exercise with the right status.
"""
import io
import json
import time
import types
from contextlib import contextmanager

import numpy as np
import pytest

from minivae import gaussian, layers, likelihoods, optim
from minivae.assignments import checks, runner
from minivae.assignments import reference as ref
from minivae.assignments.checks import GRAD_TOL, VALUE_TOL, Fail, Judge, run_check
from minivae.assignments.exercises import IDS
from minivae.assignments.sandbox import ChildError, parse_npz

SEED = 1234


def _npz(arrays):
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


class InProcessChild:
    """A child that runs the "student's" functions in this process: ``fns`` maps ``module:function`` to the
    student's version (the rest is minivae's own code, the reference solution)."""

    def __init__(self, fns=None, adam=None):
        self.fns, self.adam, self.requests = dict(fns or {}), adam, []

    def request(self, req, timeout, handler=None):
        req = parse_npz(_npz(req))                  # what the child receives: plain arrays only
        self.requests.append(req)
        job = str(req["job"])
        t0 = time.perf_counter()
        try:
            if job == "call":
                fn = self.fns.get(str(req["fn"])) or runner.resolve(str(req["fn"]))
                args = runner.build(json.loads(str(req["spec"])), req)
                with np.errstate(all="ignore"):
                    result = fn(*args)
                out = {"status": runner.text("ok")}
                runner.flatten(result, "r", out)
                if "result_only" not in req:
                    runner.flatten(args, "after", out)
            elif job == "adam":
                with _patched(optim, "Adam", self.adam or optim.Adam):
                    out = runner.job_adam(req)
            elif job == "vae":
                out = self._vae(req)
            else:
                raise AssertionError(job)
        except Exception as e:          # noqa: BLE001 -- as the runner does
            out = runner.error_reply(e)
        if time.perf_counter() - t0 > timeout:
            raise ChildError("timeout")
        return parse_npz(_npz(out))

    def _vae(self, req):
        """The runner's vae job without the op proxies: the student's model runs minivae's own ops."""
        from minivae.config import VAEConfig
        from minivae.model import VAE
        model = VAE(VAEConfig(**json.loads(str(req["config"]))), rng=np.random.default_rng(0))
        for k in [str(n) for n in req["names"]]:
            model.params[k][...] = req[f"param/{k}"]
        _, grads = model.loss(req["x"], eps=req["eps"], **json.loads(str(req["kwargs"])))
        grads = (self.fns.get("vae_grads") or (lambda g: g))(grads)
        out = {"status": runner.text("ok")}
        for k, v in grads.items():
            runner.flatten(v, f"grad/{k}", out)
        return out


@contextmanager
def _patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def grade(ex_id, fns=None, adam=None, timeout=60.0, seed=SEED):
    return run_check(ex_id, InProcessChild(fns, adam), seed, timeout)


BACKWARD = {ex: fn for ex, (fn, _) in checks.OP_CHECKS.items()}
FORWARD = {"reparameterize_forward": "minivae.gaussian:reparameterize_forward",
           "kl_forward": "minivae.gaussian:kl_forward",
           "bernoulli_nll_forward": "minivae.likelihoods:bernoulli_nll_forward",
           "conv_transpose2d_forward": "minivae.conv:conv_transpose2d_forward"}
N_GRADS = {ex: len(make(np.random.default_rng(0), False)[0].names) for ex, (_, make) in checks.OP_CHECKS.items()}


def _correct(qual):
    return runner.resolve(qual)


def _outputs(result):
    return list(result) if isinstance(result, tuple) else [result]


def _pack(outs):
    return tuple(outs) if len(outs) > 1 else outs[0]


# ------------------------------------------------------------- verdicts
def test_every_exercise_has_a_check_and_a_correct_student_passes_it():
    assert set(IDS) == set(checks.OP_CHECKS) | set(checks.FORWARD_CHECKS)
    for ex in IDS:
        r = grade(ex)
        assert r["status"] == "pass" and r["passed"] and r["message"] == "ok", (ex, r)
        assert r["checked"] > 0 and r["gradient"] is None
        assert 0 <= r["worst_rel_error"] < (GRAD_TOL if ex in BACKWARD or ex == "vae_backward" else VALUE_TOL), (ex, r)


@pytest.mark.parametrize("ex", sorted(BACKWARD))
@pytest.mark.parametrize("which", ["first", "last"])
def test_a_backward_off_by_1e_5_fails_naming_the_gradient(ex, which):
    """A relative error of 1e-5 in one returned gradient (10x the tolerance) fails, and names that gradient."""
    qual = BACKWARD[ex]
    i = 0 if which == "first" else N_GRADS[ex] - 1

    def student(dy, cache):
        outs = [np.array(o) for o in _outputs(_correct(qual)(dy, cache))]
        outs[i] = outs[i] * (1 + 1e-5)
        return _pack(outs)

    r = grade(ex, {qual: student})
    name = checks.OP_CHECKS[ex][1](np.random.default_rng(0), False)[0].names[i]
    assert r["status"] == "fail" and not r["passed"], r
    assert r["gradient"].startswith(name) and "is wrong: rel error" in r["message"], r
    assert 1e-6 < r["worst_rel_error"] < 1e-4


@pytest.mark.parametrize("ex", sorted(BACKWARD))
def test_a_backward_that_ignores_the_upstream_gradient_fails(ex):
    qual = BACKWARD[ex]
    r = grade(ex, {qual: lambda dy, cache: _correct(qual)(np.ones_like(dy), cache)})
    assert r["status"] == "fail" and r["worst_rel_error"] > 1e-3, r


@pytest.mark.parametrize("ex", sorted(FORWARD))
def test_a_forward_off_by_1e_7_fails(ex):
    """Forward values are compared at 1e-9: an error of 1e-7 (the size of a wrong eps placement) fails."""
    qual = FORWARD[ex]

    def student(*args):
        out, cache = _correct(qual)(*args)
        return out * (1 + 1e-7), cache

    r = grade(ex, {qual: student})
    assert r["status"] == "fail" and 1e-8 < r["worst_rel_error"] < 1e-6, r


@pytest.mark.parametrize("ex", sorted(FORWARD))
def test_a_forward_with_the_right_output_and_a_wrong_cache_fails_where_the_cache_is_checked(ex):
    qual = FORWARD[ex]

    def student(*args):
        out, cache = _correct(qual)(*args)
        return out, tuple(np.array(c) * 2.0 if isinstance(c, np.ndarray) else c for c in cache)

    r = grade(ex, {qual: student})
    assert r["passed"] is False, r
    first = {"reparameterize_forward": "sigma", "kl_forward": "mu", "bernoulli_nll_forward": "logits",
             "conv_transpose2d_forward": "X"}[ex]
    assert r["gradient"].startswith(f"{first} (in the cache)"), r


def test_tolerances_pass_round_off():
    """An error well inside the tolerance (round-off) still passes, forward and backward."""
    qual = FORWARD["kl_forward"]
    r = grade("kl_forward", {qual: lambda *a: (_correct(qual)(*a)[0] * (1 + 1e-12), _correct(qual)(*a)[1])})
    assert r["passed"] and 0 < r["worst_rel_error"] < 1e-11, r
    qual = BACKWARD["tanh_backward"]
    r = grade("tanh_backward", {qual: lambda dy, y: _correct(qual)(dy, y) * (1 + 1e-8)})
    assert r["passed"] and 1e-9 < r["worst_rel_error"] < GRAD_TOL, r


# -------------------------------------------------- malformed answers
def _dense(transform):
    qual = BACKWARD["dense_backward"]
    return grade("dense_backward", {qual: lambda dy, cache: transform(_correct(qual)(dy, cache))})


def test_wrong_tuple_length_type_shape_dtype_and_nan_fail_with_a_message():
    cases = {
        "two values": (lambda r: r[:2], "dense_backward should return 3 values (dx, dW, db), got a 2-tuple"),
        "one array": (lambda r: r[0], "should return 3 values (dx, dW, db), got one array"),
        "a dict": (lambda r: (r[0], {"dW": r[1]}, r[2]), "dW should be a numpy array of shape (3, 5), got dict"),
        "nested": (lambda r: (r[0], (r[1],), r[2]), "dW should be one array of shape (3, 5), got a 1-tuple"),
        "shape": (lambda r: (r[0], r[1].T, r[2]), "dW has shape (5, 3), expected (3, 5)"),
        "dtype": (lambda r: (r[0], r[1].astype(np.float32), r[2]), "dW has dtype float32, expected float64"),
        "nan": (lambda r: (r[0], r[1] * np.nan, r[2]), "dW contains NaN or inf"),
    }
    for what, (transform, message) in cases.items():
        r = _dense(transform)
        assert r["status"] == "fail" and not r["passed"], (what, r)
        assert message in r["message"], (what, r["message"])
        assert r["worst_rel_error"] is None, (what, r)       # no error is defined for a malformed answer
        assert r["gradient"] == ("dx" if what in ("two values", "one array") else "dW"), (what, r)


def test_a_missing_output_and_a_string_fail():
    qual = FORWARD["kl_forward"]
    r = grade("kl_forward", {qual: lambda mu, lv: "kl"})
    assert r["status"] == "fail" and "kl_forward should return 2 values (kl, cache), got str" in r["message"]
    r = grade("kl_forward", {qual: lambda mu, lv: (_correct(qual)(mu, lv)[0], (mu,))})
    assert r["status"] == "fail" and r["gradient"] == "mu", r
    assert r["message"] == "the cache of kl_forward should return 2 values (mu, var), got a 1-tuple", r
    r = grade("kl_forward", {qual: lambda mu, lv: (_correct(qual)(mu, lv)[0], (mu, np.exp(lv), 1))})
    assert r["status"] == "fail" and "should return 2 values (mu, var), got a 3-tuple" in r["message"], r


def test_modifying_an_input_fails_naming_it():
    qual = BACKWARD["relu_backward"]

    def zeroes_dy(dy, x):
        dx = _correct(qual)(dy, x)
        dy[...] = 0
        return dx

    r = grade("relu_backward", {qual: zeroes_dy})
    assert r["status"] == "fail" and r["gradient"] == "the upstream gradient", r
    assert "modified the upstream gradient;" in r["message"] and r["worst_rel_error"] is None
    qual = BACKWARD["dense_backward"]

    def scales_W(dy, cache):
        out = _correct(qual)(dy, cache)
        cache[1][0, 0] += 1.0
        return out

    r = grade("dense_backward", {qual: scales_W})
    assert r["gradient"] == "cache (cache item 1)", r
    qual = FORWARD["kl_forward"]

    def clips_logvar(mu, logvar):
        out = _correct(qual)(mu, logvar)
        np.clip(logvar, -1, 1, out=logvar)
        return out

    r = grade("kl_forward", {qual: clips_logvar})
    assert r["status"] == "fail" and r["gradient"] == "logvar", r


def test_not_implemented_and_crashes_are_reported_with_their_status():
    qual = BACKWARD["kl_backward"]

    def stub(*a):
        raise NotImplementedError("exercise kl_backward: derive it")

    r = grade("kl_backward", {qual: stub})
    assert r["status"] == "not_implemented" and not r["passed"]
    assert r["message"] == "NotImplementedError: exercise kl_backward: derive it"
    assert r["worst_rel_error"] is None and r["checked"] == 0
    r = grade("kl_backward", {qual: lambda *a: 1 / 0})
    assert r["status"] == "error" and r["message"].startswith("ZeroDivisionError: division by zero"), r
    assert not r["passed"] and r["gradient"] is None


def test_status_replies():
    with pytest.raises(Fail) as e:
        checks._status({"status": np.array("not_implemented"), "message": np.array("")})
    assert (e.value.status, e.value.message) == ("not_implemented", "NotImplementedError")
    with pytest.raises(Fail) as e:
        checks._status({})
    assert e.value.status == "error" and e.value.message == "the student's process answered without a status"
    assert checks._status({"status": np.array("ok")}) is None


def test_a_slow_backward_fails_the_cost_check(monkeypatch):
    """The large-input run may take COST_FACTOR x the reference backward plus slack; a slower one fails."""
    monkeypatch.setattr(checks, "COST_SLACK_S", 0.05)
    qual = BACKWARD["sigmoid_backward"]
    calls = []

    def slow(dy, y):
        calls.append(dy.shape)
        if dy.size > 1000:
            time.sleep(0.4)
        return _correct(qual)(dy, y)

    r = grade("sigmoid_backward", {qual: slow})
    assert calls[-1] == (256, 512)                       # the large input
    assert r["status"] == "fail" and r["message"].startswith("too slow: on a large input (131072 input entries)")
    assert r["worst_rel_error"] is None and r["gradient"] is None
    r = grade("sigmoid_backward", {qual: lambda dy, y: (time.sleep(0.4), _correct(qual)(dy, y))[1]}, timeout=0.2)
    assert r["status"] == "timeout" and "no result within 0.2 s" in r["message"], r
    assert r["passed"] is False, r                        # a stopped check never passes


def test_the_cost_check_gets_the_answer_but_not_the_large_arguments_back():
    child = InProcessChild()
    run_check("dense_backward", child, SEED, 60)
    last = child.requests[-1]
    assert "result_only" in last and last["a.0"].shape == (128, 256)
    assert all("result_only" not in q for q in child.requests[:-1])
    assert [q["a.0"].shape for q in child.requests[:-1]] == [(4, 5)]


def test_child_errors_other_than_timeouts_are_errors():
    class Dead(InProcessChild):
        def request(self, req, timeout, handler=None):
            raise ChildError("the student's process exited")
    r = run_check("kl_forward", Dead(), SEED, 10)
    assert (r["status"], r["passed"], r["message"]) == ("error", False, "the student's process exited")
    assert r["worst_rel_error"] is None and r["checked"] == 0


# ------------------------------------------------------------------ Adam
def _adam_variant(eps_of):
    class Variant(optim.Adam):
        def __init__(self, lr, betas, eps):
            super().__init__(lr=lr, betas=betas, eps=eps_of(eps))
    return Variant


def test_adam_passes_and_its_typical_mistakes_fail():
    assert grade("adam_step")["passed"]
    for what, eps_of in (("eps ignored", lambda eps: 1e-8), ("eps doubled", lambda eps: 2 * eps)):
        r = grade("adam_step", adam=_adam_variant(eps_of))
        assert r["status"] == "fail" and r["gradient"].startswith("a after step 1"), (what, r)

    class NoBiasCorrection(optim.Adam):
        def step(self, params, grads):
            super().step(params, grads)
            self.t = 0

    r = grade("adam_step", adam=NoBiasCorrection)
    assert r["status"] == "fail" and r["gradient"] == "a after step 2", r


def test_adam_inputs_depend_on_the_seed():
    a, b, c = InProcessChild(), InProcessChild(), InProcessChild()
    for child, seed in ((a, 1), (b, 1), (c, 2)):
        checks.check_adam_step(child, Judge(), seed, 10)
    (ra,), (rb,), (rc,) = a.requests, b.requests, c.requests
    assert all(np.array_equal(ra[k], rb[k]) for k in ra)
    assert not np.array_equal(ra["p0/a"], rc["p0/a"]) and float(ra["lr"]) != float(rc["lr"])
    assert int(ra["steps"]) == 6 and 1e-3 <= float(ra["eps"]) <= 1e-2 and 10 ** -2.5 <= float(ra["lr"]) <= 0.1


# ---------------------------------------------------------- vae_backward
def test_vae_backward_names_the_wrong_parameter():
    def wrong(grads):
        grads = dict(grads)
        name = sorted(grads)[1]
        grads[name] = grads[name] * (1 + 1e-4)
        return grads

    r = grade("vae_backward", {"vae_grads": wrong})
    assert r["status"] == "fail" and r["gradient"] == sorted(r_names())[1], r
    assert r["message"].startswith("1 wrong gradient(s) (bernoulli VAE, hidden=(4, 3), S=3, beta=0.7): ")
    assert 1e-5 < r["worst_rel_error"] < 1e-3

    def two_wrong(grads):
        grads = dict(grads)
        a, b = sorted(grads)[:2]
        grads[a], grads[b] = grads[a] * 1.01, grads[b] * 1.5
        return grads

    r = grade("vae_backward", {"vae_grads": two_wrong})
    assert r["message"].startswith("2 wrong gradient(s)") and r["gradient"] == sorted(r_names())[1], r
    assert 0.1 < r["worst_rel_error"] < 0.3


def r_names():
    from minivae.config import VAEConfig
    from minivae.model import VAE
    kwargs, *_ = checks.VAE_CASES[0]
    return list(VAE(VAEConfig(**dict(kwargs, dtype="float64"))).params)


def test_vae_backward_checks_every_case_with_beta_and_the_objective():
    child = InProcessChild()
    r = run_check("vae_backward", child, SEED, 60)
    assert r["passed"]
    assert len(child.requests) == len(checks.VAE_CASES) + 1           # the last: the cost case
    cost_kwargs, N, S, beta = checks.VAE_COST_CASE
    assert child.requests[-1]["x"].shape == (N, 784) and json.loads(str(child.requests[-1]["kwargs"]))["beta"] == beta
    for req, (kwargs, N, S, beta, obj) in zip(child.requests, checks.VAE_CASES):
        assert json.loads(str(req["config"])) == json.loads(json.dumps(dict(kwargs, dtype="float64")))
        assert json.loads(str(req["kwargs"])) == dict(obj, beta=beta, n_samples=S)
        assert req["x"].shape == (N, kwargs["x_dim"]) and req["eps"].shape == (S, N, kwargs["z_dim"])
        assert sorted(str(p).rsplit("/", 1)[0] for p in req["proxy"]) == sorted(checks.PROXIED_OPS)


def test_op_server_answers_with_the_reference_ops_and_keeps_the_caches():
    srv = checks.OpServer()
    rng = np.random.default_rng(0)
    x, W, b = rng.standard_normal((4, 3)), rng.standard_normal((3, 2)), rng.standard_normal(2)
    msg = {"op": np.array("minivae.layers:dense_forward"), "spec": np.array('["array", "array", "array"]'),
           "a.0": x, "a.1": W, "a.2": b.astype(np.float32)}
    rep = srv(msg)
    np.testing.assert_allclose(rep["out.0"], x @ W + b, rtol=1e-6)
    h = int(rep["handle"])
    dy = rng.standard_normal((4, 2))
    rep = srv({"op": np.array("minivae.layers:dense_backward"), "spec": np.array('["array", "handle"]'),
               "a.0": dy, "a.1": np.array(h)})
    np.testing.assert_allclose(rep["out.0"], dy @ W.T)
    np.testing.assert_allclose(rep["out.1"], x.T @ dy)
    np.testing.assert_allclose(rep["out.2"], dy.sum(axis=0))
    rep2 = srv({"op": np.array("minivae.layers:relu_forward"), "spec": np.array('["array"]'), "a.0": x})
    assert int(rep2["handle"]) == h + 1
    rep = srv({"op": np.array("minivae.layers:relu_backward"), "spec": np.array('["array", "handle"]'),
               "a.0": np.ones((4, 3)), "a.1": rep2["handle"]})
    np.testing.assert_array_equal(rep["out.0"], (x > 0) * 1.0)
    rep = srv({"op": np.array("minivae.gaussian:kl_backward"), "spec": np.array('["array", ["array", "array"]]'),
               "a.0": np.ones(4), "a.1.0": x, "a.1.1": np.exp(x)})
    assert set(rep) == {"out.0", "out.1"}
    for bad, text in (({"a.0": dy, "a.1": np.array(99)}, "unknown cache handle"),
                      ({"a.0": np.array("s"), "a.1": np.array(h)}, "argument 0 is not a numeric array")):
        rep = srv(dict(bad, op=np.array("minivae.layers:dense_backward"), spec=np.array('["array", "handle"]')))
        assert set(rep) == {"error"} and str(rep["error"]).startswith("dense_backward: ValueError: " + text)
    rep = srv({"op": np.array("os:system"), "spec": np.array("[]")})
    assert str(rep["error"]).startswith("system: KeyError")
    rep = srv({"op": np.array("minivae.layers:relu_forward"), "spec": np.array('["none"]')})
    assert "error" in rep
    assert srv._decode(["none", ["array"]], {"a.1.0": np.ones(2, np.int32)}) [0] is None
    assert srv._decode(["none", ["array"]], {"a.1.0": np.ones(2, np.int32)})[1][0].dtype == np.float64
    with pytest.raises(ValueError, match="bad argument"):
        srv._decode(["number"], {})


def test_proxy_list_gives_each_op_its_number_of_outputs():
    got = dict(entry.rsplit("/", 1) for entry in checks.proxy_list())
    assert set(got) == set(checks.PROXIED_OPS)
    for qual, n in got.items():
        fn = qual.split(":")[1]
        want = 2 if fn.endswith("_forward") else {"dense_backward": 3, "conv2d_backward": 3,
                                                  "conv_transpose2d_backward": 3, "reparameterize_backward": 2,
                                                  "kl_backward": 2}.get(fn, 1)
        if fn.endswith("_forward"):
            want = 1               # a forward answers its output and a handle to its cache
        assert int(n) == want, qual


# ----------------------------------------------------------------- Judge
def test_judge_relative_error_and_worst():
    j = Judge()
    assert j.compare("a", np.array([1.0, 2.0]), [1.0, 2.0], 0.0) == 0.0
    err = j.compare("b", np.array([1.0, 3.0]), [1.0, 2.0], 1.0)
    assert err == pytest.approx(1.0 / 5.0)            # max |got - want| / max(|got| + |want|)
    assert j.worst == pytest.approx(0.2) and j.checked == 2
    assert j.compare("c", np.array([1.0, 2.0 + 1e-3]), [1.0, 2.0], 1.0) < 0.2 and j.worst == pytest.approx(0.2)
    assert j.compare("empty", np.zeros((0, 3)), np.zeros((0, 3)), 0.0) == 0.0 and j.checked == 4
    assert j.compare("zeros", np.zeros(3), np.zeros(3), 0.0) == 0.0
    with pytest.raises(Fail) as e:
        j.compare("d", np.array([0.0, 1.0, 5.0]), [0.0, 1.0, 4.0], 0.1)
    assert e.value.err == pytest.approx(1 / 9) and e.value.quantity == "d" and j.worst == pytest.approx(0.2)
    assert e.value.message == "d is wrong: rel error 1.11e-01 > 1e-01; at index (2,) got 5, expected 4"
    assert j.compare("e", np.array([1.0]), [1.0 + 1e-7], 1e-7) > 0       # err <= tol passes
    j2 = Judge()
    with pytest.raises(Fail, match="has shape"):
        j2.compare("s", np.zeros(2), np.zeros(3), 1.0)
    assert j2.worst is None and j2.checked == 0
    j3 = Judge()
    with pytest.raises(Fail, match="NaN or inf"):
        j3.compare("n", np.array([np.inf]), [1.0], 1.0)
    assert j3.worst is None and j3.checked == 1


def test_inputs_depend_on_seed_and_exercise():
    a = checks.rng_for(1, "kl_forward").standard_normal(3)
    assert np.array_equal(a, checks.rng_for(1, "kl_forward").standard_normal(3))
    assert not np.array_equal(a, checks.rng_for(2, "kl_forward").standard_normal(3))
    assert not np.array_equal(a, checks.rng_for(1, "kl_backward").standard_normal(3))


def test_check_inputs_keep_away_from_kinks_and_ties():
    rng = np.random.default_rng(0)
    x = checks._away_from_zero(rng, (1000,))
    assert np.abs(x).min() >= 0.2 and (x > 0).any() and (x < 0).any()
    d = checks._distinct(rng, (2, 3, 4, 5))
    diffs = np.diff(np.sort(d.ravel()))
    assert d.shape == (2, 3, 4, 5) and np.allclose(diffs, 0.01) and abs(d.mean()) < 0.01
    mu, logvar = checks._gauss(rng, 5, 2)
    assert mu.shape == logvar.shape == (5, 2) and np.abs(logvar).max() <= 2.5


def test_every_case_is_small_and_every_large_case_is_large():
    rng = np.random.default_rng(0)
    for ex, (_, make) in checks.OP_CHECKS.items():
        small = make(rng, False)
        assert all(sum(x.size for x in c.inputs) <= 500 for c in small), ex
        (big,) = make(rng, True)
        assert sum(x.size for x in big.inputs) >= 50_000, ex
        out, _ = big.forward(*big.inputs)
        assert np.all(np.isfinite(out))
    assert [c.label for c in checks._conv(rng, False)] == [" (stride 1, padding 0)", " (stride 2, padding 1)"]
    assert len(checks._reparam(rng, False)) == 2 and checks._reparam(rng, False)[1].forward(
        *checks._reparam(rng, False)[1].inputs)[0].shape[0] == 3
    assert [c.inputs[0].shape[0] for c in checks._bern(rng, False)] == [4, 2]


def test_encode_args_round_trips_through_the_runner():
    rng = np.random.default_rng(0)
    args = (rng.standard_normal((2, 3)), (rng.standard_normal(4), None, (np.arange(3.0),)), 2, 0.5, None)
    out = {}
    spec = checks.encode_args(args, out)
    back = runner.build(json.loads(json.dumps(spec)), out)
    assert back[2:] == (2, 0.5, None) and back[1][1] is None
    np.testing.assert_array_equal(back[0], args[0])
    np.testing.assert_array_equal(back[1][0], args[1][0])
    np.testing.assert_array_equal(back[1][2][0], args[1][2][0])
    assert [k for k, _ in checks._leaves(args)] == ["after.0", "after.1.0", "after.1.2.0"]
    assert checks.encode_args((True,), {}) == ["array"]


# ------------------------------------------------------------ reference
def test_the_graders_reference_ops_agree_with_minivae():
    """reference.py is an independent copy of the formulas: forwards, caches and backwards equal minivae's."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 4)) * 3
    W, b = rng.standard_normal((4, 3)), rng.standard_normal(3)
    dy = rng.standard_normal((5, 3))
    for name in ("dense",):
        y, c = ref.dense_forward(x, W, b)
        y2, c2 = layers.dense_forward(x, W, b)
        np.testing.assert_allclose(y, y2, rtol=1e-13)
        for a, b_ in zip(ref.dense_backward(dy, c), layers.dense_backward(dy, c2)):
            np.testing.assert_allclose(a, b_, rtol=1e-13)
    g = rng.standard_normal(x.shape)
    for act in ("relu", "tanh", "sigmoid"):
        y, c = getattr(ref, act + "_forward")(x)
        y2, c2 = getattr(layers, act + "_forward")(x)
        np.testing.assert_allclose(y, y2, rtol=1e-13, atol=1e-300)
        np.testing.assert_allclose(getattr(ref, act + "_backward")(g, c), getattr(layers, act + "_backward")(g, c2),
                                   rtol=1e-12, atol=1e-300)
    big = np.array([-800.0, -40.0, 0.0, 40.0, 800.0])
    np.testing.assert_allclose(ref.softplus(big), [0.0, np.log1p(np.exp(-40.0)), np.log(2), 40.0, 800.0], rtol=1e-15)
    np.testing.assert_allclose(ref.sigmoid(big), [0.0, 1 / (1 + np.exp(40.0)), 0.5, 1 / (1 + np.exp(-40.0)), 1.0],
                               rtol=1e-15, atol=0)
    mu, logvar = rng.standard_normal((4, 3)), rng.uniform(-2, 2, (4, 3))
    eps = rng.standard_normal((2, 4, 3))
    z, c = ref.reparameterize_forward(mu, logvar, eps)
    z2, c2 = gaussian.reparameterize_forward(mu, logvar, eps)
    np.testing.assert_allclose(z, z2, rtol=1e-14)
    dz = rng.standard_normal(z.shape)
    for a, b_ in zip(ref.reparameterize_backward(dz, c), gaussian.reparameterize_backward(dz, c2)):
        np.testing.assert_allclose(a, b_, rtol=1e-13)
    kl, c = ref.kl_forward(mu, logvar)
    kl2, c2 = gaussian.kl_forward(mu, logvar)
    np.testing.assert_allclose(kl, kl2, rtol=1e-14)
    dkl = rng.standard_normal(4)
    for a, b_ in zip(ref.kl_backward(dkl, c), gaussian.kl_backward(dkl, c2)):
        np.testing.assert_allclose(a, b_, rtol=1e-13)
    logits, xb = 4 * rng.standard_normal((2, 4, 6)), rng.uniform(0, 1, (4, 6))
    nll, c = ref.bernoulli_nll_forward(logits, xb)
    nll2, c2 = likelihoods.bernoulli_nll_forward(logits, xb)
    np.testing.assert_allclose(nll, nll2, rtol=1e-13)
    dn = rng.standard_normal(nll.shape)
    np.testing.assert_allclose(ref.bernoulli_nll_backward(dn, c), likelihoods.bernoulli_nll_backward(dn, c2),
                               rtol=1e-12)


@pytest.mark.parametrize("case", ["conv", "convT", "pool2", "pool3", "up2", "up3"])
def test_the_graders_conv_ops_agree_with_minivae(case):
    from minivae import conv
    rng = np.random.default_rng(1)
    if case in ("conv", "convT"):
        s, p = 2, 1
        x = rng.standard_normal((2, 3, 7, 6))
        W = rng.standard_normal((4, 3, 3, 3) if case == "conv" else (3, 4, 3, 3))
        b = rng.standard_normal(4)
        name = "conv2d" if case == "conv" else "conv_transpose2d"
        args = (x, W, b, s, p)
    elif case.startswith("pool"):
        size = int(case[-1])                      # outputs of 4 x 3 (size 2) and 3 x 2 (size 3): not square
        name, args = "maxpool2d", (checks._distinct(rng, (2, 3, 4 * size, 6)), size)
    else:
        name, args = "upsample_nearest2d", (rng.standard_normal((2, 3, 3, 4)), int(case[-1]))
    y, c = getattr(ref, name + "_forward")(*args)
    y2, c2 = getattr(conv, name + "_forward")(*args)
    np.testing.assert_allclose(y, y2, rtol=1e-12, atol=1e-12)
    dy = rng.standard_normal(y.shape)
    a, b_ = getattr(ref, name + "_backward")(dy, c), getattr(conv, name + "_backward")(dy, c2)
    for u, v in zip(_outputs(a), _outputs(b_)):
        np.testing.assert_allclose(u, v, rtol=1e-12, atol=1e-12)


def test_the_graders_adam_is_the_textbook_formula():
    rng = np.random.default_rng(0)
    p0 = [rng.standard_normal(3), rng.standard_normal((2, 2))]
    grads = [[rng.standard_normal(3), rng.standard_normal((2, 2))] for _ in range(4)]
    lr, (b1, b2), eps = 0.01, (0.8, 0.95), 1e-3
    hist = ref.adam_run([q.copy() for q in p0], grads, lr, (b1, b2), eps)
    assert len(hist) == 4
    p = [q.copy() for q in p0]
    m = [np.zeros_like(q) for q in p0]
    v = [np.zeros_like(q) for q in p0]
    for t, g in enumerate(grads, 1):
        for i in range(2):
            m[i] = b1 * m[i] + (1 - b1) * g[i]
            v[i] = b2 * v[i] + (1 - b2) * g[i] ** 2
            mh, vh = m[i] / (1 - b1 ** t), v[i] / (1 - b2 ** t)
            p[i] = p[i] - lr * mh / (np.sqrt(vh) + eps)
            for j, want in enumerate((p[i], m[i], v[i])):
                np.testing.assert_allclose(hist[t - 1][j][i], want, rtol=1e-12)


def test_op_server_errors_name_the_op_and_are_bounded():
    srv = checks.OpServer()
    assert str(srv({})["error"]) == ": KeyError: ''"                                  # no op named
    assert str(srv({"op": np.array("nope")})["error"]) == "nope: KeyError: 'nope'"
    long = srv({"op": np.array("x" * 1000)})["error"]
    assert str(long).startswith("x" * 400) and len(str(long)) == 500
    # a spec that is not a list means no arguments (the op then misses its arguments), not a string to walk
    rep = srv({"op": np.array("minivae.layers:relu_forward"), "spec": np.array('"array"'), "a.0": np.ones(2)})
    assert str(rep["error"]).startswith("relu_forward: TypeError")
    rep = srv({"op": np.array("minivae.layers:relu_forward")})                         # no spec: no arguments
    assert str(rep["error"]).startswith("relu_forward: TypeError")


def test_op_server_computes_with_floating_point_warnings_off():
    import warnings
    srv = checks.OpServer()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rep = srv({"op": np.array("minivae.gaussian:kl_forward"), "spec": np.array('["array", "array"]'),
                   "a.0": np.zeros((1, 2)), "a.1": np.full((1, 2), 1000.0)})
    assert "error" not in rep and np.isinf(rep["out.0"]).all()


def test_has_check_for_every_exercise_and_nothing_else():
    assert all(checks.has_check(ex) for ex in IDS)
    assert sum(checks.has_check(ex) for ex in checks.OP_CHECKS) == len(checks.OP_CHECKS)
    assert not checks.has_check("nope") and not checks.has_check("dense_forward")


@pytest.mark.parametrize("wrong_for", ["(N, L) eps", "(S, N, L) eps"])
def test_reparameterize_forward_checks_both_eps_layouts_and_names_the_wrong_one(wrong_for):
    qual = FORWARD["reparameterize_forward"]

    def student(mu, logvar, eps):
        z, cache = _correct(qual)(mu, logvar, eps)
        if (eps.ndim == 3) == (wrong_for == "(S, N, L) eps"):
            z = z + 1e-3
        return z, cache

    r = grade("reparameterize_forward", {qual: student})
    assert r["status"] == "fail" and r["gradient"] == ("z (S, N, L) eps" if eps_axis(wrong_for) else "z"), r
    r = grade("reparameterize_forward", {qual: lambda mu, logvar, eps: _correct(qual)(mu, logvar, eps)[0]})
    assert r["message"] == "reparameterize_forward should return 2 values (z, cache), got one array", r
    assert r["gradient"] == "z"


def eps_axis(wrong_for):
    return wrong_for.startswith("(S")


# the forward checks: output name, the label of each case (in the order the check runs them), input names
FORWARD_CASES = {
    "reparameterize_forward": ("z", ["", " (S, N, L) eps"], ["mu", "logvar", "eps"]),
    "kl_forward": ("kl", [""], ["mu", "logvar"]),
    "bernoulli_nll_forward": ("nll", ["", " (S, N, D) logits", " (large |logits|)"], ["logits", "x"]),
    "conv_transpose2d_forward": ("y", [" (stride 2, padding 1)", " (stride 1, padding 0)"], ["x", "W", "b"]),
}


def _wrong_on_call(qual, k, change):
    calls = []

    def student(*args):
        calls.append(1)
        out, cache = _correct(qual)(*args)
        return (change(out, args), cache) if len(calls) == k + 1 else (out, cache)
    return student


@pytest.mark.parametrize("ex", sorted(FORWARD_CASES))
def test_each_case_of_a_forward_check_is_checked_and_named(ex):
    """A student wrong in only one case of the check fails, and the verdict names that case."""
    qual = FORWARD[ex]
    out, labels, inputs = FORWARD_CASES[ex]
    for k, label in enumerate(labels):
        r = grade(ex, {qual: _wrong_on_call(qual, k, lambda o, a: o * (1 + 1e-6))})
        assert r["status"] == "fail" and r["gradient"] == out + label, (k, r)
        r = grade(ex, {qual: _wrong_on_call(qual, k, lambda o, a: o.astype(np.float32))})
        assert r["gradient"] == out + label and r["message"].startswith(f"{out}{label} has dtype float32"), r
    for i, name in enumerate(inputs):
        def modifies(*args, i=i):
            res = _correct(qual)(*args)
            args[i][...] = 0.5
            return res
        r = grade(ex, {qual: modifies})
        assert r["status"] == "fail" and r["gradient"] == name and f"modified its input {name};" in r["message"], r
    r = grade(ex, {qual: lambda *a: _correct(qual)(*a)[0]})
    assert r["message"] == f"{ex} should return 2 values ({out}, cache), got one array" and r["gradient"] == out, r


def test_the_large_logits_case_catches_the_unstable_formula():
    """-x log(sigmoid(l)) - (1 - x) log(1 - sigmoid(l)) is exact for moderate logits, inf for |l| >= 37."""
    qual = FORWARD["bernoulli_nll_forward"]

    def naive(logits, x):
        _, cache = _correct(qual)(logits, x)
        p = 1.0 / (1.0 + np.exp(-logits))
        return (-(x * np.log(p) + (1 - x) * np.log(1 - p))).sum(axis=-1), cache

    r = grade("bernoulli_nll_forward", {qual: naive})
    assert r["status"] == "fail" and r["gradient"] == "nll (large |logits|)" and "NaN or inf" in r["message"], r


def test_the_graders_relu_backward_is_zero_at_the_kink_like_minivae():
    x = np.array([[-1.0, 0.0, 2.0]])
    dy = np.array([[3.0, 5.0, 7.0]])
    np.testing.assert_array_equal(ref.relu_backward(dy, x), [[0.0, 0.0, 7.0]])
    np.testing.assert_array_equal(ref.relu_backward(dy, x), layers.relu_backward(dy, layers.relu_forward(x)[1]))


def test_the_graders_conv_ops_have_minivaes_defaults():
    """The op server calls the reference ops with the student's arguments; defaults must mean what minivae's do."""
    import inspect
    from minivae import conv
    for name in ("conv2d_forward", "conv_transpose2d_forward", "maxpool2d_forward", "upsample_nearest2d_forward"):
        ours = {k: p.default for k, p in inspect.signature(getattr(ref, name)).parameters.items()
                if p.default is not inspect.Parameter.empty}
        theirs = {k: p.default for k, p in inspect.signature(getattr(conv, name)).parameters.items()
                  if p.default is not inspect.Parameter.empty}
        assert ours and ours == {k: theirs[k] for k in ours}, name
    rng = np.random.default_rng(0)
    x, W, b = rng.standard_normal((2, 3, 4, 5)), rng.standard_normal((3, 2, 3, 3)), rng.standard_normal(2)
    np.testing.assert_allclose(ref.conv_transpose2d_forward(x, W, b)[0], conv.conv_transpose2d_forward(x, W, b)[0],
                               rtol=1e-12, atol=1e-12)


def test_bernoulli_forward_cases_catch_rounded_targets_and_a_missing_sample_axis():
    qual = FORWARD["bernoulli_nll_forward"]
    r = grade("bernoulli_nll_forward", {qual: lambda logits, x: _correct(qual)(logits, np.round(x))})
    assert r["status"] == "fail" and r["gradient"] == "nll", r                    # fractional targets x

    def flat_only(logits, x):
        out, cache = _correct(qual)(logits, x)
        return (out + 1.0 if logits.ndim == 3 else out), cache

    r = grade("bernoulli_nll_forward", {qual: flat_only})
    assert r["status"] == "fail" and r["gradient"] == "nll (S, N, D) logits", r


def test_a_malformed_reparameterize_cache_is_named():
    qual = FORWARD["reparameterize_forward"]
    r = grade("reparameterize_forward", {qual: lambda *a: (_correct(qual)(*a)[0], (_correct(qual)(*a)[1][0],))})
    assert r["message"] == ("the cache of reparameterize_forward should return 2 values (sigma, eps), got a "
                            "1-tuple") and r["gradient"] == "sigma", r
    r = grade("reparameterize_forward",
              {qual: lambda *a: (_correct(qual)(*a)[0], (_correct(qual)(*a)[1][0].astype(np.float32), a[2]))})
    assert r["gradient"] == "sigma (in the cache)" and r["message"].startswith("sigma (in the cache) has dtype"), r
    r = grade("reparameterize_forward", {qual: lambda *a: (_correct(qual)(*a)[0], (_correct(qual)(*a)[1][0] * 1.1,
                                                                                 a[2]))})
    assert r["gradient"] == "sigma (in the cache)" and r["message"].startswith("sigma (in the cache) is wrong"), r


# ------------------------------------------ time limits, op server, inputs
class Recorder:
    """A child that records each request with the timeout and handler it was given, then answers as ``inner``
    does or, without one, times out."""

    def __init__(self, inner=None):
        self.inner, self.calls = inner, []

    def request(self, req, timeout, handler=None):
        self.calls.append((req, timeout, handler))
        if self.inner is None:
            raise ChildError("timeout")
        return self.inner.request(req, timeout, handler)


def test_the_cost_limit_is_the_factor_times_the_reference_plus_the_transfer_plus_slack(monkeypatch):
    """limit = COST_FACTOR x the reference backward's time + twice the time to serialize the request + COST_SLACK_S,
    the forward pass (timed in between) not counted as transfer.  On a fake clock that only the reference backward
    (10 ms), the forward (300 ms) and the serialization (0.1 us a byte) advance, the limit is exact."""
    ex = "relu_backward"
    clock = [0.0]

    def advancing(dt, f):
        def g(*args):
            clock[0] += dt
            return f(*args)
        return g

    fn, make = checks.OP_CHECKS[ex]

    def make_slow_forward(rng, big):
        cases = make(rng, big)
        for c in cases:
            c.forward = advancing(0.3, c.forward)
        return cases

    class NumpyWithTimedSavez:
        def __getattr__(self, name):
            return getattr(np, name)

        @staticmethod
        def savez(file, **arrays):
            clock[0] += 1e-7 * sum(np.asarray(a).nbytes for a in arrays.values())
            np.savez(file, **arrays)

    monkeypatch.setitem(checks.OP_CHECKS, ex, (fn, make_slow_forward))
    monkeypatch.setitem(checks.REF_BACKWARD, ex, advancing(0.01, checks.REF_BACKWARD[ex]))
    monkeypatch.setattr(checks, "np", NumpyWithTimedSavez())
    monkeypatch.setattr(checks, "time", types.SimpleNamespace(perf_counter=lambda: clock[0], monotonic=time.monotonic))
    child = Recorder()
    with pytest.raises(Fail, match="too slow") as e:
        checks.check_cost(ex, child, Judge(), SEED, 100.0)
    assert "where the reference backward takes 10.0 ms and one forward pass 300.0 ms." in e.value.message
    ((req, limit, _),) = child.calls
    serialize = 1e-7 * sum(a.nbytes for a in req.values())
    answer = 1e-7 * req["a.0"].nbytes                   # the answer, dx, is as large as dy
    assert serialize > 0.1 and "result_only" in req
    assert limit == pytest.approx(checks.COST_FACTOR * 0.01 + 2 * (serialize + answer) + checks.COST_SLACK_S,
                                  rel=1e-9)
    with pytest.raises(Fail):
        checks.check_cost(ex, child, Judge(), SEED, 1.5)                 # never more than the time the check has left
    assert child.calls[-1][1] == 1.5


def test_each_request_gets_the_time_left_to_its_check():
    rec = Recorder(InProcessChild())
    run_check("relu_backward", rec, SEED, 1.0)
    (_, t_call, _), (_, t_cost, _) = rec.calls
    assert 0.9 < t_call <= 1.0 and 0.1 < t_cost <= 1.0          # the cost check gets what the first call left
    rec = Recorder(InProcessChild())
    assert run_check("vae_backward", rec, SEED, 30.0)["passed"]
    ts = [t for _, t, _ in rec.calls]
    assert len(ts) == len(checks.VAE_CASES) + 1 and all(0.1 < t <= 30.0 for t in ts)      # + the cost case
    assert ts[:-1] == sorted(ts[:-1], reverse=True)
    rec = Recorder()
    r = run_check("vae_backward", rec, SEED, 0.001)             # the time is spent: a short grace, no more
    assert r["status"] == "timeout" and r["passed"] is False and [t for _, t, _ in rec.calls] == [0.1], r


def test_vae_backward_answers_the_childs_op_calls_with_the_reference_ops():
    rec = Recorder(InProcessChild())
    assert run_check("vae_backward", rec, SEED, 60.0)["passed"]
    rng = np.random.default_rng(0)
    x, W, b = rng.standard_normal((3, 4)), rng.standard_normal((4, 2)), rng.standard_normal(2)
    servers = [h for _, _, h in rec.calls]
    assert len(servers) == len(checks.VAE_CASES) + 1                 # + the cost case
    for srv in servers:
        rep = srv({"op": np.array("minivae.layers:dense_forward"), "spec": np.array('["array", "array", "array"]'),
                   "a.0": x, "a.1": W, "a.2": b})
        np.testing.assert_allclose(rep["out.0"], x @ W + b, rtol=1e-13)
        assert "handle" in rep
    assert len({id(s) for s in servers}) == len(servers)          # a fresh server (and cache table) per case


def test_vae_backward_inputs_are_a_fixed_function_of_the_seed():
    sent = []
    for seed in (1, 1, 2):
        rec = Recorder()
        run_check("vae_backward", rec, seed, 10.0)
        sent.append(rec.calls[0][0])
    a, b, c = sent
    params = [k for k in a if k.startswith("param/")]
    assert params and all(np.array_equal(a[k], b[k]) for k in params + ["x", "eps"])
    assert not all(np.array_equal(a[k], c[k]) for k in params)


def test_vae_backward_names_a_malformed_gradient_as_the_worst():
    """A gradient of the wrong shape next to one with a wrong value: both are listed, the malformed one is the
    worst (no error is defined for it), and the check does not crash on the mix."""
    names = sorted(r_names())

    def wrong(grads):
        grads = dict(grads)
        grads[names[0]] = grads[names[0]][..., None]
        grads[names[1]] = grads[names[1]] * 1.5
        return grads

    r = grade("vae_backward", {"vae_grads": wrong})
    assert r["status"] == "fail" and r["gradient"] == names[0] and r["worst_rel_error"] is None, r
    assert r["message"].startswith(f"2 wrong gradient(s) (bernoulli VAE, hidden=(4, 3), S=3, beta=0.7): "
                                   f"{names[0]}, {names[1]}; worst: {names[0]} has shape "), r


def test_judge_records_a_wrong_value_after_a_malformed_one():
    """The VAE check compares every parameter even after a malformed one; a later wrong value is still recorded."""
    j = Judge()
    with pytest.raises(Fail, match="has shape"):
        j.compare("s", np.zeros(2), np.zeros(3), 1.0)
    assert j.worst is None
    with pytest.raises(Fail) as e:
        j.compare("v", np.array([1.0, 3.0]), [1.0, 2.0], 0.1)
    assert e.value.err == pytest.approx(0.2) and j.worst == pytest.approx(0.2)


def test_no_side_effects_takes_unchanged_nan_as_unchanged_and_names_any_argument():
    sent = (np.array([1.0, np.nan]), (np.ones(2), (np.zeros(3),)))
    after = {"after.0": np.array([1.0, np.nan]), "after.1.0": np.ones(2), "after.1.1.0": np.zeros(3)}
    checks.no_side_effects(after, sent, {"0": "dy"})               # a NaN sent back as NaN is not a change
    with pytest.raises(Fail) as e:
        checks.no_side_effects(dict(after, **{"after.1.1.0": np.ones(3)}), sent, {"0": "dy"})
    assert e.value.quantity == "argument 1 (cache item 1.0)"      # no name given: the argument's position
    assert e.value.message.startswith("the function modified its input argument 1 (cache item 1.0); ")
    with pytest.raises(Fail) as e:
        checks.no_side_effects(dict(after, **{"after.0": np.array([1.0, 2.0])}), sent, {"0": "dy"})
    assert e.value.quantity == "dy"


def test_a_wrong_kl_cache_is_named():
    qual = FORWARD["kl_forward"]

    def with_cache(change):
        def student(mu, logvar):
            out, (m, var) = _correct(qual)(mu, logvar)
            return out, (m, change(var))
        return student

    r = grade("kl_forward", {qual: with_cache(lambda var: var.astype(np.float32))})
    assert r["gradient"] == "var (in the cache)", r
    assert r["message"] == "var (in the cache) has dtype float32, expected float64 (the inputs are float64)", r
    r = grade("kl_forward", {qual: with_cache(lambda var: var[:, :1])})
    assert r["gradient"] == "var (in the cache)" and r["message"] == (
        "var (in the cache) has shape (5, 1), expected (5, 3)"), r


@pytest.mark.parametrize("moment", ["m", "v"])
def test_adam_checks_each_moment_and_names_it(moment):
    """An Adam with the right parameters that keeps one moment as a flat vector fails on that moment, at step 1."""
    class FlatMoment(optim.Adam):
        def _init_state(self, pairs):
            super()._init_state(pairs)
            for st in self.state:
                st[moment] = st[moment].ravel()

        def _update(self, p, g, st):
            super()._update(p, g, dict(st, **{moment: st[moment].reshape(p.shape)}))

    child = InProcessChild(adam=FlatMoment)
    r = run_check("adam_step", child, SEED, 60)
    shape = child.requests[0]["p0/a"].shape
    assert r["status"] == "fail" and r["gradient"] == f"{moment}[a] after step 1", r
    assert r["message"] == f"{moment}[a] after step 1 has shape ({int(np.prod(shape))},), expected {shape}", r


def test_adam_fails_when_entries_get_another_entrys_gradient():
    """The gradients differ entry by entry, so an Adam that mixes up which gradient entry goes with which
    parameter entry fails."""
    class Mixed(optim.Adam):
        def _update(self, p, g, st):
            super()._update(p, np.ascontiguousarray(g.ravel()[::-1]).reshape(g.shape), st)

    r = grade("adam_step", adam=Mixed)
    assert r["status"] == "fail" and r["gradient"] == "a after step 1", r


def test_adam_hyperparameters_are_valid_for_every_seed():
    """Adam needs 0 <= beta < 1 (an optimizer may reject other betas); lr and eps are positive."""
    for seed in range(12):
        rec = Recorder()
        with pytest.raises(ChildError):
            checks.check_adam_step(rec, Judge(), seed, 10)
        req = rec.calls[0][0]
        b1, b2 = (float(b) for b in req["betas"])
        assert 0 <= b1 < 1 and 0 <= b2 < 1 and float(req["lr"]) > 0 and float(req["eps"]) > 0, (seed, b1, b2)


def test_the_reference_conv_ops_have_minivaes_defaults_and_the_op_server_answers_only_the_vaes_ops():
    """The reference conv ops called without stride, padding, size or scale do what minivae's ops do; the op
    server answers only the ops of the check's MLP VAE (a conv op is the student's own there)."""
    from minivae import conv
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 6, 6))
    W, b = rng.standard_normal((4, 3, 3, 3)), rng.standard_normal(4)
    Wt, bt = rng.standard_normal((3, 2, 3, 3)), rng.standard_normal(2)
    srv = checks.OpServer()
    for op, args in (("conv2d_forward", (x, W, b)), ("conv_transpose2d_forward", (x, Wt, bt)),
                     ("maxpool2d_forward", (checks._distinct(rng, x.shape),)), ("upsample_nearest2d_forward", (x,))):
        np.testing.assert_allclose(getattr(ref, op)(*args)[0], getattr(conv, op)(*args)[0], rtol=1e-12, atol=1e-12,
                                   err_msg=op)
        msg = {"op": np.array("minivae.conv:" + op), "spec": np.array(json.dumps(["array"] * len(args)))}
        msg.update({f"a.{i}": a for i, a in enumerate(args)})
        assert "KeyError" in str(srv(msg)["error"])
    assert sorted(checks.PROXIED_OPS) == sorted(f"minivae.{ref.OP_PAIRS[p][0]}:{p}_{d}" for p in ref.VAE_PAIRS
                                                for d in ("forward", "backward"))


def test_the_op_server_bounds_what_the_child_can_make_it_compute_and_keep(monkeypatch):
    srv = checks.OpServer()
    big = {"op": np.array("minivae.layers:dense_forward"), "spec": np.array('["array", "array", "array"]'),
           "a.0": np.ones((2000, 1)), "a.1": np.ones((1, 2000)), "a.2": np.ones(2000)}     # a 4,000,000-entry result
    assert "larger than the check's model ever makes" in str(srv(big)["error"])
    wide = {"op": np.array("minivae.layers:relu_forward"), "spec": np.array('["array"]'), "a.0": np.ones(3 << 20)}
    assert "larger than the check's model ever makes" in str(srv(wide)["error"])
    monkeypatch.setattr(checks, "MAX_CACHE_BYTES", 10_000)
    ok = {"op": np.array("minivae.layers:relu_forward"), "spec": np.array('["array"]'), "a.0": np.ones(1000)}
    assert "handle" in srv(ok)
    assert "the caches of this check passed" in str(srv(ok)["error"])            # 8,000 bytes kept: no more
    srv = checks.OpServer(max_calls=checks.op_call_limit(2))                  # 24 calls
    for _ in range(24):
        srv({"op": np.array("minivae.layers:relu_forward"), "spec": np.array('["array"]'), "a.0": np.ones(2)})
    with pytest.raises(Fail, match="called the ops more than 24 times .* finite differences"):
        srv(ok)
    assert checks.OpServer(max_calls=10 ** 9).max_calls == checks.MAX_OP_CALLS


def _leaf_types(tree):
    if isinstance(tree, tuple):
        return tuple(_leaf_types(t) for t in tree)
    if isinstance(tree, np.ndarray):
        return ("array", tree.dtype, tree.shape)
    return tree


@pytest.mark.parametrize("name", ["conv2d", "conv_transpose2d", "maxpool2d", "upsample_nearest2d"])
def test_the_reference_conv_caches_have_minivaes_layout_and_dtypes(name):
    """The check hands a student's backward the reference forward's cache: it must be the cache minivae's own
    forward makes (the same tuple, array shapes and dtypes; e.g. max-pooling's offsets as integers)."""
    from minivae import conv
    rng = np.random.default_rng(2)
    x = checks._distinct(rng, (2, 3, 6, 6))
    args = {"conv2d": (x, rng.standard_normal((4, 3, 3, 3)), rng.standard_normal(4), 2, 1),
            "conv_transpose2d": (x, rng.standard_normal((3, 2, 3, 3)), rng.standard_normal(2), 2, 1),
            "maxpool2d": (x, 2), "upsample_nearest2d": (x, 2)}[name]
    ours = getattr(ref, name + "_forward")(*args)[1]
    theirs = getattr(conv, name + "_forward")(*args)[1]
    assert _leaf_types(ours) == _leaf_types(theirs)


@pytest.mark.parametrize("ex", [e for e in IDS if e != "vae_backward"])
def test_check_py_and_the_grader_draw_the_same_inputs_and_judge_them_alike(ex):
    """Both take their inputs from cases.py: at one seed, the student's check.py (here with the reference ops,
    as make records it) and the grader see the same cases and reach the same worst error."""
    import importlib

    from minivae.assignments import harness
    mods = {m: importlib.import_module(f"minivae.{m}") for m in harness.MODULES}
    local = harness.run_check(harness.Context("record", mods, SEED, reference=ref), ex)
    judge = Judge()
    if ex in checks.OP_CHECKS:
        checks.check_op_backward(ex, InProcessChild(), judge, SEED, 60)          # the cases, not the cost check
    else:
        checks.FORWARD_CHECKS[ex](InProcessChild(), judge, SEED, 60)
    assert local["passed"] and local["worst_rel_error"] == judge.worst, (local, judge.worst)
    assert local["checked"] > 0 and list(harness.CHECKS) == list(IDS)
