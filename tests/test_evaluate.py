"""Evaluation: the importance-weighted log-likelihood, active units, KL per dimension, report."""
import json

import numpy as np
import pytest

from minivae import VAE, VAEConfig
from minivae.evaluate import (active_units, collapse_warning, iw_log_likelihood, kl_per_dim, log_mean_exp,
                              negative_elbo, posterior_mean_variance, report)
from minivae.gaussian import log_standard_normal

from conftest import backends


def tiny_1d_model(seed=3):
    """A small Bernoulli VAE with a 1-D latent and a decoder that depends strongly on z."""
    m = VAE(VAEConfig(x_dim=8, hidden=(6,), z_dim=1, activation="tanh", dtype="float64"), rng=seed)
    m.params["dec.0.W"] = m.params["dec.0.W"] * 3
    m.params["dec.out.W"] = m.params["dec.out.W"] * 3
    return m


def exact_log_px(model, x, lim=12.0, n=24001):
    """log p(x) = log integral p(x|z) p(z) dz by quadrature on a fine grid (1-D latent)."""
    zg = np.linspace(-lim, lim, n)
    Z = np.broadcast_to(zg[:, None, None], (n, x.shape[0], 1)).copy()
    log_joint = model.log_px_given_z(x, Z) + log_standard_normal(Z)        # (n, N)
    return log_mean_exp(log_joint, axis=0) + np.log(n * (zg[1] - zg[0]))   # Riemann sum in log space


def binary_data(n, d, seed=0):
    return (np.random.default_rng(seed).random((n, d)) < 0.5).astype(np.float64)


def test_log_mean_exp_is_stable():
    a = np.array([[1000.0, -1000.0], [1000.0, -1001.0]])
    out = log_mean_exp(a, axis=0)
    assert np.allclose(out, [1000.0, -1000.0 + np.log((1 + np.exp(-1)) / 2)])


def test_iw_estimate_converges_to_quadrature():
    m = tiny_1d_model()
    x = binary_data(6, 8)
    exact = exact_log_px(m, x)
    errs = {k: np.abs(iw_log_likelihood(m, x, k, np.random.default_rng(1), chunk=1000) - exact).mean()
            for k in (1, 100, 50000)}
    assert errs[50000] < 0.02
    assert errs[50000] < 0.1 * errs[1]
    assert errs[100] < errs[1]


def test_quadrature_itself_is_converged():
    m = tiny_1d_model()
    x = binary_data(3, 8)
    assert np.allclose(exact_log_px(m, x), exact_log_px(m, x, lim=15.0, n=60001), atol=1e-8)


def test_iw_at_least_elbo_and_nondecreasing_in_k():
    m = VAE(VAEConfig(x_dim=10, hidden=(8,), z_dim=3, activation="tanh", dtype="float64"), rng=0)
    x = binary_data(200, 10, seed=2)
    elbo = -negative_elbo(m, x, np.random.default_rng(0))["loss"]
    means = [iw_log_likelihood(m, x, k, np.random.default_rng(5)).mean() for k in (1, 4, 16, 64)]
    assert abs(means[0] - elbo) < 0.1            # k = 1 is an (MC-KL) ELBO estimate
    assert all(mk >= elbo for mk in means[1:])
    assert all(b >= a for a, b in zip(means, means[1:]))


def test_chunked_equals_unchunked():
    m = VAE(VAEConfig(x_dim=10, hidden=(8,), z_dim=3, dtype="float64"), rng=0)
    x = binary_data(13, 10)
    k = 37
    full = iw_log_likelihood(m, x, k, np.random.default_rng(9), chunk=k, batch_size=13)
    for chunk in (1, 5, 36):
        part = iw_log_likelihood(m, x, k, np.random.default_rng(9), chunk=chunk, batch_size=13)
        assert np.allclose(part, full, rtol=0, atol=1e-12)
    # and against a direct computation with all k x N weights at once
    eps = np.random.default_rng(9).standard_normal((k, 13, 3))
    direct = log_mean_exp(m.log_weights(x, eps), axis=0)
    assert np.allclose(full, direct, rtol=0, atol=1e-12)
    assert full.dtype == np.float64


