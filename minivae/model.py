"""The VAE: a thin object that holds the parameters and chains the op pairs.

Generative model and recognition model (Kingma & Welling 2014):

    p(z)     = N(0, I)                                   z in R^L
    p(x|z)   = Bernoulli(sigmoid(f(z)))  or  N(f(z), var I)  or  N(f(z), diag exp(g(z)))
    q(z|x)   = N(mu(x), diag exp(logvar(x)))

The loss is the negative ELBO in nats per example, estimated with S samples
of eps ~ N(0, I) per example (z = mu + exp(logvar/2) * eps):

    loss = 1/N sum_n [ 1/S sum_s -log p(x_n | z_ns)  +  beta * KL(q(z|x_n) || p(z)) ]

Parameter names, in order (``model.params`` keeps this order):

    enc.0.W, enc.0.b, ..., enc.{K-1}.W, enc.{K-1}.b     encoder hidden layers
    enc.mu.W, enc.mu.b, enc.logvar.W, enc.logvar.b      the two Gaussian heads
    dec.0.W, dec.0.b, ..., dec.{K-1}.W, dec.{K-1}.b     decoder hidden layers (mirrored widths)
    dec.out.W, dec.out.b                                decoder output (logits or mean)
    dec.out_logvar.W, dec.out_logvar.b                  only for likelihood="gaussian_learned_var"

Every W is (in, out) and every layer computes y = x @ W + b on batch-first rows.

The networks are lists of layers (:mod:`minivae.networks`), each one op pair
with its parameters.  The model walks them: forward in order, backward in
reverse order (:meth:`VAE._layer_forward`, :meth:`VAE._layer_backward`, which look the layer's op up in
:data:`LAYER_OPS`).
Everything else -- reparameterization, KL, likelihood, the IWAE and free-bits
objectives, and their one shared backward (:meth:`VAE._loss_backward`) -- is
written once here, whatever the networks are.

A conditional VAE (``VAEConfig(n_classes=K)``, Sohn, Lee & Yan 2015) models p(x|y) for labels y in
0..K-1: q(z|x, y) and p(x|z, y), with the one-hot label joined to the input of each network's first
dense layer by a ``concat`` layer (:mod:`minivae.conditional`).  Every method that runs a network then
takes the labels ``y``, integer class indices (N,): ``loss(x, y=y)``, ``encode(x, y)``, ``decode(z, y)``,
``sample(n, y=7)``, ``log_weights(x, eps, y)``.  The objective chain is unchanged: the label is data,
the concat layer's backward keeps only the gradient of h.

All parameters live in one contiguous buffer, ``model.flat``; each entry of
``model.params`` is a reshaped view into it, and the gradients returned by
:meth:`VAE.loss` are views into a fresh buffer of the same layout
(``grads.flat``).  Optimizers use the flat buffers to update everything in a
few vectorised passes.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import numpy as np

from .backend import asarray, backend_name, get_backend, get_xp, to_numpy
from .config import VAEConfig
from .gaussian import (LOG_2PI, kl_backward, kl_forward, log_diag_normal, log_standard_normal,
                       reparameterize_backward, reparameterize_forward)
from . import networks
from .conditional import check_labels, concat_backward, concat_forward, one_hot, outer_backward, outer_forward
from .conv import (conv2d_backward, conv2d_forward, conv_transpose2d_backward, conv_transpose2d_forward,
                   maxpool2d_backward, maxpool2d_forward, upsample_nearest2d_backward, upsample_nearest2d_forward)
from .layers import activation, dense_backward, dense_forward
from .likelihoods import LIKELIHOODS, logvar_floor_forward
from .objectives import (free_bits_backward, free_bits_forward, iwae_backward, iwae_forward, kl_dim_backward,
                         kl_dim_forward)


class ParamDict(dict):
    """An ordered ``{name: array}`` dict whose arrays are views of ``self.flat``.

    Assigning to an existing key copies into the buffer (shape-checked), so
    the views stay views: ``model.params["dec.out.b"] = b0`` is safe.
    """

    def __init__(self, flat, layout):
        super().__init__()
        self.flat = flat
        self.layout = layout
        for name, (offset, shape) in layout.items():
            size = int(np.prod(shape))
            dict.__setitem__(self, name, flat[offset:offset + size].reshape(shape))

    def __setitem__(self, key, value):
        if key not in self:
            raise KeyError(f"unknown parameter {key!r}; known: {', '.join(self)}")
        dst = dict.__getitem__(self, key)
        if tuple(np.shape(value)) != dst.shape:
            raise ValueError(f"parameter {key!r} has shape {dst.shape}, got {tuple(np.shape(value))}")
        dst[...] = asarray(value, _module_of(dst))


def _module_of(a):
    from .backend import get_array_module
    return get_array_module(a)


def param_shapes(config):
    """Ordered list of ``(name, shape)`` for a config (see the module docstring), of its model kind."""
    return get_model_kind(config).param_shapes(config)


def _layout(shapes):
    layout, offset = {}, 0
    for name, shape in shapes:
        layout[name] = (offset, shape)
        offset += int(np.prod(shape))
    return layout, offset


def as_generator(rng):
    """A NumPy Generator from a Generator, an int seed, or None (seed 0)."""
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None:
        return np.random.default_rng(0)
    if isinstance(rng, (int, np.integer)):
        return np.random.default_rng(int(rng))
    raise TypeError(f"rng must be a numpy.random.Generator or an int seed, got {type(rng).__name__}")


def _check_objective(n_samples, iwae_k, free_bits):
    """Validate ``iwae_k`` and ``free_bits`` for :meth:`VAE.loss`; returns them normalised."""
    try:
        free_bits = float(free_bits)
    except (TypeError, ValueError):
        raise ValueError(f"free_bits must be a number >= 0, got {free_bits!r}") from None
    if not (free_bits >= 0 and np.isfinite(free_bits)):
        raise ValueError(f"free_bits must be a finite number >= 0, got {free_bits}")
    if iwae_k is not None:
        if isinstance(iwae_k, bool) or int(iwae_k) != iwae_k or iwae_k < 1:
            raise ValueError(f"iwae_k must be a positive integer, got {iwae_k}")
        iwae_k = int(iwae_k)
        if free_bits:
            raise ValueError("free_bits cannot be combined with iwae_k (the IWAE bound has no separate KL term)")
        if n_samples not in (1, iwae_k):
            raise ValueError(f"n_samples ({n_samples}) and iwae_k ({iwae_k}) disagree; give only iwae_k")
    return iwae_k, free_bits


def tile_labels(y, S):
    """The one-hot labels (N, K) repeated for S samples, (S*N, K) in the (s, n) row order of z; None stays None."""
    if y is None or S == 1:
        return y
    return y[None].repeat(S, axis=0).reshape(S * y.shape[0], -1)


# ----------------------------------------------------------------------------
# The layer ops: how the model runs each kind of layer of minivae.networks
# ----------------------------------------------------------------------------
# forward(model, layer, h, y) -> (out, cache);  backward(model, layer, dout, cache, grads) -> din.
# A layer with parameters reads params[name + ".W"] and params[name + ".b"] and writes the same keys of grads.
def _weights(model, layer):
    return model.params[layer.name + ".W"], model.params[layer.name + ".b"]


def _param_grads(result, layer, grads):
    """Write a backward's (din, dW, db) into ``grads`` and return din."""
    din, grads[layer.name + ".W"], grads[layer.name + ".b"] = result
    return din


