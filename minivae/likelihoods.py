"""Reconstruction terms -log p(x|z), in nats, one value per example.

Each is a forward/backward pair.  The forward returns the negative
log-likelihood summed over the D data dimensions, shape (N,); the backward
takes the per-example upstream gradient ``dnll`` (N,) and returns the
gradient with respect to the decoder's raw outputs.

Shapes: ``N`` examples, ``D`` data dimension.  Every function also accepts a
leading sample axis, (S, N, D) outputs against (N, D) data, by broadcasting;
the per-example results are then (S, N).

At the end, :data:`LIKELIHOODS` registers each one under the name a ``VAEConfig`` uses; the model, the
configuration's checks and the command line read it from there.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

from .backend import get_array_module
from .gaussian import LOG_2PI
from .layers import sigmoid, softplus


# ----------------------------------------------------------------------------
# Bernoulli from logits (the "BCE" loss)
# ----------------------------------------------------------------------------
def bernoulli_nll_forward(logits, x):
    """-log Bernoulli(x; p = sigmoid(logits)), summed over D.

    Per pixel, with l the logit:
        -[x log p + (1 - x) log(1 - p)]
          = x softplus(-l) + (1 - x) softplus(l)
          = softplus(l) - x l.
    Computing it from logits with a stable softplus never takes log(0), even
    when sigmoid(l) rounds to exactly 0 or 1 (in float32 it rounds to 1 from l ~ 17 on,
    and to 0 only below l ~ -104, where exp(l) < 2^-150 underflows to 0).  x may be
    any value in [0, 1] (continuous "probabilities" as targets are allowed).

    Shapes: logits (N, D), x (N, D) -> nll (N,).
    """
    ### BEGIN SOLUTION bernoulli_nll_forward
    nll = (softplus(logits) - x * logits).sum(axis=-1)   # sum_d softplus(l) - x l
    ### END SOLUTION
    return nll, (logits, x)


def bernoulli_nll_backward(dnll, cache):
    """Backward of nll = sum_d softplus(l_d) - x_d l_d.

    Derivation (d nll / d l per pixel):
    d/dl [softplus(l) - x l] = sigmoid(l) - x.
    (end of derivation)

    Shapes: dnll (N,) or (S, N) -> dlogits (N, D) or (S, N, D).
    """
    logits, x = cache
    ### BEGIN SOLUTION bernoulli_nll_backward
    dlogits = dnll[..., None] * (sigmoid(logits) - x)     # dL/dl = upstream * (p - x)
    ### END SOLUTION
    return dlogits


# ----------------------------------------------------------------------------
# Gaussian with fixed variance (the "MSE" form)
# ----------------------------------------------------------------------------
def gaussian_nll_forward(mean, x, var=1.0):
    """-log N(x; mean, var I) with a fixed scalar variance, summed over D.

        nll = sum_d (x_d - mean_d)^2 / (2 var) + D/2 * log(2 pi var)

    This is the squared error up to a scale and a constant; the constant is
    kept so the number is a real log-likelihood in nats.

    Shapes: mean, x (N, D) -> nll (N,).
    """
    D = x.shape[-1]
    r = mean - x
    nll = (r * r).sum(axis=-1) * (0.5 / var) + 0.5 * D * (LOG_2PI + math.log(var))
    return nll, (r, var)


def gaussian_nll_backward(dnll, cache):
    """d nll / d mean = (mean - x) / var.  dnll (N,) -> dmean (N, D)."""
    r, var = cache
    return dnll[..., None] * r * (1.0 / var)


# ----------------------------------------------------------------------------
# Gaussian with a learned per-pixel variance
# ----------------------------------------------------------------------------
def gaussian_learned_var_nll_forward(mean, logvar, x):
    """-log N(x; mean, diag exp(logvar)), the decoder predicting both.

        nll = 1/2 * sum_d [ (x_d - mean_d)^2 exp(-logvar_d) + logvar_d + log 2 pi ]

    Shapes: mean, logvar, x (N, D) -> nll (N,).
    """
    xp = get_array_module(mean, logvar, x)
    D = x.shape[-1]
    r = mean - x
    inv_var = xp.exp(-logvar)
    nll = 0.5 * (r * r * inv_var + logvar).sum(axis=-1) + 0.5 * D * LOG_2PI
    return nll, (r, inv_var)


def gaussian_learned_var_nll_backward(dnll, cache):
    """Gradients:

        d nll / d mean   = (mean - x) exp(-logvar)
        d nll / d logvar = 1/2 * (1 - (x - mean)^2 exp(-logvar))

    dnll (N,) -> (dmean, dlogvar), each (N, D).
    """
    r, inv_var = cache
    g = dnll[..., None]
    dmean = g * r * inv_var                      # (mean - x) / sigma^2
    dlogvar = g * (0.5 * (1.0 - r * r * inv_var))  # (1 - r^2 / sigma^2) / 2
    return dmean, dlogvar


# ----------------------------------------------------------------------------
# A floor on the learned log-variance (VAEConfig(dec_logvar_min=m))
# ----------------------------------------------------------------------------
# Why a floor.  On a pixel that is 0 in every training image (MNIST's border),
# the decoder can predict mean = 0 exactly, so r = 0 and the per-pixel NLL
# 1/2 (r^2 exp(-logvar) + logvar + log 2 pi) -> 1/2 (logvar + log 2 pi) falls
# without bound as logvar -> -inf: the density of a constant pixel is
# unbounded (a Dirac delta), and the optimizer chases it.  A floor m bounds
# each pixel's contribution below by 1/2 (m + log 2 pi) nats.
#
# Why smooth (softplus) rather than a hard clamp max(logvar, m).  Both bound
# the density the same way.  The clamp is not differentiable at logvar = m,
# so a finite-difference check there means nothing; the softplus floor is
# smooth everywhere and its gradient sigmoid(logvar - m) falls off gradually
# instead of jumping from 1 to 0.  Neither is "alive" far below the floor:
# the clamp's gradient there is exactly 0 and the softplus's is about
# e^(logvar - m) (2e-9 at 20 below), just as useless for a gradient step.  Nor
# is a clamped pixel dead forever: its raw log-variance w_d . h + b_d comes from
# hidden features h that every pixel trains, so it can cross back above m
# without receiving any gradient of its own (lesson 20 shows both).  Above the
# floor the softplus is the identity to within log(1 + e^-a) in log-variance,
# a = logvar - m (0.13 at a = 2, a factor e^0.13 = 1.14 on the variance;
# 0.007 at a = 5).  The price: the effective variance is always a bit above
# the raw one near the floor -- irrelevant for a floor meant to stop a
# collapse, not to shape the variance.
def logvar_floor_forward(logvar, m):
    """Smooth floor on a log-variance:  logvar' = m + softplus(logvar - m)  >  m.

        a        = logvar - m
        logvar'  = m + log(1 + exp(a))          (stable softplus, never exp of a positive number)
        logvar' -> logvar   for logvar >> m,    logvar' -> m   for logvar << m

    So sigma' = exp(logvar'/2) > exp(m/2): each pixel's density is at most
    1/sqrt(2 pi exp(m)), its NLL at least 1/2 (m + log 2 pi).

    Shapes: logvar (..., D) any shape, m a Python float -> (logvar' same shape, cache).
    """
    a = logvar - m
    return m + softplus(a), a


def logvar_floor_backward(dout, cache):
    """d logvar' / d logvar = softplus'(a) = sigmoid(logvar - m), in (0, 1).

    dout (..., D) -> dlogvar (..., D), the same shape.
    """
    a = cache
    return dout * sigmoid(a)                         # dL/dlogvar = dL/dlogvar' * sigmoid(logvar - m)


# ----------------------------------------------------------------------------
# The registry: the likelihoods a VAEConfig can name
# ----------------------------------------------------------------------------
class Likelihood(NamedTuple):
    """One p(x|z) of the model, as the VAE runs it.

    heads          the decoder's output heads: ``("out",)``, or ``("out", "out_logvar")`` for a mean and a
                   log-variance (their parameters are ``dec.out.*``, ``dec.out_logvar.*``)
    forward        ``(outs, x, config) -> (nll, cache)``: the heads' outputs (S, N, D) each against x (N, D),
                   nll (S, N)
    backward       ``(dnll, cache, config) -> [dL/d(out) for each head]``
    mean           the first head's output -> E[x|z] (the decoder's link)
    unit_interval  the data must lie in [0, 1] (and can be binarized)
    summary        one line for the command line's help
    """

    heads: tuple
    forward: Callable
    backward: Callable
    mean: Callable
    unit_interval: bool
    summary: str


LIKELIHOODS = {}   # name -> Likelihood


def register_likelihood(name, likelihood):
    """Make ``name`` a likelihood that VAEConfig, the model and the command line accept."""
    if not isinstance(likelihood, Likelihood):
        raise TypeError(f"likelihood {name!r}: expected a Likelihood, got {type(likelihood).__name__}")
    LIKELIHOODS[name] = likelihood
    return likelihood


def _identity(a):
    return a


def _bernoulli_forward(outs, x, config):
    return bernoulli_nll_forward(outs[0], x)


def _bernoulli_backward(dnll, cache, config):
    return [bernoulli_nll_backward(dnll, cache)]


def _gaussian_forward(outs, x, config):
    return gaussian_nll_forward(outs[0], x, config.obs_var)


def _gaussian_backward(dnll, cache, config):
    return [gaussian_nll_backward(dnll, cache)]


def _learned_var_forward(outs, x, config):
    """With ``config.dec_logvar_min = m`` the learned log-variance first goes through the floor
    logvar' = m + softplus(logvar - m) (:func:`logvar_floor_forward`)."""
    m = config.dec_logvar_min
    if m is None:
        return gaussian_learned_var_nll_forward(outs[0], outs[1], x)
    logvar, c_floor = logvar_floor_forward(outs[1], m)                 # floored logvar' > m
    nll, c_nll = gaussian_learned_var_nll_forward(outs[0], logvar, x)
    return nll, (c_nll, c_floor)