def test_memory_bound_rows_per_call(monkeypatch):
    import minivae.evaluate as ev
    m = VAE(VAEConfig(x_dim=10, hidden=(8,), z_dim=3), rng=0)
    seen = []
    orig = ev._log_weights

    def spy(model, xb, eps):
        seen.append(eps.shape[0] * eps.shape[1])
        return orig(model, xb, eps)

    monkeypatch.setattr(ev, "_log_weights", spy)
    out = iw_log_likelihood(m, binary_data(25, 10), 500, np.random.default_rng(0), chunk=40, batch_size=10)
    assert max(seen) <= 40 * 10
    assert sum(seen) == 25 * 500
    assert out.shape == (25,) and out.dtype == np.float64 and np.isfinite(out).all()


def test_iw_float32_model_accumulates_in_float64():
    # log w of 300 pixels is about -200 nats, where float32 resolves only ~1.5e-5 nats: a float32
    # log-sum-exp over the k samples is off by ~1e-5, the float64 one (what the docstring promises) by ~1e-13
    from minivae.evaluate import _log_weights
    m = VAE(VAEConfig(x_dim=300, hidden=(8,), z_dim=3), rng=0)
    assert m.dtype == np.float32
    x = binary_data(5, 300).astype(np.float32)
    k = 400
    out = iw_log_likelihood(m, x, k, np.random.default_rng(0), chunk=7, batch_size=5)
    eps = np.random.default_rng(0).standard_normal((k, 5, 3)).astype(np.float32)   # the same draws
    lw = np.concatenate([_log_weights(m, x, eps[i:i + 7]) for i in range(0, k, 7)])   # (k, N) float32
    assert lw.dtype == np.float32 and lw.max() < -100
    exact = log_mean_exp(lw.astype(np.float64), axis=0)
    assert out.dtype == np.float64
    assert np.abs(out - exact).max() < 1e-9
    # the same log-sum-exp in float32 misses by far more than that tolerance
    mx = lw.max(axis=0)
    in32 = mx + np.log(np.mean(np.exp(lw - mx), axis=0, dtype=np.float32), dtype=np.float32)
    assert in32.dtype == np.float32 and np.abs(in32 - exact).max() > 1e-7


def test_iw_rejects_bad_k():
    m = VAE(VAEConfig(x_dim=10, hidden=(8,), z_dim=3), rng=0)
    with pytest.raises(ValueError, match="k must be"):
        iw_log_likelihood(m, binary_data(4, 10), 0, np.random.default_rng(0))


def linear_encoder_model(scales):
    """No hidden layer: mu_j(x) = scales[j] * x_0 + 1, so Var_x(mu_j) = scales[j]^2 * Var(x_0)."""
    L = len(scales)
    m = VAE(VAEConfig(x_dim=4, hidden=(), z_dim=L, dtype="float64"), rng=0)
    W = np.zeros((4, L))
    W[0] = scales
    m.params["enc.mu.W"] = W
    m.params["enc.mu.b"] = np.ones(L)
    return m


def test_active_units_on_constructed_model():
    x = np.zeros((1000, 4))
    x[::2, 0] = 1.0                                   # x_0 alternates 0/1: variance exactly 1/4
    # Var(mu_j) = s^2 / 4: 0, 0.0049, 0.0081, 0.0121, 0.25, 1.0 -> 3 active at threshold 0.01
    scales = np.array([0.0, 0.14, 0.18, 0.22, 1.0, 2.0])
    m = linear_encoder_model(scales)
    assert np.allclose(posterior_mean_variance(m, x, batch_size=64), scales ** 2 / 4)
    assert active_units(m, x) == 3
    assert active_units(m, x, threshold=0.005) == 4
    assert active_units(m, x, threshold=0.3) == 1


def test_kl_per_dim_sums_to_kl():
    m = VAE(VAEConfig(x_dim=10, hidden=(8,), z_dim=4, dtype="float64"), rng=1)
    x = binary_data(50, 10)
    per = kl_per_dim(m, x, batch_size=7)
    assert per.shape == (4,) and (per >= 0).all()
    assert np.isclose(per.sum(), negative_elbo(m, x, np.random.default_rng(0))["kl"])
    mu, logvar = m.encode(x)
    j = 2
    direct = 0.5 * (mu[:, j] ** 2 + np.exp(logvar[:, j]) - 1 - logvar[:, j]).mean()
    assert np.isclose(per[j], direct)


def test_collapse_warning():
    assert collapse_warning(10, 20) is False
    assert "9 of 20" in collapse_warning(9, 20)


