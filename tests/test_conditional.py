"""The conditional VAE: the concatenation op pair, the whole model's gradients, the label API, the CLI."""
import gzip
import json
import struct

import numpy as np
import pytest

from minivae import VAE, VAEConfig, check_model, check_op
from minivae.checkpoint import load_checkpoint
from minivae.cli import main
from minivae.conditional import check_labels, concat_backward, concat_forward, one_hot, outer_backward, outer_forward
from minivae.figures import class_grid_images
from minivae.train import TrainSettings, train


# ------------------------------------------------------------------ the op pair
def test_concat_op_gradient_check_float64():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((5, 4)), rng.standard_normal((5, 3))
    report = check_op(concat_forward, concat_backward, [a, b], names=["a", "b"], rng=rng)
    assert max(report.values()) < 1e-7


def test_concat_forward_places_the_columns_and_backward_slices():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((3, 2)), rng.standard_normal((3, 4))
    out, cache = concat_forward(a, b)
    assert out.shape == (3, 6) and np.array_equal(out[:, :2], a) and np.array_equal(out[:, 2:], b)
    g = rng.standard_normal((3, 6))
    da, db = concat_backward(g, cache)
    assert np.array_equal(da, g[:, :2]) and np.array_equal(db, g[:, 2:])
    with pytest.raises(ValueError, match="rows"):
        concat_forward(a, b[:2])


def test_outer_op_gradient_check_float64():
    rng = np.random.default_rng(10)
    a, b = rng.standard_normal((5, 4)), rng.standard_normal((5, 3))
    report = check_op(outer_forward, outer_backward, [a, b], names=["a", "b"], rng=rng)
    assert max(report.values()) < 1e-7


def test_outer_with_a_one_hot_label_copies_h_into_its_class_block():
    rng = np.random.default_rng(11)
    h, y = rng.standard_normal((3, 2)), one_hot(np.array([2, 0, 1]), 3, np.float64)
    out, cache = outer_forward(h, y)
    blocks = out.reshape(3, 2, 3)                          # (n, i, k)
    for n, k in enumerate([2, 0, 1]):
        assert np.array_equal(blocks[n, :, k], h[n]) and not np.delete(blocks[n], k, axis=1).any()
    g = rng.standard_normal((3, 6))
    dh, _ = outer_backward(g, cache)
    assert np.array_equal(dh, np.stack([g.reshape(3, 2, 3)[n, :, k] for n, k in enumerate([2, 0, 1])]))
    with pytest.raises(ValueError, match="rows"):
        outer_forward(h, y[:2])


def test_one_hot_and_label_checks():
    y = one_hot(np.array([2, 0, 1]), 4, np.float32)
    assert y.dtype == np.float32 and np.array_equal(y, np.eye(4, dtype=np.float32)[[2, 0, 1]])
    assert check_labels([1.0, 3.0], 4).dtype == np.int64
    for bad, msg in (([0, 4], "outside 0..3"), ([-1], "outside 0..3"), ([0.5], "integer"), ([[0, 1]], "shape"),
                     (["a"], "integer")):
        with pytest.raises(ValueError, match=msg):
            check_labels(bad, 4)
    with pytest.raises(ValueError, match="3 labels for 2 examples"):
        check_labels([0, 1, 2], 4, n=2)


# ------------------------------------------------------------- the whole model
def _data(rng, n, d, K):
    return rng.random((n, d)), rng.integers(0, K, n)


@pytest.mark.parametrize("cfg", [
    dict(x_dim=10, hidden=(6, 5), z_dim=3, n_classes=4, activation="tanh"),
    dict(x_dim=10, hidden=(), z_dim=2, n_classes=3, likelihood="gaussian_learned_var"),
    dict(x_dim=10, hidden=(6,), z_dim=2, n_classes=3, likelihood="gaussian", activation="softplus"),
], ids=["dense-2-hidden", "dense-no-hidden", "dense-gaussian"])
def test_whole_conditional_dense_model_gradient_check(cfg):
    rng = np.random.default_rng(2)
    m = VAE(VAEConfig(dtype="float64", **cfg), rng=3)
    x, y = _data(rng, 6, cfg["x_dim"], cfg["n_classes"])
    assert max(check_model(m, x, y=y, n_samples=2, beta=0.7, rng=rng).values()) < 1e-7
    assert max(check_model(m, x, y=y, n_samples=3, rng=rng, loss_kwargs={"iwae_k": 3}).values()) < 1e-6


