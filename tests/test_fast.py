"""The optimized training step (minivae.fast) against the reference path, op by op and step by step."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import minivae
from minivae.backend import get_xp, to_numpy
from minivae.fast import SPLIT_MIN_ROWS, FastPathError, FastTrainer, bernoulli_nll_rows, log_weights, threads
from minivae.fast.threads import blas_control_available
from minivae.gradcheck import rel_error
from minivae.likelihoods import bernoulli_nll_backward, bernoulli_nll_forward
from minivae.fast import cpu_kernels


ROOT = Path(__file__).resolve().parents[1]
TOL = {"float64": 1e-12, "float32": 2e-5}

CONFIGS = {
    "standard": dict(),
    "two-layer-tanh-gaussian": dict(x_dim=12, hidden=(9, 7), z_dim=3, activation="tanh", likelihood="gaussian",
                                    obs_var=0.5),
    "relu-deep": dict(x_dim=10, hidden=(8, 6), z_dim=4),
    "no-hidden": dict(x_dim=9, hidden=(), z_dim=2),
    "softplus": dict(x_dim=8, hidden=(5,), z_dim=2, activation="softplus"),
}
# models used only by the log-weights tests (not by every test parametrized over CONFIGS)
LW_CONFIGS = {"two-layer-tanh": dict(x_dim=11, hidden=(9, 7), z_dim=3, activation="tanh")}


def make(name, dtype, backend="numpy", seed=0):
    cfg = minivae.VAEConfig(dtype=dtype, **{**CONFIGS, **LW_CONFIGS}[name])
    return minivae.VAE(cfg, rng=seed, backend=backend)


def batch(model, N, seed=1):
    """Binary (Bernoulli) or real (Gaussian) data and eps, on the model's backend and dtype."""
    rng = np.random.default_rng(seed)
    c = model.config
    if c.likelihood == "bernoulli":
        x = (rng.random((N, c.x_dim)) < 0.4).astype(model.dtype)
    else:
        x = rng.normal(size=(N, c.x_dim)).astype(model.dtype)
    eps = rng.standard_normal((N, c.z_dim)).astype(model.dtype)
    return model.xp.asarray(x), model.xp.asarray(eps)


needs_numba = pytest.mark.skipif(not cpu_kernels.AVAILABLE, reason="numba is not installed (the fused CPU kernels)")
# Both CPU implementations of the fast path: NumPy ufuncs, and the fused kernels (numba)
PATHS = [pytest.param(False, id="numpy"), pytest.param(True, id="fused", marks=needs_numba)]


@pytest.mark.parametrize("fused", PATHS)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_loss_and_grads_match_reference(name, dtype, fused):
    model = make(name, dtype)
    x, eps = batch(model, 33 if name != "standard" else 64)
    ref_loss, ref_grads = model.loss(x, eps, beta=0.7)
    ref_parts = {k: float(v) for k, v in model.parts.items()}
    tr = FastTrainer(model, minivae.Adam(), fused=fused)
    assert tr.fused == fused
    loss, grads = tr.loss_and_grads(x, eps, beta=0.7)
    tol = TOL[dtype]
    assert abs(float(loss) - float(ref_loss)) <= tol * abs(float(ref_loss))
    for k in ("loss", "recon", "kl"):
        assert abs(float(tr.parts[k]) - ref_parts[k]) <= tol * max(1.0, abs(ref_parts[k])), k
    assert list(grads) == list(ref_grads)
    for k in ref_grads:
        assert rel_error(grads[k], ref_grads[k]) < tol * 10, k
    # computing without the loss value gives the same gradients
    g_copy = grads.flat.copy()
    none, grads2 = tr.loss_and_grads(x, eps, beta=0.7, need_loss=False)
    assert none is None and np.array_equal(grads2.flat, g_copy)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_forward_ops_match_reference(dtype):
    """Intermediate values: fused heads = (mu, logvar) of encode; z; logits = decode_raw(z)."""
    model = make("standard", dtype)
    x, eps = batch(model, 40)
    tr = FastTrainer(model)
    tr.loss_and_grads(x, eps)
    B = tr._buffers(40)
    L = model.config.z_dim
    mu, logvar = model.encode(x)
    tol = TOL[dtype]
    assert rel_error(B.heads[:, :L], mu) < tol and rel_error(B.heads[:, L:], logvar) < tol
    z = mu + np.exp(0.5 * logvar) * eps
    assert rel_error(B.z, z) < tol
    assert rel_error(B.out, model.decode_raw(B.z)[0]) < tol


