"""Beyond the plain VAE: an autoregressive decoder, flows in q(z|x) and better IWAE gradients, composed.

:class:`FamilyVAE` is the fully connected VAE of :mod:`minivae.model` with up to three changes, chosen by a
:class:`FamilyConfig` (and the ``--decoder``, ``--flow``, ``--iwae-grad`` flags of ``train``):

    decoder="made"     p(x|z) = prod_d Bernoulli(x_d; sigmoid(l_d(x_<d, z))), a MADE (:mod:`minivae.made`) with
                       one masked hidden layer of width hidden[-1] and direct connections from x_<d to l_d;
                       z is an input every hidden unit sees
    flow="planar:T"    T planar steps after the Gaussian sample (:func:`minivae.flows.planar_forward`)
    flow="iaf:T"       T inverse autoregressive flow steps (:func:`minivae.flows.iaf_forward`), the latent order
                       reversed between steps
    prior="mog:C"      a learned prior p(z): a mixture of C Gaussians (:mod:`minivae.priors`)
    prior="vamp:C"     the VampPrior: the encoder's q(z|u_c) at C learned pseudo-inputs u_c, mixed uniformly
    iwae_grad          "stl" or "dreg": the encoder's gradient of the IWAE bound (:mod:`minivae.iwae_grads`);
                       an argument of :meth:`FamilyVAE.loss`, not part of the model

The objective chain, forward (S samples, N examples):

    x -> encoder -> (mu, logvar) -> z0 = mu + sigma eps -> flow -> (zT, sum logdet) -> decoder(zT [, x]) -> rec
    log q(zT|x) = -1/2 sum_j (eps_j^2 + logvar_j + log 2pi) - sum_t logdet_t       (eps fixed: z0 - mu = sigma eps)
    log p(zT)   = log N(zT; 0, I), or the learned prior's log-density (:func:`minivae.priors.mixture_log_prob_forward`)

    ELBO, no flow, N(0, I) prior:   loss = mean rec + beta * mean KL(q || p)     (the analytic KL; free bits too)
    ELBO, a flow or a learned prior: loss = mean rec + beta * mean (log q(zT|x) - log p(zT))   (Monte Carlo KL)
    IWAE:            log w = -rec + beta (log p(zT) - log q(zT|x)),  loss = -1/N sum_n logsumexp_k log w - log K

and backward in reverse order (:meth:`FamilyVAE._backward`).  With a = dloss/dlog q per sample (beta/(SN) for
the ELBO, -beta g for IWAE, g = dloss/dlog w), log p(zT) gets -a, each step's logdet gets -a (log q has
-logdet) and each logvar_j gets -a/2 directly.

Parameters: the encoder's as in the plain VAE (enc.*); the factorised decoder's as in the plain VAE (dec.*),
or for the MADE decoder

    dec.ar.W (D + L, H), dec.ar.b (H,)      reads [x, z]; masked: x_i feeds hidden unit k when deg_k >= i, z
                                            feeds every unit
    dec.out.W (H + D, D), dec.out.b (D,)    reads [h, x]; masked: hidden unit k feeds logit d when d > deg_k,
                                            x_i feeds logit d when d > i (the direct connections)

and per flow step t: flow.t.u, flow.t.w (L,), flow.t.b (1,) (planar), or flow.t.W1 (L, F), flow.t.b1 (F,),
flow.t.W2 (F, 2L), flow.t.b2 (2L,) (IAF, F = :func:`iaf_width`); a mixture prior's prior.a (C,), prior.m (C, L),
prior.s (C, L), or the VampPrior's pseudo-inputs prior.u (C, D) (initialised in [0, 1], like pixels).

The fast path (:mod:`minivae.fast`) does not cover these models: training and evaluation run this code.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from . import networks
from .backend import asarray, get_backend, get_xp
from .config import VAEConfig
from .gaussian import LOG_2PI, kl_backward, kl_forward, log_standard_normal, reparameterize_backward, \
    reparameterize_forward
from .iwae_grads import check_estimator, iwae_estimator_backward, iwae_estimator_forward
from .layers import activation, sigmoid
from .likelihoods import LIKELIHOODS
from .made import hidden_degrees, made_masks, masked_dense_backward, masked_dense_forward
from .flows import (iaf_backward, iaf_forward, planar_backward, planar_forward, planar_uhat_backward,
                    planar_uhat_forward)
from .model import VAE, ParamDict, _check_objective, _layout, as_generator
from .priors import mixture_log_prob_backward, mixture_log_prob_forward
from .objectives import free_bits_backward, free_bits_forward, kl_dim_backward, kl_dim_forward

DECODERS = ("factorised", "made")
FLOWS = ("planar", "iaf")
PRIORS = ("mog", "vamp")
MAX_FLOW_STEPS = 64
MAX_COMPONENTS = 10000


def parse_prior(spec):
    """``"vamp:500"`` -> ``("vamp", 500)``; None -> None (the standard normal).  ValueError for anything else."""
    if spec is None:
        return None
    kind, _, n = str(spec).partition(":")
    try:
        C = int(n)
    except ValueError:
        C = -1
    if kind not in PRIORS or not 1 <= C <= MAX_COMPONENTS:
        raise ValueError(f"prior must be KIND:C with KIND one of {', '.join(PRIORS)} and 1 <= C <= {MAX_COMPONENTS} "
                         f"components (e.g. vamp:500), got {spec!r}")
    return kind, C


def parse_flow(spec):
    """``"planar:4"`` -> ``("planar", 4)``; None -> None.  ValueError (one line) for anything else."""
    if spec is None:
        return None
    kind, _, steps = str(spec).partition(":")
    try:
        n = int(steps)
    except ValueError:
        n = -1
    if kind not in FLOWS or not 1 <= n <= MAX_FLOW_STEPS:
        raise ValueError(f"flow must be KIND:T with KIND one of {', '.join(FLOWS)} and 1 <= T <= {MAX_FLOW_STEPS} "
                         f"steps (e.g. planar:4), got {spec!r}")
    return kind, n


def iaf_width(z_dim):
    """Hidden width of an IAF step's MADE: 4 L, at least 16."""
    return max(16, 4 * int(z_dim))