@pytest.mark.parametrize("mode", ["outer", "every"])
def test_whole_conditional_model_gradient_check_for_each_label_decoder(mode):
    rng = np.random.default_rng(12)
    m = VAE(VAEConfig(x_dim=10, hidden=(6, 5), z_dim=3, n_classes=4, activation="tanh", dtype="float64",
                      label_decoder=mode), rng=3)
    dec = [(layer.op, layer.W) for layer in m.net.decoder + m.net.dec_heads]
    if mode == "outer":          # [z, vec(z ⊗ y), y]: 3 + 12 + 4 inputs to dec.0
        assert dec[:3] == [("outer", None), ("concat", None), ("dense", (19, 5))]
    else:                        # y before every dense layer, the output layer too
        assert [w for op, w in dec if op == "dense"] == [(7, 5), (9, 6), (10, 10)]
        assert [op for op, _ in dec].count("concat") == 3
    x, y = _data(rng, 6, 10, 4)
    assert max(check_model(m, x, y=y, n_samples=2, beta=0.7, rng=rng).values()) < 1e-7
    assert max(check_model(m, x, y=y, n_samples=3, rng=rng, loss_kwargs={"iwae_k": 3}).values()) < 1e-6


def test_whole_conditional_model_with_outer_encoder_heads_gradient_check():
    rng = np.random.default_rng(14)
    m = VAE(VAEConfig(x_dim=10, hidden=(6,), z_dim=3, n_classes=4, activation="tanh", dtype="float64",
                      label_decoder="outer", label_encoder="outer"), rng=3)
    assert [layer.op for layer in m.net.encoder] == ["concat", "dense", "act", "outer"]
    assert m.params["enc.mu.W"].shape == m.params["enc.logvar.W"].shape == (6 + 6 * 4, 3)
    x, y = _data(rng, 6, 10, 4)
    assert max(check_model(m, x, y=y, n_samples=2, beta=0.7, rng=rng).values()) < 1e-7


def test_whole_conditional_conv_model_with_the_outer_decoder_gradient_check():
    rng = np.random.default_rng(13)
    m = VAE(VAEConfig(arch="conv", image_shape=(1, 4, 4), hidden=(3,), z_dim=2, n_classes=3, dtype="float64",
                      activation="tanh", label_decoder="outer", label_encoder="outer"), rng=5)
    assert m.params["dec.0.W"].shape == (2 + 6 + 3, 3) and m.params["enc.mu.W"].shape == (3 + 9, 2)
    x, y = _data(rng, 3, 16, 3)
    report = check_model(m, x, y=y, rng=rng, max_entries=150)
    assert set(report) == set(m.params) and max(report.values()) < 1e-7


def test_label_decoder_config_errors_and_serialisation():
    for kw, msg in ((dict(label_decoder="outer"), "needs a conditional model"),
                    (dict(n_classes=3, label_decoder="sideways"), "unknown label_decoder"),
                    (dict(n_classes=3, label_decoder="every", arch="conv"), "fully connected"),
                    (dict(label_encoder="outer"), "needs a conditional model"),
                    (dict(n_classes=3, label_encoder="every"), "unknown label_encoder")):
        with pytest.raises(ValueError, match=msg):
            VAEConfig(**kw)
    c = VAEConfig(n_classes=3, label_decoder="outer")
    assert VAEConfig.from_json(c.to_json()) == c and c.to_dict()["label_decoder"] == "outer"
    assert "label_decoder" not in VAEConfig(n_classes=3).to_dict()      # the default serialises as before


