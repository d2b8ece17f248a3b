"""The judge (minivae.judge): its op pair and gradients, training, the cache, label accuracy, the CLI."""
import json

import numpy as np
import pytest

from minivae import VAE, VAEConfig, check_op
from minivae.cli import main
from minivae.gradcheck import numerical_gradient
from minivae.judge import (JUDGE_FILE, Judge, JudgeError, init_params, judge_loss, label_accuracy, load_or_train,
                           softmax_xent_backward, softmax_xent_forward, train_judge)
from test_conditional import make_labelled


def test_softmax_cross_entropy_op_gradient_check_float64():
    rng = np.random.default_rng(0)
    logits, y = 3 * rng.standard_normal((7, 5)), rng.integers(0, 5, 7)
    report = check_op(lambda l: softmax_xent_forward(l, y), softmax_xent_backward, [logits], rng=rng)
    assert report["x0"] < 1e-7
    # the value: -mean log softmax at the label, stable for huge logits
    loss, _ = softmax_xent_forward(np.array([[1000.0, 0.0], [0.0, 0.0]]), np.array([0, 1]))
    assert np.isclose(float(loss), np.log(2) / 2)


def test_whole_judge_gradient_check_float64():
    rng = np.random.default_rng(1)
    params = {k: v.astype(np.float64) for k, v in init_params(6, 5, 3, rng).items()}
    x, y = rng.random((4, 6)), rng.integers(0, 3, 4)
    _, grads = judge_loss(params, x, y)
    for name, p in params.items():
        num = numerical_gradient(lambda: judge_loss(params, x, y)[0], p)
        err = np.max(np.abs(num - grads[name]) / np.maximum(1e-12, np.abs(num) + np.abs(grads[name])))
        assert err < 1e-7, name


def _band_data(tmp_path):
    from minivae.data import load_mnist
    d = make_labelled(tmp_path / "data", n_train=200, n_test=60)
    return d, load_mnist("train", d), load_mnist("test", d)


def test_judge_learns_saves_loads_and_refuses_a_corrupt_file(tmp_path):
    _, (x, y), (xt, yt) = _band_data(tmp_path)
    judge = train_judge(x, y, xt, yt, hidden=16, epochs=20, batch_size=32, n_classes=4)
    assert judge.test_accuracy == 1.0 and judge.accuracy(xt, yt) == 1.0      # the bands are plain to see
    path = judge.save(tmp_path / "j.npz")
    again = Judge.load(path)
    assert again.test_accuracy == judge.test_accuracy and again.info["hidden"] == 16
    assert np.array_equal(again.predict(xt), judge.predict(xt))
    with pytest.raises(ValueError, match="rows of 64 pixels"):
        judge.predict(xt[:, :10])
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(JudgeError, match="bad.npz: not a judge file.*delete it"):
        Judge.load(tmp_path / "bad.npz")
    bad = dict(judge.params, W2=judge.params["W2"][:3])
    np.savez(tmp_path / "shapes.npz", meta=np.array(json.dumps({"test_accuracy": 1.0})), **bad)
    with pytest.raises(JudgeError, match="inconsistent"):
        Judge.load(tmp_path / "shapes.npz")


def test_load_or_train_caches_in_the_run_folder_and_retrains_for_other_data(tmp_path, monkeypatch):
    d, _, _ = _band_data(tmp_path)
    logs = []
    j1 = load_or_train(tmp_path / "run", d, log=logs.append, hidden=8, epochs=2, batch_size=32)
    assert (tmp_path / "run" / JUDGE_FILE).exists() and j1.info["n_train"] == 200
    assert logs == [f"training the judge (a pixel classifier) on 200 real training images, once: cached as "
                    f"{tmp_path / 'run' / JUDGE_FILE}"]
    logs.clear()
    import minivae.judge as judge_mod
    monkeypatch.setattr(judge_mod, "train_judge", lambda *a, **k: pytest.fail("the cached judge was not used"))
    j2 = load_or_train(tmp_path / "run", d, log=logs.append)
    assert np.array_equal(j2.params["W1"], j1.params["W1"]) and not logs
    monkeypatch.undo()
    other = make_labelled(tmp_path / "other", n_train=120, n_test=40, seed=1)
    j3 = load_or_train(tmp_path / "run", other, log=logs.append, hidden=8, epochs=2, batch_size=32)
    assert j3.info["n_train"] == 120 and "other data" in logs[0]


