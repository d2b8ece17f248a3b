"""The training loop: reproducibility, exact resume, divergence, schedules, data checks."""
import json

import numpy as np
import pytest

from minivae import VAE
from minivae.checkpoint import CheckpointError, load_checkpoint
from minivae.data import DataError
from minivae.gradcheck import rel_error
from minivae.train import Data, TrainingDiverged, TrainSettings, beta_at, train


def tiny(**kw):
    base = dict(n_train=256, n_test=128, epochs=2, batch_size=64, hidden=(32,), latent=2, figures=False)
    base.update(kw)
    return TrainSettings.from_recipe("default", **base)


def run(settings, out, **kw):
    lines = []
    hist = train(settings, out, progress=False, log=lines.append, **kw)
    return hist, lines


def strip_time(history):
    return [{k: v for k, v in rec.items() if k != "time_s"} for rec in history]


def test_same_seed_same_history_other_seed_differs(tmp_path):
    h1, lines = run(tiny(), tmp_path / "a")
    h2, _ = run(tiny(), tmp_path / "b")
    h3, _ = run(tiny(seed=1), tmp_path / "c")
    assert strip_time(h1) == strip_time(h2)
    assert strip_time(h1) != strip_time(h3)
    assert [r["epoch"] for r in h1] == [1, 2]
    rec = h1[-1]
    assert abs(rec["test_neg_elbo"] - rec["test_recon"] - rec["test_kl"]) < 1e-4
    assert h1[1]["train_neg_elbo"] < h1[0]["train_neg_elbo"]       # it learns
    assert any(line.startswith("epoch 2/2  train ") and " test " in line for line in lines)
    assert json.loads((tmp_path / "a" / "history.json").read_text()) == h1
    header = (tmp_path / "a" / "history.csv").read_text().splitlines()[0].split(",")
    assert {"epoch", "train_neg_elbo", "test_neg_elbo", "test_kl", "time_s"} <= set(header)
    res = json.loads((tmp_path / "a" / "results.json").read_text())
    assert res["test"]["n"] == 128 and res["test"]["neg_elbo"] == pytest.approx(h1[-1]["test_neg_elbo"], rel=1e-4)


def test_resume_equals_uninterrupted(tmp_path):
    s = tiny(epochs=3, valid=32)
    full, _ = run(s, tmp_path / "full")
    part, _ = run(tiny(epochs=2, valid=32), tmp_path / "part")
    assert load_checkpoint(tmp_path / "part" / "checkpoint.npz").epoch == 2
    resumed, lines = run(s, tmp_path / "part", resume=True)
    assert strip_time(resumed) == strip_time(full)
    assert len(lines) >= 2 and lines[-2].startswith("epoch 3/3  ")
    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "part")
    assert a.epoch == b.epoch == 3
    for k in a.params:
        assert np.array_equal(a.params[k], b.params[k]), k
    for k in a.opt_state:
        assert np.array_equal(a.opt_state[k], b.opt_state[k]), k
    assert a.opt_meta == b.opt_meta and a.rng == b.rng


def test_resume_refuses_other_settings_and_overwrite(tmp_path):
    run(tiny(epochs=1), tmp_path / "r")
    with pytest.raises(CheckpointError, match="already holds a run"):
        run(tiny(epochs=1), tmp_path / "r")
    with pytest.raises(CheckpointError, match="hidden"):
        run(tiny(epochs=2, hidden=(16,)), tmp_path / "r", resume=True)
    with pytest.raises(CheckpointError, match="not found"):
        run(tiny(), tmp_path / "none", resume=True)