@pytest.mark.parametrize("fused", PATHS)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_fused_bernoulli_matches_reference_ops(dtype, threads, fused):
    """The one-exp loss + gradient against bernoulli_nll_forward/backward, extreme logits included
    (with 2 threads the rows are split in two blocks)."""
    rng = np.random.default_rng(3)
    N, D = 200, 784
    logits = (rng.standard_normal((N, D)) * 8).astype(dtype)
    logits[0, :6] = [0.0, -0.0, 100.0, -100.0, 1e4, -1e4]     # exp(-|l|) underflows to 0: no inf/nan
    x = (rng.random((N, D)) < 0.5).astype(dtype)
    x[1] = rng.random(D).astype(dtype)                          # continuous targets in [0, 1] are allowed
    model = make("standard", dtype)
    tr = FastTrainer(model, threads=threads, fused=fused)
    B = tr._buffers(N)
    with np.errstate(over="raise", invalid="raise", divide="raise"):   # underflow to 0 is expected
        tr.ops.prepare()
        recon = tr.ops.likelihood(logits, x, B, 1.0 / N, True)
    nll, cache = bernoulli_nll_forward(logits, x)
    dlogits = bernoulli_nll_backward(np.full(N, 1.0 / N, dtype=dtype), cache)
    tol = TOL[dtype]
    assert abs(recon - float(nll.sum(dtype=np.float64))) <= tol * float(nll.sum())
    assert rel_error(B.dout, dlogits) < tol
    assert np.isfinite(B.dout).all()
    tr.close()


@pytest.mark.parametrize("fused", PATHS)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_the_likelihood_writes_its_scratch_before_reading_it(dtype, fused):
    """Stale scratch contents (anything a fresh np.empty may hold) neither raise nor reach the result.

    The fused path once cast a float64 scratch vector's old bytes to float32 for a throw-away bias
    gradient: under errstate(over="raise") that raised, or not, depending on which tests ran before."""
    rng = np.random.default_rng(5)
    N, D = 200, 784
    logits = (rng.standard_normal((N, D)) * 4).astype(dtype)
    x = (rng.random((N, D)) < 0.5).astype(dtype)
    tr = FastTrainer(make("standard", dtype), threads=2, fused=fused)
    B = tr._buffers(N)
    first = tr.ops.likelihood(logits, x, B, 1.0 / N, True)
    dout = B.dout.copy()
    for a in B.vectors.values():                                # the scratch vectors, if this path has any
        a[...] = np.finfo(a.dtype).max
    B.dout[...] = np.nan
    with np.errstate(over="raise", invalid="raise"):
        again = tr.ops.likelihood(logits, x, B, 1.0 / N, True)
    assert again == first
    np.testing.assert_array_equal(B.dout, dout)
    tr.close()


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("D", [5, 64, 130, 784])
def test_bernoulli_nll_rows_matches_reference(dtype, D):
    """The evaluation's grouped-product Bernoulli nll equals bernoulli_nll_forward, with a sample axis."""
    rng = np.random.default_rng(D)
    logits = (rng.standard_normal((3, 7, D)) * 6).astype(dtype)
    logits[0, 0, :4] = [0.0, 100.0, -100.0, -1e4]                 # exp(-|l|) underflows: no inf/nan
    x = (rng.random((7, D)) < 0.4).astype(dtype)
    x[1] = rng.random(D)                                           # continuous targets in [0, 1] too
    ref = bernoulli_nll_forward(logits, x)[0]
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        got = bernoulli_nll_rows(logits, x)
    assert got.shape == ref.shape == (3, 7) and got.dtype == np.dtype(dtype)
    # float32: the sums of ~D terms round at ~1e-7 relative; 1 + e = 1 loses < 6e-8 nats per pixel
    tol = 1e-12 if dtype == "float64" else 2e-6
    assert np.max(np.abs(got - ref) / np.maximum(1.0, np.abs(ref))) < tol


def test_bernoulli_nll_rows_products_cannot_overflow():
    """Every product has at most 64 factors in [1, 2]: logits 0 (factor exactly 2) over 5000 pixels stay finite."""
    logits = np.zeros((2, 5000), dtype=np.float32)
    got = bernoulli_nll_rows(logits, np.ones_like(logits))
    assert np.allclose(got, 5000 * np.log(2.0), rtol=1e-6)


@pytest.mark.parametrize("name", ["standard", "two-layer-tanh-gaussian", "no-hidden", "two-layer-tanh", "softplus"])
def test_fast_log_weights_match_model(name):
    model = make(name, "float64")
    x, _ = batch(model, 9)
    eps = np.random.default_rng(3).standard_normal((4, 9, model.config.z_dim))
    ref = model.log_weights(x, eps)
    got = log_weights(model, x, eps)
    assert got.shape == (4, 9)
    assert np.allclose(got, ref, rtol=1e-12, atol=1e-9)
    m32 = make(name, "float32")
    got32, ref32 = log_weights(m32, x, eps), m32.log_weights(x, eps)
    assert got32.dtype == np.float32
    assert np.max(np.abs(got32 - ref32) / np.maximum(1.0, np.abs(ref32))) < 1e-5