@dataclass
class FamilyConfig(VAEConfig):
    """A :class:`~minivae.config.VAEConfig` plus the family's choices (see the module docstring).

    decoder  "factorised" (the plain VAE's decoder) or "made" (autoregressive; Bernoulli likelihood only)
    flow     None, "planar:T" or "iaf:T"
    prior    None (N(0, I)), "mog:C" or "vamp:C"
    """

    decoder: str = "factorised"
    flow: str = None
    prior: str = None
    kind: ClassVar[str] = "family"

    def __post_init__(self):
        super().__post_init__()
        if self.decoder not in DECODERS:
            raise ValueError(f"unknown decoder {self.decoder!r}: choose one of {', '.join(DECODERS)}")
        parsed = parse_flow(self.flow)
        self.flow = None if parsed is None else f"{parsed[0]}:{parsed[1]}"
        parsed = parse_prior(self.prior)
        self.prior = None if parsed is None else f"{parsed[0]}:{parsed[1]}"
        if self.arch != "mlp":
            raise ValueError(f"the decoder and flow options build on the fully connected VAE (arch 'mlp'), not "
                             f"arch {self.arch!r}")
        if self.n_classes is not None:
            raise ValueError("the decoder and flow options are for the unconditional VAE (no n_classes)")
        if self.decoder == "made" and self.likelihood != "bernoulli":
            raise ValueError(f"the MADE decoder models binary pixels: it needs likelihood 'bernoulli', not "
                             f"{self.likelihood!r}")

    def to_dict(self):
        d = super().to_dict()
        d["kind"] = self.kind
        return d