def test_beta_start_anneals_the_kl_weight_to_beta_over_the_warmup():
    from minivae.train import beta_at
    s = TrainSettings(beta=1.0, beta_start=4.0, warmup=2)
    assert [beta_at(s, t, 10) for t in (0, 5, 10, 15, 20, 30)] == [4.0, 3.25, 2.5, 1.75, 1.0, 1.0]
    plain = TrainSettings(beta=2.0, warmup=2)          # beta_start 0: the classic warm-up, as before
    assert [beta_at(plain, t, 10) for t in (0, 10, 20)] == [0.0, 1.0, 2.0]
    for kw, msg in ((dict(beta_start=4.0), "needs warmup"), (dict(beta_start=-1.0, warmup=1), "beta_start"),
                    (dict(label_decoder="outer"), "conditional run"), (dict(label_encoder="outer"), "conditional run")):
        with pytest.raises(ValueError, match=msg):
            TrainSettings(**kw).validate()


def test_outer_decoder_with_an_annealed_beta_trains_and_resumes_exactly(tmp_path):
    d = make_labelled(tmp_path / "data")
    kw = dict(conditional=True, data_dir=str(d), label_decoder="outer", beta_start=3.0, warmup=1, **TINY)
    full = train(TrainSettings(**kw), tmp_path / "full", progress=False, log=lambda *a: None)
    train(TrainSettings(**dict(kw, epochs=1)), tmp_path / "part", progress=False, log=lambda *a: None)
    resumed = train(TrainSettings(**kw), tmp_path / "part", resume=True, progress=False, log=lambda *a: None)
    assert [r["train_loss"] for r in resumed] == [r["train_loss"] for r in full]
    assert full[0]["beta"] > 1 and full[1]["beta"] == 1.0
    assert load_checkpoint(tmp_path / "full").config.label_decoder == "outer"


@pytest.mark.parametrize("arch", ["conv", "conv-pool"])
def test_whole_conditional_conv_model_gradient_check(arch):
    """Every parameter is checked; the two big convolution weights at 150 random entries each (all entries of
    every other parameter, among them every row of enc.0.W and dec.0.W that reads the label)."""
    rng = np.random.default_rng(4)
    m = VAE(VAEConfig(arch=arch, image_shape=(1, 4, 4), hidden=(3,), z_dim=2, n_classes=3, dtype="float64",
                      activation="tanh"), rng=5)
    assert m.params["enc.0.W"].shape == (64 + 3, 3) and m.params["dec.0.W"].shape == (2 + 3, 3)
    x, y = _data(rng, 3, 16, 3)
    report = check_model(m, x, y=y, rng=rng, max_entries=150)
    assert set(report) == set(m.params) and max(report.values()) < 1e-7


def test_label_rows_of_the_first_layers_get_gradient_only_from_their_class():
    rng = np.random.default_rng(6)
    m = VAE(VAEConfig(x_dim=8, hidden=(5,), z_dim=2, n_classes=4, dtype="float64", activation="tanh"), rng=0)
    x = rng.random((6, 8))
    y = np.array([0, 2, 2, 0, 2, 0])                    # classes 1 and 3 absent
    _, g = m.loss(x, y=y)
    for name, n_in in (("enc.0.W", 8), ("dec.0.W", 2)):
        label_rows = g[name][n_in:]                     # the rows that multiply onehot(y)
        assert np.all(label_rows[[1, 3]] == 0) and np.all(label_rows[[0, 2]] != 0)


def test_the_label_changes_the_model_and_sample_decodes_the_asked_label():
    rng = np.random.default_rng(7)
    m = VAE(VAEConfig(x_dim=9, hidden=(7,), z_dim=2, n_classes=3, dtype="float64"), rng=1)
    x, y = _data(rng, 4, 9, 3)
    eps = rng.standard_normal((1, 4, 2))
    l0 = float(m.loss(x, y=y, eps=eps, backward=False)[0])
    l1 = float(m.loss(x, y=(y + 1) % 3, eps=eps, backward=False)[0])
    assert l0 != l1
    z = np.random.default_rng(9).standard_normal((5, 2))
    assert np.array_equal(m.sample(5, rng=9, y=2), m.decode(z, np.full(5, 2)))
    assert np.array_equal(m.sample(5, rng=9, y=[2, 0, 1, 1, 0]), m.decode(z, [2, 0, 1, 1, 0]))
    assert not np.allclose(m.decode(z, np.zeros(5, int)), m.decode(z, np.ones(5, int)))
    mu, logvar = m.encode(x, y)
    assert np.allclose(m.reconstruct(x, y), m.decode(mu, y))


