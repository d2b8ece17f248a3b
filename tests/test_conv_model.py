"""The convolutional VAEs (arch "conv" and "conv-pool"): whole-model gradient checks, names and shapes, errors,
dtypes, the shared API, and a tiny CLI run with checkpoints and exact resume."""
import gzip
import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

import minivae
from minivae import VAE, VAEConfig, check_model
from minivae.backend import to_numpy
from minivae.cli import main
from minivae.checkpoint import load_checkpoint
from conftest import backends

ARCHS = ["conv", "conv-pool"]
ENV = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")


def small(arch, likelihood="bernoulli", activation="tanh", image_shape=(1, 4, 8), seed=1, backend="numpy",
          scale=2.0):
    """A tiny float64 conv VAE.  ``scale``: see the note in the gradient-check test."""
    cfg = VAEConfig(arch=arch, image_shape=image_shape, hidden=(6,), z_dim=2, activation=activation,
                    likelihood=likelihood, dtype="float64")
    m = VAE(cfg, rng=seed, backend=backend)
    m.flat *= scale
    return m


# --------------------------------------------------------------------------- gradient checks
# At PyTorch's init (U(±1/sqrt(fan_in))) the first convolution's gradients are ~1e-4 of the loss.  Central
# differences carry a round-off error of about eps_float64 * |loss| / h ~ 1e-10 (h = 1e-5), which is then
# ~1e-6 relative to such small gradients: the check would measure round-off, not the backward.  Scaling
# every parameter by 2 makes the gradients large enough that the check measures the backward to < 1e-8.
@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("objective", ["elbo", "iwae", "free_bits"])
def test_whole_conv_model_gradcheck_every_parameter(arch, objective, backend):
    rng = np.random.default_rng(7)
    m = small(arch, backend=backend)
    x = rng.uniform(0.05, 0.95, (3, m.config.x_dim))
    kw = {"elbo": dict(n_samples=2, beta=0.7), "iwae": dict(n_samples=3, loss_kwargs={"iwae_k": 3}),
          "free_bits": dict(beta=1.3, loss_kwargs={"free_bits": 0.2})}[objective]
    report = check_model(m, x, rng=rng, max_entries=20, **kw)
    assert set(report) == set(m.params)
    assert max(report.values()) < 1e-7, report


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("likelihood", ["gaussian", "gaussian_learned_var"])
def test_gradcheck_gaussian_likelihoods_and_two_channels(arch, likelihood):
    rng = np.random.default_rng(3)
    m = small(arch, likelihood=likelihood, image_shape=(2, 4, 4))
    x = rng.standard_normal((3, m.config.x_dim))
    report = check_model(m, x, rng=rng, max_entries=20, n_samples=2, beta=0.7)
    assert set(report) == set(m.params)
    if likelihood == "gaussian_learned_var":
        assert "dec.out_logvar.W" in report
    assert max(report.values()) < 1e-7, report


@pytest.mark.parametrize("arch", ARCHS)
def test_gradcheck_relu_at_the_default_init(arch):
    """The default activation (ReLU) and init, on an 8x8 image: no kink within h of this draw."""
    rng = np.random.default_rng(0)
    m = small(arch, activation="relu", image_shape=(1, 8, 8), seed=2, scale=1.5)
    x = rng.uniform(0.05, 0.95, (2, 64))
    report = check_model(m, x, rng=rng, max_entries=20, n_samples=2, beta=0.7)
    assert max(report.values()) < 1e-7, report


def test_gradcheck_catches_a_broken_conv_backward(monkeypatch):
    """A planted bug in a conv op's backward (dW not summed over the batch) must fail the model check."""
    import minivae.model as mm
    real = mm.conv2d_backward

    def broken(dy, cache):                      # dW averaged instead of summed over the batch
        dx, dW, db = real(dy, cache)
        return dx, dW / dy.shape[0], db
    monkeypatch.setattr(mm, "conv2d_backward", broken)
    m = small("conv")
    x = np.random.default_rng(0).uniform(0.05, 0.95, (3, m.config.x_dim))
    with pytest.raises(minivae.GradientCheckError, match="enc.conv"):
        check_model(m, x, max_entries=5)


