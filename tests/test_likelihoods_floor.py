"""The floor on the decoder's log-variance (VAEConfig(dec_logvar_min=m), CLI --dec-logvar-min).

logvar' = m + softplus(logvar - m), d logvar'/d logvar = sigmoid(logvar - m): the op pair against float64
finite differences with a random upstream gradient, its limits, the whole model with the floor on, and the
config / checkpoint / CLI / fast-path plumbing.
"""
import json
import warnings

import numpy as np
import pytest

from minivae import VAE, VAEConfig
from minivae.checkpoint import load_checkpoint, save_checkpoint
from minivae.cli import main
from minivae.fast import FastPathError, check_supported
from minivae.gaussian import LOG_2PI
from minivae.gradcheck import GradientCheckError, check_model, check_op
from minivae.likelihoods import (gaussian_learned_var_nll_backward, gaussian_learned_var_nll_forward,
                                 logvar_floor_backward, logvar_floor_forward)

from conftest import backends

TOL = 1e-7


def _xp(backend):
    if backend == "cupy":
        import cupy
        return cupy
    return np


# ---------------------------------------------------------------------------- the op pair
@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("m", [-6.0, -1.5, 0.0, 2.0])
def test_floor_op_gradcheck_random_upstream(backend, m, rng):
    xp = _xp(backend)
    # raw log-variances from far below to far above the floor
    logvar = xp.asarray(m + rng.uniform(-8, 8, size=(5, 7)))
    rep = check_op(lambda lv: logvar_floor_forward(lv, m), logvar_floor_backward, [logvar], ["logvar"], rng)
    assert rep["logvar"] < TOL


def test_floor_gradcheck_catches_a_wrong_derivative(rng, monkeypatch):
    """The check can fail: the derivative of the softplus floor is sigmoid(a), not 1 (the identity's)."""
    logvar = rng.uniform(-5, 3, size=(4, 6))
    with pytest.raises(GradientCheckError):
        check_op(lambda lv: logvar_floor_forward(lv, -1.0), lambda d, c: d, [logvar], ["logvar"], rng)


def test_floor_values_limits_and_stability():
    m = -3.0
    a = np.array([-1e4, -50.0, -5.0, 0.0, 5.0, 50.0, 1e4])
    with warnings.catch_warnings():
        warnings.simplefilter("error")                       # no overflow in exp
        out, cache = logvar_floor_forward(m + a, m)
        d = logvar_floor_backward(np.ones_like(a), cache)
    assert np.all(out >= m) and np.all(np.isfinite(out)) and np.all(np.isfinite(d))
    assert np.all(out > m + a - 1e-12)                       # softplus(a) >= a: the floor never lowers logvar
    np.testing.assert_allclose(out, m + np.logaddexp(0.0, a), rtol=1e-12)     # NumPy's own stable softplus
    assert out[0] == m and out[-1] == m + a[-1]              # exactly m far below, exactly logvar far above
    assert abs(out[3] - (m + np.log(2))) < 1e-15             # at the floor: m + log 2
    np.testing.assert_allclose(d, 1 / (1 + np.exp(-np.clip(a, -700, 700))), rtol=1e-12, atol=1e-300)
    assert np.all(np.diff(out) >= 0)                         # monotone
    # float32 stays float32
    o32, _ = logvar_floor_forward(np.float32([-100, 0, 100]), m)
    assert o32.dtype == np.float32


def test_floor_bounds_the_nll_of_a_perfect_mean():
    """With mean = x the unfloored NLL falls without bound as logvar -> -inf; the floored one stays >= D/2 (m + log 2 pi)."""
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(3, 10))
    m = -4.0
    for lv in (-5.0, -50.0, -500.0):
        raw = np.full_like(x, lv)
        nll_raw = gaussian_learned_var_nll_forward(x, raw, x)[0]
        nll_floor = gaussian_learned_var_nll_forward(x, logvar_floor_forward(raw, m)[0], x)[0]
        np.testing.assert_allclose(nll_raw, 0.5 * 10 * (lv + LOG_2PI))
        assert np.all(nll_floor >= 0.5 * 10 * (m + LOG_2PI))
    assert nll_raw[0] < -1000 and nll_floor[0] > 0.5 * 10 * (m + LOG_2PI) - 1e-9


