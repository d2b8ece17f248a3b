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


def test_kl_per_unit_sums_to_the_kl_term():
    rng = np.random.default_rng(2)
    m = tiny()
    x = (rng.random((4, 6)) < 0.5).astype(float)
    eps = rng.standard_normal((3, 4, 5))
    m.loss(x, eps=eps, n_samples=3, backward=False)
    per = m.kl_per_unit(x, eps)
    assert per.shape == (3, 4, 5)
    assert np.isclose(per.sum(axis=-1).mean(), m.parts["kl"], rtol=1e-12)


def test_eval_reports_per_unit_kl_shares_that_add_up_to_the_total(tmp_path, capsys):
    """eval's per-unit KL figures of a two-layer model are its shares of the reported KL, labelled z1 and z2."""
    import json
    import re
    from minivae.cli import main
    assert main(["train", "--n-train", "64", "--n-test", "40", "--batch-size", "32", "--hidden", "8", "--latent", "5",
                 "--quiet", "--no-figures", "--stochastic-layers", "2", "--epochs", "2",
                 "--out", str(tmp_path / "a")]) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tmp_path / "a"), "--n", "40", "--json", "-"]) == 0
    rep = json.loads(capsys.readouterr().out)
    L1, L2 = rep["latent_layers"]["z1"], rep["latent_layers"]["z2"]
    assert L1 + L2 == rep["n_latent"] == len(rep["kl_per_dim"])
    assert np.isclose(sum(rep["kl_per_dim"]), rep["kl"], rtol=1e-6, atol=1e-6)
    assert rep["active_units_z1"] + rep["active_units_z2"] == rep["active_units"]
    assert main(["eval", "--checkpoint", str(tmp_path / "a"), "--n", "40"]) == 0
    out = capsys.readouterr().out
    kl = float(re.search(r"KL (-?[\d.]+)\)", out).group(1))
    z1 = [float(v) for v in re.search(r"z1, log q\(z1_j\|x\) - log p\(z1_j\|z2\), sum [-\d.]+: (.*)", out)
          .group(1).split()]
    z2 = [float(v) for v in re.search(r"z2, log q\(z2_j\|z1\) - log p\(z2_j\), sum [-\d.]+: (.*)", out)
          .group(1).split()]
    assert (len(z1), len(z2)) == (L1, L2)
    assert abs(sum(z1) + sum(z2) - kl) <= 0.005 * (L1 + L2) + 1e-4      # printed to 2 decimals each
    assert np.isclose(kl, rep["kl"], atol=1e-4)                           # the same seed: the same draws
    assert f"z1 {rep['active_units_z1']} of {L1}, z2 {rep['active_units_z2']} of {L2}" in out
