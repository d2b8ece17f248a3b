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
All parameters live in one contiguous buffer, ``model.flat``; each entry of
``model.params`` is a reshaped view into it, and the gradients returned by
:meth:`VAE.loss` are views into a fresh buffer of the same layout
(``grads.flat``).  Optimizers use the flat buffers to update everything in a
few vectorised passes.
"""
from __future__ import annotations

import numpy as np

from .backend import asarray, backend_name, get_backend, get_xp, to_numpy
from .config import VAEConfig
from .gaussian import (LOG_2PI, kl_backward, kl_forward, log_diag_normal, log_standard_normal,
                       reparameterize_backward, reparameterize_forward)
from .layers import activation, dense_backward, dense_forward, sigmoid
from .likelihoods import (bernoulli_nll_backward, bernoulli_nll_forward, gaussian_learned_var_nll_backward,
                          gaussian_learned_var_nll_forward, gaussian_nll_backward, gaussian_nll_forward)


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
    """Ordered list of ``(name, shape)`` for a config (see the module docstring)."""
    c = config
    shapes = []
    prev = c.x_dim
    for i, h in enumerate(c.hidden):
        shapes += [(f"enc.{i}.W", (prev, h)), (f"enc.{i}.b", (h,))]
        prev = h
    shapes += [("enc.mu.W", (prev, c.z_dim)), ("enc.mu.b", (c.z_dim,)),
               ("enc.logvar.W", (prev, c.z_dim)), ("enc.logvar.b", (c.z_dim,))]
    prev = c.z_dim
    for i, h in enumerate(reversed(c.hidden)):
        shapes += [(f"dec.{i}.W", (prev, h)), (f"dec.{i}.b", (h,))]
        prev = h
    shapes += [("dec.out.W", (prev, c.x_dim)), ("dec.out.b", (c.x_dim,))]
    if c.likelihood == "gaussian_learned_var":
        shapes += [("dec.out_logvar.W", (prev, c.x_dim)), ("dec.out_logvar.b", (c.x_dim,))]
    return shapes


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


class VAE:
    """A fully connected VAE with hand-derived gradients.

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
        shapes = param_shapes(self.config)
        self.layout, self.size = _layout(shapes)
        host = np.empty(self.size, dtype=self.dtype)
        for name, (offset, shape) in self.layout.items():
            fan_in = shape[0] if len(shape) == 2 else self._fan_in(name)
            bound = 1.0 / np.sqrt(fan_in)
            n = int(np.prod(shape))
            host[offset:offset + n] = self.rng.uniform(-bound, bound, size=n)
        self.flat = asarray(host, self.xp, self.dtype)
        self.params = ParamDict(self.flat, self.layout)
        self.act_forward, self.act_backward = activation(self.config.activation)
        self.parts = {}

    def _fan_in(self, bias_name):
        return self.layout[bias_name[:-1] + "W"][1][0]

    # ------------------------------------------------------------------ utils
    def new_grads(self):
        """A zeroed gradient dict with the layout of ``params`` (``.flat`` too)."""
        return ParamDict(self.xp.zeros_like(self.flat), self.layout)

    def num_params(self):
        return self.size

    def _as_input(self, x, validate=True):
        """Put x on the model's backend and dtype, and check it."""
        xp = self.xp
        if backend_name(_module_of(x)) != self.backend and self.backend == "numpy":
            x = to_numpy(x)
        x = xp.asarray(x, dtype=self.dtype)
        if x.ndim != 2 or x.shape[1] != self.config.x_dim:
            raise ValueError(f"x must have shape (N, {self.config.x_dim}), got {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError("x is empty (0 rows)")
        if validate:
            if not bool(xp.isfinite(x).all()):
                raise ValueError("x contains NaN or inf")
            if self.config.likelihood == "bernoulli" and (float(x.min()) < 0 or float(x.max()) > 1):
                raise ValueError(f"x has values outside [0, 1] (min {float(x.min()):g}, max {float(x.max()):g}), "
                                 "which a Bernoulli likelihood cannot score")
        return x

    def _as_eps(self, eps, N, n_samples=None):
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

    # ---------------------------------------------------------------- pieces
    def _encoder_forward(self, x):
        p, caches, h = self.params, [], x
        for i in range(len(self.config.hidden)):
            a, c_dense = dense_forward(h, p[f"enc.{i}.W"], p[f"enc.{i}.b"])
            h, c_act = self.act_forward(a)
            caches.append((c_dense, c_act))
        mu, c_mu = dense_forward(h, p["enc.mu.W"], p["enc.mu.b"])
        logvar, c_lv = dense_forward(h, p["enc.logvar.W"], p["enc.logvar.b"])
        return mu, logvar, (caches, c_mu, c_lv)

    def _encoder_backward(self, dmu, dlogvar, cache, grads):
        caches, c_mu, c_lv = cache
        ### BEGIN SOLUTION vae_backward
        dh, grads["enc.mu.W"], grads["enc.mu.b"] = dense_backward(dmu, c_mu)
        dh_lv, grads["enc.logvar.W"], grads["enc.logvar.b"] = dense_backward(dlogvar, c_lv)
        dh += dh_lv                                    # h feeds both heads: add the two paths
        for i in reversed(range(len(self.config.hidden))):
            c_dense, c_act = caches[i]
            da = self.act_backward(dh, c_act)
            dh, grads[f"enc.{i}.W"], grads[f"enc.{i}.b"] = dense_backward(da, c_dense)
        ### END SOLUTION
        return dh

    def _decoder_forward(self, z):
        """z (M, L) -> raw outputs: (out,) or (mean, logvar) for the learned variance."""
        p, caches, h = self.params, [], z
        for i in range(len(self.config.hidden)):
            a, c_dense = dense_forward(h, p[f"dec.{i}.W"], p[f"dec.{i}.b"])
            h, c_act = self.act_forward(a)
            caches.append((c_dense, c_act))
        out, c_out = dense_forward(h, p["dec.out.W"], p["dec.out.b"])
        outs, c_outs = [out], [c_out]
        if self.config.likelihood == "gaussian_learned_var":
            olv, c_olv = dense_forward(h, p["dec.out_logvar.W"], p["dec.out_logvar.b"])
            outs.append(olv)
            c_outs.append(c_olv)
        return outs, (caches, c_outs)

    def _decoder_backward(self, douts, cache, grads):
        caches, c_outs = cache
        ### BEGIN SOLUTION vae_backward
        dh, grads["dec.out.W"], grads["dec.out.b"] = dense_backward(douts[0], c_outs[0])
        if len(douts) == 2:
            dh2, grads["dec.out_logvar.W"], grads["dec.out_logvar.b"] = dense_backward(douts[1], c_outs[1])
            dh += dh2
        for i in reversed(range(len(self.config.hidden))):
            c_dense, c_act = caches[i]
            da = self.act_backward(dh, c_act)
            dh, grads[f"dec.{i}.W"], grads[f"dec.{i}.b"] = dense_backward(da, c_dense)
        ### END SOLUTION
        return dh

    def _recon_forward(self, outs, x):
        """outs reshaped to (S, N, D) against x (N, D) -> nll (S, N)."""
        lik = self.config.likelihood
        if lik == "bernoulli":
            return bernoulli_nll_forward(outs[0], x)
        if lik == "gaussian":
            return gaussian_nll_forward(outs[0], x, self.config.obs_var)
        return gaussian_learned_var_nll_forward(outs[0], outs[1], x)

    def _recon_backward(self, dnll, cache):
        lik = self.config.likelihood
        if lik == "bernoulli":
            return [bernoulli_nll_backward(dnll, cache)]
        if lik == "gaussian":
            return [gaussian_nll_backward(dnll, cache)]
        return list(gaussian_learned_var_nll_backward(dnll, cache))

    # ------------------------------------------------------------------- API
    def loss(self, x, eps=None, beta=1.0, n_samples=1, backward=True, validate=True, iwae_k=None,
             free_bits=0.0):
        """Mean negative ELBO (nats per example) and its gradients.

        x          (N, D) data on the model's scale ([0, 1] for Bernoulli)
        eps        optional noise, (S, N, L) or (N, L); drawn from ``self.rng`` if None
        beta       weight of the KL term (beta-VAE, KL warm-up); 1 gives the true ELBO
        n_samples  S, Monte-Carlo samples of z per example
        backward   False skips the gradients (returns ``(loss, None)``)
        iwae_k     K: optimise the IWAE bound with K samples instead (see
                   :meth:`_objective_loss`); eps is then (K, N, L)
        free_bits  lambda >= 0: the KL term becomes sum_j max(lambda, mean_n KL_nj)
                   (free bits, Kingma et al. 2016; see :mod:`minivae.objectives`)

        Returns ``(loss, grads)``: ``loss`` is a scalar on the model's backend,
        ``grads`` a dict with exactly the keys of ``params``.  The parts are in
        ``self.parts``: ``loss``, ``recon`` (mean -log p(x|z)) and ``kl``
        (mean KL, not multiplied by beta).
        """
        # beta as a scalar of the model's dtype: under NumPy < 2's value-based casting, a Python float
        # times a float32 0-d array (kl.mean()) promotes to float64; NEP 50 (NumPy >= 2) keeps float32.
        # Casting it here gives float32 under both rules, and the same numbers as NumPy 2.
        beta = self.dtype.type(beta)
        if iwae_k is not None or free_bits:
            return self._objective_loss(x, eps, beta, n_samples, backward, validate, iwae_k, free_bits)
        xp = self.xp
        x = self._as_input(x, validate)
        N, L, D = x.shape[0], self.config.z_dim, self.config.x_dim
        eps = self._as_eps(eps, N, n_samples)
        S = eps.shape[0]

        # ---- forward
        mu, logvar, c_enc = self._encoder_forward(x)                  # (N, L) each
        z, c_rep = reparameterize_forward(mu, logvar, eps)            # (S, N, L)
        outs, c_dec = self._decoder_forward(z.reshape(S * N, L))      # (S*N, D) each
        outs = [o.reshape(S, N, D) for o in outs]
        rec, c_rec = self._recon_forward(outs, x)                     # (S, N)
        kl, c_kl = kl_forward(mu, logvar)                             # (N,)
        recon_mean = rec.mean()
        kl_mean = kl.mean()
        loss = recon_mean + beta * kl_mean
        self.parts = {"loss": loss, "recon": recon_mean, "kl": kl_mean}
        if not backward:
            return loss, None

        # ---- backward: loss = 1/(S N) sum_sn rec_sn + beta/N sum_n kl_n
        grads = self.new_grads()
        ### BEGIN SOLUTION vae_backward
        drec = xp.full((S, N), 1.0 / (S * N), dtype=self.dtype)      # dloss/drec_sn
        douts = self._recon_backward(drec, c_rec)                     # (S, N, D) each
        dz = self._decoder_backward([d.reshape(S * N, D) for d in douts], c_dec, grads)
        dmu, dlogvar = reparameterize_backward(dz.reshape(S, N, L), c_rep)
        dkl = xp.full((N,), beta / N, dtype=self.dtype)               # dloss/dkl_n
        dmu_kl, dlogvar_kl = kl_backward(dkl, c_kl)
        dmu += dmu_kl
        dlogvar += dlogvar_kl
        self._encoder_backward(dmu, dlogvar, c_enc, grads)
        ### END SOLUTION
        return loss, grads

    def _objective_loss(self, x, eps, beta, n_samples, backward, validate, iwae_k, free_bits):
        """The IWAE bound (``iwae_k=K``) or the ELBO with free bits (``free_bits=lambda``).

        IWAE (Burda et al. 2015), with the op pair in :mod:`minivae.objectives`:

            log w_nk = log p(x_n|z_nk) + beta * (log p(z_nk) - log q(z_nk|x_n)),
            z_nk = mu_n + sigma_n * eps_nk,      eps (K, N, L),
            loss = -1/N sum_n log (1/K) sum_k w_nk.

        beta (KL warm-up) weights the prior/posterior log-ratio inside each
        weight; beta = 1 is the true IWAE bound.  With K = 1 the loss is
        exactly the negative ELBO with the *Monte-Carlo* KL estimate,
        1/N sum_n [ -log p(x_n|z_n) + beta * (log q(z_n|x_n) - log p(z_n)) ],
        not the analytic-KL ELBO of the default path (equal only in
        expectation over eps).

        Backward.  g_nk = d loss / d log w_nk = -wtilde_nk / N (normalized
        importance weights, :func:`~minivae.objectives.iwae_backward`).  Then,
        with eps held fixed:

        * log p(x|z): the reconstruction term rec = -log p(x|z) gets
          d loss / d rec_nk = -g_nk, pushed through the decoder to dz.
        * log p(z) = -1/2 |z|^2 - L/2 log 2pi:  d/dz = -z, so dz += beta * g * (-z).
          dz then goes through z = mu + sigma * eps to (dmu, dlogvar).
        * log q(z|x) at z = mu + sigma * eps: (z - mu)^2 / sigma^2 = eps^2, so
          log q = -1/2 sum_j (eps_j^2 + logvar_j + log 2pi).  Its total
          derivative is 0 with respect to mu and -1/2 with respect to each
          logvar_j (the dependence through z and the direct one cancel for
          mu).  Hence dlogvar_nj += -beta * sum_k g_nk * (-1/2).

        ``self.parts`` for IWAE: ``loss`` (-L_K), ``recon`` (mean over samples
        and examples of -log p(x|z)), ``kl`` (analytic mean KL, for reporting
        only: it is not part of the IWAE objective) and ``iwae_k``.

        Free bits: loss = 1/(S N) sum rec + beta * sum_j max(lambda, KLbar_j),
        KLbar_j the batch-mean analytic KL of dimension j.  ``parts["kl"]``
        stays the true mean KL; ``parts["kl_objective"]`` is the floored sum.
        Free bits and IWAE are not combined (IWAE has no separate KL term).
        """
        from .objectives import (free_bits_backward, free_bits_forward, iwae_backward, iwae_forward,
                                 kl_dim_backward, kl_dim_forward)
        xp = self.xp
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
        x = self._as_input(x, validate)
        N, L, D = x.shape[0], self.config.z_dim, self.config.x_dim
        eps = self._as_eps(eps, N, iwae_k if iwae_k is not None else n_samples)
        S = eps.shape[0]
        if iwae_k is not None and S != iwae_k:
            raise ValueError(f"eps has {S} samples but iwae_k is {iwae_k}")

        mu, logvar, c_enc = self._encoder_forward(x)
        z, c_rep = reparameterize_forward(mu, logvar, eps)                # (S, N, L)
        outs, c_dec = self._decoder_forward(z.reshape(S * N, L))
        outs = [o.reshape(S, N, D) for o in outs]
        rec, c_rec = self._recon_forward(outs, x)                         # (S, N)
        kl, _ = kl_forward(mu, logvar)
        recon_mean = rec.mean()
        if iwae_k is not None:
            log_pz = log_standard_normal(z)                               # (S, N)
            log_qz = -0.5 * (eps * eps + logvar + LOG_2PI).sum(axis=-1)   # log q(z|x) via eps
            log_w = -rec + beta * (log_pz - log_qz)
            loss, c_iw = iwae_forward(log_w)
            self.parts = {"loss": loss, "recon": recon_mean, "kl": kl.mean(), "iwae_k": iwae_k}
        else:
            kl_dim, c_kld = kl_dim_forward(mu, logvar)                    # (N, L)
            kl_obj, c_fb = free_bits_forward(kl_dim, free_bits)
            loss = recon_mean + beta * kl_obj
            self.parts = {"loss": loss, "recon": recon_mean, "kl": kl.mean(), "kl_objective": kl_obj}
        if not backward:
            return loss, None

        grads = self.new_grads()
        one = xp.asarray(1.0, dtype=self.dtype)
        if iwae_k is not None:
            g = iwae_backward(one, c_iw)                                  # (S, N) d loss / d log w
            drec = -g
        else:
            drec = xp.full((S, N), 1.0 / (S * N), dtype=self.dtype)
        douts = self._recon_backward(drec, c_rec)
        dz = self._decoder_backward([d.reshape(S * N, D) for d in douts], c_dec, grads).reshape(S, N, L)
        if iwae_k is not None:
            dz = dz - (beta * g)[..., None] * z                           # through log p(z): d/dz = -z
        dmu, dlogvar = reparameterize_backward(dz, c_rep)
        if iwae_k is not None:
            dlogvar = dlogvar + (0.5 * beta) * g.sum(axis=0)[:, None]     # through -log q: -(-1/2) per dim
        else:
            dkl = free_bits_backward(beta * one, c_fb)                    # (N, L)
            dmu_kl, dlogvar_kl = kl_dim_backward(dkl, c_kld)
            dmu = dmu + dmu_kl
            dlogvar = dlogvar + dlogvar_kl
        self._encoder_backward(dmu, dlogvar, c_enc, grads)
        return loss, grads

    def encode(self, x):
        """q(z|x): ``(mu, logvar)``, each (N, L)."""
        mu, logvar, _ = self._encoder_forward(self._as_input(x))
        return mu, logvar

    def decode_raw(self, z):
        """Decoder outputs before the link: logits (Bernoulli) or mean [, logvar]."""
        z = self.xp.asarray(z, dtype=self.dtype)
        if z.ndim != 2 or z.shape[1] != self.config.z_dim:
            raise ValueError(f"z must have shape (N, {self.config.z_dim}), got {tuple(z.shape)}")
        outs, _ = self._decoder_forward(z)
        return outs

    def decode(self, z):
        """E[x|z]: pixel probabilities (Bernoulli) or means (Gaussian), (N, D)."""
        outs = self.decode_raw(z)
        if self.config.likelihood == "bernoulli":
            return sigmoid(outs[0])
        return outs[0]

    def reconstruct(self, x):
        """decode(mu(x)): the mean reconstruction, (N, D)."""
        return self.decode(self.encode(x)[0])

    def sample(self, n, rng=None):
        """n draws of E[x|z] with z ~ p(z) = N(0, I), (n, D).  rng: Generator or seed."""
        g = as_generator(rng) if rng is not None else self.rng
        z = g.standard_normal((int(n), self.config.z_dim)).astype(self.dtype)
        return self.decode(z)

    def log_px_given_z(self, x, z):
        """log p(x|z) for z (S, N, L) against x (N, D) -> (S, N)."""
        x = self._as_input(x, validate=False)
        S, N, L = z.shape
        outs, _ = self._decoder_forward(z.reshape(S * N, L))
        rec, _ = self._recon_forward([o.reshape(S, N, -1) for o in outs], x)
        return -rec

    def log_weights(self, x, eps):
        """Importance log-weights log p(x|z) + log p(z) - log q(z|x), (S, N).

        z = mu + sigma * eps with eps (S, N, L); this is the quantity the
        importance-weighted bound and estimator average (log-mean-exp over S).
        """
        x = self._as_input(x, validate=False)
        mu, logvar, _ = self._encoder_forward(x)
        eps = self._as_eps(eps, x.shape[0])
        z = reparameterize_forward(mu, logvar, eps)[0]
        return self.log_px_given_z(x, z) + log_standard_normal(z) - log_diag_normal(z, mu, logvar)

    def __repr__(self):
        c = self.config
        arch = "-".join(str(v) for v in (c.x_dim, *c.hidden, c.z_dim))
        return (f"VAE({arch}, {c.activation}, {c.likelihood}, {c.dtype}, backend={self.backend}, "
                f"{self.size} params)")