@pytest.mark.parametrize("fused", PATHS)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("threads,block", [(1, 1 << 16), (2, 1 << 16), (1, 1000), (2, 777)])
def test_adam_steps_match_reference(dtype, threads, block, fused):
    ref = make("standard", dtype)
    fast = make("standard", dtype)
    opt_ref, opt_fast = minivae.Adam(lr=3e-3), minivae.Adam(lr=3e-3)
    tr = FastTrainer(fast, opt_fast, threads=threads, block=block, fused=fused)
    for s in range(4):
        x, eps = batch(ref, 32, seed=10 + s)
        loss_ref, grads = ref.loss(x, eps)
        opt_ref.step(ref.params, grads)
        loss = tr.step(x, eps)
        assert abs(float(loss) - float(loss_ref)) <= TOL[dtype] * abs(float(loss_ref))
    tol = TOL[dtype] * (1 if dtype == "float64" else 5)
    # Adam's update is ~lr per entry whatever the gradient scale, so compare the parameter *changes*
    start = make("standard", dtype).flat
    assert rel_error(fast.flat - start, ref.flat - start) < tol * 100
    sd_ref, sd_fast = opt_ref.state_dict(), opt_fast.state_dict()
    # Entry by entry, Adam divides by sqrt(v) + eps: where |g| has stayed near eps (1e-8), a float32
    # rounding difference in g (~1e-9) moves the step by up to ~lr * 1e-9 / 1e-8.  One-thread BLAS sums
    # in another order than two-thread BLAS and showed 1e-5 on such an entry (v = 1e-17).  So the
    # entry-wise bound applies where sqrt(v) is well above eps; every entry stays within a few lr.
    diff = np.abs(fast.flat - ref.flat)
    settled = np.sqrt(sd_ref["0.v"]) > 100 * opt_ref.eps
    assert settled.mean() > 0.5
    assert diff[settled].max() < (1e-9 if dtype == "float64" else 1e-5)
    assert diff.max() < 4 * 3e-3
    assert sd_fast["t"] == sd_ref["t"] == 4
    assert rel_error(sd_fast["0.m"], sd_ref["0.m"]) < tol * 10
    assert rel_error(sd_fast["0.v"], sd_ref["0.v"]) < tol * 10
    tr.close()


@pytest.mark.parametrize("fused", PATHS)
def test_two_threads_give_the_same_training(fused):
    """Threaded Adam is bitwise identical; the threaded likelihood (N >= 128) only regroups a sum."""
    models = [make("standard", "float32") for _ in range(2)]
    trainers = [FastTrainer(m, minivae.Adam(), threads=t, block=b, split=False, fused=fused)
                for m, t, b in zip(models, (1, 2), (1 << 16, 5000))]
    for s in range(3):
        x, eps = batch(models[0], 16, seed=s)
        for tr in trainers:
            tr.step(x, eps)
    assert np.array_equal(models[0].flat, models[1].flat)
    x, eps = batch(models[0], 150, seed=9)
    (l1, g1), (l2, g2) = [(float(l), g.flat.copy()) for l, g in (tr.loss_and_grads(x, eps) for tr in trainers)]
    assert np.array_equal(g1, g2) and abs(l1 - l2) <= 1e-6 * abs(l1)


needs_split = pytest.mark.skipif(not blas_control_available(),
                                 reason="NumPy's BLAS is not an OpenBLAS whose thread count we can set")


@needs_split
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name,N", [("standard", 128), ("standard", 97), ("relu-deep", 64),
                                    ("two-layer-tanh-gaussian", 80)])
def test_split_step_matches_reference(name, N, dtype):
    """Two half-batches on two threads: the same loss, parts and gradients as model.loss."""
    model = make(name, dtype)
    x, eps = batch(model, N, seed=5)
    ref_loss, ref_grads = model.loss(x, eps, beta=0.6)
    ref_parts = {k: float(v) for k, v in model.parts.items()}
    tr = FastTrainer(model, minivae.Adam(), threads=2, split=True)
    assert tr._use_split(N)
    loss, grads = tr.loss_and_grads(x, eps, beta=0.6)
    tol = TOL[dtype]
    assert abs(float(loss) - float(ref_loss)) <= tol * abs(float(ref_loss))
    for k in ("loss", "recon", "kl"):
        assert abs(float(tr.parts[k]) - ref_parts[k]) <= tol * max(1.0, abs(ref_parts[k])), k
    for k in ref_grads:
        assert rel_error(grads[k], ref_grads[k]) < tol * 10, k
    g_copy = grads.flat.copy()
    none, grads2 = tr.loss_and_grads(x, eps, beta=0.6, need_loss=False)
    assert none is None and np.array_equal(grads2.flat, g_copy)
    tr.close()


@needs_split
def test_split_training_is_deterministic_and_matches_one_thread():
    """Same data -> bitwise the same parameters, run to run; and the split training follows the
    one-thread fast path (and the reference) within float32 rounding, over several Adam steps."""
    ref = make("standard", "float32")
    models = [make("standard", "float32") for _ in range(3)]
    trainers = [FastTrainer(models[0], minivae.Adam(lr=3e-3), threads=2, split=True),
                FastTrainer(models[1], minivae.Adam(lr=3e-3), threads=2, split=True, block=20000),
                FastTrainer(models[2], minivae.Adam(lr=3e-3), threads=1)]
    opt_ref = minivae.Adam(lr=3e-3)
    for s in range(4):
        x, eps = batch(ref, 128, seed=20 + s)
        loss_ref, grads = ref.loss(x, eps)
        opt_ref.step(ref.params, grads)
        losses = [float(tr.step(x, eps)) for tr in trainers]
        assert losses[0] == losses[1]
        for loss in losses:
            assert abs(loss - float(loss_ref)) <= 2e-5 * abs(float(loss_ref))
    assert trainers[0]._use_split(128) and not trainers[2]._use_split(128)
    assert np.array_equal(models[0].flat, models[1].flat)          # deterministic, any Adam block size
    assert np.array_equal(trainers[0].opt.state[0]["v"], trainers[1].opt.state[0]["v"])
    # As in test_adam_steps_match_reference: a float32 rounding difference dg in g (the split step sums
    # two half-batches, the reference one batch) moves an entry's step by about lr * dg / sqrt(v), and
    # where m is a small difference of larger gradients the moments amplify it: 1.6e-5 after 4 steps was
    # seen (half a percent of one step of lr = 3e-3).  So: within 1% of a step where sqrt(v) > 1e-4, and
    # every entry within a few lr.
    settled = np.sqrt(trainers[0].opt.state[0]["v"]) > 1e-4
    assert settled.mean() > 0.5
    for m in (models[2], ref):
        diff = np.abs(models[0].flat - m.flat)
        assert diff[settled].max() < 3e-5
        assert diff.max() < 4 * 3e-3
    for tr in trainers:
        tr.close()


