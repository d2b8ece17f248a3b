"""Objectives beyond the plain ELBO, as op pairs: the IWAE bound and free bits.

Both are used by :meth:`minivae.VAE.loss` (``iwae_k=K`` and ``free_bits=lambda``);
here they are small, separately gradient-checked ops.

Shapes: ``K`` importance samples, ``N`` batch, ``L`` latent.

The IWAE bound (Burda, Grosse & Salakhutdinov 2015)
---------------------------------------------------
With K samples z_k = mu(x) + sigma(x) * eps_k from q(z|x) and the log-weights

    log w_k = log p(x|z_k) + log p(z_k) - log q(z_k|x),

the bound is  L_K(x) = E[ log (1/K) sum_k w_k ]  <=  log p(x).  It is the ELBO for
K = 1, is non-decreasing in K and tends to log p(x).  Both hold in expectation over
the draws: a single draw of log (1/K) sum_k w_k can exceed log p(x).  The loss over a batch (one draw per example) is

    loss = -1/N sum_n [ logsumexp_k(log w_nk) - log K ].

Gradient.  d logsumexp_k(a_k) / d a_j = exp(a_j) / sum_k exp(a_k) = softmax(a)_j,
so with an upstream ``dloss``

    d loss / d log w_nk = -dloss * wtilde_nk / N,     wtilde_nk = softmax_k(log w_n)_k,

the *normalized importance weights*.  They are computed with the max
subtracted (softmax is invariant to a shift), so nothing overflows.  Every
sample's log-weight then gets the ordinary single-sample gradient, scaled by
its normalized weight: samples that explain x well dominate the update, which
is what makes IWAE different from averaging K ELBO samples (weights 1/K).
The rest of the chain (decoder, prior, posterior) is in :meth:`VAE.loss`.

Free bits (Kingma et al. 2016, IAF paper, "free bits")
------------------------------------------------------
The KL term is replaced by a per-dimension floor lambda (nats), applied to the
batch mean of each dimension's KL:

    KLbar_j = 1/N sum_n KL_nj,        obj = sum_j max(lambda, KLbar_j).

A dimension whose average KL is below lambda pays the constant lambda, so the
optimizer gets no incentive to push it further towards the prior (which
counters posterior collapse).  Gradient (zero below the floor):

    d obj / d KL_nj = [KLbar_j > lambda] / N.

At KLbar_j == lambda the max has a kink; this implementation uses the
gradient 0 there (the ``>`` above).  Finite differences are only meaningful
away from the kink, which is how the tests check it.
"""
from __future__ import annotations

import math

from .backend import get_array_module
# the per-dimension KL op pair free bits sits on, derived from kl_forward / kl_backward (re-exported here)
from .gaussian import kl_dim_backward, kl_dim_forward  # noqa: F401


# ----------------------------------------------------------------------------
# IWAE bound
# ----------------------------------------------------------------------------
def iwae_forward(log_w):
    """Negative IWAE bound from log-weights: -1/N sum_n log (1/K) sum_k exp(log_w[k, n]).

    log_w (K, N) -> (loss 0-d array, cache).  K = 1 gives the negative
    single-sample (Monte-Carlo KL) ELBO, -mean(log_w).
    """
    xp = get_array_module(log_w)
    if log_w.ndim != 2:
        raise ValueError(f"log_w must have shape (K, N), got {tuple(log_w.shape)}")
    K, N = log_w.shape
    m = log_w.max(axis=0)                        # (N,) shift for stability
    e = xp.exp(log_w - m)                        # (K, N), entries in (0, 1]
    s = e.sum(axis=0)                            # (N,) >= 1
    bound = m + xp.log(s) - math.log(K)          # L_K per example
    loss = -bound.mean()
    wtilde = e / s                               # normalized importance weights, softmax over k
    return loss, (wtilde, N)


def iwae_backward(dloss, cache):
    """d loss / d log_w = -dloss * softmax_k(log_w) / N, shape (K, N)."""
    wtilde, N = cache
    return (-dloss / N) * wtilde


# ----------------------------------------------------------------------------
# free bits
# ----------------------------------------------------------------------------
def free_bits_forward(kl, lam):
    """Free-bits KL objective: sum_j max(lam, mean_n kl[n, j]).

    kl (N, L) per-example, per-dimension KL; lam >= 0 in nats per dimension.
    Returns (obj 0-d array, cache).
    """
    xp = get_array_module(kl)
    if kl.ndim != 2:
        raise ValueError(f"kl must have shape (N, L), got {tuple(kl.shape)}")
    N = kl.shape[0]
    kl_bar = kl.mean(axis=0)                     # (L,) batch-mean KL per dimension
    obj = xp.maximum(kl_bar, lam).sum()
    active = (kl_bar > lam).astype(kl.dtype)     # 1 above the floor, 0 at or below it
    return obj, (active, N)


def free_bits_backward(dobj, cache):
    """d obj / d kl[n, j] = dobj * [mean_n kl[n, j] > lam] / N, shape (N, L)."""
    active, N = cache
    xp = get_array_module(active)
    return xp.broadcast_to((dobj / N) * active, (N, active.shape[0])).copy()