@pytest.mark.parametrize("fast", [True, False], ids=["fast-path", "reference-path"])
def test_nan_stops_with_epoch_and_step_and_keeps_last_checkpoint(tmp_path, monkeypatch, fast):
    from minivae.fast import FastTrainer
    out = tmp_path / "r"
    run(tiny(epochs=1, fast=fast), tmp_path / "ref")
    calls = {"n": 0}

    def poison(loss):
        calls["n"] += 1
        if calls["n"] == 4 + 2:                    # 4 steps per epoch: epoch 2, step 2
            loss = loss * np.float32("nan")
        return loss

    original_loss, original_step = VAE.loss, FastTrainer.step

    def poisoned(self, x, *args, **kw):
        loss, grads = original_loss(self, x, *args, **kw)
        if grads is not None:                      # training steps only (evaluation has backward=False)
            loss = poison(loss)
        return loss, grads

    def poisoned_step(self, *args, **kw):
        return poison(original_step(self, *args, **kw))

    monkeypatch.setattr(FastTrainer, "step", poisoned_step)
    monkeypatch.setattr(VAE, "loss", poisoned)
    with pytest.raises(TrainingDiverged, match=r"epoch 2, step 2") as info:
        run(tiny(epochs=3, fast=fast), out)
    assert "last good checkpoint kept" in str(info.value)
    c = load_checkpoint(out / "checkpoint.npz")
    ref = load_checkpoint(tmp_path / "ref" / "checkpoint.npz")
    assert c.epoch == 1 and len(c.history) == 1
    for k in c.params:                              # the epoch-1 checkpoint, untouched
        assert np.array_equal(c.params[k], ref.params[k])
    assert not (out / "results.json").exists()


def test_warmup_beta_and_lr_schedule(tmp_path):
    s = tiny(warmup=2, beta=0.5, epochs=2)
    assert beta_at(s, 0, 4) == 0.0 and beta_at(s, 4, 4) == pytest.approx(0.25) and beta_at(s, 100, 4) == 0.5
    h, _ = run(s, tmp_path / "w")
    assert [r["beta"] for r in h] == pytest.approx([0.5 * 3 / 8, 0.5 * 7 / 8])
    # during warm-up the objective is recon + beta_t KL, while the reported -ELBO uses beta = 1
    assert h[0]["train_loss"] < h[0]["train_neg_elbo"]

    r = TrainSettings.from_recipe("burda2015-short", n_train=40, n_test=20, epochs=3, hidden=(16,), latent=2,
                                  figures=False)
    assert r.batch_size == 20 and r.activation == "tanh" and r.adam_eps == 1e-4 and r.init_output_bias
    h, _ = run(r, tmp_path / "b")
    # stages of 1, 2, 3, ... passes at 1e-3 * 10^(-i/7)
    assert [x["lr"] for x in h] == pytest.approx([1e-3, 1e-3 * 10 ** (-1 / 7), 1e-3 * 10 ** (-1 / 7)])
    assert h[0]["steps"] == 2


def test_objective_flags_reach_model_loss(tmp_path, monkeypatch):
    seen = []
    original = VAE.loss

    def spy(self, x, *args, **kw):
        if kw.get("backward", True):
            seen.append({k: kw.get(k) for k in ("iwae_k", "free_bits", "validate")})
        return original(self, x, *args, **kw)

    monkeypatch.setattr(VAE, "loss", spy)
    run(tiny(epochs=1, fast=False), tmp_path / "plain")      # the readable path calls model.loss every step
    assert seen and all(s == {"iwae_k": None, "free_bits": None, "validate": False} for s in seen)
    for name, kw in (("iwae", {"iwae_k": 3}), ("fb", {"free_bits": 0.1})):
        seen.clear()
        h, _ = run(tiny(epochs=1, **kw), tmp_path / name)
        want = {"iwae_k": None, "free_bits": None, "validate": False, **kw}
        assert seen and all(s == want for s in seen)
        assert np.isfinite(h[0]["test_neg_elbo"])
    # KL warm-up composes with both objectives: beta_t ramps per step inside the IWAE / free-bits loss
    for name, kw in (("iwae-warm", {"iwae_k": 3}), ("fb-warm", {"free_bits": 0.1})):
        betas = []
        monkeypatch.setattr(VAE, "loss", lambda self, x, *a, **k: (
            betas.append(k.get("beta")) if k.get("backward", True) else None, original(self, x, *a, **k))[1])
        h, _ = run(tiny(epochs=2, warmup=1, beta=0.5, **kw), tmp_path / name)
        assert betas == pytest.approx([0.5 * t / 4 for t in range(4)] + [0.5] * 4)    # 4 steps per epoch
        assert h[0]["beta"] == pytest.approx(0.5 * 3 / 4) and h[1]["beta"] == 0.5
        assert np.isfinite(h[1]["train_loss"]) and h[0]["train_loss"] < h[0]["train_neg_elbo"]
    with pytest.raises(ValueError, match="free bits cannot be combined"):
        tiny(iwae_k=2, free_bits=0.5).validate()