def _dense_forward(model, layer, h, y):
    return dense_forward(h, *_weights(model, layer))                        # y = h @ W + b


def _dense_backward(model, layer, dout, cache, grads):
    return _param_grads(dense_backward(dout, cache), layer, grads)


def _conv_forward(model, layer, h, y):
    return conv2d_forward(h, *_weights(model, layer), *layer.arg)           # arg: (stride, padding)


def _conv_backward(model, layer, dout, cache, grads):
    return _param_grads(conv2d_backward(dout, cache), layer, grads)


def _deconv_forward(model, layer, h, y):
    return conv_transpose2d_forward(h, *_weights(model, layer), *layer.arg)


def _deconv_backward(model, layer, dout, cache, grads):
    return _param_grads(conv_transpose2d_backward(dout, cache), layer, grads)


def _act_forward(model, layer, h, y):
    return model.act_forward(h)                       # the config's activation


def _act_backward(model, layer, dout, cache, grads):
    return model.act_backward(dout, cache)


def _concat_forward(model, layer, h, y):
    return concat_forward(h, y)                       # [h, onehot(y)]: (N, H) -> (N, H + K)


def _concat_backward(model, layer, dout, cache, grads):
    return concat_backward(dout, cache)[0]            # a slice; the label is data: no gradient to y


def _outer_forward(model, layer, h, y):
    """[h, vec(h ⊗ y)]: (N, H) -> (N, H + H·K), the outer op's columns beside h itself (minivae.conditional)."""
    o, c_outer = outer_forward(h, y)                  # vec(h ⊗ onehot(y)): h copied into its class's block
    out, c_cat = concat_forward(h, o)
    return out, (c_cat, c_outer)


def _outer_backward(model, layer, dout, cache, grads):
    c_cat, c_outer = cache
    dh, do = concat_backward(dout, c_cat)             # the plain copy of h, and the outer product's columns
    dh = dh + outer_backward(do, c_outer)[0]          # h feeds both: add the two paths; no gradient to y (data)
    return dh


def _flatten_forward(model, layer, h, y):
    return h.reshape(h.shape[0], -1), h.shape          # (N, C, H, W) -> (N, C·H·W), (C, H, W) order


def _unflatten_forward(model, layer, h, y):
    return h.reshape((h.shape[0], *layer.arg)), h.shape   # (N, C·H·W) -> (N, C, H, W)


def _reshape_backward(model, layer, dout, cache, grads):
    return dout.reshape(cache)                        # a reshape: its backward reshapes back


def _maxpool_forward(model, layer, h, y):
    return maxpool2d_forward(h, *layer.arg)


def _maxpool_backward(model, layer, dout, cache, grads):
    return maxpool2d_backward(dout, cache)


def _upsample_forward(model, layer, h, y):
    return upsample_nearest2d_forward(h, *layer.arg)


def _upsample_backward(model, layer, dout, cache, grads):
    return upsample_nearest2d_backward(dout, cache)


LAYER_OPS = {
    "dense": (_dense_forward, _dense_backward),
    "conv": (_conv_forward, _conv_backward),
    "deconv": (_deconv_forward, _deconv_backward),
    "act": (_act_forward, _act_backward),
    "concat": (_concat_forward, _concat_backward),
    "outer": (_outer_forward, _outer_backward),
    "flatten": (_flatten_forward, _reshape_backward),
    "unflatten": (_unflatten_forward, _reshape_backward),
    "maxpool": (_maxpool_forward, _maxpool_backward),
    "upsample": (_upsample_forward, _upsample_backward),
}