# --------------------------------------------------------------------------- names, shapes, init
def test_parameter_names_and_shapes_are_the_issues():
    conv = VAE(VAEConfig(arch="conv"), rng=0)
    assert conv.config.image_shape == (1, 28, 28) and conv.config.x_dim == 784 and conv.config.hidden == (256,)
    assert {k: v.shape for k, v in conv.params.items()} == {
        "enc.conv.0.W": (32, 1, 4, 4), "enc.conv.0.b": (32,), "enc.conv.1.W": (64, 32, 4, 4), "enc.conv.1.b": (64,),
        "enc.0.W": (3136, 256), "enc.0.b": (256,), "enc.mu.W": (256, 20), "enc.mu.b": (20,),
        "enc.logvar.W": (256, 20), "enc.logvar.b": (20,),
        "dec.0.W": (20, 256), "dec.0.b": (256,), "dec.1.W": (256, 3136), "dec.1.b": (3136,),
        "dec.deconv.0.W": (64, 32, 4, 4), "dec.deconv.0.b": (32,), "dec.deconv.1.W": (32, 1, 4, 4),
        "dec.deconv.1.b": (1,)}
    assert list(conv.params)[:4] == ["enc.conv.0.W", "enc.conv.0.b", "enc.conv.1.W", "enc.conv.1.b"]
    pool = VAE(VAEConfig(arch="conv-pool"), rng=0)
    shapes = {k: v.shape for k, v in pool.params.items()}
    assert shapes["enc.conv.0.W"] == (32, 1, 3, 3) and shapes["enc.conv.1.W"] == (64, 32, 3, 3)
    assert shapes["enc.0.W"] == (3136, 256) and shapes["dec.1.W"] == (256, 3136)
    assert shapes["dec.conv.0.W"] == (32, 64, 3, 3) and shapes["dec.conv.1.W"] == (1, 32, 3, 3)
    assert not any("deconv" in k for k in shapes)
    for m in (conv, pool):
        assert m.size == sum(p.size for p in m.params.values()) == m.flat.size


def test_init_is_pytorchs_default():
    """U(±1/sqrt(fan_in)) for W and b; fan_in = C·KH·KW for conv and, as PyTorch counts it, C_out·KH·KW for the
    (C_in, C_out, KH, KW) weight of a transposed convolution."""
    m = VAE(VAEConfig(arch="conv"), rng=0)
    bounds = {"enc.conv.0": 1 * 16, "enc.conv.1": 32 * 16, "enc.0": 3136, "dec.1": 256,
              "dec.deconv.0": 32 * 16, "dec.deconv.1": 1 * 16}
    for layer, fan_in in bounds.items():
        bound = 1 / np.sqrt(fan_in)
        for p in ("W", "b"):
            a = np.abs(m.params[f"{layer}.{p}"])
            assert a.max() <= bound, (layer, p)
        assert np.abs(m.params[f"{layer}.W"]).max() > 0.9 * bound, layer


def test_activation_shapes_through_the_networks():
    for arch in ARCHS:
        m = VAE(VAEConfig(arch=arch, z_dim=3, dtype="float64"), rng=0)
        h = np.zeros((2, 784))
        shapes = []
        for layer in m.net.encoder:
            h, _ = m._layer_forward(layer, h)
            shapes.append(h.shape)
        assert (2, 32, 14, 14) in shapes and (2, 64, 7, 7) in shapes and shapes[-1] == (2, 256)
        z = np.zeros((2, 3))
        for layer in m.net.decoder:
            z, _ = m._layer_forward(layer, z)
        assert z.shape == (2, 32, 28, 28) if arch == "conv-pool" else (2, 32, 14, 14)


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kwargs, match", [
    (dict(arch="conv", image_shape=(1, 30, 30)), r"divisible by 4.*\(1, 30, 30\)"),
    (dict(arch="conv-pool", image_shape=(1, 28, 26)), r"divisible by 4.*\(1, 28, 26\)"),
    (dict(arch="conv", x_dim=100), r"needs image_shape"),
    (dict(arch="conv", x_dim=100, image_shape=(1, 8, 8)), r"x_dim 100 does not match image_shape \(1, 8, 8\)"),
    (dict(arch="conv", image_shape=(28, 28)), r"image_shape must be \(C, H, W\)"),
    (dict(arch="resnet"), r"unknown arch 'resnet'"),
])
def test_bad_configs_give_one_line_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VAEConfig(**kwargs)