def test_report_keys_types_and_collapse():
    x = np.zeros((40, 4))
    x[::2, 0] = 1.0
    m = linear_encoder_model(np.array([0.0, 0.0, 0.0, 1.0]))      # 1 of 4 active: collapse
    r = report(m, x, np.random.default_rng(0), iw_k=20, chunk=7, batch_size=16, progress=False)
    for key in ("n", "neg_elbo", "recon", "kl", "iw_k", "iw_nll", "active_units", "n_latent", "kl_per_dim",
                "au_threshold", "collapse_warning"):
        assert key in r
    json.dumps(r)                                                  # plain Python values only
    assert r["n"] == 40 and r["iw_k"] == 20 and r["active_units"] == 1 and r["n_latent"] == 4
    assert isinstance(r["kl_per_dim"], list) and len(r["kl_per_dim"]) == 4
    assert np.isclose(sum(r["kl_per_dim"]), r["kl"])
    assert "posterior collapse" in r["collapse_warning"]
    assert r["iw_nll"] <= r["neg_elbo"] + 0.5                     # IW is tighter (up to MC noise)


def test_report_without_iw_and_progress(capsys):
    m = VAE(VAEConfig(x_dim=10, hidden=(8,), z_dim=2), rng=0)
    r = report(m, binary_data(8, 10), np.random.default_rng(0))
    assert r["iw_nll"] is None and r["iw_k"] == 0
    r = report(m, binary_data(8, 10), np.random.default_rng(0), iw_k=30, progress=True)
    assert np.isfinite(r["iw_nll"])
    assert "IW log p(x)" not in capsys.readouterr().err        # stderr is not a terminal: no bar


def test_progress_bar_only_on_a_terminal(monkeypatch):
    import io
    import sys

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    m = VAE(VAEConfig(x_dim=10, hidden=(8,), z_dim=2), rng=0)
    for tty, shown in ((True, True), (False, False)):
        err = Terminal() if tty else io.StringIO()
        monkeypatch.setattr(sys, "stderr", err)
        report(m, binary_data(8, 10), np.random.default_rng(0), iw_k=30, progress=True)
        assert ("IW log p(x)" in err.getvalue()) == shown
        if tty:                                       # counts samples: 8 examples x 30 = 240
            assert "/240 " in err.getvalue() and "sample/s" in err.getvalue() and "0.00/240" in err.getvalue()


def test_active_units_need_a_minimum_of_examples():
    from minivae.evaluate import AU_MIN_N
    m = linear_encoder_model(np.array([0.0, 0.0, 0.0, 1.0]))      # 1 of 4 active: collapse on enough data
    x = binary_data(AU_MIN_N - 1, m.config.x_dim)
    r = report(m, x, np.random.default_rng(0))
    assert r["active_units"] is None and r["collapse_warning"] is False
    assert f"at least {AU_MIN_N}" in r["au_note"]
    r = report(m, binary_data(40, m.config.x_dim), np.random.default_rng(0))
    assert r["active_units"] == 1 and "posterior collapse" in r["collapse_warning"] and "au_note" not in r


@pytest.mark.parametrize("backend", backends())
def test_iw_same_on_backend(backend):
    from minivae.backend import use_backend
    x = binary_data(6, 10)
    ref = VAE(VAEConfig(x_dim=10, hidden=(8,), z_dim=3, dtype="float64"), rng=0)
    with use_backend(backend):
        m = VAE(VAEConfig(x_dim=10, hidden=(8,), z_dim=3, dtype="float64"), rng=0)
    a = iw_log_likelihood(ref, x, 20, np.random.default_rng(2), chunk=6)
    b = iw_log_likelihood(m, x, 20, np.random.default_rng(2), chunk=6)
    assert np.allclose(a, b, atol=1e-9)


def test_report_counts_active_units_at_the_threshold_it_is_given():
    x = np.zeros((40, 4))
    x[::2, 0] = 1.0                                   # Var(x_0) = 1/4
    scales = np.array([0.0, 0.14, 0.18, 0.22, 1.0, 2.0])        # Var(mu_j): 0, .0049, .0081, .0121, .25, 1
    m = linear_encoder_model(scales)
    for threshold, count in ((0.001, 5), (0.005, 4), (0.01, 3), (0.3, 1), (2.0, 0)):
        r = report(m, x, np.random.default_rng(0), au_threshold=threshold)
        assert r["au_threshold"] == threshold and r["active_units"] == count, (threshold, r["active_units"])
        assert bool(r["collapse_warning"]) == (count < 3)
    assert report(m, x, np.random.default_rng(0))["au_threshold"] == 0.01          # the default