def _learned_var_backward(dnll, cache, config):
    if config.dec_logvar_min is None:
        return list(gaussian_learned_var_nll_backward(dnll, cache))
    c_nll, c_floor = cache
    dmean, dlogvar_floored = gaussian_learned_var_nll_backward(dnll, c_nll)
    return [dmean, logvar_floor_backward(dlogvar_floored, c_floor)]    # chain through the floor


register_likelihood("bernoulli", Likelihood(
    ("out",), _bernoulli_forward, _bernoulli_backward, sigmoid, True,
    "bernoulli (binary pixels, logits)"))
register_likelihood("gaussian", Likelihood(
    ("out",), _gaussian_forward, _gaussian_backward, _identity, False,
    "gaussian (fixed variance --obs-var)"))
register_likelihood("gaussian_learned_var", Likelihood(
    ("out", "out_logvar"), _learned_var_forward, _learned_var_backward, _identity, False,
    "gaussian_learned_var (a learned per-pixel variance)"))


def get_likelihood(name):
    """The registered :class:`Likelihood` ``name``; ValueError naming the known ones otherwise."""
    try:
        return LIKELIHOODS[name]
    except KeyError:
        raise ValueError(f"unknown likelihood {name!r}: choose one of {', '.join(LIKELIHOODS)}") from None