def family_param_shapes(config):
    """Ordered ``[(name, shape, fan_in)]`` of a FamilyConfig's parameters (module docstring)."""
    c = config
    base = networks.build(c)
    layers = [*base.encoder, *base.enc_heads]
    if c.decoder == "factorised":
        layers += [*base.decoder, *base.dec_heads]
    out = [(n, s, networks.fan_in(layer.W)) for layer in layers for n, s in layer.param_shapes()]
    D, L = c.x_dim, c.z_dim
    if c.decoder == "made":
        H = c.hidden[-1]
        out += [("dec.ar.W", (D + L, H), D + L), ("dec.ar.b", (H,), D + L),
                ("dec.out.W", (H + D, D), H + D), ("dec.out.b", (D,), H + D)]
    flow = parse_flow(c.flow)
    if flow is not None:
        kind, T = flow
        F = iaf_width(L)
        for t in range(T):
            if kind == "planar":
                out += [(f"flow.{t}.u", (L,), L), (f"flow.{t}.w", (L,), L), (f"flow.{t}.b", (1,), L)]
            else:
                out += [(f"flow.{t}.W1", (L, F), L), (f"flow.{t}.b1", (F,), L),
                        (f"flow.{t}.W2", (F, 2 * L), F), (f"flow.{t}.b2", (2 * L,), F)]
    prior = parse_prior(c.prior)
    if prior is not None:
        kind, C = prior
        if kind == "mog":                      # fan-in 1: means spread over U(-1, 1), logits and log-variances too
            out += [("prior.a", (C,), 1), ("prior.m", (C, L), 1), ("prior.s", (C, L), 1)]
        else:
            out += [("prior.u", (C, D), None)]     # None: U(0, 1), pseudo-inputs in the data's range
    return out


def param_shapes(config):
    """``[(name, shape)]`` of a FamilyConfig (the model-kind registry of :mod:`minivae.model` calls this)."""
    return [(n, s) for n, s, _ in family_param_shapes(config)]