def test_log_mean_exp_edge_cases():
    a = np.array([[-np.inf, 0.0], [-np.inf, np.log(3.0)]])
    with np.errstate(divide="ignore"):
        out = log_mean_exp(a, axis=0)
    assert out[0] == -np.inf and np.isclose(out[1], np.log(2.0))        # all weights zero: log 0, no NaN
    assert np.allclose(log_mean_exp(np.log([[1.0, 2.0, 6.0]]), axis=1), [np.log(3.0)])
    assert log_mean_exp(np.array([5.0])).shape == ()


def test_iw_smallest_sizes_and_bad_sizes():
    m = VAE(VAEConfig(x_dim=10, hidden=(8,), z_dim=3, dtype="float64"), rng=0)
    x = binary_data(3, 10)
    a = iw_log_likelihood(m, x, 3, np.random.default_rng(1), chunk=1, batch_size=1)
    b = iw_log_likelihood(m, x, 3, np.random.default_rng(1), chunk=3, batch_size=1)   # the same draws
    assert a.shape == (3,) and np.allclose(a, b, rtol=0, atol=1e-12)
    one = iw_log_likelihood(m, x, 1, np.random.default_rng(1), batch_size=3)       # k = 1: one log weight
    eps = np.random.default_rng(1).standard_normal((1, 3, 3))
    assert np.allclose(one, m.log_weights(x, eps)[0], rtol=0, atol=1e-12)
    for kw in ({"k": 2.5}, {"k": -1}, {"chunk": 0}, {"batch_size": 0}, {"chunk": 1.5}, {"batch_size": 2.5}):
        args = {"k": 3, **kw}
        with pytest.raises(ValueError, match="must be positive integers|k must be"):
            iw_log_likelihood(m, x, args.pop("k"), np.random.default_rng(0), **args)


def test_log_mean_exp_axes_shapes_and_float64():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2, 3, 4))
    for axis in (0, 1, 2, -1):
        direct = np.log(np.mean(np.exp(a), axis=axis))
        out = log_mean_exp(a, axis=axis)
        assert out.shape == direct.shape and np.allclose(out, direct, rtol=1e-14)
    assert log_mean_exp(np.zeros((4, 1)), axis=0).shape == (1,)          # only the reduced axis goes
    # float32 input is computed in float64: log-weights near -200 keep their sub-1e-5 differences
    a32 = (-200.0 + rng.standard_normal((50, 3))).astype(np.float32)
    out = log_mean_exp(a32, axis=0)
    assert out.dtype == np.float64
    assert np.allclose(out, log_mean_exp(a32.astype(np.float64), axis=0), rtol=0, atol=1e-12)


def test_iw_without_the_fast_module_uses_the_models_own_log_weights(monkeypatch):
    """A student copy has no minivae/fast/: the estimate then comes from model.log_weights."""
    import sys
    from minivae.evaluate import _log_weights
    m = VAE(VAEConfig(x_dim=10, hidden=(8,), z_dim=3, dtype="float64"), rng=0)
    x, eps = binary_data(4, 10), np.random.default_rng(0).standard_normal((6, 4, 3))
    calls = []
    orig = VAE.log_weights
    monkeypatch.setattr(VAE, "log_weights", lambda self, *a: calls.append(a) or orig(self, *a))
    monkeypatch.setitem(sys.modules, "minivae.fast", None)           # import minivae.fast -> ImportError
    lw = _log_weights(m, x, eps)
    assert len(calls) == 1 and np.array_equal(lw, orig(m, x, eps))



def test_iw_without_the_fast_module_passes_a_conditional_models_labels(monkeypatch):
    """Without minivae/fast/ a conditional model's weights still come from log p(x|z, y) with its labels:
    the estimate matches the log-mean-exp of model.log_weights(x, eps, y) with the same draws."""
    import sys
    m = VAE(VAEConfig(x_dim=10, hidden=(8,), z_dim=3, n_classes=3, dtype="float64"), rng=0)
    x, y = binary_data(4, 10), np.array([0, 2, 1, 2])
    monkeypatch.setitem(sys.modules, "minivae.fast", None)           # import minivae.fast -> ImportError
    got = iw_log_likelihood(m, x, 6, np.random.default_rng(3), y=y)
    eps = np.random.default_rng(3).standard_normal((6, 4, 3))
    assert np.allclose(got, log_mean_exp(m.log_weights(x, eps, y), axis=0), rtol=0, atol=1e-12)
    other = iw_log_likelihood(m, x, 6, np.random.default_rng(3), y=(y + 1) % 3)
    assert not np.allclose(got, other)