@needs_split
def test_split_restores_blas_threads_and_falls_back():
    before = threads.blas_threads()
    model = make("standard", "float32")
    tr = FastTrainer(model, minivae.Adam(), threads=2, split=True)
    x, eps = batch(model, SPLIT_MIN_ROWS)
    tr.step(x, eps)
    assert threads.blas_threads() == before
    assert not tr._use_split(SPLIT_MIN_ROWS - 1)                    # small batches are not split
    # an optimizer without the fused update still gets the summed gradients
    ref, fast = make("relu-deep", "float64"), make("relu-deep", "float64")
    o_ref, o_fast = minivae.SGD(lr=0.05, momentum=0.9), minivae.SGD(lr=0.05, momentum=0.9)
    tr2 = FastTrainer(fast, o_fast, threads=2, split=True)
    for s in range(3):
        x, eps = batch(ref, 70, seed=s)
        o_ref.step(ref.params, ref.loss(x, eps)[1])
        tr2.step(x, eps)
    assert rel_error(fast.flat, ref.flat) < 1e-12
    with pytest.raises(ValueError, match="split"):
        FastTrainer(model, threads=1, split=True)
    tr.close()
    tr2.close()


def test_float32_is_preserved_everywhere():
    model = make("standard", "float32")
    tr = FastTrainer(model, minivae.Adam())
    x, eps = batch(model, 24)
    loss = tr.step(x, eps)
    assert loss.dtype == np.float32 and all(v.dtype == np.float32 for v in tr.parts.values())
    assert model.flat.dtype == np.float32 and tr.grads.flat.dtype == np.float32
    assert all(a.dtype == np.float32 for a in tr.opt.state[0].values())
    B = tr._buffers(24)
    arrays = [a for k, v in vars(B).items() if k != "vectors"
              for a in (v.values() if isinstance(v, dict) else v if isinstance(v, list) else [v])]
    assert all(a.dtype in (np.float32, np.bool_) for a in arrays)
    # the fused kernels' small scratch vectors: float64 partial sums (of the loss and the KL) only
    assert all(a.dtype == np.float32 or name in ("parts", "kl_rows") for name, a in B.vectors.items())
    tmp = getattr(tr.ops, "_tmp", None)
    assert tr.W_heads.dtype == np.float32 and (tmp is None or tmp.dtype == np.float32)


def test_other_optimizers_fall_back_to_their_step():
    for make_opt in (lambda: minivae.SGD(lr=0.01), lambda: minivae.Adam(weight_decay=1e-3, clip_norm=5.0)):
        ref, fast = make("relu-deep", "float64"), make("relu-deep", "float64")
        o_ref, o_fast = make_opt(), make_opt()
        tr = FastTrainer(fast, o_fast)
        for s in range(3):
            x, eps = batch(ref, 12, seed=s)
            o_ref.step(ref.params, ref.loss(x, eps)[1])
            tr.step(x, eps)
        assert rel_error(fast.flat, ref.flat) < 1e-12


def test_model_stays_usable_and_checkpointable():
    model = make("standard", "float32")
    start = model.flat.copy()
    opt = minivae.Adam()
    tr = FastTrainer(model, opt)
    x, eps = batch(model, 16)
    tr.step(x, eps)
    assert not np.array_equal(model.flat, start)                # trained in place
    assert model.params["enc.mu.W"].base is not None            # still views of model.flat
    model.loss(x, eps)                                          # the reference path still runs
    opt2 = minivae.Adam()
    opt2.load_state_dict(opt.state_dict(), model.params)
    assert opt2.t == 1 and np.array_equal(opt2.state[0]["m"], opt.state[0]["m"])


def test_unsupported_and_bad_input_raise_clear_errors():
    cfg = minivae.VAEConfig(x_dim=6, hidden=(4,), z_dim=2, likelihood="gaussian_learned_var")
    with pytest.raises(FastPathError, match="gaussian_learned_var"):
        FastTrainer(minivae.VAE(cfg, rng=0))
    model = make("standard", "float32")
    tr = FastTrainer(model)
    x, eps = batch(model, 8)
    with pytest.raises(ValueError, match="x must be"):
        tr.step(x.astype(np.float64), eps)
    with pytest.raises(ValueError, match="eps must be"):
        tr.step(x, eps[:4])
    with pytest.raises(ValueError, match="threads"):
        FastTrainer(model, threads=0)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["standard", "relu-deep"])
