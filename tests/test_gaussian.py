"""Statistical tests of the Gaussian pieces: these catch the exp(logvar)-as-sigma bug."""
import numpy as np
import pytest

from minivae.gaussian import kl_forward, kl_per_dim, log_diag_normal, log_standard_normal, reparameterize


def test_sampler_mean_and_variance_are_mu_and_exp_logvar():
    rng = np.random.default_rng(0)
    mu = np.array([[0.5, -2.0, 3.0, 0.0]])
    logvar = np.array([[np.log(4.0), np.log(0.25), 1.0, -3.0]])   # variances 4, 0.25, e, e^-3
    n = 200_000
    z = reparameterize(mu, logvar, rng.standard_normal((n, 4)))
    var = np.exp(logvar[0])
    # standard errors: sd/sqrt(n) for the mean, var*sqrt(2/n) for the variance; allow 5 of them
    assert np.all(np.abs(z.mean(0) - mu[0]) < 5 * np.sqrt(var / n))
    assert np.all(np.abs(z.var(0) - var) < 5 * var * np.sqrt(2 / n))
    # the same check rejects the classic bug (sigma = exp(logvar), variance exp(2 logvar): 16 instead of 4)
    z_bug = mu + np.exp(logvar) * rng.standard_normal((n, 4))
    assert not np.all(np.abs(z_bug.var(0) - var) < 5 * var * np.sqrt(2 / n))


def test_sampler_with_sample_axis_broadcasts_mu():
    rng = np.random.default_rng(1)
    mu, logvar = rng.standard_normal((3, 2)), rng.standard_normal((3, 2))
    z = reparameterize(mu, logvar, rng.standard_normal((50_000, 3, 2)))
    assert z.shape == (50_000, 3, 2)
    assert np.allclose(z.var(0), np.exp(logvar), rtol=0.05)


def test_float32_sampling_stays_float32():
    z = reparameterize(np.zeros((2, 3), np.float32), np.zeros((2, 3), np.float32), np.ones((2, 3), np.float32))
    assert z.dtype == np.float32


def test_analytic_kl_matches_monte_carlo():
    rng = np.random.default_rng(2)
    mu = rng.standard_normal((3, 4))
    logvar = rng.uniform(-2, 1, (3, 4))
    kl, _ = kl_forward(mu, logvar)
    n = 400_000
    z = reparameterize(mu, logvar, rng.standard_normal((n, 3, 4)))
    log_ratio = log_diag_normal(z, mu, logvar) - log_standard_normal(z)      # (n, 3)
    mc, se = log_ratio.mean(0), log_ratio.std(0) / np.sqrt(n)
    assert np.all(np.abs(mc - kl) < 5 * se), (mc, kl, se)
    assert np.allclose(kl_per_dim(mu, logvar).sum(1), kl)


def test_kl_is_zero_only_at_the_prior():
    kl, _ = kl_forward(np.zeros((1, 5)), np.zeros((1, 5)))
    assert kl[0] == 0.0
    kl, _ = kl_forward(np.full((1, 5), 0.1), np.zeros((1, 5)))
    assert kl[0] > 0


def test_log_densities_match_closed_forms():
    z = np.array([[0.3, -1.2]])
    assert np.isclose(log_standard_normal(z)[0], np.sum(-0.5 * z ** 2 - 0.5 * np.log(2 * np.pi)))
    mu, logvar = np.array([[1.0, 0.0]]), np.array([[np.log(2.0), np.log(0.5)]])
    var = np.exp(logvar)
    expect = np.sum(-0.5 * (z - mu) ** 2 / var - 0.5 * np.log(2 * np.pi * var))
    assert np.isclose(log_diag_normal(z, mu, logvar)[0], expect)


@pytest.mark.parametrize("logvar", [-80.0, 80.0])
def test_log_diag_normal_extreme_logvar_is_finite(logvar):
    out = log_diag_normal(np.zeros((1, 2)), np.zeros((1, 2)), np.full((1, 2), logvar))
    assert np.isfinite(out).all()