class _FakeModel:
    """Just what iw_log_likelihood reads: config.arch, config.z_dim and dtype."""

    def __init__(self, arch, z_dim=2):
        from types import SimpleNamespace
        self.config = SimpleNamespace(arch=arch, z_dim=z_dim)
        self.dtype = np.float64


def _spy_log_weights(monkeypatch, seen, offsets=None):
    """log w = -|eps|^2 (+ a per-example offset): a function of the draws alone, whatever the chunking."""
    import minivae.evaluate as ev

    def lw(model, xb, eps):
        seen.append(eps.shape[0] * eps.shape[1])
        out = -(eps ** 2).sum(-1)
        return out if offsets is None else out + offsets[xb[:, 0].astype(int)]
    monkeypatch.setattr(ev, "_log_weights", lw)


def _cap_rows(monkeypatch, arch, rows):
    """The registered architecture ``arch`` with ``eval_rows = rows``, for this test only."""
    from minivae.networks import ARCHITECTURES
    monkeypatch.setitem(ARCHITECTURES, arch, ARCHITECTURES[arch]._replace(eval_rows=rows))


def test_conv_models_see_at_most_conv_rows_per_call(monkeypatch):
    x = np.arange(25.0)[:, None] * np.ones((1, 3))
    seen = []
    _spy_log_weights(monkeypatch, seen)
    ref = iw_log_likelihood(_FakeModel("mlp"), x, 50, np.random.default_rng(0), chunk=50, batch_size=10)
    assert max(seen) == 500                                   # an MLP keeps the chunk it is given
    for rows, batch, per_call in ((40, 10, 40), (10, 10, 10), (5, 10, 10), (1000, 10, 500)):
        _cap_rows(monkeypatch, "conv", rows)
        seen.clear()
        out = iw_log_likelihood(_FakeModel("conv"), x, 50, np.random.default_rng(0), chunk=50, batch_size=batch)
        assert max(seen) == per_call and sum(seen) == 25 * 50, (rows, seen)   # at least one sample per call
        assert np.allclose(out, ref, rtol=0, atol=1e-12)                      # the same draws, the same estimate
    _cap_rows(monkeypatch, "conv", 40)
    seen.clear()
    iw_log_likelihood(_FakeModel("mlp"), x, 50, np.random.default_rng(0), chunk=50, batch_size=10)
    assert max(seen) == 500                                   # the conv cap is for conv models only
    seen.clear()
    iw_log_likelihood(VAE(VAEConfig(x_dim=3, hidden=(4,), z_dim=2), rng=0), x, 50, np.random.default_rng(0),
                      chunk=50, batch_size=10)
    assert max(seen) == 500                                   # a real MLP model's config has no conv arch


def test_iw_running_max_is_per_example(monkeypatch):
    # two examples 5000 nats apart: one shared maximum would underflow the lower one to -inf
    x = np.array([[0.0], [1.0]])
    _spy_log_weights(monkeypatch, [], offsets=np.array([0.0, -5000.0]))
    out = iw_log_likelihood(_FakeModel("mlp", z_dim=1), x, 20, np.random.default_rng(0), chunk=3, batch_size=2)
    eps = np.random.default_rng(0).standard_normal((20, 2, 1))
    expect = log_mean_exp(-(eps ** 2).sum(-1) + [0.0, -5000.0], axis=0)
    assert np.isfinite(out).all() and np.allclose(out, expect, rtol=0, atol=1e-9)