def test_label_accuracy_counts_per_label_and_refuses_what_it_cannot_judge(tmp_path):
    _, (x, y), (xt, yt) = _band_data(tmp_path)
    judge = train_judge(x, y, xt, yt, hidden=16, epochs=20, batch_size=32, n_classes=4)
    model = VAE(VAEConfig(x_dim=64, hidden=(8,), z_dim=2, n_classes=4), rng=0)
    # a decoder that draws band k for label k, whatever z: every sample recognised
    for name in ("dec.0.W", "dec.0.b", "dec.out.W", "dec.out.b"):
        model.params[name][...] = 0.0
    rows = np.arange(64).reshape(8, 8) // 8                 # row index of each pixel
    model.params["dec.0.W"][2:, :4] = 10 * np.eye(4)        # label k lights hidden unit k
    model.params["dec.out.W"][:4] = np.stack([np.where(rows.ravel() // 2 == k, 5.0, -5.0) for k in range(4)])
    acc = label_accuracy(model, judge, n_per_label=5)
    assert acc["overall"] == 1.0 and acc["per_label"] == [1.0] * 4 and acc["n"] == 20
    # the same decoder with labels 0 and 1 swapped: those labels are never recognised
    model.params["dec.0.W"][2:4, :4] = model.params["dec.0.W"][[3, 2], :4]
    acc = label_accuracy(model, judge, n_per_label=5)
    assert acc["per_label"] == [0.0, 0.0, 1.0, 1.0] and acc["overall"] == 0.5 and acc["worst"] == 0.0
    with pytest.raises(ValueError, match="unconditional"):
        label_accuracy(VAE(VAEConfig(x_dim=64, hidden=(8,), z_dim=2), rng=0), judge)
    with pytest.raises(ValueError, match="4 classes apart, the model has 3"):
        label_accuracy(VAE(VAEConfig(x_dim=64, hidden=(8,), z_dim=2, n_classes=3), rng=0), judge)


def test_cli_eval_label_accuracy(tmp_path, capsys):
    d = make_labelled(tmp_path / "data")
    out = tmp_path / "run"
    assert main(["train", "--conditional", "--data-dir", str(d), "--epochs", "1", "--batch-size", "32", "--hidden",
                 "16", "--latent", "2", "--out", str(out), "--quiet", "--no-figures"]) == 0
    js = tmp_path / "e.json"
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out), "--label-accuracy", "--json", str(js)]) == 0
    text = capsys.readouterr().out
    assert "of 400 prior samples (100 per label) recognised as their label" in text
    assert "real test images (trained now" in text and (out / JUDGE_FILE).exists()
    rep = json.loads(js.read_text())["label_accuracy"]
    assert len(rep["per_label"]) == 4 and 0 <= rep["overall"] <= 1 and 0 <= rep["judge_test_accuracy"] <= 1
    assert main(["eval", "--checkpoint", str(out), "--label-accuracy"]) == 0
    assert "(cached" in capsys.readouterr().out
    plain = tmp_path / "plain"
    assert main(["train", "--data-dir", str(d), "--epochs", "1", "--hidden", "8", "--latent", "2", "--out",
                 str(plain), "--quiet", "--no-figures"]) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(plain), "--label-accuracy"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("minivae: error:") and "needs a conditional model" in err and "\n" not in err


def test_class_grid_title_carries_the_recognition_rate():
    from minivae.figures import class_grid_title
    assert "recognised" not in class_grid_title()
    t = class_grid_title({"overall": 0.964, "n": 1000, "worst": 0.88, "worst_label": 8, "judge_test_accuracy": 0.979})
    assert "96.4% of 1000 prior samples recognised as their label (worst: 8, 88%)" in t and "97.9% right" in t


@pytest.mark.slow
def test_a_small_run_of_the_conditional_recipe_draws_the_asked_digit_and_todays_model_does_not(tmp_path):
    """Issue 32 in small: the same short run (12,800 real training digits, 6 epochs, hidden 100, lr 2e-3) of the
    conditional recipe and of yesterday's conditional model (the default recipe with --conditional), judged on 100
    prior samples per label by a small MLP judge trained on all the real training digits (about 94% right on the
    real test digits).  In a run this short neither model draws clean digits, but the recipe's samples already
    follow the label clearly more often (57-63% against 39-45% over seeds 0, 1, 2): the threshold between them
    fails yesterday's model.  About 8 s of CPU in all.  The full 10-epoch runs are in docs/results.md."""
    from minivae.checkpoint import load_checkpoint
    from minivae.data import load_mnist
    from minivae.train import TrainSettings, train, using_threads
    x, y = load_mnist("train")
    xt, yt = load_mnist("test")
    with using_threads(1):              # one BLAS thread: many small products, on a shared machine
        judge = train_judge(x, y, xt, yt, hidden=64, epochs=2)
    assert judge.test_accuracy > 0.92
    small = dict(n_train=12800, n_test=100, epochs=6, hidden=(100,), lr=2e-3, figures=False, threads=1)
    rates = {}
    for name, s in (("recipe", TrainSettings.from_recipe("conditional", **dict(small, warmup=4))),
                    ("today", TrainSettings.from_recipe("default", conditional=True, **small))):
        train(s, tmp_path / name, progress=False, log=lambda *a: None)
        rates[name] = label_accuracy(load_checkpoint(tmp_path / name).build_model("numpy"), judge)["overall"]
    assert rates["recipe"] >= 0.51 > rates["today"], rates