def test_cupy_fast_path_matches_numpy_reference(name):
    cp = get_xp("cupy")
    host = make(name, "float32")
    dev = make(name, "float32", backend="cupy")
    x, eps = batch(host, 64)
    ref_loss, ref_grads = host.loss(x, eps, beta=0.5)
    tr = FastTrainer(dev, minivae.Adam())
    loss, grads = tr.loss_and_grads(cp.asarray(x), cp.asarray(eps), beta=0.5)
    assert abs(float(loss) - float(ref_loss)) < 1e-4 * abs(float(ref_loss))
    assert rel_error(to_numpy(grads.flat), ref_grads.flat) < 1e-4
    p0 = host.flat.copy()
    opt = minivae.Adam()
    opt.step(host.params, ref_grads)
    tr.apply(grads)
    check_first_adam_step(to_numpy(dev.flat) - p0, host.flat - p0, ref_grads.flat, opt,
                          to_numpy(tr.opt.state[0]["m"]), to_numpy(tr.opt.state[0]["v"]))


def check_first_adam_step(step, ref_step, ref_g, ref_opt, m, v):
    """Adam's first step from two float32 gradients that agree to ~1e-5 relative.

    At t = 1, m = (1 - b1) g and v = (1 - b2) g^2, so the step is -lr g / (|g| + eps): about -lr sign(g) for
    every |g| >> eps.  Where g is near 0 the two gradients can round to opposite signs, and the parameter moves
    by up to 2 lr between them (3.97e-5 = 0.04 lr was seen on an H200): not a bug.  So the moments, which are
    the gradient scaled, must match to the gradient's tolerance; the step must match closely wherever |g| is
    well above both eps and the gradient's error; and everywhere it differs by at most the 2 lr of a sign flip.
    """
    st = ref_opt.state[0]
    assert rel_error(m, st["m"]) < 1e-4 and rel_error(v, st["v"]) < 2e-4
    lr = ref_opt.lr
    assert np.max(np.abs(step - ref_step)) <= 2 * lr * (1 + 1e-4)
    clear = np.abs(ref_g) > 1e-3 * np.max(np.abs(ref_g))
    assert clear.mean() > 0.5
    assert np.max(np.abs(step[clear] - ref_step[clear])) < 1e-3 * lr


def test_first_adam_step_check_catches_a_wrong_update():
    # the GPU check above, on the CPU: it accepts two float32 runs and rejects a wrong gradient or update
    model = make("standard", "float32")
    x, eps = batch(model, 64)
    _, g = model.loss(x, eps)
    g32 = g.flat.copy()
    p0 = model.flat.copy()

    def first_step(grad):
        m = make("standard", "float32")
        opt = minivae.Adam()
        gd = m.new_grads()
        gd.flat[...] = grad
        opt.step(m.params, gd)
        return m.flat - p0, opt

    ref_step, ref_opt = first_step(g32)
    rng = np.random.default_rng(0)
    noisy = g32 * (1 + 1e-6 * rng.standard_normal(g32.shape)).astype(np.float32)   # float32-sized noise
    step, opt = first_step(noisy)
    check_first_adam_step(step, ref_step, g32, ref_opt, opt.state[0]["m"], opt.state[0]["v"])
    for bad in (g32 * np.float32(1.01), np.where(np.arange(g32.size) % 7 == 0, -g32, g32)):
        step, opt = first_step(bad)
        with pytest.raises(AssertionError):
            check_first_adam_step(step, ref_step, g32, ref_opt, opt.state[0]["m"], opt.state[0]["v"])
    step, opt = first_step(g32)
    step[:100] *= 0.5                                               # a wrong update from the right moments
    with pytest.raises(AssertionError):
        check_first_adam_step(step, ref_step, g32, ref_opt, opt.state[0]["m"], opt.state[0]["v"])