def test_log_weights_condition_on_y_and_the_fast_twin_agrees():
    from minivae.fast import log_weights
    from minivae.gaussian import log_diag_normal, log_standard_normal
    rng = np.random.default_rng(8)
    m = VAE(VAEConfig(x_dim=12, hidden=(6,), z_dim=3, n_classes=4, dtype="float64"), rng=2)
    x = (rng.random((5, 12)) < 0.5).astype(float)
    y = rng.integers(0, 4, 5)
    eps = rng.standard_normal((3, 5, 3))
    lw = m.log_weights(x, eps, y)
    mu, logvar = m.encode(x, y)
    z = mu + np.exp(0.5 * logvar) * eps
    by_hand = m.log_px_given_z(x, z, y) + log_standard_normal(z) - log_diag_normal(z, mu, logvar)
    assert lw.shape == (3, 5) and np.allclose(lw, by_hand, rtol=0, atol=1e-10)
    # with S = 1 the mean log-weight is minus the Monte-Carlo negative ELBO of log p(x|y)
    assert np.allclose(log_weights(m, x, eps, y), lw, rtol=0, atol=1e-9)
    assert not np.allclose(m.log_weights(x, eps, (y + 1) % 4), lw)


def test_api_errors_are_one_line_value_errors():
    rng = np.random.default_rng(9)
    cond = VAE(VAEConfig(x_dim=6, hidden=(4,), z_dim=2, n_classes=3), rng=0)
    plain = VAE(VAEConfig(x_dim=6, hidden=(4,), z_dim=2), rng=0)
    x, y, z = rng.random((2, 6)), np.array([0, 2]), np.zeros((2, 2))
    calls = {"loss": (lambda m, **k: m.loss(x, **k)), "encode": (lambda m, **k: m.encode(x, **k)),
             "decode": (lambda m, **k: m.decode(z, **k)), "sample": (lambda m, **k: m.sample(2, **k)),
             "log_weights": (lambda m, **k: m.log_weights(x, np.zeros((1, 2, 2)), **k)),
             "reconstruct": (lambda m, **k: m.reconstruct(x, **k))}
    for name, call in calls.items():
        with pytest.raises(ValueError, match="conditional") as e:
            call(cond)
        assert "\n" not in str(e.value), name
        with pytest.raises(ValueError, match="unconditional") as e:
            call(plain, y=y)
        assert "\n" not in str(e.value), name
    with pytest.raises(ValueError, match="outside 0..2"):
        cond.loss(x, y=[0, 3])
    with pytest.raises(ValueError, match="3 labels for 2 examples"):
        cond.encode(x, [0, 1, 2])
    with pytest.raises(ValueError, match="n_classes"):
        VAEConfig(n_classes=0)


def test_config_records_n_classes_and_plain_configs_serialise_as_before():
    assert "n_classes" not in VAEConfig().to_dict()
    c = VAEConfig(n_classes=10)
    assert VAEConfig.from_json(c.to_json()) == c and c.to_dict()["n_classes"] == 10


def test_fast_path_refuses_a_conditional_model_and_training_falls_back():
    from minivae.fast import FastPathError, check_supported
    with pytest.raises(FastPathError, match="conditional"):
        check_supported(VAEConfig(n_classes=10))
    check_supported(VAEConfig())


def test_class_grid_rows_are_classes_and_columns_share_z():
    m = VAE(VAEConfig(x_dim=16, hidden=(8,), z_dim=2, n_classes=3), rng=0)
    img = class_grid_images(m, np.random.default_rng(5), n_cols=4)
    assert img.shape == (12, 16)
    z = np.random.default_rng(5).standard_normal((4, 2)).astype(np.float32)
    for k in range(3):
        assert np.array_equal(img[4 * k:4 * k + 4], m.decode(z, np.full(4, k)))
    assert not np.allclose(img[:4], img[4:8])              # another label, another picture from the same z
    with pytest.raises(ValueError, match="conditional"):
        class_grid_images(VAE(VAEConfig(x_dim=16, hidden=(8,), z_dim=2), rng=0), np.random.default_rng(0))