def _layer_op(layer):
    """The (forward, backward) of ``layer.op``; ValueError naming the op when the table has none."""
    try:
        return LAYER_OPS[layer.op]
    except KeyError:
        raise ValueError(f"unknown layer op {layer.op!r} (layer {layer.name or 'without parameters'}); known: "
                         f"{', '.join(LAYER_OPS)}") from None


class VAE:
    """A VAE with hand-derived gradients (fully connected by default).

    ``VAE(config, rng)`` builds the parameters on the backend current at
    construction (see :mod:`minivae.backend`) and keeps it.  ``rng`` (a NumPy
    Generator or an int seed) draws the initial weights and, later, the eps
    noise whenever :meth:`loss` is called without ``eps``.

    Initialisation (the same as PyTorch's ``nn.Linear`` default): every W and
    b of a layer with fan-in ``m`` is drawn from U(-1/sqrt(m), 1/sqrt(m)).
    """

    def __init__(self, config=None, rng=None, backend=None):
        self.config = config if config is not None else VAEConfig()
        if not isinstance(self.config, VAEConfig):
            raise TypeError("config must be a minivae.VAEConfig")
        self.backend = backend or get_backend()
        self.xp = get_xp(self.backend)
        self.dtype = np.dtype(self.config.dtype)
        self.rng = as_generator(rng)
        self.net = networks.build(self.config)
        self.layout, self.size = _layout(param_shapes(self.config))
        host = np.empty(self.size, dtype=self.dtype)
        for layer in self.net.layers():                  # W and b of a layer share its fan-in
            if layer.name is None:
                continue
            bound = 1.0 / np.sqrt(networks.fan_in(layer.W))
            for name, shape in layer.param_shapes():
                offset, n = self.layout[name][0], int(np.prod(shape))
                host[offset:offset + n] = self.rng.uniform(-bound, bound, size=n)
        self.flat = asarray(host, self.xp, self.dtype)
        self.params = ParamDict(self.flat, self.layout)
        self.act_forward, self.act_backward = activation(self.config.activation)
        self.parts = {}

    # ------------------------------------------------------------------ utils
    def new_grads(self):
        """A zeroed gradient dict with the layout of ``params`` (``.flat`` too)."""
        return ParamDict(self.xp.zeros_like(self.flat), self.layout)

    def num_params(self):
        return self.size

    def as_input(self, x, validate=True):
        """Put x on the model's backend and dtype, and check it."""
        xp = self.xp
        if backend_name(_module_of(x)) != self.backend and self.backend == "numpy":
            x = to_numpy(x)
        x = xp.asarray(x, dtype=self.dtype)
        if x.ndim != 2 or x.shape[1] != self.config.x_dim:
            images = "" if self.config.image_shape is None else \
                f" (images {self.config.image_shape} flattened in (C, H, W) order)"
            raise ValueError(f"x must have shape (N, {self.config.x_dim}){images}, got {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError("x is empty (0 rows)")
        if validate:
            if not bool(xp.isfinite(x).all()):
                raise ValueError("x contains NaN or inf")
            lik = self.config.likelihood
            if LIKELIHOODS[lik].unit_interval and (float(x.min()) < 0 or float(x.max()) > 1):
                raise ValueError(f"x has values outside [0, 1] (min {float(x.min()):g}, max {float(x.max()):g}), "
                                 f"which the {lik} likelihood cannot score")
        return x

    def as_eps(self, eps, N, n_samples=None):
        """eps as (S, N, L) on the model's backend; drawn from self.rng if None."""
        L = self.config.z_dim
        if eps is None:
            if n_samples is None or int(n_samples) != n_samples or n_samples < 1:
                raise ValueError(f"n_samples must be a positive integer, got {n_samples}")
            eps = self.rng.standard_normal((int(n_samples), N, L), dtype=self.dtype)
        eps = self.xp.asarray(eps, dtype=self.dtype)
        if eps.ndim == 2:
            eps = eps[None]
        if eps.ndim != 3 or eps.shape[1:] != (N, L) or (n_samples not in (None, 1) and eps.shape[0] != n_samples):
            S = n_samples or "S"
            raise ValueError(f"eps must have shape ({S}, {N}, {L}) or ({N}, {L}), got {tuple(eps.shape)}")
        return eps

    def labels_one_hot(self, y, N):
        """The one-hot labels (N, K) of a conditional model, or None for an unconditional one (which takes no y)."""
        K = self.config.n_classes
        if K is None:
            if y is not None:
                raise ValueError("this VAE is unconditional (n_classes=None) and takes no labels y; build it with "
                                 "VAEConfig(n_classes=K) to condition on labels")
            return None
        if y is None:
            raise ValueError(f"this VAE is conditional (n_classes={K}): pass the labels y, integer class indices "
                             f"(N,) in 0..{K - 1}")
        return one_hot(check_labels(y, K, N), K, self.dtype, self.xp)

    # ---------------------------------------------------------------- pieces
    # The model's building blocks, public so that other code (the fast path of minivae.fast, the evaluation,
    # the lessons) can run one piece of the chain without copying it: put data on the model's backend
    # (as_input, as_eps, labels_one_hot), and the encoder and decoder forward and backward.
    def _layer_forward(self, layer, h, y=None):
        """One layer's op pair, forward: ``h -> (out, cache)``, through :data:`LAYER_OPS` (see :mod:`minivae.networks`).

        ``y`` is the one-hot label (rows of h, K), read by a ``concat`` layer only.  An op the table does not
        know raises ValueError.
        """
        return _layer_op(layer)[0](self, layer, h, y)

    def _layer_backward(self, layer, dout, cache, grads):
        """One layer's op pair, backward: dL/d(out) -> dL/d(in), through :data:`LAYER_OPS`.

        A layer with parameters writes its dL/dW and dL/db into ``grads[name + ".W"]`` and
        ``grads[name + ".b"]``.
        """
        return _layer_op(layer)[1](self, layer, dout, cache, grads)

    def encoder_forward(self, x, y=None):
        """x (N, D) [and the one-hot labels y (N, K) of a conditional model] -> ``(mu, logvar, cache)``.

        mu and logvar are (N, L).
        The cache is ``(caches, c_mu, c_lv)``: one cache per layer of ``self.net.encoder``
        (in forward order), then the caches of the mu and logvar heads.
        """
        h, caches = x, []
        for layer in self.net.encoder:
            h, c = self._layer_forward(layer, h, y)
            caches.append(c)
        head_mu, head_lv = self.net.enc_heads
        mu, c_mu = self._layer_forward(head_mu, h)
        logvar, c_lv = self._layer_forward(head_lv, h)
        return mu, logvar, (caches, c_mu, c_lv)

    def encoder_backward(self, dmu, dlogvar, cache, grads):
        """Backward through the encoder.

        dmu, dlogvar  dL/dmu and dL/dlogvar, (N, L) each: every path to the loss already added
                      (through z and through the KL or log q term)
        cache         what :meth:`encoder_forward` returned: the per-layer caches of the
                      encoder (forward order) and the caches of the two heads
        grads         the gradient dict (:meth:`new_grads`); every ``enc.*`` entry is written

        Returns dh = dL/dx (N, D), the gradient with respect to the encoder's input.
        """
        caches, c_mu, c_lv = cache
        head_mu, head_lv = self.net.enc_heads
        ### BEGIN SOLUTION vae_backward
        dh = self._layer_backward(head_mu, dmu, c_mu, grads)
        dh_lv = self._layer_backward(head_lv, dlogvar, c_lv, grads)
        dh += dh_lv                                    # h feeds both heads: add the two paths
        for layer, c in zip(reversed(self.net.encoder), reversed(caches)):
            dh = self._layer_backward(layer, dh, c, grads)
        ### END SOLUTION
        return dh

    def decoder_forward(self, z, y=None):
        """z (M, L) [and the one-hot labels y (M, K) of a conditional model] -> ``(outs, cache)``.

        outs is ``[out]`` (logits or mean) or ``[mean, logvar]`` for the learned variance,
        each (M, D) rows.  The cache is ``(caches, c_outs)``: one cache per layer of
        ``self.net.decoder`` (forward order), and for each head its cache and the shape of its
        output before it was flattened to rows.
        """
        h, caches = z, []
        for layer in self.net.decoder:
            h, c = self._layer_forward(layer, h, y)
            caches.append(c)
        outs, c_outs = [], []
        for head in self.net.dec_heads:
            out, c = self._layer_forward(head, h)
            outs.append(out.reshape(out.shape[0], -1))          # rows (M, D), in (C, H, W) order
            c_outs.append((c, out.shape))
        return outs, (caches, c_outs)

    def decoder_backward(self, douts, cache, grads):
        """Backward through the decoder.

        douts  dL/d(out) for each output of :meth:`decoder_forward`, (M, D) each
        cache  what :meth:`decoder_forward` returned: the per-layer caches of the decoder
               (forward order), and each head's cache with the shape of its output
        grads  the gradient dict (:meth:`new_grads`); every ``dec.*`` entry is written

        Returns dh = dL/dz (M, L), the gradient with respect to the decoder's input.
        """
        caches, c_outs = cache
        heads = self.net.dec_heads
        ### BEGIN SOLUTION vae_backward
        (c_out, shape), *rest = c_outs
        dh = self._layer_backward(heads[0], douts[0].reshape(shape), c_out, grads)
        for head, dout, (c, shape) in zip(heads[1:], douts[1:], rest):
            dh += self._layer_backward(head, dout.reshape(shape), c, grads)   # g feeds both heads: add
        for layer, c in zip(reversed(self.net.decoder), reversed(caches)):
            dh = self._layer_backward(layer, dh, c, grads)
        ### END SOLUTION
        return dh

    def _recon_forward(self, outs, x):
        """outs reshaped to (S, N, D) against x (N, D) -> nll (S, N), through the config's likelihood
        (:data:`minivae.likelihoods.LIKELIHOODS`; a learned log-variance with ``config.dec_logvar_min = m``
        first goes through the floor logvar' = m + softplus(logvar - m))."""
        return LIKELIHOODS[self.config.likelihood].forward(outs, x, self.config)

    def _recon_backward(self, dnll, cache):
        """dnll (S, N) -> [dL/d(out) for each decoder output], (S, N, D) each."""
        return LIKELIHOODS[self.config.likelihood].backward(dnll, cache, self.config)

    # ------------------------------------------------------------------- API
    def loss(self, x, eps=None, beta=1.0, n_samples=1, backward=True, validate=True, iwae_k=None,
             free_bits=0.0, y=None):
        """Mean negative ELBO (nats per example) and its gradients.

        x          (N, D) data on the model's scale ([0, 1] for Bernoulli)
        eps        optional noise, (S, N, L) or (N, L); drawn from ``self.rng`` if None
        beta       weight of the KL term (beta-VAE, KL warm-up); 1 gives the true ELBO
        n_samples  S, Monte-Carlo samples of z per example
        backward   False skips the gradients (returns ``(loss, None)``)
        iwae_k     K: optimise the IWAE bound with K samples instead; eps is then (K, N, L)
        free_bits  lambda >= 0: the KL term becomes sum_j max(lambda, mean_n KL_nj)
                   (free bits, Kingma et al. 2016; see :mod:`minivae.objectives`)
        y          labels (N,), integer class indices, for a conditional model (required there,
                   refused otherwise); the loss is then the negative ELBO of log p(x|y)

        The three objectives share the whole forward (encoder, reparameterization, decoder,
        likelihood, KL) and the whole backward (:meth:`_loss_backward`); only the last step, from
        the terms to one number, differs.

        IWAE (Burda et al. 2015), with the op pair in :mod:`minivae.objectives`:

            log w_nk = log p(x_n|z_nk) + beta * (log p(z_nk) - log q(z_nk|x_n)),
            z_nk = mu_n + sigma_n * eps_nk,      eps (K, N, L),
            loss = -1/N sum_n log (1/K) sum_k w_nk.

        beta (KL warm-up) weights the prior/posterior log-ratio inside each
        weight; beta = 1 is the true IWAE bound.  With K = 1 the loss is
        exactly the negative ELBO with the *Monte-Carlo* KL estimate,
        1/N sum_n [ -log p(x_n|z_n) + beta * (log q(z_n|x_n) - log p(z_n)) ],
        not the analytic-KL ELBO of the default path (equal only in
        expectation over eps).  log q(z|x) at z = mu + sigma * eps is
        -1/2 sum_j (eps_j^2 + logvar_j + log 2pi), since (z - mu)^2 / sigma^2 = eps^2.

        Free bits: loss = 1/(S N) sum rec + beta * sum_j max(lambda, KLbar_j),
        KLbar_j the batch-mean analytic KL of dimension j.  Free bits and IWAE
        are not combined (IWAE has no separate KL term).

        Returns ``(loss, grads)``: ``loss`` is a scalar on the model's backend,
        ``grads`` a dict with exactly the keys of ``params``.  The parts are in
        ``self.parts``: ``loss``, ``recon`` (mean -log p(x|z)) and ``kl``
        (mean analytic KL, not multiplied by beta; for IWAE it is reported only,
        not part of the objective), plus ``iwae_k`` for IWAE and
        ``kl_objective`` (the floored sum) for free bits.
        """
        # beta as a scalar of the model's dtype: under NumPy < 2's value-based casting, a Python float
        # times a float32 0-d array (kl.mean()) promotes to float64; NEP 50 (NumPy >= 2) keeps float32.
        # Casting it here gives float32 under both rules, and the same numbers as NumPy 2.
        beta = self.dtype.type(beta)
        objective = "elbo"
        if iwae_k is not None or free_bits:
            iwae_k, free_bits = _check_objective(n_samples, iwae_k, free_bits)
            objective = "iwae" if iwae_k is not None else "free_bits"
        x = self.as_input(x, validate)
        N, L, D = x.shape[0], self.config.z_dim, self.config.x_dim
        if eps is None and iwae_k is not None and iwae_k > self._iwae_chunk(N):
            # large K: the noise is drawn chunk by chunk too, so memory does not grow with K
            return self._iwae_chunked(x, None, beta, backward, self.labels_one_hot(y, N), n_samples=iwae_k)
        eps = self.as_eps(eps, N, iwae_k if iwae_k is not None else n_samples)
        S = eps.shape[0]
        if iwae_k is not None and S != iwae_k:
            raise ValueError(f"eps has {S} samples but iwae_k is {iwae_k}")
        y = self.labels_one_hot(y, N)                                     # one-hot (N, K), or None

        if iwae_k is not None and S > self._iwae_chunk(N):
            return self._iwae_chunked(x, eps, beta, backward, y)      # bounded memory for large K

        # ---- forward, shared by every objective
        mu, logvar, c_enc = self.encoder_forward(x, y)               # (N, L) each
        z, c_rep = reparameterize_forward(mu, logvar, eps)            # (S, N, L)
        outs, c_dec = self.decoder_forward(z.reshape(S * N, L), tile_labels(y, S))   # (S*N, D) each
        outs = [o.reshape(S, N, D) for o in outs]
        rec, c_rec = self._recon_forward(outs, x)                     # (S, N)
        kl, c_kl = kl_forward(mu, logvar)                             # (N,)
        recon_mean = rec.mean()
        kl_mean = kl.mean()

        # ---- the objective: from the terms to one number
        if objective == "elbo":
            loss = recon_mean + beta * kl_mean
            c_obj = c_kl
            self.parts = {"loss": loss, "recon": recon_mean, "kl": kl_mean}
        elif objective == "iwae":
            log_pz = log_standard_normal(z)                               # (S, N)
            log_qz = -0.5 * (eps * eps + logvar + LOG_2PI).sum(axis=-1)   # log q(z|x) via eps
            log_w = -rec + beta * (log_pz - log_qz)
            loss, c_obj = iwae_forward(log_w)
            self.parts = {"loss": loss, "recon": recon_mean, "kl": kl_mean, "iwae_k": iwae_k}
        else:
            kl_dim, c_kld = kl_dim_forward(mu, logvar)                    # (N, L)
            kl_obj, c_fb = free_bits_forward(kl_dim, free_bits)
            loss = recon_mean + beta * kl_obj
            c_obj = (c_kld, c_fb)
            self.parts = {"loss": loss, "recon": recon_mean, "kl": kl_mean, "kl_objective": kl_obj}
        if not backward:
            return loss, None

        grads = self.new_grads()
        self._loss_backward(objective, beta, (z, c_enc, c_rep, c_dec, c_rec, c_obj), grads)
        return loss, grads

    def _loss_backward(self, objective, beta, cache, grads):
        """The backward of :meth:`loss`, one chain for every objective; fills ``grads``.

        1. The objective's gradients with respect to its terms: drec = dloss/drec (S, N) and the
           direct paths from the loss to z and to (mu, logvar).

           * ELBO: loss = 1/(S N) sum_sn rec_sn + beta/N sum_n kl_n, so drec_sn = 1/(S N) and
             dkl_n = beta/N, pushed through the KL op to (dmu, dlogvar).  No direct path to z.
           * Free bits: drec as for the ELBO; beta goes through the floor
             (:func:`~minivae.objectives.free_bits_backward`) and the per-dimension KL.
           * IWAE: g_nk = dloss/dlog w_nk = -wtilde_nk / N (normalized importance weights,
             :func:`~minivae.objectives.iwae_backward`).  With eps held fixed:
             rec enters log w with a minus sign, so drec = -g;
             log p(z) = -1/2 |z|^2 - L/2 log 2pi has d/dz = -z, so dz gets beta * g * (-z);
             log q(z|x) = -1/2 sum_j (eps_j^2 + logvar_j + log 2pi) has total derivative 0 with
             respect to mu and -1/2 with respect to each logvar_j, so dlogvar gets
             -beta * sum_k g_nk * (-1/2).

        2. The chain, the same for all three: reconstruction -> decoder -> dz (+ the direct path)
           -> reparameterization -> (dmu, dlogvar) (+ the direct paths) -> encoder.
        """
        xp = self.xp
        z, c_enc, c_rep, c_dec, c_rec, c_obj = cache
        S, N, L = z.shape
        D = self.config.x_dim
        ### BEGIN SOLUTION vae_backward
        one = xp.asarray(1.0, dtype=self.dtype)
        dz_direct = 0                                                 # loss -> z, not through the decoder
        if objective == "iwae":
            g = iwae_backward(one, c_obj)                                 # (S, N) dloss/dlog w
            drec = -g                                                     # log w = -rec + ...
            dz_direct = -(beta * g)[..., None] * z                        # through log p(z): d/dz = -z
            dmu_direct = 0                                                # through -log q: 0 for mu
            dlogvar_direct = (0.5 * beta) * g.sum(axis=0)[:, None]       # ... and -(-1/2) per logvar_j
        else:
            drec = xp.full((S, N), 1.0 / (S * N), dtype=self.dtype)      # dloss/drec_sn
            if objective == "elbo":
                dkl = xp.full((N,), beta / N, dtype=self.dtype)           # dloss/dkl_n
                dmu_direct, dlogvar_direct = kl_backward(dkl, c_obj)
            else:
                c_kld, c_fb = c_obj
                dkl = free_bits_backward(beta * one, c_fb)                # (N, L)
                dmu_direct, dlogvar_direct = kl_dim_backward(dkl, c_kld)
        douts = self._recon_backward(drec, c_rec)                         # (S, N, D) each
        dz = self.decoder_backward([d.reshape(S * N, D) for d in douts], c_dec, grads).reshape(S, N, L)
        dz += dz_direct                                                   # z feeds the decoder (and log p(z))
        dmu, dlogvar = reparameterize_backward(dz, c_rep)
        dmu += dmu_direct                                                 # mu, logvar feed z and the KL
        dlogvar += dlogvar_direct
        self.encoder_backward(dmu, dlogvar, c_enc, grads)
        ### END SOLUTION

    # numbers of the widest decoder layer that one IWAE chunk may hold (2**22: 16 MB in float32)
    IWAE_CHUNK_ELEMENTS = 1 << 22

    def _iwae_chunk(self, N):
        """Samples per chunk of the IWAE bound: S*N rows of the widest layer within IWAE_CHUNK_ELEMENTS.

        The architecture says how wide its widest row is (``Architecture.widest_row``): max(D, hidden) for
        a dense decoder; a convolutional one holds patch matrices (im2col) of up to about 144·D numbers.
        """
        width = networks.get_architecture(self.config.arch).widest_row(self.config)
        return max(1, self.IWAE_CHUNK_ELEMENTS // (N * width))

    def _iwae_chunked(self, x, eps, beta, backward, y=None, n_samples=None):
        """The IWAE loss and gradients of :meth:`loss`, over the K samples in chunks.

        Same math, memory bounded by one chunk of samples whatever K is.  The normalized weights
        wtilde_kn = exp(log w_kn - m_n) / s_n need the per-example log-sum-exp first, so it takes two
        passes over the chunks: (1) forward only, keeping a running max m_n and sum s_n = sum_k exp(log w_kn
        - m_n) (rescaled when m_n grows: nothing of size K x N is kept); (2) forward again with caches, then
        the shared backward (:meth:`_loss_backward`) of each chunk with its wtilde, i.e. of g = dloss/dlog w.
        Every parameter's gradient is a sum over the chunks' rows (the encoder's too: its backward is linear
        in (dmu, dlogvar)), so the chunks' gradients add up to the one-block result, up to float summation order.

        ``eps=None`` (with ``n_samples`` = K): the noise is drawn from ``self.rng`` one chunk at a time, the
        same stream as one (K, N, L) draw; pass 2 draws the same chunks again from the saved generator state.
        """
        xp = self.xp
        N, L = x.shape[0], self.config.z_dim
        D = self.config.x_dim
        if eps is None:
            S = int(n_samples)
            start = self.rng.bit_generator.state

            def eps_of(s0, s1):
                return xp.asarray(self.rng.standard_normal((s1 - s0, N, L), dtype=self.dtype))
        else:
            S = eps.shape[0]

            def eps_of(s0, s1):
                return eps[s0:s1]
        step = self._iwae_chunk(N)
        mu, logvar, c_enc = self.encoder_forward(x, y)                 # y: one-hot (N, K), or None
        kl, _ = kl_forward(mu, logvar)

        def chunk_forward(s0, s1):
            e = eps_of(s0, s1)
            z, c_rep = reparameterize_forward(mu, logvar, e)              # (s, N, L)
            outs, c_dec = self.decoder_forward(z.reshape((s1 - s0) * N, L), tile_labels(y, s1 - s0))
            rec, c_rec = self._recon_forward([o.reshape(s1 - s0, N, D) for o in outs], x)   # (s, N)
            log_pz = log_standard_normal(z)
            log_qz = -0.5 * (e * e + logvar + LOG_2PI).sum(axis=-1)
            return rec, -rec + beta * (log_pz - log_qz), (z, c_enc, c_rep, c_dec, c_rec)

        m = s_run = None
        rec_sum = 0.0
        for s0 in range(0, S, step):                                      # pass 1: the log-sum-exp only
            s1 = min(S, s0 + step)
            rec, log_w, _ = chunk_forward(s0, s1)
            rec_sum = rec_sum + rec.sum()
            cm = log_w.max(axis=0)                                        # (N,)
            if m is None:
                m, s_run = cm, xp.exp(log_w - cm).sum(axis=0)
            else:                   # a stable running sum: rescale the old sum when the max grows
                new_m = xp.maximum(m, cm)
                s_run = s_run * xp.exp(m - new_m) + xp.exp(log_w - new_m).sum(axis=0)
                m = new_m
        bound = m + xp.log(s_run) - math.log(S)                          # L_K per example, as iwae_forward
        loss = -bound.mean()
        self.parts = {"loss": loss, "recon": rec_sum / (S * N), "kl": kl.mean(), "iwae_k": S}
        if not backward:
            return loss, None
        if eps is None:
            end = self.rng.bit_generator.state
            self.rng.bit_generator.state = start                          # pass 2 draws the same chunks again
        grads, part = self.new_grads(), self.new_grads()
        for s0 in range(0, S, step):                                      # pass 2: backward per chunk
            s1 = min(S, s0 + step)
            _, log_w, cache = chunk_forward(s0, s1)
            wtilde = xp.exp(log_w - m) / s_run                            # (s, N): this chunk's softmax weights
            self._loss_backward("iwae", beta, cache + ((wtilde, N),), part)
            grads.flat += part.flat
        if eps is None:
            self.rng.bit_generator.state = end
        return loss, grads

    def encode(self, x, y=None):
        """q(z|x) (or q(z|x, y) with labels y (N,)): ``(mu, logvar)``, each (N, L)."""
        x = self.as_input(x)
        mu, logvar, _ = self.encoder_forward(x, self.labels_one_hot(y, x.shape[0]))
        return mu, logvar

    def decode_raw(self, z, y=None):
        """Decoder outputs before the link: logits (Bernoulli) or mean [, logvar].  y: labels (N,) if conditional.

        The logvar here is the head's raw output, before the floor of ``config.dec_logvar_min``;
        :meth:`decode_logvar` gives the floored one that the likelihood uses.
        """
        z = self.xp.asarray(z, dtype=self.dtype)
        if z.ndim != 2 or z.shape[1] != self.config.z_dim:
            raise ValueError(f"z must have shape (N, {self.config.z_dim}), got {tuple(z.shape)}")
        outs, _ = self.decoder_forward(z, self.labels_one_hot(y, z.shape[0]))
        return outs

    def decode_logvar(self, z, y=None):
        """log Var[x_d|z], (N, D): the log-variance the likelihood uses.

        "gaussian_learned_var": the decoder's logvar head, through the floor when
        ``config.dec_logvar_min`` is set (:meth:`decode_raw` gives the head before the floor);
        "gaussian": log(obs_var) everywhere.  The Bernoulli likelihood has no variance parameter
        (Var[x_d|z] = p_d (1 - p_d)): ValueError.
        """
        lik = self.config.likelihood
        if lik == "bernoulli":
            raise ValueError("the Bernoulli likelihood has no log-variance output (its variance is p (1 - p))")
        outs = self.decode_raw(z, y)
        if lik == "gaussian":
            return self.xp.full_like(outs[0], np.log(self.config.obs_var))
        if self.config.dec_logvar_min is None:
            return outs[1]
        return logvar_floor_forward(outs[1], self.config.dec_logvar_min)[0]

    def decode(self, z, y=None):
        """E[x|z] (or E[x|z, y]): pixel probabilities (Bernoulli) or means (Gaussian), (N, D)."""
        return LIKELIHOODS[self.config.likelihood].mean(self.decode_raw(z, y)[0])

    def reconstruct(self, x, y=None):
        """decode(mu(x)) (or decode(mu(x, y), y)): the mean reconstruction, (N, D)."""
        return self.decode(self.encode(x, y)[0], y)

    def sample(self, n, rng=None, y=None):
        """n draws of E[x|z] with z ~ p(z) = N(0, I), (n, D).  rng: Generator or seed.

        A conditional model draws E[x|z, y]: ``y`` is one label for all n (``y=7``) or n labels (n,).
        """
        g = as_generator(rng) if rng is not None else self.rng
        z = g.standard_normal((int(n), self.config.z_dim)).astype(self.dtype)
        if y is not None and np.ndim(y) == 0 and self.config.n_classes is not None:
            y = np.full(int(n), y)
        return self.decode(z, y)

    def log_px_given_z(self, x, z, y=None):
        """log p(x|z) (or log p(x|z, y), labels y (N,)) for z (S, N, L) against x (N, D) -> (S, N)."""
        x = self.as_input(x, validate=False)
        S, N, L = z.shape
        y = self.labels_one_hot(y, N)
        outs, _ = self.decoder_forward(z.reshape(S * N, L), tile_labels(y, S))
        rec, _ = self._recon_forward([o.reshape(S, N, -1) for o in outs], x)
        return -rec

    def log_weights(self, x, eps, y=None):
        """Importance log-weights log p(x|z) + log p(z) - log q(z|x), (S, N).

        z = mu + sigma * eps with eps (S, N, L); this is the quantity the
        importance-weighted bound and estimator average (log-mean-exp over S).
        A conditional model takes the labels y (N,) and gives
        log p(x|z, y) + log p(z) - log q(z|x, y), whose log-mean-exp estimates log p(x|y).
        """
        x = self.as_input(x, validate=False)
        mu, logvar, _ = self.encoder_forward(x, self.labels_one_hot(y, x.shape[0]))
        eps = self.as_eps(eps, x.shape[0])
        z = reparameterize_forward(mu, logvar, eps)[0]
        return self.log_px_given_z(x, z, y) + log_standard_normal(z) - log_diag_normal(z, mu, logvar)

    def __repr__(self):
        c = self.config
        arch = "-".join(str(v) for v in (c.x_dim, *c.hidden, c.z_dim))
        if networks.get_architecture(c.arch).image:
            arch = f"{c.arch} {'x'.join(map(str, c.image_shape))}-{'-'.join(map(str, (*c.hidden, c.z_dim)))}"
        if c.n_classes is not None:
            arch += f" | y of {c.n_classes} classes"
        return (f"VAE({arch}, {c.activation}, {c.likelihood}, {c.dtype}, backend={self.backend}, "
                f"{self.size} params)")


# ----------------------------------------------------------------------------
# The registry of model kinds: which config class and model class a checkpoint's config names
# ----------------------------------------------------------------------------
class ModelKind(NamedTuple):
    """One kind of model: its config class (a VAEConfig subclass), its model class and its parameter shapes.

    A config says its kind by a class attribute ``kind`` (the plain VAEConfig has none: "vae"), and its
    ``to_dict`` writes it as the key "kind", so a checkpoint's config JSON names the class to build.
    """

    config: type
    model: type
    param_shapes: Callable
    work: Callable = None     # config, labelled -> (once, per_draw) multiply-adds per example (minivae.limits);
                              # None: the encoder's (enc.*) weights once, the decoder's (dec.*) per draw of z


MODEL_KINDS = {}   # name -> ModelKind


def register_model_kind(name, kind):
    """Make ``name`` a model kind that checkpoints, training and the command line can build."""
    if not isinstance(kind, ModelKind):
        raise TypeError(f"model kind {name!r}: expected a ModelKind, got {type(kind).__name__}")
    MODEL_KINDS[name] = kind
    return kind


def get_model_kind(config):
    """The :class:`ModelKind` of a config (``config.kind``, "vae" when it has none)."""
    name = getattr(config, "kind", "vae")
    try:
        return MODEL_KINDS[name]
    except KeyError:
        raise ValueError(f"unknown model kind {name!r}: known: {', '.join(MODEL_KINDS)}") from None


def config_from_dict(d):
    """The config of a dict written by ``config.to_dict()``, of the class its "kind" names (default "vae")."""
    d = dict(d)
    name = d.pop("kind", "vae")
    if name not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {name!r}: known: {', '.join(MODEL_KINDS)}")
    return MODEL_KINDS[name].config.from_dict(d)


def config_from_json(text):
    import json
    d = json.loads(text)
    if not isinstance(d, dict):
        raise ValueError("a model config must be a JSON object")
    return config_from_dict(d)


def build_model(config, rng=None, backend=None):
    """A model of the config's kind: ``VAE(config, rng, backend)`` or, e.g., ``FamilyVAE(...)``."""
    return get_model_kind(config).model(config, rng=rng, backend=backend)


# minivae.families registers "family" when the package is imported (minivae/__init__.py imports it)
register_model_kind("vae", ModelKind(VAEConfig, VAE, networks.param_shapes, networks.work))
