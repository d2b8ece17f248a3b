"""ELBO surgery: split the average KL into what z knows about x and how far q(z) is from p(z).

For a data set of N points x_n with encoder posteriors q(z|x_n) = N(mu_n, diag sigma_n^2), the aggregate
posterior is the mixture

    q(z) = (1/N) sum_n q(z|x_n).

Hoffman & Johnson (2016, "ELBO surgery") split the KL term of the ELBO, averaged over the data, into

    (1/N) sum_n KL(q(z|x_n) || p(z))  =  I_q(x; z)  +  KL(q(z) || p(z))
    "rate"                               mutual       marginal KL: how badly the prior
                                         information  matches the codes the encoder uses

    I_q(x; z)      = E_n E_{q(z|x_n)} [ log q(z|x_n) - log q(z) ],
    KL(q(z)||p(z)) = E_n E_{q(z|x_n)} [ log q(z) - log p(z) ].

Both are estimated here by Monte Carlo with z drawn from each q(z|x_n) and log q(z) computed exactly as the
log-mean-exp over the N mixture components. Since q(z|x_n) <= N q(z), the estimate of I is at most log N:
with N points, more than log N nats of information cannot be measured.

"Holes" in the prior: regions that p(z) covers and q(z) does not. A decoder never trained there draws poor
samples from them. ``prior_holes`` measures them with draws from the prior: the fraction whose density ratio
q(z)/p(z) is below a threshold, and KL(p(z) || q(z)).

Shapes: mu, logvar (N, L); z (M, L). Everything here is evaluation, with no gradient: NumPy float64 on the
host (CuPy arrays are copied over).
"""
from __future__ import annotations

import math

import numpy as np

from .backend import to_numpy
from .gaussian import LOG_2PI


def _as_posteriors(mu, logvar):
    mu = np.asarray(to_numpy(mu), dtype=np.float64)
    logvar = np.asarray(to_numpy(logvar), dtype=np.float64)
    if mu.ndim != 2 or mu.shape != logvar.shape:
        raise ValueError(f"mu and logvar must both be (N, L); got {mu.shape} and {logvar.shape}")
    if mu.shape[0] < 1:
        raise ValueError("need at least one posterior (N >= 1)")
    if not (np.isfinite(mu).all() and np.isfinite(logvar).all()):
        raise ValueError("mu and logvar must be finite")
    return mu, logvar


def log_aggregate_posterior(z, mu, logvar, chunk=512):
    """log q(z) for the mixture q(z) = (1/N) sum_n N(z; mu_n, diag exp(logvar_n)), one value per row of z.

    log N(z; mu_n, v_n) = -1/2 sum_l [ log 2pi + log v_nl + (z_l - mu_nl)^2 / v_nl ], and the square expands into
    z^2 @ (1/v).T - 2 z @ (mu/v).T + sum mu^2/v: two matrix products per chunk of rows of z, (chunk, N) at a time.
    The mean over n is a log-mean-exp with the maximum subtracted first (exp of -700 nats would underflow).

    Shapes: z (M, L), mu and logvar (N, L) -> (M,).
    """
    mu, logvar = _as_posteriors(mu, logvar)
    z = np.asarray(to_numpy(z), dtype=np.float64)
    if z.ndim != 2 or z.shape[1] != mu.shape[1]:
        raise ValueError(f"z must be (M, {mu.shape[1]}); got {z.shape}")
    inv_v = np.exp(-logvar)                                              # (N, L): 1 / sigma^2
    const = -0.5 * (mu.shape[1] * LOG_2PI + logvar.sum(1) + (mu * mu * inv_v).sum(1))   # (N,)
    out = np.empty(z.shape[0])
    for lo in range(0, z.shape[0], chunk):
        zc = z[lo:lo + chunk]
        # (chunk, N): log N(z_m; mu_n, v_n), by the expansion above
        a = const - 0.5 * ((zc * zc) @ inv_v.T) + zc @ (mu * inv_v).T
        m = a.max(axis=1, keepdims=True)
        out[lo:lo + chunk] = m[:, 0] + np.log(np.exp(a - m).mean(axis=1))
    return out


def _log_diag(z, mu, logvar):
    return -0.5 * (LOG_2PI + logvar + (z - mu) ** 2 * np.exp(-logvar)).sum(-1)


def elbo_surgery(mu, logvar, rng, samples=1):
    """Estimate the three terms of ELBO surgery for the posteriors (mu, logvar) of N data points.

    Returns a dict (nats, averaged over the N points):
      ``rate``            (1/N) sum_n KL(q(z|x_n) || p(z)), analytic (Kingma & Welling 2014, App. B)
      ``mutual_info``     I_q(x; z), Monte Carlo, at most ``log_n`` = log N
      ``marginal_kl``     KL(q(z) || p(z)), Monte Carlo
      ``mutual_info_sem``, ``marginal_kl_sem``  their standard errors over the N points
      ``log_n``           log N, the ceiling of the mutual-information estimate
    ``mutual_info + marginal_kl`` estimates ``rate`` (their difference is Monte Carlo noise).

    ``rng`` draws z = mu + sigma * eps, ``samples`` draws per data point.
    """
    mu, logvar = _as_posteriors(mu, logvar)
    if int(samples) < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    N, L = mu.shape
    rate = 0.5 * (mu * mu + np.exp(logvar) - logvar - 1.0).sum(1)          # (N,) KL(q(z|x_n) || N(0, I))
    mi = np.zeros(N)
    mkl = np.zeros(N)
    for _ in range(int(samples)):
        z = mu + np.exp(0.5 * logvar) * rng.standard_normal((N, L))       # z_n ~ q(z | x_n)
        log_q_cond = _log_diag(z, mu, logvar)                               # log q(z_n | x_n)
        log_q_agg = log_aggregate_posterior(z, mu, logvar)                  # log q(z_n)
        log_p = -0.5 * (L * LOG_2PI + (z * z).sum(1))                       # log p(z_n), standard normal
        mi += (log_q_cond - log_q_agg) / samples
        mkl += (log_q_agg - log_p) / samples
    sem = (lambda a: float(a.std(ddof=1) / math.sqrt(N)) if N > 1 else float("nan"))
    return {
        "rate": float(rate.mean()), "mutual_info": float(mi.mean()), "marginal_kl": float(mkl.mean()),
        "mutual_info_sem": sem(mi), "marginal_kl_sem": sem(mkl), "log_n": math.log(N),
    }


def prior_holes(mu, logvar, rng, n=2000, ratio=0.1):
    """How much of the prior the aggregate posterior leaves empty, measured with n draws z ~ p(z) = N(0, I).

    Returns a dict:
      ``hole_fraction``  the fraction of prior draws where q(z) / p(z) < ``ratio``: places where the prior
                         sends samples that the decoder has (almost) never been trained on
      ``kl_p_q``         KL(p(z) || q(z)) = E_p[log p(z) - log q(z)], Monte Carlo (large when p has holes in q)
      ``kl_p_q_sem``     its standard error
    """
    mu, logvar = _as_posteriors(mu, logvar)
    if not 0 < ratio:
        raise ValueError(f"ratio must be > 0, got {ratio}")
    z = rng.standard_normal((int(n), mu.shape[1]))
    log_p = -0.5 * (mu.shape[1] * LOG_2PI + (z * z).sum(1))
    d = log_p - log_aggregate_posterior(z, mu, logvar)                      # log p(z) - log q(z)
    return {
        "hole_fraction": float((d > -math.log(ratio)).mean()),
        "kl_p_q": float(d.mean()), "kl_p_q_sem": float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan"),
    }