def test_wrong_input_shape_names_the_expected_shape():
    m = VAE(VAEConfig(arch="conv", image_shape=(1, 8, 12)), rng=0)
    with pytest.raises(ValueError, match=r"x must have shape \(N, 96\) \(images \(1, 8, 12\) flattened"):
        m.loss(np.zeros((2, 784)))
    with pytest.raises(ValueError, match=r"z must have shape \(N, 20\)"):
        m.decode(np.zeros((2, 3)))


# --------------------------------------------------------------------------- the shared API
@pytest.mark.parametrize("arch", ARCHS)
def test_float32_stays_float32_and_the_api_works(arch):
    m = VAE(VAEConfig(arch=arch, image_shape=(1, 8, 12), z_dim=3), rng=0)
    rng = np.random.default_rng(0)
    x = (rng.random((5, 96)) < 0.4).astype(np.float32)
    loss, grads = m.loss(x, n_samples=2, beta=0.5)
    assert loss.dtype == np.float32 and all(g.dtype == np.float32 for g in grads.values())
    for kw in (dict(iwae_k=4), dict(free_bits=0.1)):
        loss, grads = m.loss(x, **kw)
        assert loss.dtype == np.float32 and grads.flat.dtype == np.float32
    mu, logvar = m.encode(x)
    assert mu.shape == logvar.shape == (5, 3) and mu.dtype == np.float32
    assert m.decode(mu).shape == (5, 96) and m.decode(mu).dtype == np.float32
    assert m.reconstruct(x).shape == (5, 96) and m.sample(4, rng=1).shape == (4, 96)
    assert 0 <= float(m.sample(4, rng=1).min()) and float(m.sample(4, rng=1).max()) <= 1
    assert m.log_weights(x, rng.standard_normal((6, 5, 3))).shape == (6, 5)


def test_iwae_with_one_sample_is_minus_the_mean_log_weight():
    """The IWAE loss (K = 1) and log_weights compute the same quantity by two routes (the shared objective
    forward, and encode/decode with the density formulas)."""
    m = VAE(VAEConfig(arch="conv-pool", image_shape=(1, 8, 8), z_dim=3, dtype="float64"), rng=0)
    rng = np.random.default_rng(1)
    x = rng.uniform(0.05, 0.95, (4, 64))
    eps = rng.standard_normal((1, 4, 3))
    loss, _ = m.loss(x, eps=eps, iwae_k=1, backward=False)
    assert np.isclose(float(loss), -float(m.log_weights(x, eps).mean()), rtol=1e-12)


def test_conv_training_reduces_the_loss_and_uses_the_readable_path():
    from minivae.fast import FastPathError, check_supported
    from minivae.lessonkit import fit
    from minivae.train import TrainSettings, fast_trainer
    with pytest.raises(FastPathError, match="arch 'conv'"):
        check_supported(VAEConfig(arch="conv"))
    s = TrainSettings.from_recipe("conv")
    assert s.fast and fast_trainer(s, VAE(VAEConfig(arch="conv"), rng=0), s.make_optimizer(), {}) is None
    x, _ = minivae.data.load_mnist("test")
    x = x[:256]
    m = VAE(VAEConfig(arch="conv", z_dim=4), rng=0)
    rng = np.random.default_rng(0)
    xb = minivae.data.static_binarize(x, 0)
    before = float(m.loss(xb, eps=np.zeros((1, 256, 4), np.float32), backward=False)[0])
    fit(m, x, steps=30, rng=rng, batch_size=64)
    after = float(m.loss(xb, eps=np.zeros((1, 256, 4), np.float32), backward=False)[0])
    assert after < before - 100, (before, after)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ARCHS)