@pytest.mark.gpu
def test_conditional_model_on_cupy_matches_numpy():
    import cupy
    from minivae.backend import to_numpy
    rng = np.random.default_rng(0)
    x, y = rng.uniform(size=(6, 12)), rng.integers(0, 3, 6)
    eps = rng.standard_normal((2, 6, 3))
    cfg = VAEConfig(x_dim=12, hidden=(10,), z_dim=3, n_classes=3, dtype="float64")
    mn, mc = VAE(cfg, rng=7), VAE(cfg, rng=7, backend="cupy")
    ln, gn = mn.loss(x, y=y, eps=eps, n_samples=2)
    lc, gc = mc.loss(cupy.asarray(x), y=cupy.asarray(y), eps=eps, n_samples=2)
    assert np.isclose(float(ln), float(lc), rtol=1e-10)
    for k in gn:
        assert np.allclose(gn[k], to_numpy(gc[k]), rtol=1e-8, atol=1e-12), k
    assert np.allclose(mn.log_weights(x, eps, y), to_numpy(mc.log_weights(x, eps, y)), rtol=1e-10)


# ----------------------------------------------------------------- runs and CLI
def _idx(path, a):
    a = np.asarray(a, dtype=np.uint8)
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 8, a.ndim]) + struct.pack(">" + "I" * a.ndim, *a.shape) + a.tobytes())


