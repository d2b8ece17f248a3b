"""Two stochastic layers (the architecture of Burda, Grosse & Salakhutdinov 2015, section 5): z1 and z2.

Generative model and recognition model, each conditional a Gaussian (or Bernoulli) MLP:

    p(z2) = N(0, I)                 p(z1|z2) = N(mp(z2), diag exp(lp(z2)))          p(x|z1) = Bernoulli(f(z1))
    q(z1|x) = N(m1(x), diag exp(l1(x)))            q(z2|z1) = N(m2(z1), diag exp(l2(z1)))

Sampling with eps = [eps1, eps2] (S, N, L1 + L2):  z1 = m1 + s1 eps1,  z2 = m2(z1) + s2(z1) eps2,  s = exp(l / 2).
The importance log-weight of a draw is

    log w = log p(x|z1) + log p(z1|z2) + log p(z2) - log q(z1|x) - log q(z2|z1),

with log q(z1|x) = -1/2 sum (eps1^2 + l1 + log 2pi) and log q(z2|z1) = -1/2 sum (eps2^2 + l2 + log 2pi) (eps held),
and the loss is the negative IWAE bound over K draws (K = 1: the ELBO with every KL by Monte Carlo).

Backward (:meth:`TwoLayerVAE._backward`), with g = dloss/dlog w = -wtilde / N (S, N):

    log p(z2)        dz2 += -g z2
    log p(z1|z2)     r = (z1 - mp) / exp(lp):  dz1 += -g r,  dmp = g r,  dlp = g/2 (r (z1 - mp) - 1)
                     -> the p1 network's backward -> dz2 += ...
    -log q(z2|z1)    dl2 += g/2 (the eps-form: only l2 appears)
    z2 = m2 + s2 eps2   dm2 = dz2, dl2 += dz2 eps2 s2 / 2   -> the q2 network's backward -> dz1 += ...
    log p(x|z1)      the likelihood and the decoder's backward -> dz1 += ...
    -log q(z1|x)     dl1 += g/2
    z1 = m1 + s1 eps1   (reparameterize_backward, summed over S) -> the q1 network's backward

z1 feeds three consumers (the decoder, p(z1|z2) and q(z2|z1)), so its gradient is the sum of three paths, and z2
feeds two (p(z2) and p(z1|z2)).  ``config.z_dim`` is L1 + L2 (eps and ``encode`` carry both layers);
``config.hidden`` are the widths of q1 and of the decoder p(x|z1) (mirrored), ``hidden2`` those of q2 and p1.

Parameters: q1.* (x -> z1), q2.* (z1 -> z2), p1.* (z2 -> z1), px.* (z1 -> x), each ``<net>.<i>.W/b`` hidden
layers and ``<net>.mu.*``, ``<net>.logvar.*`` heads (``px.out.*`` for the logits).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .backend import asarray, get_backend, get_xp
from .config import VAEConfig
from .gaussian import LOG_2PI, log_standard_normal, reparameterize_backward, reparameterize_forward
from .layers import activation, dense_backward, dense_forward
from .likelihoods import LIKELIHOODS
from .model import VAE, ParamDict, _layout, as_generator
from .objectives import iwae_backward, iwae_forward


@dataclass
class TwoLayerConfig(VAEConfig):
    """A VAEConfig with a second stochastic layer: ``z_dim`` = L1 + L2, ``z2_dim`` = L2, ``hidden2`` the widths
    between z1 and z2 (Burda et al.: hidden (100, 100), L1 = 100, hidden2 (50, 50), L2 = 50)."""

    z2_dim: int = 50
    hidden2: tuple = (50, 50)
    kind: ClassVar[str] = "two_layer"

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.hidden2, int):
            self.hidden2 = (self.hidden2,)
        self.hidden2 = tuple(int(h) for h in self.hidden2)
        self.z2_dim = int(self.z2_dim)
        if not 1 <= self.z2_dim < self.z_dim or any(h < 1 for h in self.hidden2):
            raise ValueError(f"two stochastic layers need 1 <= z2_dim < z_dim (z_dim = L1 + L2) and positive "
                             f"hidden2 widths, got z_dim={self.z_dim}, z2_dim={self.z2_dim}, hidden2={self.hidden2}")
        if self.arch != "mlp" or self.n_classes is not None or self.likelihood != "bernoulli":
            raise ValueError("two stochastic layers are built for the unconditional fully connected Bernoulli VAE")

    def to_dict(self):
        d = super().to_dict()
        d["hidden2"] = list(self.hidden2)
        d["kind"] = self.kind
        return d


def _mlp_shapes(prefix, n_in, widths, heads, n_out):
    out, prev = [], n_in
    for i, w in enumerate(widths):
        out += [(f"{prefix}.{i}.W", (prev, w)), (f"{prefix}.{i}.b", (w,))]
        prev = w
    for h in heads:
        out += [(f"{prefix}.{h}.W", (prev, n_out)), (f"{prefix}.{h}.b", (n_out,))]
    return out


def param_shapes(config):
    c = config
    L2 = c.z2_dim
    L1 = c.z_dim - L2
    return (_mlp_shapes("q1", c.x_dim, c.hidden, ("mu", "logvar"), L1)
            + _mlp_shapes("q2", L1, c.hidden2, ("mu", "logvar"), L2)
            + _mlp_shapes("p1", L2, tuple(reversed(c.hidden2)), ("mu", "logvar"), L1)
            + _mlp_shapes("px", L1, tuple(reversed(c.hidden)), ("out",), c.x_dim))


class TwoLayerVAE(VAE):
    """The VAE with two stochastic layers (module docstring).  ``TwoLayerVAE(TwoLayerConfig(...))``."""

    output_bias = "px.out.b"           # the logits' bias, for the recipes' init_output_bias

    def __init__(self, config=None, rng=None, backend=None):
        self.config = config if config is not None else TwoLayerConfig()
        if not isinstance(self.config, TwoLayerConfig):
            raise TypeError("config must be a minivae.twolayer.TwoLayerConfig")
        c = self.config
        self.backend = backend or get_backend()
        self.xp = get_xp(self.backend)
        self.dtype = np.dtype(c.dtype)
        self.rng = as_generator(rng)
        shapes = param_shapes(c)
        self.layout, self.size = _layout(shapes)
        host = np.empty(self.size, dtype=self.dtype)
        for name, shape in shapes:                       # W and b of a layer: U(-1/sqrt(fan-in), 1/sqrt(fan-in))
            fan = self.layout[name[:-2] + ".W"][1][0]
            offset, n = self.layout[name][0], int(np.prod(shape))
            host[offset:offset + n] = self.rng.uniform(-1 / np.sqrt(fan), 1 / np.sqrt(fan), size=n)
        self.flat = asarray(host, self.xp, self.dtype)
        self.params = ParamDict(self.flat, self.layout)
        self.act_forward, self.act_backward = activation(c.activation)
        self.L2 = c.z2_dim
        self.L1 = c.z_dim - self.L2
        self.depth = {"q1": len(c.hidden), "q2": len(c.hidden2), "p1": len(c.hidden2), "px": len(c.hidden)}
        self.parts = {}

    # ----------------------------------------------------------- one MLP
    def _net_forward(self, net, h, heads):
        """The hidden layers of ``net`` then its heads: h (M, in) -> ([head outputs], cache)."""
        p, caches = self.params, []
        for i in range(self.depth[net]):
            h, c1 = dense_forward(h, p[f"{net}.{i}.W"], p[f"{net}.{i}.b"])
            h, c2 = self.act_forward(h)
            caches.append((c1, c2))
        outs, c_heads = [], []
        for head in heads:
            o, c = dense_forward(h, p[f"{net}.{head}.W"], p[f"{net}.{head}.b"])
            outs.append(o)
            c_heads.append(c)
        return outs, (caches, c_heads, heads)

    def _net_backward(self, net, douts, cache, grads):
        """dL/d(heads) -> dL/d(input); writes ``net``'s gradients.  The heads read the same h: their dh add."""
        caches, c_heads, heads = cache
        dh = 0
        for head, d, c in zip(heads, douts, c_heads):
            dx, grads[f"{net}.{head}.W"], grads[f"{net}.{head}.b"] = dense_backward(d, c)
            dh = dh + dx
        for i in reversed(range(self.depth[net])):
            c1, c2 = caches[i]
            dh = self.act_backward(dh, c2)
            dh, grads[f"{net}.{i}.W"], grads[f"{net}.{i}.b"] = dense_backward(dh, c1)
        return dh

    # ------------------------------------------------------------ the loss
    def _forward(self, x, eps):
        S, N, _ = eps.shape
        L1, L2, D = self.L1, self.L2, self.config.x_dim
        e1, e2 = eps[..., :L1], eps[..., L1:]
        (m1, l1), c_q1 = self._net_forward("q1", x, ("mu", "logvar"))
        z1, c_r1 = reparameterize_forward(m1, l1, e1)                                   # (S, N, L1)
        z1r = z1.reshape(S * N, L1)
        (m2, l2), c_q2 = self._net_forward("q2", z1r, ("mu", "logvar"))                # (S*N, L2) each
        z2, c_r2 = reparameterize_forward(m2, l2, e2.reshape(S * N, L2))
        (mp, lp), c_p1 = self._net_forward("p1", z2, ("mu", "logvar"))
        (logits,), c_px = self._net_forward("px", z1r, ("out",))
        rec, c_rec = LIKELIHOODS["bernoulli"].forward([logits.reshape(S, N, D)], x, self.config)   # (S, N)
        d1 = z1r - mp
        r = d1 * self.xp.exp(-lp)                                                       # (z1 - mp) / var
        log_p1 = (-0.5 * (d1 * r + lp + LOG_2PI).sum(axis=1)).reshape(S, N)
        log_p2 = log_standard_normal(z2).reshape(S, N)
        log_q1 = -0.5 * (e1 * e1 + l1 + LOG_2PI).sum(axis=-1)
        log_q2 = -0.5 * (e2 * e2 + l2.reshape(S, N, L2) + LOG_2PI).sum(axis=-1)
        log_w = -rec + log_p1 + log_p2 - log_q1 - log_q2
        cache = (S, N, d1, z2, r, c_q1, c_r1, c_q2, c_r2, c_p1, c_px, c_rec)
        return log_w, rec, (log_q1 + log_q2 - log_p1 - log_p2), cache

    def loss(self, x, eps=None, beta=1.0, n_samples=1, backward=True, validate=True, iwae_k=None, free_bits=0.0,
             y=None):
        """The negative IWAE bound with K = ``iwae_k`` draws (default ``n_samples`` = 1: the ELBO, every KL by
        Monte Carlo); eps (K, N, L1 + L2).  ``beta`` and ``free_bits`` are not offered for two layers."""
        if y is not None or free_bits or beta != 1.0:
            raise ValueError("two stochastic layers train on the ELBO or the IWAE bound (no labels, beta = 1, no "
                             "free bits)")
        K = iwae_k if iwae_k is not None else n_samples
        x = self.as_input(x, validate)
        eps = self.as_eps(eps, x.shape[0], K)
        log_w, rec, kl, cache = self._forward(x, eps)
        if iwae_k is None:                                     # the ELBO with S samples: mean of log w
            loss = -log_w.mean()
            c_obj = None
        else:
            loss, c_obj = iwae_forward(log_w)
        self.parts = {"loss": loss, "recon": rec.mean(), "kl": kl.mean()}
        if not backward:
            return loss, None
        S, N = log_w.shape
        one = self.xp.asarray(1.0, dtype=self.dtype)
        g = (self.xp.full((S, N), -1.0 / (S * N), dtype=self.dtype) if c_obj is None
             else iwae_backward(one, c_obj))                   # dloss/dlog w
        grads = self.new_grads()
        self._backward(g, cache, grads)
        return loss, grads

    def _backward(self, g, cache, grads):
        """dloss/dlog w (S, N) -> every parameter's gradient (the chain of the module docstring)."""
        S, N, d1, z2, r, c_q1, c_r1, c_q2, c_r2, c_p1, c_px, c_rec = cache
        L1, L2, D = self.L1, self.L2, self.config.x_dim
        gr = g.reshape(S * N, 1)
        dz2 = -gr * z2                                                     # log p(z2)
        dmp = gr * r                                                       # log p(z1|z2): d/dmp = r
        dlp = 0.5 * gr * (r * d1 - 1.0)                                    # d/dlp = 1/2 (r (z1 - mp) - 1)
        dz2 = dz2 + self._net_backward("p1", [dmp, dlp], c_p1, grads)
        dz1 = -gr * r                                                      # log p(z1|z2): d/dz1 = -r
        dm2, dl2 = reparameterize_backward(dz2, c_r2)                      # z2 = m2 + s2 eps2
        dl2 = dl2 + 0.5 * gr                                               # -log q(z2|z1) = 1/2 (... + l2 ...)
        dz1 = dz1 + self._net_backward("q2", [dm2, dl2], c_q2, grads)
        dlogits = LIKELIHOODS["bernoulli"].backward(-g, c_rec, self.config)[0]   # log p(x|z1) = -rec
        dz1 = dz1 + self._net_backward("px", [dlogits.reshape(S * N, D)], c_px, grads)
        dm1, dl1 = reparameterize_backward(dz1.reshape(S, N, L1), c_r1)   # z1 = m1 + s1 eps1, summed over S
        dl1 = dl1 + 0.5 * g.sum(axis=0)[:, None]                           # -log q(z1|x)
        self._net_backward("q1", [dm1, dl1], c_q1, grads)

    def kl_per_unit(self, x, eps):
        """Each latent unit's share of the Monte Carlo KL term, (S, N, L1 + L2); the L1 + L2 entries of a row sum
        to the ``kl`` of :meth:`loss` for the same eps (``parts["kl"]`` is their mean over S and N).

        With two stochastic layers the KL term is E_q[log q(z1|x) + log q(z2|z1) - log p(z1|z2) - log p(z2)], and
        every density is diagonal, so it splits over units (the log 2 pi terms cancel pairwise):

            z1 unit j:  log q(z1_j|x) - log p(z1_j|z2)  = 1/2 ((z1_j - mp_j)^2 / exp(lp_j) + lp_j - eps1_j^2 - l1_j)
            z2 unit k:  log q(z2_k|z1) - log p(z2_k)    = 1/2 (z2_k^2 - eps2_k^2 - l2_k)

        Columns :L1 are z1's units, L1: z2's.  A z1 entry is measured against the learned prior p(z1|z2), not
        N(0, 1), so it can be negative for one draw; it is not KL(q(z1_j|x) || N(0, 1)).
        """
        x = self.as_input(x, validate=False)
        eps = self.as_eps(eps, x.shape[0])
        S, N, _ = eps.shape
        L1, L2 = self.L1, self.L2
        e1, e2 = eps[..., :L1], eps[..., L1:].reshape(S * N, L2)
        (m1, l1), _ = self._net_forward("q1", x, ("mu", "logvar"))
        z1, _ = reparameterize_forward(m1, l1, e1)                                      # (S, N, L1)
        z1r = z1.reshape(S * N, L1)
        (m2, l2), _ = self._net_forward("q2", z1r, ("mu", "logvar"))
        z2, _ = reparameterize_forward(m2, l2, e2)                                      # (S*N, L2)
        (mp, lp), _ = self._net_forward("p1", z2, ("mu", "logvar"))
        d1 = z1r - mp
        k1 = 0.5 * (d1 * d1 * self.xp.exp(-lp) + lp - e1.reshape(S * N, L1) ** 2 - self.xp.broadcast_to(
            l1, (S, N, L1)).reshape(S * N, L1))
        k2 = 0.5 * (z2 * z2 - e2 * e2 - l2)
        return self.xp.concatenate([k1, k2], axis=1).reshape(S, N, L1 + L2)

    # ------------------------------------------------------------ the rest
    def log_weights(self, x, eps, y=None):
        """log w = log p(x|z1) + log p(z1|z2) + log p(z2) - log q(z1|x) - log q(z2|z1), (S, N)."""
        x = self.as_input(x, validate=False)
        return self._forward(x, self.as_eps(eps, x.shape[0]))[0]

    def encode(self, x, y=None):
        """The means and log-variances of q(z1|x) and of q(z2|z1 = m1(x)), joined: (N, L1 + L2) each."""
        x = self.as_input(x)
        (m1, l1), _ = self._net_forward("q1", x, ("mu", "logvar"))
        (m2, l2), _ = self._net_forward("q2", m1, ("mu", "logvar"))
        return self.xp.concatenate([m1, m2], axis=1), self.xp.concatenate([l1, l2], axis=1)

    def decode(self, z, y=None):
        """E[x|z1] for z (N, L1 + L2) or (N, L1): the decoder reads z1 only."""
        z = self.xp.asarray(z, dtype=self.dtype)[:, :self.L1]
        (logits,), _ = self._net_forward("px", z, ("out",))
        return LIKELIHOODS["bernoulli"].mean(logits)

    def sample(self, n, rng=None, y=None):
        """z2 ~ N(0, I), z1 ~ p(z1|z2), then E[x|z1]: (n, D)."""
        g = as_generator(rng) if rng is not None else self.rng
        z2 = self.xp.asarray(g.standard_normal((int(n), self.L2)), dtype=self.dtype)
        (mp, lp), _ = self._net_forward("p1", z2, ("mu", "logvar"))
        z1 = mp + self.xp.exp(0.5 * lp) * self.xp.asarray(g.standard_normal((int(n), self.L1)), dtype=self.dtype)
        return self.decode(z1)

    def __repr__(self):
        c = self.config
        return (f"TwoLayerVAE({c.x_dim}-{'-'.join(map(str, c.hidden))}-[z1 {self.L1}]-"
                f"{'-'.join(map(str, c.hidden2))}-[z2 {self.L2}], {c.activation}, {c.dtype}, backend={self.backend}, "
                f"{self.size} params)")


def work(config, labelled=False):
    """``(once, per_draw)`` multiply-adds per example (minivae.limits): q(z1|x) once; q(z2|z1), p(z1|z2) and
    p(x|z1) for every draw."""
    n = {net: sum(int(np.prod(s)) for name, s in param_shapes(config) if name.startswith(net + ".")
                  and name.endswith(".W"))                 # each weight once (the biases are adds)
         for net in ("q1", "q2", "p1", "px")}
    return n["q1"], n["q2"] + n["p1"] + n["px"]


def _register():
    from .model import ModelKind, register_model_kind
    register_model_kind("two_layer", ModelKind(TwoLayerConfig, TwoLayerVAE, param_shapes, work))


_register()
