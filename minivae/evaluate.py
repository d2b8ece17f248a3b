"""Evaluation: the negative ELBO and the importance-weighted log-likelihood.

The importance-weighted estimate (Burda et al. 2015) of log p(x) with k
samples z_i ~ q(z|x):

    log p(x) ~ log (1/k) sum_i w_i,     log w_i = log p(x|z_i) + log p(z_i) - log q(z_i|x)

It is a stochastic lower bound whose expectation increases with k and tends to
log p(x); k = 1 gives the ELBO.  The log-mean-exp is computed stably as
    m + log( (1/k) sum_i exp(log w_i - m) ),   m = max_i log w_i,
and accumulated in float64.
"""
from __future__ import annotations

import numpy as np

from .backend import to_numpy


def log_mean_exp(a, axis=0):
    """Stable log(mean(exp(a))) along ``axis`` (float64 on the host)."""
    a = np.asarray(a, dtype=np.float64)
    m = np.max(a, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    out = m + np.log(np.mean(np.exp(a - m), axis=axis, keepdims=True))
    return np.squeeze(out, axis=axis)


def iw_log_likelihood(model, x, k, rng, chunk=100, batch_size=500):
    """Per-example importance-weighted estimate of log p(x), shape (N,), float64.

    ``k`` samples per example are drawn in chunks of ``chunk`` so memory stays
    bounded (about batch_size * chunk * D floats at a time).  ``rng`` is a
    NumPy Generator: the eps noise comes from it on the host.
    """
    x = np.asarray(to_numpy(x))
    N, L = x.shape[0], model.config.z_dim
    out = np.empty(N, dtype=np.float64)
    for start in range(0, N, batch_size):
        xb = x[start:start + batch_size]
        n = xb.shape[0]
        # running log-sum-exp over chunks: keep max and the scaled sum
        run_max = np.full(n, -np.inf)
        run_sum = np.zeros(n)
        done = 0
        while done < k:
            s = min(chunk, k - done)
            eps = rng.standard_normal((s, n, L)).astype(model.dtype)
            lw = to_numpy(model.log_weights(xb, eps)).astype(np.float64)   # (s, n)
            new_max = np.maximum(run_max, lw.max(axis=0))
            run_sum = run_sum * np.exp(run_max - new_max) + np.exp(lw - new_max).sum(axis=0)
            run_max = new_max
            done += s
        out[start:start + n] = run_max + np.log(run_sum / k)
    return out


def negative_elbo(model, x, rng, batch_size=1000):
    """Mean negative ELBO and its parts over a dataset (one eps draw per example).

    Returns ``{"loss", "recon", "kl"}`` as Python floats, nats per example.
    """
    x = np.asarray(to_numpy(x))
    N = x.shape[0]
    tot = {"loss": 0.0, "recon": 0.0, "kl": 0.0}
    for start in range(0, N, batch_size):
        xb = x[start:start + batch_size]
        eps = rng.standard_normal((1, xb.shape[0], model.config.z_dim)).astype(model.dtype)
        model.loss(xb, eps=eps, backward=False)
        for key in tot:
            tot[key] += float(to_numpy(model.parts[key])) * xb.shape[0]
    return {key: v / N for key, v in tot.items()}


def report(model, x, rng, iw_k=0, chunk=100, batch_size=500, progress=False):
    """Evaluation summary of ``model`` on data ``x`` (already binarized if needed).

    Returns a dict of plain Python numbers: ``n``, ``neg_elbo``, ``recon``,
    ``kl`` (nats per example) and, when ``iw_k > 0``, ``iw_nll`` and ``iw_k``.
    """
    parts = negative_elbo(model, x, rng, batch_size=batch_size)
    out = {"n": int(np.shape(x)[0]), "neg_elbo": parts["loss"], "recon": parts["recon"], "kl": parts["kl"]}
    if iw_k:
        ll = iw_log_likelihood(model, x, iw_k, rng, chunk=chunk, batch_size=batch_size)
        out["iw_k"] = int(iw_k)
        out["iw_nll"] = float(-ll.mean())
    return out