def make_labelled(folder, n_train=96, n_test=32, side=8, K=4, seed=0):
    """Tiny IDX data: class k is a bright k-th band of rows, so the label is visible in the image."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        y = rng.integers(0, K, n)
        y[:K] = np.arange(K)                               # every class appears
        x = rng.integers(0, 60, (n, side, side))
        for i, k in enumerate(y):
            x[i, 2 * k:2 * k + 2] = 230
        _idx(folder / f"{prefix}-images-idx3-ubyte.gz", x)
        _idx(folder / f"{prefix}-labels-idx1-ubyte.gz", y)
    return folder


TINY = dict(hidden=(16,), latent=2, epochs=2, batch_size=32, figures=False)


def test_conditional_training_learns_the_labels_and_resumes_exactly(tmp_path):
    d = make_labelled(tmp_path / "data")
    s = TrainSettings(conditional=True, data_dir=str(d), **TINY)
    full = train(s, tmp_path / "full", progress=False, log=lambda *a: None)
    ck = load_checkpoint(tmp_path / "full")
    assert ck.config.n_classes == 4 and ck.settings["conditional"] is True
    # stop after one epoch, then resume: the same history and parameters, bit for bit
    train(TrainSettings(conditional=True, data_dir=str(d), **dict(TINY, epochs=1)), tmp_path / "part",
          progress=False, log=lambda *a: None)
    resumed = train(TrainSettings(conditional=True, data_dir=str(d), **TINY), tmp_path / "part", resume=True,
                    progress=False, log=lambda *a: None)
    def numbers(history):
        return [{k: v for k, v in r.items() if k != "time_s"} for r in history]
    assert numbers(resumed) == numbers(full)
    ck2 = load_checkpoint(tmp_path / "part")
    for name, p in ck.params.items():
        assert np.array_equal(p, ck2.params[name]), name
    # resuming a conditional run as an unconditional one is refused
    with pytest.raises(ValueError, match="conditional"):
        train(TrainSettings(data_dir=str(d), **dict(TINY, epochs=3)), tmp_path / "part", resume=True,
              progress=False, log=lambda *a: None)


def test_readable_and_fast_settings_train_a_conditional_model_identically(tmp_path):
    d = make_labelled(tmp_path / "data")
    h1 = train(TrainSettings(conditional=True, data_dir=str(d), fast=True, **TINY), tmp_path / "a",
               progress=False, log=lambda *a: None)
    h2 = train(TrainSettings(conditional=True, data_dir=str(d), fast=False, **TINY), tmp_path / "b",
               progress=False, log=lambda *a: None)
    assert [r["train_loss"] for r in h1] == [r["train_loss"] for r in h2]


def test_cli_train_sample_eval_on_tiny_labelled_data(tmp_path, capsys, monkeypatch):
    import minivae.figures as figures
    titles, real_title = [], figures.class_grid_title
    monkeypatch.setattr(figures, "class_grid_title", lambda acc=None: titles.append(real_title(acc)) or titles[-1])
    d = make_labelled(tmp_path / "data")
    out = tmp_path / "run"
    assert main(["train", "--conditional", "--data-dir", str(d), "--epochs", "2", "--batch-size", "32", "--hidden",
                 "16", "--latent", "2", "--iw-k", "3", "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "-log p(x|y)" in text
    for name in ("class_grid", "reconstructions", "loss_curves", "neighbourhood", "manifold", "latent_scatter"):
        assert (out / "figures" / f"{name}.png").read_bytes()[:4] == b"\x89PNG", name
    res = json.loads((out / "results.json").read_text())["test"]
    assert res["iw_k"] == 3 and res["iw_nll"] is not None
    # --conditional without --recipe trains the conditional recipe
    saved = json.loads((out / "settings.json").read_text())
    assert saved["recipe"] == "conditional" and saved["label_decoder"] == "outer" and saved["beta_start"] > 1
    # the run judged its own samples (minivae.judge, cached in the run folder) and says so in the log
    acc = json.loads((out / "results.json").read_text())["label_accuracy"]
    assert (out / "judge.npz").exists() and len(acc["per_label"]) == 4 and acc["n"] == 400
    assert f"label accuracy {100 * acc['overall']:.1f}% of 400 prior samples" in text
    # class_grid.png's title carries the run's own verdict (issue 32: the rate written into the figure)
    assert len(titles) == 1 and f"{100 * acc['overall']:.1f}% of 400 prior samples recognised" in titles[0]
    assert "training the judge (a pixel classifier) on" in text       # the pause it takes is announced
    js = tmp_path / "e.json"
    assert main(["eval", "--checkpoint", str(out), "--json", str(js)]) == 0
    assert "test -ELBO (a bound on -log p(x|y))" in capsys.readouterr().out
    assert json.loads(js.read_text())["neg_elbo"] == pytest.approx(res["neg_elbo"], rel=1e-6)
    assert main(["sample", "--checkpoint", str(out), "--label", "3", "--n", "9", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "samples_label3.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["interpolate", "--checkpoint", str(out), "--out", str(tmp_path)]) == 0
    assert main(["manifold", "--checkpoint", str(out), "--label", "1", "--grid", "4", "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    for argv, fragment in ((["sample", "--checkpoint", str(out)], "give --label 0..3"),
                           (["sample", "--checkpoint", str(out), "--label", "4"], "got 4"),
                           (["manifold", "--checkpoint", str(out), "--label", "9"], "4 classes")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("minivae: error:") and fragment in err and "\n" not in err


def _error(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("minivae: error:") and "\n" not in err and "Traceback" not in err
    return err


def test_label_file_errors_are_one_line(tmp_path, capsys):
    base = ["train", "--conditional", "--epochs", "1", "--hidden", "8", "--latent", "2", "--no-figures", "--quiet"]
    # missing labels file
    d = make_labelled(tmp_path / "missing")
    (d / "train-labels-idx1-ubyte.gz").unlink()
    err = _error(base + ["--data-dir", str(d), "--out", str(tmp_path / "r1")], capsys)
    assert "train-labels-idx1-ubyte.gz" in err and ("not found" in err or "No such file" in err)
    # wrong count
    d = make_labelled(tmp_path / "count")
    _idx(d / "t10k-labels-idx1-ubyte.gz", np.zeros(5))
    assert "32 images but 5 labels" in _error(base + ["--data-dir", str(d), "--out", str(tmp_path / "r2")], capsys)
    # a test label outside the training labels' 0..K-1
    d = make_labelled(tmp_path / "range")
    _idx(d / "t10k-labels-idx1-ubyte.gz", np.full(32, 7))
    assert "outside 0..3" in _error(base + ["--data-dir", str(d), "--out", str(tmp_path / "r3")], capsys)
    # npz data without labels
    d = tmp_path / "npz"
    d.mkdir()
    for split in ("train", "test"):
        np.savez(d / f"{split}.npz", x=np.random.default_rng(0).random((20, 16)))
    assert "no labels" in _error(base + ["--data-dir", str(d), "--out", str(tmp_path / "r4")], capsys)
    # eval on test data whose labels the model has never seen
    good = make_labelled(tmp_path / "good")
    out = tmp_path / "run"
    assert main(base + ["--data-dir", str(good), "--out", str(out)]) == 0
    capsys.readouterr()
    # (the run's data provenance refuses other data first; either way one line, never a silent number)
    err = _error(["eval", "--checkpoint", str(out), "--data-dir", str(tmp_path / "range")], capsys)
    assert "outside 0..3" in err or "other data" in err


def test_unconditional_checkpoint_refuses_a_label(tmp_path, capsys):
    d = make_labelled(tmp_path / "data")
    out = tmp_path / "plain"
    assert main(["train", "--data-dir", str(d), "--epochs", "1", "--hidden", "8", "--latent", "2", "--no-figures",
                 "--quiet", "--out", str(out)]) == 0
    capsys.readouterr()
    assert "needs a conditional model" in _error(["sample", "--checkpoint", str(out), "--label", "1"], capsys)


@pytest.mark.parametrize("K", [3, 40])          # one chunk, and several (the chunked two-pass path)
def test_conditional_iwae_loss_is_the_log_mean_exp_of_the_label_conditioned_weights(K):
    """loss(iwae_k=K, y) = -mean_n log (1/K) sum_k w_nk with w the weights of log p(x|y) (beta = 1),
    and the parts it reports are its own recon and the analytic KL of q(z|x, y)."""
    from minivae.gaussian import kl_forward
    rng = np.random.default_rng(9)
    m = VAE(VAEConfig(x_dim=12, hidden=(6,), z_dim=3, n_classes=4, dtype="float64"), rng=2)
    m.IWAE_CHUNK_ELEMENTS = 7 * 5 * 12             # chunks of 7 samples of 5 rows of 12: K = 40 takes 6
    x = (rng.random((5, 12)) < 0.5).astype(float)
    y = rng.integers(0, 4, 5)
    eps = rng.standard_normal((K, 5, 3))
    loss, _ = m.loss(x, eps=eps.copy(), iwae_k=K, y=y, backward=False)
    parts = dict(m.parts)
    lw = m.log_weights(x, eps, y)
    mx = lw.max(axis=0)
    want = -np.mean(mx + np.log(np.mean(np.exp(lw - mx), axis=0)))
    assert abs(float(loss) - want) < 1e-10
    other, _ = m.loss(x, eps=eps.copy(), iwae_k=K, y=(y + 1) % 4, backward=False)
    assert abs(float(other) - want) > 1e-3
    mu, logvar = m.encode(x, y)
    z = mu + np.exp(0.5 * logvar) * eps
    assert parts["loss"] == loss and parts["iwae_k"] == K
    assert abs(float(parts["recon"]) - float(-m.log_px_given_z(x, z, y).mean())) < 1e-10
    assert abs(float(parts["kl"]) - float(kl_forward(mu, logvar)[0].mean())) < 1e-12


def test_conditional_decode_logvar_depends_on_the_label():
    rng = np.random.default_rng(3)
    m = VAE(VAEConfig(x_dim=6, hidden=(5,), z_dim=2, n_classes=3, likelihood="gaussian_learned_var",
                      dtype="float64"), rng=1)
    z = rng.standard_normal((4, 2))
    for y in (np.array([0, 1, 2, 0]), np.array([2, 2, 1, 1])):
        np.testing.assert_array_equal(m.decode_logvar(z, y), m.decode_raw(z, y)[1])
    assert not np.allclose(m.decode_logvar(z, np.zeros(4, int)), m.decode_logvar(z, np.full(4, 2)))