def test_floor_and_likelihood_chained_gradcheck(rng):
    """NLL(mean, floor(logvar)) as one composite op: the chain rule through the floor."""
    x, mean = rng.standard_normal((4, 6)), rng.standard_normal((4, 6))
    logvar = rng.uniform(-6, 2, size=(4, 6))
    m = -2.0

    def fwd(mu, lv):
        lvf, c_f = logvar_floor_forward(lv, m)
        nll, c = gaussian_learned_var_nll_forward(mu, lvf, x)
        return nll, (c, c_f)

    def bwd(dnll, cache):
        c, c_f = cache
        dmu, dlvf = gaussian_learned_var_nll_backward(dnll, c)
        return dmu, logvar_floor_backward(dlvf, c_f)

    rep = check_op(fwd, bwd, [mean, logvar], ["mean", "logvar"], rng)
    assert max(rep.values()) < TOL


# ---------------------------------------------------------------------------- the whole model
def floored(m=-2.0, activation="tanh", hidden=(5,), backend="numpy", seed=0):
    cfg = VAEConfig(x_dim=6, hidden=hidden, z_dim=3, activation=activation, likelihood="gaussian_learned_var",
                    dtype="float64", dec_logvar_min=m)
    return VAE(cfg, rng=seed, backend=backend)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("activation", ["tanh", "softplus", "leaky_relu"])
@pytest.mark.parametrize("objective", [{}, {"iwae_k": 3}, {"free_bits": 0.05}])
def test_whole_model_gradcheck_with_the_floor(backend, activation, objective, rng):
    model = floored(activation=activation, backend=backend)
    # push some raw log-variances below the floor so both regimes of the softplus are exercised
    model.params["dec.out_logvar.b"] = np.array([-6.0, -3.0, -2.0, -1.0, 0.5, 2.0])
    x = rng.standard_normal((4, 6))
    n = objective.get("iwae_k", 2)
    report = check_model(model, x, n_samples=1 if "iwae_k" in objective else n, beta=0.8, rng=rng,
                         eps=rng.standard_normal((n, 4, 3)), loss_kwargs=objective)
    assert set(report) == set(model.params)
    assert max(report.values()) < TOL, report


def test_floor_changes_the_loss_and_the_logvar_gradient(rng):
    """Same parameters, with and without the floor: the floored NLL is higher, and far below the floor
    the logvar head gets sigmoid(a) ~ e^a of the unfloored gradient."""
    x = rng.standard_normal((8, 6))
    eps = rng.standard_normal((1, 8, 3))
    off = VAE(VAEConfig(x_dim=6, hidden=(5,), z_dim=3, activation="tanh", likelihood="gaussian_learned_var",
                        dtype="float64"), rng=3)
    on = floored(m=-1.0, seed=3)
    np.testing.assert_array_equal(off.flat, on.flat)
    for model in (off, on):
        model.params["dec.out_logvar.b"] = np.full(6, -12.0)     # raw logvar ~ -12, far below m = -1
    l_off, g_off = off.loss(x, eps=eps)
    l_on, g_on = on.loss(x, eps=eps)
    assert float(l_on) < float(l_off)        # variance exp(-12) is terrible for x ~ N(0, 1): the floor helps
    ratio = np.abs(g_on["dec.out_logvar.b"]).max() / np.abs(g_off["dec.out_logvar.b"]).max()
    assert ratio < 1e-3                      # sigmoid(-11) ~ 1.7e-5 times a different upstream
    # decode_logvar is the floored one; decode_raw the head's raw output
    z = rng.standard_normal((4, 3))
    assert np.all(on.decode_logvar(z) > -1.0) and np.all(on.decode_raw(z)[1] < -1.0)
    np.testing.assert_array_equal(off.decode_logvar(z), off.decode_raw(z)[1])


def test_decode_logvar_other_likelihoods():
    g = VAE(VAEConfig(x_dim=6, hidden=(5,), z_dim=3, likelihood="gaussian", obs_var=0.25), rng=0)
    np.testing.assert_allclose(g.decode_logvar(np.zeros((2, 3))), np.log(0.25), rtol=1e-6)
    b = VAE(VAEConfig(x_dim=6, hidden=(5,), z_dim=3), rng=0)
    with pytest.raises(ValueError, match="Bernoulli"):
        b.decode_logvar(np.zeros((2, 3)))