# Each registered CUDA kernel of minivae.fast.ops_cupy written as NumPy, with CuPy's calling convention (inputs,
# then outputs; elementwise outputs written in place, a reduction returning its value): the CuPy ops' logic runs
# here without a GPU, and the kernels' arithmetic is read once more.
def _emulated_cuda_kernels():
    def bias_relu(b, a):
        a[...] = np.maximum(a + b, 0)

    def relu_bwd(h, d):
        d[...] = np.where(h > 0, d, 0)

    def reparam(mu, lv, eps, sig, z):
        sig[...] = np.exp(0.5 * lv)
        z[...] = mu + sig * eps

    def latent_bwd(dz, mu, lv, sig, eps, c, dmu, dlv):
        dmu[...] = dz + c * mu
        dlv[...] = dz * eps * (0.5 * sig) + c * (0.5 * (np.exp(lv) - 1))

    def kl_terms(mu, lv):
        return 0.5 * (mu * mu + np.exp(lv) - 1 - lv).sum()

    def bernoulli(l, x, invn, d, nll):
        e = np.exp(-np.abs(l))
        r = 1 / (1 + e)
        d[...] = (np.where(l >= 0, r, e * r) - x) * invn
        nll[...] = np.maximum(l, 0) + np.log1p(e) - x * l

    def adam(g, b1, c1, b2, c2, lr_t, eps_t, p, m, v):
        m[...] = b1 * m + c1 * g
        v[...] = b2 * v + c2 * (g * g)
        p -= lr_t * m / (np.sqrt(v) + eps_t)
    return dict(bias_relu=bias_relu, relu_bwd=relu_bwd, reparam=reparam, latent_bwd=latent_bwd,
                kl_terms=kl_terms, bernoulli=bernoulli, adam=adam)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_cupy_ops_with_emulated_kernels_match_the_reference(name):
    """FastTrainer's one step body with the CuPy ops (minivae.fast.ops_cupy), each CUDA kernel emulated in NumPy:
    the reference's loss, gradients and Adam update.  (The GPU itself: test_cupy_fast_path_matches_numpy_reference.)"""
    from minivae.fast.ops_cupy import KERNEL_SPECS, CupyOps
    emulated = _emulated_cuda_kernels()
    assert set(emulated) == set(KERNEL_SPECS)
    model, ref = make(name, "float64"), make(name, "float64")
    x, eps = batch(model, 37)
    tr = FastTrainer(model, minivae.Adam(lr=1e-2), fused=False)
    tr.ops = CupyOps(model.config, model.dtype, kernels=emulated)
    loss, grads = tr.loss_and_grads(x, eps, beta=0.6)
    ref_loss, ref_grads = ref.loss(x, eps, beta=0.6)
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-12)
    for k in ref_grads:
        assert rel_error(grads[k], ref_grads[k]) < 1e-10, k
    opt = minivae.Adam(lr=1e-2)
    for _ in range(3):
        tr.step(x, eps, beta=0.6)
        opt.step(ref.params, ref.loss(x, eps, beta=0.6)[1])
    assert rel_error(model.flat, ref.flat) < 1e-10
    tr.close()


def test_benchmark_quick_smoke(tmp_path):
    """benchmarks/epoch.py --quick runs without torch and writes the documented JSON fields."""
    out = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "epoch.py"), "--quick", "--no-torch",
                        "--epochs", "1", "--warmup", "0", "--threads", "1", "--json", str(out)],
                       capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads(out.read_text())
    assert d["backend"] == "numpy" and d["torch_available"] is False
    for k in ("cpu", "logical_cpus", "threads", "numpy_blas", "loadavg_start"):
        assert k in d["machine"], k
    run = d["runs"][0]
    assert run["batch_size"] == 128 and run["n_steps"] == 12
    assert set(run["median_s"]) == {"minivae", "bound"}
    assert all(v > 0 for v in run["median_s"].values())
    assert run["ratio_minivae_over_bound"] == pytest.approx(run["median_s"]["minivae"] / run["median_s"]["bound"])
    assert run["gflop_per_epoch"] == pytest.approx(12 * 128 * 3.28e6 / 1e9)
    assert np.isfinite(run["mean_loss_per_round"]["minivae"]).all()
    assert run["minivae_array_bytes"] > 4 * 4 * 648_824        # params, grads, m, v at least
    assert d["peak_rss_mib"] > 0


@needs_split
def test_blas_thread_control_goes_through_threadpoolctl():
    from threadpoolctl import threadpool_info

    from minivae.fast.threads import _find_blas, set_blas_threads as _set_blas_threads
    fset, fget = _find_blas()
    blas = [i for i in threadpool_info() if i["user_api"] == "blas"]
    assert blas and fget() in [i["num_threads"] for i in blas]
    target = 2 if fget() == 1 else 1
    before = _set_blas_threads(target)
    try:
        # NumPy's BLAS now runs `target` threads, as threadpoolctl itself reports (other libraries, e.g. one
        # loaded by numba, may bring a BLAS of their own, which the fast path does not use)
        assert fget() == target
        assert any(i["num_threads"] == target for i in threadpool_info() if i["user_api"] == "blas")
        assert _set_blas_threads(before) == target
    finally:
        fset(before)
    assert fget() == before


@needs_split
@pytest.mark.parametrize("n", [1, 3, 8])
def test_threads_using_sets_blas_and_numba_and_restores_them(n):
    """threads.using(n), what --threads n runs under: BLAS on n threads (threadpoolctl), numba's kernels on n
    (at most the cores numba started with), the fast path's count n; all restored afterwards."""
    from threadpoolctl import threadpool_info
    blas_before, count_before = threads.blas_threads(), threads.count()
    numba_before = threads.numba_threads()
    with threads.using(n) as got:
        assert got == n == threads.count()
        assert threads.blas_threads() == n
        assert any(i["num_threads"] == n for i in threadpool_info() if i["user_api"] == "blas")
        if cpu_kernels.AVAILABLE:
            assert threads.numba_threads() == min(n, cpu_kernels.numba.config.NUMBA_NUM_THREADS)
    assert threads.blas_threads() == blas_before and threads.count() == count_before
    assert threads.numba_threads() == numba_before
    with threads.using(None) as got:                         # every core; BLAS keeps its own setting
        assert got == threads.all_cores() and threads.blas_threads() == blas_before
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="threads must be a positive integer"):
            with threads.using(bad):
                pass