def test_progress_bar_counts_every_sample(monkeypatch):
    import tqdm
    made = []

    class Bar:
        def __init__(self, **kw):
            self.kw, self.n = kw, 0
            made.append(self)

        def update(self, n):
            self.n += n

        def close(self):
            self.closed = True
    monkeypatch.setattr(tqdm, "tqdm", Bar)
    m = VAE(VAEConfig(x_dim=10, hidden=(8,), z_dim=2), rng=0)
    iw_log_likelihood(m, binary_data(7, 10), 30, np.random.default_rng(0), chunk=4, batch_size=3)
    assert made == []                                          # no bar unless asked
    iw_log_likelihood(m, binary_data(7, 10), 30, np.random.default_rng(0), chunk=4, batch_size=3, progress=True)
    (bar,) = made
    assert bar.kw["total"] == 7 * 30 and bar.n == 7 * 30 and bar.closed
    assert bar.kw["unit"] == "sample" and bar.kw["leave"] is False and bar.kw["disable"] is None
    assert bar.kw["unit_scale"] is True and bar.kw["desc"] == "IW log p(x), k=30"
    report(m, binary_data(7, 10), np.random.default_rng(0), iw_k=5)
    assert len(made) == 1                                      # report: no bar by default either


def test_posterior_mean_variance_in_batches():
    m = linear_encoder_model(np.array([1.0, -2.0]))
    x = np.random.default_rng(0).random((5, 4))
    direct = m.encode(x)[0].var(axis=0)
    for bs in (1, 2, 3, 5, 1000):
        assert np.allclose(posterior_mean_variance(m, x, batch_size=bs), direct, rtol=1e-13)
    # the threshold is strict: a variance exactly at it is not active
    x2 = np.zeros((40, 4))
    x2[::2, 0] = 1.0
    m2 = linear_encoder_model(np.array([0.5]))            # mu in {1, 1.5}: variance exactly 0.0625
    assert posterior_mean_variance(m2, x2)[0] == 0.0625
    assert active_units(m2, x2, threshold=0.0625) == 0 and active_units(m2, x2, threshold=0.0624) == 1


def test_collapse_warning_says_what_it_means_and_what_to_do():
    msg = collapse_warning(3, 50)
    assert msg.startswith("posterior collapse: only 3 of 50 latent units are active")
    assert "carry no information about x" in msg
    assert "Burda et al. 2015 report 19-20 of 50 for their VAE" in msg
    assert msg.endswith("try KL warm-up or free bits)")


def test_report_numbers_are_the_functions_numbers():
    m = VAE(VAEConfig(x_dim=10, hidden=(8,), z_dim=3, dtype="float64"), rng=0)
    x = binary_data(150, 10)
    import time
    t0 = time.perf_counter()
    r = report(m, x, np.random.default_rng(0), iw_k=3)
    took = time.perf_counter() - t0
    rng = np.random.default_rng(0)                          # the same draws, in the same order
    parts = negative_elbo(m, x, rng, batch_size=100)
    ll = iw_log_likelihood(m, x, 3, rng, chunk=100, batch_size=100)
    assert r["neg_elbo"] == parts["loss"] and r["recon"] == parts["recon"] and r["kl"] == parts["kl"]
    assert r["iw_nll"] == float(-ll.mean()) and r["iw_nll_sem"] == float(ll.std(ddof=1) / np.sqrt(150))
    assert 0 <= r["iw_seconds"] <= took
    r0 = report(m, x[:5], np.random.default_rng(0))
    assert r0["iw_k"] == 0 and r0["iw_nll"] is None and r0["iw_nll_sem"] is None and r0["iw_seconds"] is None
    r1 = report(m, x[:1], np.random.default_rng(0), iw_k=2)
    assert r1["iw_nll_sem"] is None and np.isfinite(r1["iw_nll"])            # one example: no standard error


def test_defaults_and_boundaries_of_the_evaluation():
    from types import SimpleNamespace

    from minivae.evaluate import AU_MIN_N
    m = VAE(VAEConfig(x_dim=10, hidden=(8,), z_dim=3, dtype="float64"), rng=0)
    x = binary_data(150, 10)
    # the default batch of the IW estimate is 100 examples (it fixes the order of the draws)
    assert np.array_equal(iw_log_likelihood(m, x, 2, np.random.default_rng(0)),
                          iw_log_likelihood(m, x, 2, np.random.default_rng(0), batch_size=100))
    r = report(m, x, np.random.default_rng(0), iw_k=2, batch_size=50)
    rng = np.random.default_rng(0)
    negative_elbo(m, x, rng)
    assert r["iw_nll"] == float(-iw_log_likelihood(m, x, 2, rng, batch_size=50).mean())
    # negative_elbo: one draw eps (1, N, L) per example, then the model's own loss
    rng = np.random.default_rng(4)
    ne = negative_elbo(m, x[:30], np.random.default_rng(4))
    m.loss(x[:30], eps=rng.standard_normal((1, 30, 3)), backward=False)
    assert np.isclose(ne["loss"], float(m.parts["loss"]), rtol=1e-12) and np.isclose(ne["kl"], float(m.parts["kl"]))
    # two examples have a standard error; exactly AU_MIN_N examples are enough to count active units
    assert report(m, x[:2], np.random.default_rng(0), iw_k=2)["iw_nll_sem"] is not None
    assert report(m, x[:AU_MIN_N], np.random.default_rng(0))["active_units"] is not None
    assert report(m, x[:AU_MIN_N - 1], np.random.default_rng(0))["au_note"].endswith(f"got {AU_MIN_N - 1}")
    # a config without an ``arch`` field is an MLP: no conv row bound
    seen = []
    fake = SimpleNamespace(config=SimpleNamespace(z_dim=2), dtype=np.float64)
    import minivae.evaluate as ev
    orig, ev._log_weights = ev._log_weights, lambda model, xb, eps: seen.append(eps.shape[0]) or -(eps ** 2).sum(-1)
    try:
        iw_log_likelihood(fake, x[:10], 200, np.random.default_rng(0), chunk=200, batch_size=10)
    finally:
        ev._log_weights = orig
    assert seen == [200]


