"""ELBO surgery (minivae/surgery.py): the aggregate posterior's density, and the split of the rate."""
import math

import numpy as np
import pytest

from minivae.surgery import elbo_surgery, log_aggregate_posterior, prior_holes


def _brute_log_q(z, mu, logvar):
    v = np.exp(logvar)
    comp = -0.5 * (np.log(2 * np.pi) + logvar[None] + (z[:, None, :] - mu[None]) ** 2 / v[None]).sum(-1)
    return np.log(np.exp(comp).mean(axis=1))


def test_aggregate_density_matches_the_mixture_written_out():
    rng = np.random.default_rng(0)
    mu, logvar = rng.normal(size=(7, 3)), rng.normal(scale=0.5, size=(7, 3))
    z = rng.normal(size=(1000, 3)) * 1.5
    got = log_aggregate_posterior(z, mu, logvar, chunk=64)
    np.testing.assert_allclose(got, _brute_log_q(z, mu, logvar), rtol=1e-10, atol=1e-10)


def test_aggregate_density_is_a_density():
    # a 1-D mixture integrates to 1 (trapezoid rule on a fine grid)
    rng = np.random.default_rng(1)
    mu, logvar = rng.normal(size=(5, 1)), rng.normal(scale=0.3, size=(5, 1)) - 1
    grid = np.linspace(-12, 12, 24001)[:, None]
    area = np.trapezoid(np.exp(log_aggregate_posterior(grid, mu, logvar)), grid[:, 0]) \
        if hasattr(np, "trapezoid") else np.trapz(np.exp(log_aggregate_posterior(grid, mu, logvar)), grid[:, 0])
    assert abs(area - 1) < 1e-6


def test_posteriors_equal_to_the_prior_carry_no_information():
    mu, logvar = np.zeros((500, 4)), np.zeros((500, 4))
    s = elbo_surgery(mu, logvar, np.random.default_rng(2))
    assert s["rate"] == 0
    assert abs(s["mutual_info"]) < 1e-9 and abs(s["marginal_kl"]) < 1e-9


def test_sharp_distinct_posteriors_reach_log_n():
    # codes far apart with tiny sigma: z identifies its x_n, so I = log N exactly
    rng = np.random.default_rng(3)
    mu = rng.normal(size=(200, 5)) * 3
    logvar = np.full((200, 5), -12.0)
    s = elbo_surgery(mu, logvar, rng)
    assert abs(s["mutual_info"] - math.log(200)) < 1e-6


def test_the_two_parts_add_up_to_the_rate():
    rng = np.random.default_rng(4)
    mu = rng.normal(size=(400, 3))
    logvar = rng.normal(scale=0.4, size=(400, 3)) - 1.0
    s = elbo_surgery(mu, logvar, rng, samples=20)
    total_sem = math.hypot(s["mutual_info_sem"], s["marginal_kl_sem"])
    assert abs(s["mutual_info"] + s["marginal_kl"] - s["rate"]) < 4 * total_sem + 0.05
    assert 0 < s["mutual_info"] <= s["log_n"] + 1e-9
    assert s["marginal_kl"] > 0


def test_a_prior_with_a_hole_is_measured():
    rng = np.random.default_rng(5)
    # codes on the right half-space only: half of the prior is a hole
    mu = np.abs(rng.normal(size=(2000, 1))) + 0.5
    logvar = np.full((2000, 1), -4.0)
    holes = prior_holes(mu, logvar, rng, n=4000)
    assert 0.4 < holes["hole_fraction"] < 0.75
    full = prior_holes(rng.normal(size=(2000, 1)), np.full((2000, 1), -4.0), rng, n=4000)
    assert full["hole_fraction"] < 0.1 and full["kl_p_q"] < holes["kl_p_q"]


@pytest.mark.parametrize("bad", [dict(mu=np.zeros((3, 2)), logvar=np.zeros((3, 3))),
                                 dict(mu=np.full((3, 2), np.nan), logvar=np.zeros((3, 2)))])
def test_bad_posteriors_are_refused(bad):
    with pytest.raises(ValueError):
        elbo_surgery(bad["mu"], bad["logvar"], np.random.default_rng(0))