@needs_numba
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_fused_adam_is_numpys_adam_bit_for_bit(dtype):
    """The one-pass Adam kernel does NumPy's op sequence (adam_update_block) with the same roundings."""
    from minivae.fast import adam_update_block
    rng = np.random.default_rng(0)
    n = 100_003                                                   # several blocks and a ragged end
    p, g = rng.standard_normal(n).astype(dtype), rng.standard_normal(n).astype(dtype) * 1e-3
    m, v = rng.standard_normal(n).astype(dtype) * 1e-3, rng.random(n).astype(dtype) * 1e-6
    a, b = [arr.copy() for arr in (p, m, v)], [arr.copy() for arr in (p, m, v)]
    b1, b2, lr_t, eps_t = 0.9, 0.999, 3e-3, 1e-8
    adam_update_block(a[0], g, a[1], a[2], np.empty_like(p), b1, b2, lr_t, eps_t)
    f = np.dtype(dtype).type
    cpu_kernels.PARALLEL["adam"](b[0], g, b[1], b[2], f(b1), f(1.0 - b1), f(b2), f(1.0 - b2), f(lr_t), f(eps_t))
    for x, y in zip(a, b):
        assert np.array_equal(x, y)


@needs_numba
@pytest.mark.parametrize("parallel_min", [0, None])
@pytest.mark.parametrize("name,N", [("standard", 200), ("standard", 97), ("two-layer-tanh-gaussian", 130)])
def test_fused_results_do_not_depend_on_the_thread_count(name, N, parallel_min, monkeypatch):
    """Every sum in the fused kernels is split into fixed blocks added in a fixed order: 1, 2 or 3
    threads give bitwise the same loss, gradients and parameters.  parallel_min=0: every kernel runs its
    parallel version, however small the array; None: the library's threshold."""
    if parallel_min is not None:
        monkeypatch.setattr(cpu_kernels, "PARALLEL_MIN", parallel_min)
    models = [make(name, "float32") for _ in range(3)]
    trainers = [FastTrainer(m, minivae.Adam(lr=3e-3), threads=t, fused=True) for m, t in zip(models, (1, 2, 3))]
    for s in range(3):
        x, eps = batch(models[0], N, seed=30 + s)
        losses = [float(tr.step(x, eps)) for tr in trainers]
        assert losses[0] == losses[1] == losses[2]
    assert np.array_equal(models[0].flat, models[1].flat) and np.array_equal(models[0].flat, models[2].flat)
    for tr in trainers:
        tr.close()