def test_negative_elbo_with_labels_does_not_depend_on_the_batch_size():
    """A conditional model: each batch gets the labels of its own rows, so batches of 4 give the loss of one
    batch of all 10 rows (the same eps draws, in the same order)."""
    m = VAE(VAEConfig(x_dim=6, hidden=(5,), z_dim=2, n_classes=3, dtype="float64"), rng=0)
    x = binary_data(10, 6)
    y = np.array([0, 1, 2, 2, 1, 0, 0, 2, 1, 1])
    whole = negative_elbo(m, x, np.random.default_rng(5), batch_size=10, y=y)
    m.loss(x, eps=np.random.default_rng(5).standard_normal((1, 10, 2)), backward=False, y=y)
    assert np.isclose(whole["loss"], float(m.parts["loss"]), rtol=1e-12)
    for bs in (4, 3, 1):
        parts = negative_elbo(m, x, np.random.default_rng(5), batch_size=bs, y=y)
        for key in ("loss", "recon", "kl"):
            assert np.isclose(parts[key], whole[key], rtol=1e-12), (bs, key)


def test_batch_size_bounds_the_rows_of_each_encoder_call(monkeypatch):
    m = VAE(VAEConfig(x_dim=10, hidden=(8,), z_dim=3, dtype="float64"), rng=0)
    x = binary_data(30, 10)
    rows = []
    encode = m.encode

    def spy(xb, *a):
        rows.append(xb.shape[0])
        return encode(xb, *a)
    monkeypatch.setattr(m, "encode", spy)
    n = active_units(m, x, threshold=0.0, batch_size=8)
    assert rows == [8, 8, 8, 6]
    assert n == active_units(m, x, threshold=0.0)           # one batch (the default, 1000 rows): the same count
    rows.clear()
    kl_per_dim(m, x, batch_size=7)
    assert rows == [7, 7, 7, 7, 2]


def test_report_with_iw_k_none_makes_no_iw_estimate():
    """``iw_k=None`` (no --iw-k given) asks for no IW estimate, like 0."""
    m = VAE(VAEConfig(x_dim=10, hidden=(8,), z_dim=2), rng=0)
    r = report(m, binary_data(8, 10), np.random.default_rng(0), iw_k=None)
    assert r["iw_k"] == 0 and r["iw_nll"] is None and r["iw_seconds"] is None
    json.dumps(r)


def test_report_passes_its_chunk_to_the_iw_estimate(monkeypatch):
    """report's ``chunk`` bounds the samples per log-weight call, as in iw_log_likelihood."""
    import minivae.evaluate as ev
    m = VAE(VAEConfig(x_dim=10, hidden=(8,), z_dim=2, dtype="float64"), rng=0)
    seen = []

    def spy(model, xb, eps, *a):
        seen.append(eps.shape[:2])
        return -(eps ** 2).sum(-1)                          # log w from the draws alone: no model needed
    monkeypatch.setattr(ev, "_log_weights", spy)
    r = report(m, binary_data(6, 10), np.random.default_rng(0), iw_k=9, chunk=2, batch_size=3)
    assert max(s for s, _ in seen) == 2 and sum(s * n for s, n in seen) == 6 * 9
    assert np.isfinite(r["iw_nll"])