def test_binarization_modes():
    grey = Data(tiny(binarize="none"))
    assert len(np.unique(grey.x_train)) > 2 and np.array_equal(grey.test_eval, grey.x_test)
    st1, st2 = Data(tiny(binarize="static")), Data(tiny(binarize="static"))
    assert set(np.unique(st1.x_train)) == {0.0, 1.0} and np.array_equal(st1.x_train, st2.x_train)
    assert not np.array_equal(st1.x_train, Data(tiny(binarize="static", seed=3)).x_train)
    dyn = Data(tiny(binarize="dynamic"))
    assert len(np.unique(dyn.x_train)) > 2                       # binarized per minibatch, not up front
    assert np.array_equal(dyn.test_eval, st1.test_eval)          # the test set: fixed seed, whatever the run's
    assert np.array_equal(dyn.test_eval, Data(tiny(seed=9)).test_eval)
    with pytest.raises(ValueError, match="Bernoulli"):
        tiny(likelihood="gaussian", binarize="dynamic").validate()


@pytest.mark.parametrize("value, fragment", [(2.0, "outside"), (np.nan, "NaN")])
def test_bad_data_is_rejected_before_training(tmp_path, value, fragment):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        x = rng.random((20, 16))
        x[3, 5] = value
        np.savez(tmp_path / f"{split}.npz", x=x, y=np.zeros(20, dtype=np.int64))
    with pytest.raises(DataError, match=fragment):
        run(tiny(data_dir=str(tmp_path), binarize="none"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_device_style_loop_matches_the_host_loop(tmp_path, monkeypatch):
    """The CuPy loop (losses kept on the device, checked every 50 steps) run with NumPy arrays: one step body
    for both, so the same numbers exactly."""
    import minivae.train.loop as tr
    s = tiny(epochs=2, batch_size=4)                      # 64 steps per epoch: crosses a 50-step check
    host, _ = run(s, tmp_path / "host")
    monkeypatch.setattr(tr, "_DEVICE_STYLE_LOOP", True)
    dev, _ = run(s, tmp_path / "dev")
    for a, b in zip(host, dev):
        assert a.keys() == b.keys()
        for k in a:
            if k != "time_s":
                assert a[k] == b[k], k
    pa, pb = load_checkpoint(tmp_path / "host"), load_checkpoint(tmp_path / "dev")
    assert all(np.array_equal(pa.params[k], pb.params[k]) for k in pa.params)


def test_device_style_loop_reports_the_first_bad_step(tmp_path, monkeypatch):
    import minivae.train.loop as tr
    monkeypatch.setattr(tr, "_DEVICE_STYLE_LOOP", True)
    original = VAE.loss
    calls = {"n": 0}

    def poisoned(self, x, *args, **kw):
        loss, grads = original(self, x, *args, **kw)
        if grads is not None:
            calls["n"] += 1
            if calls["n"] >= 64 + 37:                      # epoch 2, step 37 and every later step
                loss = loss * np.float32("inf")
        return loss, grads

    monkeypatch.setattr(VAE, "loss", poisoned)
    with pytest.raises(TrainingDiverged, match=r"loss became inf at epoch 2, step 37;"):
        run(tiny(epochs=2, batch_size=4, fast=False), tmp_path / "r")
    assert load_checkpoint(tmp_path / "r").epoch == 1


@pytest.mark.parametrize("kw", [
    dict(dtype="float64", optimizer="sgd", lr=1e-3, momentum=0.5),
    dict(optimizer="adagrad", lr=1e-2, clip_norm=5.0, weight_decay=1e-4),
    dict(likelihood="gaussian", binarize="none", obs_var=0.1),
    dict(likelihood="gaussian_learned_var", binarize="none", hidden=(16, 8)),
    dict(binarize="static", activation="tanh", init_output_bias=True, valid=50),
], ids=["sgd-f64", "adagrad-clip-wd", "gaussian", "learned-var", "static-tanh"])
def test_option_combinations_train(tmp_path, kw):
    h, _ = run(tiny(epochs=1, n_train=128, **kw), tmp_path / "r")
    assert all(np.isfinite(v) for k, v in h[0].items() if isinstance(v, float))
    c = load_checkpoint(tmp_path / "r")
    assert c.config.dtype == kw.get("dtype", "float32") and c.opt_meta["name"] == kw.get("optimizer", "adam")


def test_fast_path_is_used_and_matches_the_reference_path(tmp_path):
    """The default run uses minivae.fast; --reference-path gives the same history within float32 rounding."""
    from minivae.train import fast_trainer, loss_kwargs
    s_fast = tiny(epochs=2)
    s_ref = tiny(epochs=2, fast=False)
    model = VAE(s_fast.model_config(784), rng=0)
    assert fast_trainer(s_fast, model, s_fast.make_optimizer(), loss_kwargs(s_fast, model)) is not None
    assert fast_trainer(s_ref, model, s_ref.make_optimizer(), {}) is None
    assert fast_trainer(s_fast, model, s_fast.make_optimizer(), {"iwae_k": 3}) is None
    h_fast, _ = run(s_fast, tmp_path / "fast")
    h_ref, _ = run(s_ref, tmp_path / "ref")
    for a, b in zip(h_fast, h_ref):
        for k in ("train_neg_elbo", "train_kl", "test_neg_elbo", "test_recon"):
            assert a[k] == pytest.approx(b[k], rel=2e-4), k


def test_any_thread_count_trains_the_same_model(tmp_path, monkeypatch):
    """threads=N (--threads N, any N >= 1) runs BLAS and the fast step on N threads.  The fused kernels give the
    same bits on any count (tests/test_fast.py); BLAS may round its products differently on another count, so
    runs agree to float32 rounding, and a run with the same count repeats bit for bit.  None: every core."""
    import minivae.fast as fast
    from minivae.fast import threads
    made = []
    real = fast.FastTrainer

    class Spy(real):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append((self.threads, threads.count(), threads.blas_threads()))

    monkeypatch.setattr(fast, "FastTrainer", Spy)
    hists = {}
    for t in (1, 2, 3):
        s = tiny(epochs=2, batch_size=128, threads=t)
        hists[t], _ = run(s, tmp_path / f"t{t}")
    if threads.blas_control_available():
        assert made == [(1, 1, 1), (2, 2, 2), (3, 3, 3)]
    assert [m[0] for m in made] == [1, 2, 3]
    flat = [load_checkpoint(tmp_path / f"t{t}").build_model("numpy").flat for t in (1, 2, 3)]
    assert rel_error(flat[0], flat[1]) < 1e-5 and rel_error(flat[0], flat[2]) < 1e-5
    for r1, r2 in zip(hists[1], hists[2]):
        for k in ("train_neg_elbo", "test_neg_elbo"):
            assert r1[k] == pytest.approx(r2[k], rel=1e-6), k
    again, _ = run(tiny(epochs=2, batch_size=128, threads=2), tmp_path / "t2-again")
    assert [{k: v for k, v in r.items() if k != "time_s"} for r in again] == \
        [{k: v for k, v in r.items() if k != "time_s"} for r in hists[2]]
    # resuming with another thread count is allowed
    s = tiny(epochs=3, batch_size=128, threads=1)
    h, _ = run(s, tmp_path / "t2", resume=True)
    assert len(h) == 3
    for bad in (0, -2, 1.5, True, "2"):
        with pytest.raises(ValueError, match="threads must be a positive integer"):
            tiny(threads=bad).validate()
    monkeypatch.setattr(threads, "all_cores", lambda: 5)         # no threads given: every core
    made.clear()
    run(tiny(epochs=1), tmp_path / "default")
    assert made[0][:2] == (5, 5)


@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_train_numbers_are_the_means_of_the_step_losses(tmp_path, monkeypatch, beta):
    """train_loss, train_recon, train_kl: the example-weighted means over the epoch of what each step's
    model.loss returned (recorded here as it happens); train_neg_elbo is recon + KL whatever beta is."""
    steps = []
    original = VAE.loss

    def spy(self, x, *args, **kw):
        out = original(self, x, *args, **kw)
        if kw.get("backward", True):
            steps.append((len(x), float(out[0]), float(self.parts["recon"]), float(self.parts["kl"]), kw["beta"]))
        return out

    monkeypatch.setattr(VAE, "loss", spy)
    h, _ = run(tiny(epochs=1, n_train=200, batch_size=64, beta=beta, fast=False), tmp_path / "r")   # 64,64,64,8
    n, loss, recon, kl, betas = (np.array(c) for c in zip(*steps))
    assert list(n) == [64, 64, 64, 8] and np.all(betas == beta)
    assert np.allclose(loss, recon + beta * kl, rtol=1e-6)             # each step's objective
    rec = h[0]
    assert rec["train_loss"] == pytest.approx((n * loss).sum() / n.sum(), rel=1e-12)
    assert rec["train_recon"] == pytest.approx((n * recon).sum() / n.sum(), rel=1e-12)
    assert rec["train_kl"] == pytest.approx((n * kl).sum() / n.sum(), rel=1e-12)
    assert rec["train_neg_elbo"] == pytest.approx((n * (recon + kl)).sum() / n.sum(), rel=1e-12)
    if beta == 1.0:
        assert rec["train_neg_elbo"] == pytest.approx(rec["train_loss"], rel=1e-6)
    else:
        assert rec["train_kl"] > 0.02    # float32 sums: an absolute tolerance
        assert rec["train_neg_elbo"] - rec["train_loss"] == pytest.approx(0.5 * rec["train_kl"], abs=1e-3)


def test_cupy_backend_trains_on_a_standin_device_like_numpy(tmp_path, monkeypatch):
    """`train --backend cupy` through FastTrainer, on a stand-in CuPy (tests/standin_cupy.py: NumPy arrays whose
    type says "device"): everything that reaches the trainer must live on the model's backend (on a GPU a host
    eps was a TypeError on the first step), and the run gives the NumPy run's numbers."""
    from standin_cupy import installed

    from minivae import fast
    from minivae.backend import get_array_module
    seen = []
    step = fast.FastTrainer.step

    def spy(self, x, eps, *a, **kw):
        seen.append((self.model.backend, get_array_module(x).__name__, get_array_module(eps).__name__))
        return step(self, x, eps, *a, **kw)

    monkeypatch.setattr(fast.FastTrainer, "step", spy)
    host, _ = run(tiny(batch_size=48), tmp_path / "host")            # 256 = 5 x 48 + 16: a short last batch
    n_host = len(seen)
    with installed(monkeypatch):
        dev, lines = run(tiny(batch_size=48, backend="cupy"), tmp_path / "dev")
    assert n_host == 12 and len(seen) == 24                           # the fast path ran both times
    assert set(seen[n_host:]) == {("cupy", "cupy", "cupy")}
    for a, b in zip(host, dev):
        for k in a:
            if k != "time_s":
                assert b[k] == pytest.approx(a[k], rel=2e-5, abs=1e-5), k
    pa, pb = load_checkpoint(tmp_path / "host"), load_checkpoint(tmp_path / "dev")
    assert all(np.allclose(pa.params[k], pb.params[k], rtol=0, atol=2e-3) for k in pa.params)


@pytest.mark.parametrize("recipe, kw", [
    ("default", dict(warmup=1, likelihood="gaussian", binarize="none", obs_var=0.1)),
    ("default", dict(binarize="static", activation="tanh", init_output_bias=True, valid=50, iw_k=3)),
    ("default", dict(iwae_k=3)),
    ("default", dict(optimizer="adagrad", lr=1e-2, clip_norm=5.0, weight_decay=1e-4, dtype="float64")),
    ("default", dict(conditional=True)),
    ("default", dict(likelihood="gaussian_learned_var", binarize="none", hidden=(16, 8))),
    ("conv", dict(hidden=(16,))),
    ("burda2015-short", dict(hidden=(16, 16), latent=3)),
], ids=["warmup-gaussian", "static-tanh-iw", "iwae", "adagrad-f64", "conditional", "learned-var", "conv",
        "burda2015-short"])
def test_every_kind_of_run_trains_on_a_standin_cupy_like_numpy(tmp_path, monkeypatch, recipe, kw):
    """Every recipe, architecture and option on the CuPy code path (the stand-in refuses host arrays in device
    operations as CuPy does), with the NumPy run's numbers."""
    from standin_cupy import installed
    base = dict(n_train=96, n_test=48, epochs=1, batch_size=32, figures=False)
    if recipe == "default":
        base.update(hidden=(24,), latent=2)
    base.update(kw)
    host, _ = run(TrainSettings.from_recipe(recipe, **base), tmp_path / "host")
    with installed(monkeypatch):
        dev, _ = run(TrainSettings.from_recipe(recipe, backend="cupy", **base), tmp_path / "dev")
    for k in ("train_neg_elbo", "test_neg_elbo", "test_kl"):
        assert dev[0][k] == pytest.approx(host[0][k], rel=1e-4), k
    res_h, res_d = (json.loads((tmp_path / d / "results.json").read_text())["test"] for d in ("host", "dev"))
    assert res_d["neg_elbo"] == pytest.approx(res_h["neg_elbo"], rel=1e-4)
    if kw.get("iw_k"):
        assert res_d["iw_nll"] == pytest.approx(res_h["iw_nll"], rel=1e-4)


def test_the_standin_cupy_refuses_host_arrays_where_cupy_does(monkeypatch):
    """The stand-in catches a host array where a device one belongs as CuPy does: inside a list
    (cupy.concatenate), as a 0-d array, and np.asarray(a device array) in library code (CuPy: "Implicit
    conversion to a NumPy array is not allowed"); .get() and cupy.asnumpy are the ways to the host."""
    from standin_cupy import installed
    with installed(monkeypatch) as cp:
        dev = cp.ones(3, dtype=np.float32)
        with pytest.raises(TypeError, match="Unsupported type"):
            cp.concatenate([dev, np.ones(3, dtype=np.float32)])
        with pytest.raises(TypeError, match="Unsupported type"):
            dev * np.asarray(2.0, dtype=np.float32)
        with pytest.raises(TypeError, match="Implicit conversion"):
            exec("np.asarray(a)", {"__name__": "minivae.probe", "np": np, "a": dev})
        assert type(cp.concatenate([dev, dev])) is cp.ndarray and type(dev * np.float32(2.0)) is cp.ndarray
        for host in (dev.get(), cp.asnumpy(dev)):
            assert type(host) is np.ndarray and np.array_equal(host, np.ones(3))


FAMILIES = {                     # every model family added after the recipes above, on its own
    "planar": dict(flow="planar:2", iw_k=3),
    "iaf": dict(flow="iaf:2", iw_k=3),
    "made": dict(decoder="made", iw_k=3),
    "mog": dict(prior="mog:3", iw_k=3),
    "vamp": dict(prior="vamp:3", iw_k=3),
    "two-layer": dict(stochastic_layers=2, hidden=(16, 16), latent=4, latent2=2, iw_k=3),
    "two-layer-iwae": dict(stochastic_layers=2, hidden=(16, 16), latent=4, latent2=2, iwae_k=3),
    "m2": dict(labels=20, iw_k=3),
    "stl": dict(iwae_k=3, iwae_grad="stl"),
    "dreg": dict(iwae_k=3, iwae_grad="dreg", decoder="made"),
    "made-iaf-mog": dict(decoder="made", flow="iaf:1", prior="mog:2", iwae_k=2),
}


@pytest.mark.parametrize("kw", FAMILIES.values(), ids=FAMILIES.keys())
def test_every_model_family_trains_on_a_standin_cupy_like_numpy(tmp_path, monkeypatch, kw):
    """The later model families (flows, the MADE decoder, learned priors, two stochastic layers, M2, the STL and
    DReG IWAE gradients) on the CuPy code path, where a host array among device ones is a TypeError: every
    step's batch, gradients and parameters live on the stand-in device, the run gives the NumPy run's numbers
    (today they are bit-equal: the same NumPy operations), and so do the trained model's samples,
    reconstructions and densities on the device."""
    from standin_cupy import installed

    from minivae.backend import get_array_module
    from minivae.train import loop
    seen = []
    loss, update = loop._Step.loss, loop._Step.update

    def where(*arrays):
        return {get_array_module(a).__name__ for a in arrays}

    def spy_loss(self, xb, idx, beta):
        out = loss(self, xb, idx, beta)    # (the stand-in's sums are NumPy scalars: the loss cannot tell)
        seen.append(("loss", self.model.backend, where(xb, *self.grads.values())))
        return out

    def spy_update(self):
        seen.append(("update", self.model.backend, where(*self.model.params.values())))
        return update(self)

    monkeypatch.setattr(loop._Step, "loss", spy_loss)
    monkeypatch.setattr(loop._Step, "update", spy_update)
    base = dict(n_train=96, n_test=48, epochs=1, batch_size=32, figures=False, hidden=(16,), latent=2)
    base.update(kw)
    host, _ = run(TrainSettings.from_recipe("default", **base), tmp_path / "host")
    assert {(k, b) for k, b, _ in seen} == {("loss", "numpy"), ("update", "numpy")} and len(seen) == 6
    seen.clear()
    with installed(monkeypatch):
        dev, _ = run(TrainSettings.from_recipe("default", backend="cupy", **base), tmp_path / "dev")
    assert len(seen) == 6 and all(b == "cupy" and mods == {"cupy"} for _, b, mods in seen), seen
    for k in host[0]:
        if k != "time_s":
            assert dev[0][k] == pytest.approx(host[0][k], rel=1e-4), k
    res_h, res_d = (json.loads((tmp_path / d / "results.json").read_text())["test"] for d in ("host", "dev"))
    for k in ("neg_elbo", "recon", "kl", "iw_nll", "error"):
        assert (res_d.get(k) is None) == (res_h.get(k) is None), k
        if res_h.get(k) is not None:
            assert res_d[k] == pytest.approx(res_h[k], rel=1e-4), k
    pa, pb = load_checkpoint(tmp_path / "host"), load_checkpoint(tmp_path / "dev")
    assert pa.params.keys() == pb.params.keys()
    assert all(np.allclose(pa.params[k], pb.params[k], rtol=0, atol=1e-5) for k in pa.params)
    # the trained model on the device: samples (prior draws, a MADE's pixel-by-pixel draw), reconstructions and
    # the densities the lessons read (host arrays in: the model puts them on its backend)
    g = np.random.default_rng(0)
    x = (g.random((4, pa.config.x_dim)) < 0.3).astype(np.float32)
    z = g.standard_normal((4, pa.config.z_dim)).astype(np.float32)
    calls = [("sample", lambda m: m.sample(5, rng=1)), ("reconstruct", lambda m: m.reconstruct(x))]
    if pa.config.kind == "family":
        calls += [("log_prior", lambda m: m.log_prior(z)), ("log_px_given_z", lambda m: m.log_px_given_z(x, z[None]))]
    with installed(monkeypatch):
        mh, md = pa.build_model("numpy"), pb.build_model("cupy")
        for name, call in calls:
            a, b = call(mh), call(md)
            assert get_array_module(a).__name__ == "numpy" and get_array_module(b).__name__ == "cupy", name
            assert np.allclose(b.get(), a, rtol=1e-5, atol=1e-6), name