@needs_numba
@pytest.mark.parametrize("name", ["standard", "two-layer-tanh", "softplus"])
def test_fused_log_weights_reuse_scratch_without_sharing_it(name):
    """The fused log-weights reuse per-thread scratch arrays: a result is never a view of them (a later call,
    of another shape, leaves it as it was), and two threads evaluating at once get what each gets alone.
    Bits do not depend on numba's thread count (tanh and exp run on row halves: elementwise)."""
    import threading

    model = make(name, "float32")
    x, _ = batch(model, 30)
    rng = np.random.default_rng(8)
    e1, e2 = (rng.standard_normal((s, 30, model.config.z_dim)) for s in (5, 3))
    first = log_weights(model, x, e1)
    kept = first.copy()
    second = log_weights(model, x[:7], e2[:, :7])
    assert second.shape == (3, 7) and np.array_equal(first, kept)
    assert np.array_equal(log_weights(model, x, e1), first)
    got = {}

    def work(key, eps, n):
        for _ in range(20):
            got.setdefault(key, []).append(log_weights(model, x[:n], eps[:, :n]))

    ts = [threading.Thread(target=work, args=(k, e, n)) for k, e, n in (("a", e1, 30), ("b", e2, 19))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    alone_b = log_weights(model, x[:19], e2[:, :19])
    assert all(np.array_equal(r, first) for r in got["a"]) and all(np.array_equal(r, alone_b) for r in got["b"])
    prev = threads.set_count(1)                  # numba's kernels and the ufunc halves on one thread; BLAS as it was
    try:
        one = log_weights(model, x, e1)
    finally:
        threads.set_count(prev)
    assert np.array_equal(one, first)


@pytest.mark.parametrize("name", ["standard", "relu-deep"])
def test_log_weights_numpy_fallback_matches_model(name, monkeypatch):
    """Without numba, log_weights uses the grouped-product NumPy code: the same numbers as the model."""
    monkeypatch.setattr(cpu_kernels, "AVAILABLE", False)
    model = make(name, "float64")
    x, _ = batch(model, 9)
    eps = np.random.default_rng(4).standard_normal((3, 9, model.config.z_dim))
    assert np.allclose(log_weights(model, x, eps), model.log_weights(x, eps), rtol=1e-12, atol=1e-9)


def test_without_numba_the_numpy_path_is_used(tmp_path):
    """MINIVAE_NO_NUMBA=1 (or numba missing): no fused kernels, FastTrainer trains with NumPy, and
    asking for fused=True is a clear error."""
    code = ("import numpy as np, minivae\n"
            "from minivae.fast import cpu_kernels\n"
            "from minivae.fast import FastTrainer\n"
            "assert not cpu_kernels.AVAILABLE and not cpu_kernels.KERNELS\n"
            "m = minivae.VAE(minivae.VAEConfig(x_dim=6, hidden=(4,), z_dim=2), rng=0)\n"
            "tr = FastTrainer(m, minivae.Adam(), threads=2)\n"
            "assert not tr.fused\n"
            "x = (np.random.default_rng(0).random((5, 6)) < 0.5).astype(np.float32)\n"
            "assert np.isfinite(float(tr.step(x, np.zeros((5, 2), np.float32))))\n"
            "try:\n    FastTrainer(m, fused=True)\nexcept ValueError as e:\n    print('error:', e)\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT), MINIVAE_NO_NUMBA="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "error: fused=True needs numba" in r.stdout


@pytest.mark.parametrize("fused", PATHS)
def test_profile_adds_up_the_seconds_of_each_part(fused):
    """``trainer.profile = {}`` accumulates, per part of the step, the seconds between its ticks: each part
    positive, their sum within the step's wall time, a second step adding to each; None records nothing."""
    import time
    m = make("relu-deep", "float64")
    tr = FastTrainer(m, minivae.Adam(lr=1e-3), threads=1, fused=fused)
    x, eps = batch(m, 16)
    tr.step(x, eps)
    assert tr.profile is None
    tr.profile = {}
    t0 = time.perf_counter()
    tr.step(x, eps)
    wall = time.perf_counter() - t0
    first = dict(tr.profile)
    assert set(first) == {"forward", "likelihood", "backward", "adam"}, first     # the parts profile_step.py prints
    assert all(v > 0 for v in first.values()), first
    assert sum(first.values()) <= wall
    tr.step(x, eps)
    assert set(tr.profile) == set(first) and all(tr.profile[k] > first[k] for k in first)
    tr.close()


@needs_numba
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fused_adam_step_is_adam_step_bit_for_bit(dtype, threads):
    """fused_adam_step (train's Adam for the models FastTrainer does not cover, e.g. the conv VAEs):
    several steps of one fused pass give exactly the parameters and moments of Adam.step."""
    from minivae.fast import fused_adam_step
    cfg = minivae.VAEConfig(arch="conv", hidden=(8,), z_dim=2, dtype=dtype)
    a, b = minivae.VAE(cfg, rng=3), minivae.VAE(cfg, rng=3)
    opt_a, opt_b = minivae.Adam(lr=2e-3, eps=1e-6), minivae.Adam(lr=2e-3, eps=1e-6)
    rng = np.random.default_rng(0)
    for _ in range(3):
        g = b.new_grads()
        g.flat[...] = rng.standard_normal(g.flat.shape) * 10.0 ** rng.integers(-9, 2, g.flat.shape)
        opt_a.step(a.params, g)
        assert fused_adam_step(opt_b, b.params, g, threads) is True
    assert np.array_equal(a.flat, b.flat)
    sa, sb = opt_a.state_dict(), opt_b.state_dict()
    assert sa["t"] == sb["t"] == 3
    assert np.array_equal(sa["0.m"], sb["0.m"]) and np.array_equal(sa["0.v"], sb["0.v"])


@pytest.mark.parametrize("opt", [minivae.SGD(lr=0.1), minivae.Adam(weight_decay=0.1), minivae.Adam(clip_norm=1.0)],
                         ids=["sgd", "decay", "clip"])
def test_fused_adam_step_leaves_other_optimizers_alone(opt):
    """Anything but a plain Adam: it does nothing, says so (False), and the caller runs opt.step."""
    from minivae.fast import fused_adam_step
    m = minivae.VAE(minivae.VAEConfig(hidden=(4,), z_dim=2, x_dim=6), rng=0)
    before = m.flat.copy()
    g = m.new_grads()
    g.flat[...] = 1.0
    assert fused_adam_step(opt, m.params, g, 1) is False
    assert np.array_equal(m.flat, before) and not getattr(opt, "t", 0)


def test_fused_adam_step_without_numba_does_nothing(monkeypatch):
    from minivae import fast
    monkeypatch.setattr(cpu_kernels, "AVAILABLE", False)
    m = minivae.VAE(minivae.VAEConfig(hidden=(4,), z_dim=2, x_dim=6), rng=0)
    opt = minivae.Adam()
    assert fast.fused_adam_step(opt, m.params, m.new_grads(), 2) is False and opt.t == 0


def test_bernoulli_nll_rows_wide_rows_cannot_overflow_float32():
    """Past 64 * 64 pixels the blocks widen so that a product still has at most 64 factors: with 9000
    pixels at logit 0 (each factor exactly 2), 64-wide blocks would multiply 141 factors, 2^141 > float32's
    largest number, and the row would come out inf."""
    logits = np.zeros((1, 9000), dtype=np.float32)
    with np.errstate(over="raise"):
        got = bernoulli_nll_rows(logits, np.ones_like(logits))
    assert got.dtype == np.float32 and np.isfinite(got).all()
    assert np.allclose(got, 9000 * np.log(2.0), rtol=1e-5)