class FamilyVAE(VAE):
    """The VAE with a MADE decoder, a flow in q, or both (module docstring).  ``FamilyVAE(FamilyConfig(...))``.

    Initialisation as the plain VAE: each weight and bias of a layer with fan-in m is U(-1/sqrt(m), 1/sqrt(m)).
    The masks of the MADEs are built from the config alone (:func:`minivae.made.made_masks`): no randomness.
    """

    output_bias = "dec.out.b"          # the logits' bias, for the recipes' init_output_bias (both decoders)

    def __init__(self, config=None, rng=None, backend=None):
        self.config = config if config is not None else FamilyConfig()
        if not isinstance(self.config, FamilyConfig):
            raise TypeError("config must be a minivae.families.FamilyConfig")
        c = self.config
        self.backend = backend or get_backend()
        self.xp = get_xp(self.backend)
        self.dtype = np.dtype(c.dtype)
        self.rng = as_generator(rng)
        base = networks.build(c)
        self.net = base if c.decoder == "factorised" else networks.Networks(base.encoder, base.enc_heads, [], [])
        shapes = family_param_shapes(c)
        self.layout, self.size = _layout([(n, s) for n, s, _ in shapes])
        host = np.empty(self.size, dtype=self.dtype)
        for name, shape, fan in shapes:
            offset, n = self.layout[name][0], int(np.prod(shape))
            lo, hi = (0.0, 1.0) if fan is None else (-1.0 / np.sqrt(fan), 1.0 / np.sqrt(fan))
            host[offset:offset + n] = self.rng.uniform(lo, hi, size=n)
        self.flat = asarray(host, self.xp, self.dtype)
        self.params = ParamDict(self.flat, self.layout)
        self.act_forward, self.act_backward = activation(c.activation)
        self.flow = parse_flow(c.flow)
        self.prior = parse_prior(c.prior)
        self.analytic_kl = self.flow is None and self.prior is None      # else the Monte Carlo KL
        D, L = c.x_dim, c.z_dim
        if c.decoder == "made":
            xp = self.xp
            m_in, m_out = made_masks(D, [c.hidden[-1]], 1, c.dtype, xp)
            direct = xp.asarray(np.triu(np.ones((D, D)), 1), dtype=c.dtype)   # x_i -> logit d when d > i
            # z is an input of degree 0: every hidden unit may see it (its mask rows are 1)
            self.dec_masks = (xp.concatenate([m_in, xp.ones((L, c.hidden[-1]), dtype=c.dtype)]),
                              xp.concatenate([m_out, direct]))
        if self.flow is not None and self.flow[0] == "iaf":
            self.iaf_masks = made_masks(L, [iaf_width(L)], 2, c.dtype, self.xp)
        self.parts = {}

    # ------------------------------------------------------------ the decoder
    def _dec_forward(self, z, x_rows):
        """z (M, L) and, for the MADE, the data rows x (M, D) it conditions on -> (outs, cache)."""
        if self.config.decoder == "factorised":
            return self.decoder_forward(z)
        p = self.params
        pre, c1 = masked_dense_forward(self.xp.concatenate([x_rows, z], axis=1), p["dec.ar.W"], p["dec.ar.b"],
                                       self.dec_masks[0])                 # [x, z] @ (M1 * W1) + b1: (M, H)
        h, c_act = self.act_forward(pre)
        logits, c2 = masked_dense_forward(self.xp.concatenate([h, x_rows], axis=1), p["dec.out.W"], p["dec.out.b"],
                                          self.dec_masks[1])              # [h, x] @ (M2 * W2) + b2: (M, D)
        return [logits], (c1, c_act, c2)

    def _dec_backward(self, douts, cache, grads):
        """dL/d(outs) -> dL/dz (M, L); writes the decoder's gradients into ``grads``."""
        if self.config.decoder == "factorised":
            return self.decoder_backward(douts, cache, grads)
        c1, c_act, c2 = cache
        dhx, grads["dec.out.W"], grads["dec.out.b"] = masked_dense_backward(douts[0], c2)
        dpre = self.act_backward(dhx[:, :self.config.hidden[-1]], c_act)     # h's columns; x is data
        dxz, grads["dec.ar.W"], grads["dec.ar.b"] = masked_dense_backward(dpre, c1)
        return dxz[:, self.config.x_dim:]                                  # the data x is not a parameter

    # --------------------------------------------------------------- the flow
    def _flow_forward(self, z):
        """z0 (M, L) -> (zT, sum_t logdet_t (M,), caches)."""
        xp, p = self.xp, self.params
        logdet = xp.zeros(z.shape[0], dtype=self.dtype)
        caches = []
        if self.flow is None:
            return z, logdet, caches
        kind, T = self.flow
        for t in range(T):
            if kind == "planar":
                uhat, c_u = planar_uhat_forward(p[f"flow.{t}.u"], p[f"flow.{t}.w"])
                z, ld, c = planar_forward(z, uhat, p[f"flow.{t}.w"], p[f"flow.{t}.b"])
                caches.append((c_u, c))
            else:
                if t > 0:
                    z = z[:, ::-1]                                         # reverse the order between steps
                z, ld, c = iaf_forward(z, p[f"flow.{t}.W1"], p[f"flow.{t}.b1"], p[f"flow.{t}.W2"],
                                       p[f"flow.{t}.b2"], self.iaf_masks)
                caches.append(c)
            logdet = logdet + ld
        return z, logdet, caches

    def _flow_backward(self, dz, dlogdet, caches, grads):
        """dL/dzT (M, L) and dL/d(sum logdet) (M,) -> dL/dz0; writes the flow's gradients into ``grads``."""
        if self.flow is None:
            return dz
        kind, T = self.flow
        for t in reversed(range(T)):
            if kind == "planar":
                c_u, c = caches[t]
                dz, duhat, dw, grads[f"flow.{t}.b"] = planar_backward(dz, dlogdet, c)
                du, dw_u = planar_uhat_backward(duhat, c_u)
                grads[f"flow.{t}.u"] = du
                grads[f"flow.{t}.w"] = dw + dw_u                           # w feeds the step and u_hat
            else:
                dz, grads[f"flow.{t}.W1"], grads[f"flow.{t}.b1"], grads[f"flow.{t}.W2"], grads[f"flow.{t}.b2"] = \
                    iaf_backward(dz, dlogdet, caches[t])
                if t > 0:
                    dz = dz[:, ::-1]                                       # the reversal's backward reverses
        return dz                                                          # every step's logdet adds: same G

    # -------------------------------------------------------------- the prior
    def _prior_forward(self, z):
        """log p(z) (M,) for z (M, L), and a cache."""
        if self.prior is None:
            return log_standard_normal(z), z
        p = self.params
        if self.prior[0] == "mog":
            lp, c = mixture_log_prob_forward(z, p["prior.a"], p["prior.m"], p["prior.s"])
            return lp, (c, None)
        m, s, c_enc = self.encoder_forward(p["prior.u"])                 # q(z|u_c) for every pseudo-input
        lp, c = mixture_log_prob_forward(z, self.xp.zeros(self.prior[1], dtype=self.dtype), m, s)
        return lp, (c, c_enc)

    def _prior_backward(self, dlp, cache, grads):
        """dL/dlog p(z) (M,) -> dL/dz (M, L); writes the prior's gradients into ``grads``.

        The VampPrior's (m, s) come from the encoder: their gradients go through the encoder's backward into a
        separate dict, returned second, which the caller adds once the encoder's own backward has written
        ``grads`` (a backward writes its parameters' gradients, it does not add to them).
        """
        if self.prior is None:
            return dlp[:, None] * (-cache), None                           # d/dz log N(z; 0, I) = -z
        c, c_enc = cache
        dz, da, dm, ds = mixture_log_prob_backward(dlp, c)
        if self.prior[0] == "mog":
            grads["prior.a"], grads["prior.m"], grads["prior.s"] = da, dm, ds
            return dz, None
        extra = self.new_grads()                                           # the encoder, at the pseudo-inputs
        extra["prior.u"] = self.encoder_backward(dm, ds, c_enc, extra)     # the mixture is uniform: da unused
        return dz, extra

    def log_prior(self, z):
        """log p(z) for z (M, L): N(0, I), or the learned prior's mixture log-density (M,)."""
        return self._prior_forward(self.xp.asarray(z, dtype=self.dtype))[0]

    # ---------------------------------------------------------------- the loss
    def loss(self, x, eps=None, beta=1.0, n_samples=1, backward=True, validate=True, iwae_k=None,
             free_bits=0.0, y=None, iwae_grad="iwae"):
        """Mean negative ELBO (or IWAE bound) in nats per example, and its gradients (module docstring).

        The arguments are those of :meth:`minivae.model.VAE.loss` (no labels: these models are unconditional),
        plus ``iwae_grad``: "iwae" (the gradient of the bound), "stl" or "dreg" (:mod:`minivae.iwae_grads`;
        they need ``iwae_k`` and a model without a flow).  ``self.parts`` holds loss, recon and kl (the
        analytic KL without a flow, the Monte Carlo one with a flow).
        """
        if y is not None:
            raise ValueError("this VAE is unconditional and takes no labels y")
        beta = self.dtype.type(beta)
        iwae_grad = check_estimator(iwae_grad)
        objective = "elbo"
        if iwae_k is not None or free_bits:
            iwae_k, free_bits = _check_objective(n_samples, iwae_k, free_bits)
            objective = "iwae" if iwae_k is not None else "free_bits"
        if iwae_grad != "iwae" and objective != "iwae":
            raise ValueError(f"iwae_grad={iwae_grad!r} is an estimator of the IWAE bound's gradient: give iwae_k")
        if iwae_grad != "iwae" and self.prior is not None:
            raise ValueError(f"iwae_grad={iwae_grad!r} is implemented for the N(0, I) prior; use iwae_grad='iwae' "
                             "with a learned prior")
        if iwae_grad != "iwae" and self.flow is not None:
            raise ValueError(f"iwae_grad={iwae_grad!r} needs log q(z|x) with its parameters held at any z, which a "
                             "flow does not give (it would need the flow's inverse); use iwae_grad='iwae'")
        if objective == "free_bits" and not self.analytic_kl:
            raise ValueError("free bits floor the analytic KL per dimension, which a flow or a learned prior does "
                             "not have")
        x = self.as_input(x, validate)
        N, L, D = x.shape[0], self.config.z_dim, self.config.x_dim
        eps = self.as_eps(eps, N, iwae_k if iwae_k is not None else n_samples)
        S = eps.shape[0]
        if iwae_k is not None and S != iwae_k:
            raise ValueError(f"eps has {S} samples but iwae_k is {iwae_k}")

        # ---- forward
        mu, logvar, c_enc = self.encoder_forward(x)                       # (N, L) each
        z0, c_rep = reparameterize_forward(mu, logvar, eps)               # (S, N, L)
        zT, logdet, c_flow = self._flow_forward(z0.reshape(S * N, L))     # (S*N, L), (S*N,)
        x_rows = x[None].repeat(S, axis=0).reshape(S * N, D) if self.config.decoder == "made" else None
        outs, c_dec = self._dec_forward(zT, x_rows)
        rec, c_rec = LIKELIHOODS[self.config.likelihood].forward([o.reshape(S, N, D) for o in outs], x,
                                                                 self.config)                      # (S, N)
        zT = zT.reshape(S, N, L)
        log_pz, c_prior = self._prior_forward(zT.reshape(S * N, L))
        log_pz = log_pz.reshape(S, N)                                     # (S, N)
        log_q = -0.5 * (eps * eps + logvar + LOG_2PI).sum(axis=-1) - logdet.reshape(S, N)
        kl, c_kl = kl_forward(mu, logvar)                                 # (N,) analytic, of q0
        kl_mean = kl.mean() if self.analytic_kl else (log_q - log_pz).mean()
        recon_mean = rec.mean()
        if objective == "iwae":
            loss, c_obj = iwae_estimator_forward(-rec + beta * (log_pz - log_q), iwae_grad)
            self.parts = {"loss": loss, "recon": recon_mean, "kl": kl_mean, "iwae_k": iwae_k}
        elif objective == "free_bits":
            kl_dim, c_kld = kl_dim_forward(mu, logvar)
            kl_obj, c_fb = free_bits_forward(kl_dim, free_bits)
            loss, c_obj = recon_mean + beta * kl_obj, (c_kld, c_fb)
            self.parts = {"loss": loss, "recon": recon_mean, "kl": kl_mean, "kl_objective": kl_obj}
        else:
            loss, c_obj = recon_mean + beta * kl_mean, c_kl
            self.parts = {"loss": loss, "recon": recon_mean, "kl": kl_mean}
        if not backward:
            return loss, None
        grads = self.new_grads()
        self._backward(objective, iwae_grad, beta, (eps, zT, c_enc, c_rep, c_flow, c_dec, c_rec, c_obj, c_prior),
                       grads)
        return loss, grads

    def _backward(self, objective, iwae_grad, beta, cache, grads):
        """The backward of :meth:`loss`: objective -> decoder -> flow -> reparameterization -> encoder.

        1. The objective's weights.  drec = dloss/drec (S, N); a = dloss/dlog q (S, N), the weight of the
           Monte Carlo KL's log q (0 when the KL is the analytic one, which has its own backward):
             ELBO: drec = 1/(S N); with a flow a = beta/(S N), else dkl_n = beta/N through kl_backward.
             IWAE: g = dloss/dlog w = -wtilde/N; drec = -g, a = -beta g.
        2. dlog p(zT) = -a gives dzT += -a * (-zT) = a zT; every logdet gets -a; each logvar_j gets -a/2 directly
           (log q has -1/2 logvar_j, eps held).
        3. STL / DReG (:mod:`minivae.iwae_grads`): the decoder's gradients with g as above; the encoder's from the
           weights g_enc on the path term alone: a second decoder backward with drec = -g_enc (its parameter
           gradients discarded) gives the likelihood's part, log p(z) adds -beta g_enc z and -log q's path
           term adds beta g_enc eps / sigma; no direct term to mu or logvar.
        """
        xp = self.xp
        eps, zT, c_enc, c_rep, c_flow, c_dec, c_rec, c_obj, c_prior = cache
        S, N, L = zT.shape
        D = self.config.x_dim
        one = xp.asarray(1.0, dtype=self.dtype)
        dmu_direct, dlogvar_direct = 0, 0
        if objective == "iwae":
            g, g_enc = iwae_estimator_backward(one, c_obj)              # (S, N) each
            drec, a = -g, -beta * g
        else:
            drec = xp.full((S, N), 1.0 / (S * N), dtype=self.dtype)
            a = None if self.analytic_kl else xp.full((S, N), beta / (S * N), dtype=self.dtype)
            if a is None and objective == "elbo":
                dmu_direct, dlogvar_direct = kl_backward(xp.full((N,), beta / N, dtype=self.dtype), c_obj)
            elif a is None:
                c_kld, c_fb = c_obj
                dmu_direct, dlogvar_direct = kl_dim_backward(free_bits_backward(beta * one, c_fb), c_kld)
        lik = LIKELIHOODS[self.config.likelihood]
        douts = lik.backward(drec, c_rec, self.config)                    # (S, N, D) each
        dzT = self._dec_backward([d.reshape(S * N, D) for d in douts], c_dec, grads).reshape(S, N, L)
        if objective == "iwae" and iwae_grad != "iwae":
            # the encoder's path-only gradient, weighted by g_enc (STL: wtilde, DReG: wtilde^2)
            douts_e = lik.backward(-g_enc, c_rec, self.config)
            dz_e = self._dec_backward([d.reshape(S * N, D) for d in douts_e], c_dec, self.new_grads())
            sigma = c_rep[0]
            dz_e = dz_e.reshape(S, N, L) + (beta * g_enc)[..., None] * (eps / sigma - zT)
            dmu, dlogvar = reparameterize_backward(dz_e, c_rep)
            self.encoder_backward(dmu, dlogvar, c_enc, grads)
            return
        extra = None
        if a is not None:
            dz_prior, extra = self._prior_backward(-a.reshape(S * N), c_prior, grads)   # log p(zT) has weight -a
            dzT += dz_prior.reshape(S, N, L)
            dz0 = self._flow_backward(dzT.reshape(S * N, L), -a.reshape(S * N), c_flow, grads).reshape(S, N, L)
            dlogvar_direct = -0.5 * a.sum(axis=0)[:, None]                # log q0 = -1/2 (eps^2 + logvar + ...)
        else:
            dz0 = dzT
        dmu, dlogvar = reparameterize_backward(dz0, c_rep)
        dmu += dmu_direct
        dlogvar += dlogvar_direct
        self.encoder_backward(dmu, dlogvar, c_enc, grads)
        if extra is not None:
            grads.flat += extra.flat                                      # the VampPrior's path into the encoder

    # ------------------------------------------------------------- the rest
    def log_weights(self, x, eps, y=None):
        """log p(x|zT) + log p(zT) - log q(zT|x), (S, N), for eps (S, N, L): the importance log-weights."""
        if y is not None:
            raise ValueError("this VAE is unconditional and takes no labels y")
        x = self.as_input(x, validate=False)
        N, L, D = x.shape[0], self.config.z_dim, self.config.x_dim
        eps = self.as_eps(eps, N)
        S = eps.shape[0]
        mu, logvar, _ = self.encoder_forward(x)
        z0 = reparameterize_forward(mu, logvar, eps)[0]
        zT, logdet, _ = self._flow_forward(z0.reshape(S * N, L))
        x_rows = x[None].repeat(S, axis=0).reshape(S * N, D) if self.config.decoder == "made" else None
        outs = self._dec_forward(zT, x_rows)[0]
        rec = LIKELIHOODS[self.config.likelihood].forward([o.reshape(S, N, D) for o in outs], x, self.config)[0]
        log_q = -0.5 * (eps * eps + logvar + LOG_2PI).sum(axis=-1) - logdet.reshape(S, N)
        return -rec + self._prior_forward(zT)[0].reshape(S, N) - log_q

    def log_px_given_z(self, x, z, y=None):
        """log p(x|z) for decoder inputs z (S, N, L) against x (N, D) -> (S, N)."""
        x = self.as_input(x, validate=False)
        S, N, L = z.shape
        x_rows = x[None].repeat(S, axis=0).reshape(S * N, -1) if self.config.decoder == "made" else None
        outs = self._dec_forward(self.xp.asarray(z, dtype=self.dtype).reshape(S * N, L), x_rows)[0]
        return -LIKELIHOODS[self.config.likelihood].forward([o.reshape(S, N, -1) for o in outs], x, self.config)[0]

    def decode_raw(self, z, y=None):
        if self.config.decoder == "made":
            raise ValueError("the MADE decoder's outputs depend on x as well as z: use decode(z), which draws x "
                             "pixel by pixel")
        return super().decode_raw(z, y)

    def decode(self, z, y=None, rng=None):
        """The factorised decoder: E[x|z].  The MADE decoder: the probabilities p(x_d = 1 | x_<d, z) along one
        ancestral draw x_1, x_2, ... (drawn from ``rng``, default ``self.rng``), (N, D).

        The draw updates the hidden pre-activations by one row of the masked weight per pixel
        (pre += x_d (M1 * W1)[d]), so a draw costs D small updates, not D passes of the network.
        """
        if self.config.decoder == "factorised":
            return super().decode(z, y)
        xp, p = self.xp, self.params
        g = as_generator(rng) if rng is not None else self.rng
        z = xp.asarray(z, dtype=self.dtype)
        if z.ndim != 2 or z.shape[1] != self.config.z_dim:
            raise ValueError(f"z must have shape (N, {self.config.z_dim}), got {tuple(z.shape)}")
        D = self.config.x_dim
        H = self.config.hidden[-1]
        W_in = p["dec.ar.W"] * self.dec_masks[0]
        W_out = p["dec.out.W"] * self.dec_masks[1]
        pre = z @ W_in[D:] + p["dec.ar.b"]                                # z's part; no pixel drawn yet
        direct = xp.zeros((z.shape[0], D), dtype=self.dtype)             # x_<d @ the direct weights, so far
        probs = xp.empty((z.shape[0], D), dtype=self.dtype)
        for d in range(D):
            h = self.act_forward(pre)[0]
            probs[:, d] = sigmoid(h @ W_out[:H, d] + direct[:, d] + p["dec.out.b"][d])
            x_d = xp.asarray(g.random(z.shape[0]) < to_host(probs[:, d]), dtype=self.dtype)
            pre += x_d[:, None] * W_in[d]                                 # pixel d now feeds the units after it
            direct += x_d[:, None] * W_out[H + d]                         # ... and the logits after it
        return probs

    def flow_z(self, z0):
        """The z the decoder reads for points z0 (N, L) of the base posterior q0: z_T = f_T(...f_1(z0)) (the
        flow is a function of z alone), z0 itself without a flow.  ``encode`` gives q0's mu and logvar."""
        z0 = self.xp.asarray(z0, dtype=self.dtype)
        return z0 if self.flow is None else self._flow_forward(z0)[0]

    def reconstruct(self, x, y=None):
        """decode(f(mu0(x))): the base posterior's mean through the flow, the decoder's own space, (N, D)."""
        return self.decode(self.flow_z(self.encode(x, y)[0]), y)

    def sample(self, n, rng=None, y=None):
        """n draws: z ~ N(0, I), then :meth:`decode` (E[x|z], or the MADE's probabilities along a draw)."""
        g = as_generator(rng) if rng is not None else self.rng
        z = self.sample_prior(int(n), g)
        return self.decode(z, y, rng=g) if self.config.decoder == "made" else self.decode(z, y)

    def sample_prior(self, n, rng=None):
        """n draws of z ~ p(z), (n, L): N(0, I), or a component c of the mixture (drawn by its weight) and then
        z ~ N(m_c, diag exp(s_c)); the VampPrior's components are the encoder's q(z|u_c)."""
        g = as_generator(rng) if rng is not None else self.rng
        eps = g.standard_normal((n, self.config.z_dim))
        if self.prior is None:
            return eps.astype(self.dtype)
        p = self.params
        if self.prior[0] == "mog":
            a = to_host(p["prior.a"]).astype(np.float64)
            m, s = to_host(p["prior.m"]), to_host(p["prior.s"])
            pi = np.exp(a - a.max())
            comp = g.choice(len(a), size=n, p=pi / pi.sum())
        else:
            m, s, _ = self.encoder_forward(p["prior.u"])
            m, s = to_host(m), to_host(s)
            comp = g.integers(0, self.prior[1], size=n)
        return self.xp.asarray(m[comp] + np.exp(0.5 * s[comp]) * eps, dtype=self.dtype)

    def __repr__(self):
        c = self.config
        arch = "-".join(str(v) for v in (c.x_dim, *c.hidden, c.z_dim))
        extra = f"decoder {c.decoder}" + (f", flow {c.flow}" if c.flow else "") + (f", prior {c.prior}" if c.prior else "")
        return f"FamilyVAE({arch}, {extra}, {c.activation}, {c.likelihood}, {c.dtype}, backend={self.backend}, " \
               f"{self.size} params)"


def to_host(a):
    from .backend import to_numpy
    return to_numpy(a)


def work(config, labelled=False):
    """``(once, per_draw)`` multiply-adds per example (minivae.limits).  Once: the encoder.  Per draw of z: the
    decoder (factorised, or the MADE's two masked layers, counted dense, as they are computed), every flow step,
    and a mixture prior's C components in L dimensions.  (The VampPrior's encoder pass over its C pseudo-inputs
    is once per step, not per example: left out, so the count stays a lower bound.)"""
    size = {name: int(np.prod(s)) for name, s, _ in family_param_shapes(config)}
    enc, dec = networks.work(config)
    if config.decoder != "factorised":
        dec = sum(n for name, n in size.items() if name.startswith("dec."))
    flow = sum(n for name, n in size.items() if name.startswith("flow."))
    prior = parse_prior(config.prior)
    return enc, dec + flow + (prior[1] * config.z_dim if prior else 0)


def _register():
    from .model import ModelKind, register_model_kind
    register_model_kind("family", ModelKind(FamilyConfig, FamilyVAE, param_shapes, work))


_register()