def test_iw_estimate_uses_the_floor():
    """Evaluation goes through the same likelihood: the IW estimate with the floor is the floored model's."""
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(5, 6))
    on = floored(m=-1.0, seed=2)
    off = VAE(VAEConfig(x_dim=6, hidden=(5,), z_dim=3, activation="tanh", likelihood="gaussian_learned_var",
                        dtype="float64"), rng=2)
    for model in (on, off):
        model.params["dec.out_logvar.b"] = np.full(6, -8.0)
    from minivae.evaluate import iw_log_likelihood, log_mean_exp
    ll_on = iw_log_likelihood(on, x, 10, np.random.default_rng(1))
    ll_off = iw_log_likelihood(off, x, 10, np.random.default_rng(1))
    assert np.all(ll_on != ll_off)
    eps = np.random.default_rng(1).standard_normal((10, 5, 3))
    np.testing.assert_allclose(ll_on, log_mean_exp(on.log_weights(x, eps), axis=0), rtol=1e-12)


# ---------------------------------------------------------------------------- config, checkpoint, CLI, fast path
def test_config_validation_and_serialisation():
    assert VAEConfig().dec_logvar_min is None
    assert "dec_logvar_min" not in VAEConfig().to_dict()            # old configs serialise as before
    c = VAEConfig(likelihood="gaussian_learned_var", dec_logvar_min=-4)
    assert c.dec_logvar_min == -4.0 and isinstance(c.dec_logvar_min, float)
    assert VAEConfig.from_json(c.to_json()) == c
    with pytest.raises(ValueError, match="gaussian_learned_var"):
        VAEConfig(likelihood="bernoulli", dec_logvar_min=-4)
    with pytest.raises(ValueError, match="finite"):
        VAEConfig(likelihood="gaussian_learned_var", dec_logvar_min=float("nan"))
    with pytest.raises(ValueError, match="number"):
        VAEConfig(likelihood="gaussian_learned_var", dec_logvar_min="low")


def test_checkpoint_records_the_floor(tmp_path):
    model = VAE(VAEConfig(x_dim=6, hidden=(5,), z_dim=3, likelihood="gaussian_learned_var", dec_logvar_min=-3.5),
                rng=0)
    path = tmp_path / "ck.npz"
    save_checkpoint(path, model)
    ck = load_checkpoint(path)
    assert ck.config.dec_logvar_min == -3.5
    back = ck.build_model()
    x = np.random.default_rng(0).uniform(size=(4, 6)).astype(np.float32)
    eps = np.random.default_rng(1).standard_normal((1, 4, 3)).astype(np.float32)
    assert float(back.loss(x, eps=eps)[0]) == float(model.loss(x, eps=eps)[0])


def test_fast_path_refuses_the_floor():
    with pytest.raises(FastPathError, match="dec_logvar_min"):
        check_supported(VAEConfig(likelihood="gaussian_learned_var", dec_logvar_min=-4))


def test_cli_flag_trains_and_records_the_floor(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--n-train", "64", "--n-test", "32", "--epochs", "1", "--batch-size", "32", "--hidden", "8",
                 "--no-figures", "--quiet", "--likelihood", "gaussian_learned_var", "--binarize", "none",
                 "--dec-logvar-min", "-4", "--out", str(out)])
    capsys.readouterr()
    assert code == 0
    ck = load_checkpoint(out / "checkpoint.npz")
    assert ck.config.dec_logvar_min == -4.0 and ck.settings["dec_logvar_min"] == -4.0
    assert json.loads(ck.config.to_json())["dec_logvar_min"] == -4.0


def test_cli_flag_with_the_wrong_likelihood_is_a_clear_error(tmp_path, capsys):
    code = main(["train", "--n-train", "64", "--n-test", "32", "--epochs", "1", "--hidden", "8", "--no-figures",
                 "--quiet", "--dec-logvar-min", "-4", "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("minivae: error:") and "gaussian_learned_var" in lines[0], err
