"""The diagonal Gaussian posterior q(z|x) = N(mu, diag(sigma^2)): sampling and KL.

Convention, everywhere in minivae:  ``logvar = log sigma^2``, so

    sigma = exp(0.5 * logvar),      sigma^2 = exp(logvar).

Using exp(logvar) as sigma (instead of as the variance) is the most common
VAE bug; the test suite checks the sampler's statistics.

Shapes: ``N`` batch, ``L`` latent, ``S`` Monte-Carlo samples per example.
"""
from __future__ import annotations

import math

from .backend import get_array_module

LOG_2PI = math.log(2.0 * math.pi)


# ----------------------------------------------------------------------------
# reparameterization
# ----------------------------------------------------------------------------
def reparameterize_forward(mu, logvar, eps):
    """The reparameterization trick: z = mu + sigma * eps, sigma = exp(logvar / 2).

    ``eps ~ N(0, I)`` is passed in, so the function is deterministic and
    differentiable in (mu, logvar).

    Shapes: mu, logvar (N, L); eps (N, L) or (S, N, L) -> z shaped like eps
    (mu and logvar broadcast over the sample axis).
    """
    xp = get_array_module(mu, logvar, eps)
    ### BEGIN SOLUTION reparameterize_forward
    sigma = xp.exp(0.5 * logvar)   # sigma = exp(logvar / 2): logvar is log sigma^2
    z = mu + sigma * eps
    ### END SOLUTION
    return z, (sigma, eps)


def reparameterize_backward(dz, cache):
    """Gradients of z = mu + exp(logvar / 2) * eps.

    Derivation (dz/dmu and dz/dlogvar, then dmu and dlogvar from dz):
        dz/dmu     = 1                            -> dmu     = sum_s dz
        dz/dlogvar = eps * exp(logvar / 2) / 2    -> dlogvar = sum_s dz * eps * sigma / 2
    (end of derivation)

    The sums run over the sample axis when eps is (S, N, L).
    Returns ``(dmu, dlogvar)``, each (N, L).
    """
    sigma, eps = cache
    ### BEGIN SOLUTION reparameterize_backward
    dmu = dz                                   # dL/dmu = dL/dz * 1
    dlogvar = dz * eps * (0.5 * sigma)         # dL/dlogvar = dL/dz * eps * sigma / 2
    if dz.ndim == 3:                           # (S, N, L): mu was broadcast over S
        dmu = dmu.sum(axis=0)
        dlogvar = dlogvar.sum(axis=0)
    ### END SOLUTION
    return dmu, dlogvar


def reparameterize(mu, logvar, eps):
    """Just the sample: ``z = mu + exp(0.5 * logvar) * eps``."""
    return reparameterize_forward(mu, logvar, eps)[0]


# ----------------------------------------------------------------------------
# KL(q || p) with p = N(0, I)
# ----------------------------------------------------------------------------
def kl_forward(mu, logvar):
    """Analytic KL( N(mu, diag exp(logvar)) || N(0, I) ), one value per example.

    Kingma & Welling (2014), Appendix B: for one dimension,

        KL = -1/2 * (1 + log sigma^2 - mu^2 - sigma^2)
           =  1/2 * (mu^2 + exp(logvar) - 1 - logvar),

    summed over the L latent dimensions.

    Shapes: mu, logvar (N, L) -> kl (N,).
    """
    xp = get_array_module(mu, logvar)
    ### BEGIN SOLUTION kl_forward
    var = xp.exp(logvar)                                   # sigma^2
    kl = 0.5 * (mu * mu + var - 1.0 - logvar).sum(axis=1)  # sum over latent dims
    ### END SOLUTION
    return kl, (mu, var)


def kl_backward(dkl, cache):
    """Gradient of the analytic KL (Kingma & Welling 2014, Appendix B).

    From KL = 1/2 * sum_j (mu_j^2 + exp(logvar_j) - 1 - logvar_j):

    Derivation (dKL/dmu_j and dKL/dlogvar_j):
        dKL/dmu_j     = mu_j
        dKL/dlogvar_j = (exp(logvar_j) - 1) / 2
    (end of derivation)

    Shapes: dkl (N,) upstream per example -> (dmu, dlogvar), each (N, L).
    """
    mu, var = cache
    ### BEGIN SOLUTION kl_backward
    g = dkl[:, None]                     # broadcast the per-example upstream over L
    dmu = g * mu                         # dKL/dmu     = mu
    dlogvar = g * (0.5 * (var - 1.0))    # dKL/dlogvar = (sigma^2 - 1) / 2
    ### END SOLUTION
    return dmu, dlogvar


def kl_per_dim(mu, logvar):
    """KL per example and latent dimension, shape (N, L) (no sum over L).

    Derived from :func:`kl_forward`: each (n, j) entry is the KL of a
    one-dimensional Gaussian, i.e. kl_forward on an (N*L, 1) batch.
    """
    return kl_dim_forward(mu, logvar)[0]


def kl_dim_forward(mu, logvar):
    """KL(N(mu, exp(logvar)) || N(0, 1)) per example and dimension: (N, L) -> (N, L).

    Each entry is :func:`kl_forward` of a one-dimensional Gaussian, so this
    reuses it on the (N*L, 1) reshaped batch.  The op free bits sits on.
    """
    shape = mu.shape
    kl, cache = kl_forward(mu.reshape(-1, 1), logvar.reshape(-1, 1))
    return kl.reshape(shape), (cache, shape)


def kl_dim_backward(dkl, cache):
    """Gradients of :func:`kl_dim_forward`: :func:`kl_backward` on the (N*L, 1) batch.

    dkl (N, L) upstream per entry -> (dmu, dlogvar), each (N, L).
    """
    inner, shape = cache
    dmu, dlogvar = kl_backward(dkl.reshape(-1), inner)
    return dmu.reshape(shape), dlogvar.reshape(shape)


# ----------------------------------------------------------------------------
# log densities (for importance weights)
# ----------------------------------------------------------------------------
def log_standard_normal(z):
    """log N(z; 0, I), summed over the last axis.  z (..., L) -> (...)."""
    L = z.shape[-1]
    return -0.5 * (z * z).sum(axis=-1) - 0.5 * L * LOG_2PI


def log_diag_normal(z, mu, logvar):
    """log N(z; mu, diag exp(logvar)), summed over the last axis.

    = -1/2 * sum_j [ (z_j - mu_j)^2 / sigma_j^2 + logvar_j + log 2pi ]
    z (..., L), mu and logvar broadcastable -> (...).
    """
    xp = get_array_module(z, mu, logvar)
    L = z.shape[-1]
    d = z - mu
    return -0.5 * (d * d * xp.exp(-logvar) + logvar).sum(axis=-1) - 0.5 * L * LOG_2PI
