"""Better encoder gradients for the IWAE bound: "sticking the landing" (STL) and the doubly reparameterised
gradient (DReG), as op pairs.

Shapes: ``K`` importance samples, ``N`` batch, ``L`` latent.

Where the encoder's gradient comes from
---------------------------------------
With z_k = mu + sigma * eps_k (phi: the encoder's parameters, through mu and logvar) and

    log w_k = log p(x|z_k) + log p(z_k) - log q_phi(z_k|x),        L_K = log (1/K) sum_k w_k,

the total derivative of log w_k splits into a *path* term (through z_k, with q's parameters held) and a
*score* term (through q's parameters, with z_k held):

    d log w_k / d phi = [d log w_k / d z_k] dz_k/dphi  -  d log q_phi(z_k|x) / d phi |_(z_k fixed)
                      =            path_k              -            score_k

and the IWAE gradient is  dL_K/dphi = sum_k wtilde_k (path_k - score_k),  wtilde = softmax_k(log w).
The score term has expectation 0 for K = 1 (E_q[d log q / d phi] = 0) but it is noise that does not vanish
as q approaches the posterior; Rainforth et al. (2018) show the encoder's signal-to-noise ratio under this
estimator falls like 1/sqrt(K).

STL (Roeder, Wu & Duvenaud 2017): drop the score term,

    g_STL = sum_k wtilde_k path_k.

Unbiased for K = 1 (the ELBO); for K > 1 it is biased (Tucker et al. 2019, section 5).

DReG (Tucker, Lawson, Gu & Maddison 2019): the score term's expectation can itself be reparameterised.  For
any f, E_q[f(z) d log q(z)/dphi] = E_eps[d f(z(eps))/dz dz/dphi] (their eq. 5).  With f = wtilde_k, summed over k,
this turns -sum_k wtilde_k score_k into sum_k (wtilde_k^2 - wtilde_k) path_k in expectation, so

    g_DReG = sum_k wtilde_k^2 path_k

is unbiased for dL_K/dphi, for every K, and has no score term.  The decoder's gradient is unchanged (the
ordinary sum_k wtilde_k d log w_k / d theta): only the encoder gets the new weights.

The op pairs here: :func:`iwae_estimator_forward` / :func:`iwae_estimator_backward` (the bound, and the
weights the decoder and the encoder each get), and :func:`log_q_fixed_forward` / :func:`log_q_fixed_backward`
(log q with its parameters held: its gradient is the path term's d(-log q)/dz).  The model chains them in
:meth:`minivae.families.FamilyVAE.loss` (``iwae_grad="stl"`` or ``"dreg"``).
"""
from __future__ import annotations

from .gaussian import LOG_2PI
from .backend import get_array_module
from .objectives import iwae_forward

IWAE_GRADS = ("iwae", "stl", "dreg")


def check_estimator(name):
    """``name`` if it is one of :data:`IWAE_GRADS`, else ValueError naming them."""
    if name not in IWAE_GRADS:
        raise ValueError(f"unknown IWAE gradient estimator {name!r}: choose one of {', '.join(IWAE_GRADS)}")
    return name


def iwae_estimator_forward(log_w, estimator="iwae"):
    """The negative IWAE bound of log_w (K, N) (the same number for every estimator), and a cache.

    Returns ``(loss, cache)``; the estimator only changes what :func:`iwae_estimator_backward` gives the encoder.
    """
    loss, (wtilde, N) = iwae_forward(log_w)
    return loss, (wtilde, N, check_estimator(estimator))


def iwae_estimator_backward(dloss, cache):
    """The weights each network's gradient gets, (K, N) each: ``(g_model, g_enc)``.

    Derivation (from loss = -1/N sum_n L_K(x_n) and the module docstring):
        d loss / d log w_nk           = -dloss wtilde_nk / N         (g_model: the decoder, and IWAE's encoder)
        STL's encoder weight           = -dloss wtilde_nk / N         (the same weights, on the path term only)
        DReG's encoder weight          = -dloss wtilde_nk^2 / N       (squared: the score term reparameterised)
    (end of derivation)

    The caller multiplies g_enc by the path term d log w / dz only (no score term) for STL and DReG; for
    "iwae" g_enc is g_model and the caller takes the total derivative.
    """
    wtilde, N, estimator = cache
    g_model = (-dloss / N) * wtilde
    if estimator == "dreg":
        g_enc = (-dloss / N) * wtilde * wtilde        # DReG: wtilde^2 on the path term
    else:
        g_enc = g_model                               # IWAE (total derivative) and STL (path term only)
    return g_model, g_enc


def log_q_fixed_forward(z, mu, logvar):
    """log N(z; mu, diag exp(logvar)) as a function of z alone: mu and logvar are held (no gradient).

        log q = -1/2 sum_j [ (z_j - mu_j)^2 exp(-logvar_j) + logvar_j + log 2 pi ]

    Shapes: z (K, N, L), mu and logvar (N, L) -> (K, N).
    """
    xp = get_array_module(z, mu, logvar)
    inv_var = xp.exp(-logvar)
    d = z - mu
    return -0.5 * (d * d * inv_var + logvar + LOG_2PI).sum(axis=-1), (d, inv_var)


def log_q_fixed_backward(dlogq, cache):
    """d log q / dz_j = -(z_j - mu_j) / sigma_j^2 (the path term of -log q is its negative).

    At z = mu + sigma eps this is -eps / sigma.  dlogq (K, N) -> dz (K, N, L).
    """
    d, inv_var = cache
    return dlogq[..., None] * (-d * inv_var)