def test_cupy_matches_numpy(arch):
    import cupy
    rng = np.random.default_rng(0)
    cfg = VAEConfig(arch=arch, image_shape=(1, 8, 8), z_dim=3, dtype="float64")
    x = rng.uniform(size=(5, 64))
    eps = rng.standard_normal((2, 5, 3))
    mn, mc = VAE(cfg, rng=7), VAE(cfg, rng=7, backend="cupy")
    ln, gn = mn.loss(x, eps=eps, n_samples=2)
    lc, gc = mc.loss(cupy.asarray(x), eps=eps, n_samples=2)
    assert isinstance(gc["enc.conv.0.W"], cupy.ndarray)
    assert np.isclose(float(ln), float(lc), rtol=1e-10)
    for k in gn:
        assert np.allclose(gn[k], to_numpy(gc[k]), rtol=1e-8, atol=1e-12), k


# --------------------------------------------------------------------------- CLI, checkpoints, resume
TINY = ["--recipe", "conv", "--n-train", "128", "--n-test", "64", "--batch-size", "32", "--latent", "2",
        "--hidden", "16", "--quiet"]


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "minivae", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=timeout)


@pytest.fixture(scope="module")
def conv_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("convcli") / "run"
    r = cli("train", *TINY, "--epochs", "2", "--iw-k", "3", "--out", out)
    assert r.returncode == 0, r.stderr
    return out, r


