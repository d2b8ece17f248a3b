"""Learned priors p(z): a mixture of Gaussians and the VampPrior, as one op pair.

Both priors are mixtures of C diagonal Gaussians,

    log p(z) = logsumexp_c [ log pi_c + log N(z; m_c, diag exp(s_c)) ],        pi = softmax(a),

* the **mixture-of-Gaussians prior**: a (C,), m (C, L), s (C, L) are free parameters;
* the **VampPrior** (Tomczak & Welling 2018): p(z) = 1/C sum_c q(z | u_c), the encoder's posterior at C learned
  pseudo-inputs u_c (C, D): m_c, s_c = the encoder's (mu, logvar) of u_c and pi uniform.  Its gradient goes through
  the mixture op to (m, s), then through the encoder to the encoder's weights and to the pseudo-inputs.

With either prior the KL term KL(q(z|x) || p(z)) has no closed form: the model estimates it by Monte Carlo,
log q(z|x) - log p(z) at the sampled z (:mod:`minivae.families`).

Shapes: ``M`` rows of z, ``L`` latent, ``C`` components.
"""
from __future__ import annotations

from .backend import get_array_module
from .gaussian import LOG_2PI


def mixture_log_prob_forward(z, a, m, s):
    """log p(z) = logsumexp_c [log softmax(a)_c + log N(z; m_c, diag exp(s_c))] per row.

    Shapes: z (M, L), a (C,), m and s (C, L) -> (lp (M,), cache).  The log-sum-exp subtracts the row's maximum
    (the same shift as the IWAE bound), so no component's density underflows the sum.
    """
    xp = get_array_module(z, m, s)
    L = z.shape[1]
    log_pi = a - a.max()
    log_pi = log_pi - xp.log(xp.exp(log_pi).sum())                            # log softmax(a), max subtracted
    d = z[:, None, :] - m[None]                                                # (M, C, L)
    inv = xp.exp(-s)                                                           # (C, L) 1 / variance
    ell = log_pi - 0.5 * ((d * d * inv).sum(axis=2) + s.sum(axis=1) + L * LOG_2PI)   # (M, C)
    top = ell.max(axis=1, keepdims=True)
    e = xp.exp(ell - top)
    tot = e.sum(axis=1, keepdims=True)
    lp = (top + xp.log(tot))[:, 0]
    r = e / tot                                                                # responsibilities, softmax_c(ell)
    return lp, (d, inv, r, xp.exp(log_pi))


def mixture_log_prob_backward(dlp, cache):
    """Gradients of log p(z) = logsumexp_c ell_c, ell_c = log pi_c + log N(z; m_c, diag exp(s_c)).

    With upstream G = dL/dlp (M,) and r_mc = softmax_c(ell_m)_c (the responsibilities):

    Derivation (dlp/dell, then each ell's partial derivatives):
        dlp/dell_mc        = r_mc
        dell_mc/dz_mj      = -(z_mj - m_cj) exp(-s_cj)
        dell_mc/dm_cj      = +(z_mj - m_cj) exp(-s_cj)
        dell_mc/ds_cj      = 1/2 [(z_mj - m_cj)^2 exp(-s_cj) - 1]
        dell_mc/da_k       = [c = k] - pi_k                (log softmax)
        dL/dz_m  = -G_m sum_c r_mc (z_m - m_c) exp(-s_c)
        dL/dm_c  =  sum_m G_m r_mc (z_m - m_c) exp(-s_c)
        dL/ds_c  =  1/2 sum_m G_m r_mc [(z_m - m_c)^2 exp(-s_c) - 1]
        dL/da_k  =  sum_m G_m (r_mk - pi_k)
    (end of derivation)

    Returns ``(dz, da, dm, ds)``: (M, L), (C,), (C, L), (C, L).
    """
    d, inv, r, pi = cache
    w = dlp[:, None] * r                                      # (M, C): G_m r_mc
    scaled = d * inv                                           # (M, C, L): (z - m_c) / var_c
    dz = -(w[:, :, None] * scaled).sum(axis=1)                 # through each component's Gaussian
    dm = (w[:, :, None] * scaled).sum(axis=0)
    ds = 0.5 * (w[:, :, None] * (d * scaled - 1.0)).sum(axis=0)
    da = w.sum(axis=0) - dlp.sum() * pi                        # the softmax's Jacobian: r - pi, summed over m
    return dz, da, dm, ds
