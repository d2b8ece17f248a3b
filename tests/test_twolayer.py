"""Two stochastic layers (minivae.twolayer): the whole model against central differences, its log-weights, its
checkpoints, the fast path's refusal, and the command line."""
import numpy as np
import pytest

from minivae.checkpoint import load_checkpoint, save_checkpoint
from minivae.gradcheck import check_model
from minivae.twolayer import TwoLayerConfig, TwoLayerVAE


def tiny(**kw):
    return TwoLayerVAE(TwoLayerConfig(x_dim=6, hidden=(5,), z_dim=5, z2_dim=2, hidden2=(4,), dtype="float64",
                                      activation="tanh", **kw), rng=1)


@pytest.mark.parametrize("kw", [{}, {"iwae_k": 3}])
def test_whole_model_gradients(kw):
    rng = np.random.default_rng(0)
    x = (rng.random((3, 6)) < 0.5).astype(float)
    rep = check_model(tiny(), x, n_samples=kw.get("iwae_k", 2), loss_kwargs=kw, rng=rng)
    assert max(rep.values()) <= 1e-7


def test_log_weights_bound_and_refusals():
    rng = np.random.default_rng(1)
    m = tiny()
    x = (rng.random((4, 6)) < 0.5).astype(float)
    eps = rng.standard_normal((1, 4, 5))
    assert np.isclose(m.loss(x, eps=eps, iwae_k=1, backward=False)[0], -m.log_weights(x, eps).mean())
    eps = rng.standard_normal((50, 4, 5))
    assert m.loss(x, eps=eps, iwae_k=50, backward=False)[0] <= m.loss(x, eps=eps, n_samples=50, backward=False)[0]
    assert m.encode(x)[0].shape == (4, 5) and m.sample(3, rng=0).shape == (3, 6)
    with pytest.raises(ValueError, match="beta = 1"):
        m.loss(x, beta=0.5)
    with pytest.raises(ValueError, match="z2_dim"):
        TwoLayerConfig(z_dim=4, z2_dim=4)


def test_checkpoint_round_trip_and_the_fast_path_declines(tmp_path):
    from minivae.fast import FastPathError, check_supported
    m = tiny()
    save_checkpoint(tmp_path / "c.npz", m)
    m2 = load_checkpoint(tmp_path / "c.npz").build_model()
    assert type(m2) is TwoLayerVAE and np.array_equal(m2.flat, m.flat)
    with pytest.raises(FastPathError, match="two_layer"):
        check_supported(m.config)


def test_train_resume_and_eval_from_the_command_line(tmp_path, capsys):
    from minivae.cli import main
    small = ["--n-train", "64", "--n-test", "32", "--batch-size", "32", "--hidden", "8,8", "--latent", "4", "--quiet",
             "--no-figures", "--stochastic-layers", "2", "--iwae-k", "2"]
    assert main(["train", *small, "--epochs", "2", "--out", str(tmp_path / "a")]) == 0
    assert main(["train", *small, "--epochs", "1", "--out", str(tmp_path / "b")]) == 0
    assert main(["train", "--out", str(tmp_path / "b"), "--resume", "--epochs", "2", "--quiet"]) == 0
    a, b = load_checkpoint(tmp_path / "a"), load_checkpoint(tmp_path / "b")
    assert a.config.z2_dim == 2 and all(np.array_equal(a.params[k], b.params[k]) for k in a.params)
    assert main(["eval", "--checkpoint", str(tmp_path / "a"), "--nll-k", "3", "--n", "32"]) == 0
    assert "TwoLayerVAE" in capsys.readouterr().out
    assert main(["train", *small, "--recipe", "burda2015-short", "--epochs", "1", "--out", str(tmp_path / "c")]) == 0
    assert main(["train", *small, "--flow", "planar:2", "--out", str(tmp_path / "bad")]) == 2
    assert "two stochastic layers" in capsys.readouterr().err