def test_conv_run_through_the_cli_writes_every_artifact(conv_run):
    out, r = conv_run
    assert "IW bound (k=3)" in r.stdout and "final test -ELBO" in r.stdout
    c = load_checkpoint(out / "checkpoint.npz")
    assert c.config.arch == "conv" and c.config.image_shape == (1, 28, 28) and c.config.hidden == (16,)
    assert c.settings["arch"] == "conv"
    for name in ("reconstructions", "samples", "loss_curves", "interpolation", "neighbourhood", "manifold",
                 "latent_scatter"):
        assert (out / "figures" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_conv_checkpoint_round_trip_and_exact_resume(conv_run, tmp_path):
    out, _ = conv_run
    part = tmp_path / "part"
    # the same environment as the uninterrupted run (one BLAS thread): products summed by another number of
    # threads round differently, so bit-for-bit equality is a promise for the same backend and thread count
    r = cli("train", *TINY, "--epochs", "1", "--no-figures", "--out", part)
    assert r.returncode == 0, r.stderr
    r = cli("train", "--out", part, "--resume", "--epochs", "2", "--no-figures", "--quiet")
    assert r.returncode == 0, r.stderr
    a, b = load_checkpoint(out / "checkpoint.npz"), load_checkpoint(part / "checkpoint.npz")
    assert a.epoch == b.epoch == 2
    ma, mb = a.build_model(), b.build_model()
    assert np.array_equal(ma.flat, mb.flat)                       # bit for bit, as one uninterrupted run
    ha = json.loads((out / "history.json").read_text())
    hb = json.loads((part / "history.json").read_text())
    assert [h["test_neg_elbo"] for h in ha] == [h["test_neg_elbo"] for h in hb]


def test_eval_sample_interpolate_manifold_on_a_conv_checkpoint(conv_run, tmp_path):
    out, _ = conv_run
    js = tmp_path / "e.json"
    assert main(["eval", "--checkpoint", str(out), "--n", "64", "--iw-k", "5", "--json", str(js)]) == 0
    doc = json.loads(js.read_text())
    final = json.loads((out / "results.json").read_text())["test"]
    assert doc["neg_elbo"] == pytest.approx(final["neg_elbo"], rel=1e-6)
    assert doc["iw_nll"] <= doc["neg_elbo"] + 1
    for cmd in ("sample", "interpolate", "manifold"):
        assert main([cmd, "--checkpoint", str(out), "--out", str(tmp_path / cmd)]) == 0
        assert list((tmp_path / cmd).glob("*.png")), cmd


def write_idx(folder, shape, n=(64, 32)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
    for (split, (img, lab)), count in zip(names.items(), n):
        pixels = rng.integers(0, 256, (count, *shape), dtype=np.uint8)
        with gzip.open(folder / f"{img}.gz", "wb") as f:
            f.write(struct.pack(">BBBB", 0, 0, 8, 3) + struct.pack(">III", count, *shape) + pixels.tobytes())
        with gzip.open(folder / f"{lab}.gz", "wb") as f:
            f.write(struct.pack(">BBBB", 0, 0, 8, 1) + struct.pack(">I", count)
                    + rng.integers(0, 10, count, dtype=np.uint8).tobytes())
    return folder


def test_data_dir_with_other_image_sizes(tmp_path):
    ok = write_idx(tmp_path / "h16w12", (16, 12))
    for arch in ARCHS:
        run = tmp_path / f"run-{arch}"
        r = cli("train", "--arch", arch, "--data-dir", ok, "--epochs", "1", "--batch-size", "32", "--latent", "2",
                "--quiet", "--out", run)
        assert r.returncode == 0, r.stderr
        c = load_checkpoint(run)
        assert c.config.image_shape == (1, 16, 12) and c.config.x_dim == 192 and c.config.arch == arch
        assert (run / "figures" / "manifold.png").is_file()
    bad = write_idx(tmp_path / "h30", (30, 30))
    r = cli("train", "--recipe", "conv", "--data-dir", bad, "--epochs", "1", "--out", tmp_path / "bad")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("minivae: error:") and "(1, 30, 30)" in last and "divisible by 4" in last


def test_arch_flag_works_with_any_recipe(tmp_path):
    from minivae.train import TrainSettings
    s = TrainSettings.from_recipe("default", arch="conv-pool")
    assert s.arch == "conv-pool" and s.hidden == (256,)         # the conv archs' own dense width
    assert TrainSettings.from_recipe("conv", arch="mlp").hidden == (400,)
    assert TrainSettings.from_recipe("burda2015", arch="conv", hidden=(64,)).hidden == (64,)
    run = tmp_path / "mlp"
    assert main(["train", "--recipe", "conv", "--arch", "mlp", "--n-train", "64", "--n-test", "32", "--epochs", "1",
                 "--no-figures", "--quiet", "--out", str(run)]) == 0
    c = load_checkpoint(run)
    assert c.config.arch == "mlp" and c.config.hidden == (400,) and "enc.conv.0.W" not in c.build_model().params
    shutil.rmtree(run)


def test_conv_evaluation_is_chunked_without_changing_the_numbers(monkeypatch):
    """The conv archs cap the rows per model call (memory); the eps stream, and so the estimate, is unchanged."""
    from minivae import evaluate
    m = VAE(VAEConfig(arch="conv-pool", image_shape=(1, 8, 8), z_dim=3, dtype="float64"), rng=0)
    x = (np.random.default_rng(1).random((10, 64)) < 0.4).astype(np.float64)
    rng = np.random.default_rng(5)
    want = []
    for start in range(0, 10, 4):
        xb = x[start:start + 4]
        want.append(evaluate.log_mean_exp(m.log_weights(xb, rng.standard_normal((7, len(xb), 3)))))
    want = np.concatenate(want)
    elbo = evaluate.negative_elbo(m, x, np.random.default_rng(2), batch_size=10)
    calls = []
    real = evaluate._log_weights
    monkeypatch.setattr(evaluate, "_log_weights",
                        lambda model, xb, eps: calls.append(eps.shape[0] * eps.shape[1]) or real(model, xb, eps))
    from minivae.networks import ARCHITECTURES
    monkeypatch.setitem(ARCHITECTURES, "conv-pool", ARCHITECTURES["conv-pool"]._replace(eval_rows=8))
    got = evaluate.iw_log_likelihood(m, x, 7, np.random.default_rng(5), chunk=7, batch_size=4)
    assert np.allclose(got, want, rtol=1e-10) and max(calls) <= 8 and len(calls) > 3
    capped = evaluate.negative_elbo(m, x, np.random.default_rng(2), batch_size=10)     # 8 rows per call now
    assert capped["loss"] == pytest.approx(elbo["loss"], rel=1e-12)
