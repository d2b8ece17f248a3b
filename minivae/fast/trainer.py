"""An optimized training step for the dense VAE: the reference path's numbers, written for speed.

The reference path (:meth:`minivae.model.VAE.loss` followed by :meth:`minivae.optim.Adam.step`) is the code
to read: one op pair per line, each with its derivation.  :class:`FastTrainer` computes *the same numbers* --
the same loss, the same gradients, the same Adam update -- but is written for speed.  ``tests/test_fast.py``
checks it against the reference op by op and for whole training steps.

    trainer = FastTrainer(model, Adam(lr=1e-3))
    for xb in batches:                       # xb (N, D) float32
        eps = rng.standard_normal((len(xb), model.config.z_dim), dtype=np.float32)
        loss = trainer.step(xb, eps)         # updates model.params in place

It trains the model's own parameters (``model.flat``), so the model stays usable afterwards (encode, decode,
checkpoints), and it keeps the optimizer's state in the optimizer (``opt.state_dict()`` works).

The step is written once, for every device: the trainer runs the matrix products, and an "ops" object does
the elementwise work -- :class:`~minivae.fast.ops_numpy.NumpyOps` (NumPy ufuncs),
:class:`~minivae.fast.ops_numba.NumbaOps` (fused CPU kernels, when numba is installed) or
:class:`~minivae.fast.ops_cupy.CupyOps` (fused CUDA kernels, nothing synchronises with the host).

What is done differently from the reference, and why it is the same math:

* **No per-step allocations.**  Every activation and gradient lives in a buffer allocated once per batch
  size (:class:`Buffers`); ops write with ``out=`` or in place.
* **The two Gaussian heads are one matmul.**  ``[mu | logvar] = h @ [W_mu | W_lv]`` is one (H, 2L) product
  instead of two (H, L) ones; backward likewise gives
  ``dh = [dmu | dlogvar] @ [W_mu | W_lv].T = dmu @ W_mu.T + dlogvar @ W_lv.T``.
* **Weight gradients are written straight into the flat gradient buffer**
  (``np.matmul(h.T, d, out=grads["dec.out.W"])``), which is what Adam reads.
* **The Bernoulli loss and its gradient share one exponential.**  With ``e = exp(-|l|)`` and
  ``r = 1 / (1 + e)``: ``softplus(l) = max(l, 0) + log1p(e)`` and ``sigmoid(l) = r`` (l >= 0) or ``e r`` (l < 0).
* **The 1/N of the mean is applied once**, to dlogits (and to the KL gradient), exactly where the
  reference's ``drec = 1/N`` lands.
* **The input layer's dx is never computed** (nothing needs dL/dx).
* **Adam runs over the flat buffer** (:mod:`minivae.fast.adam`), with the reference's exact op sequence.
* **Two half-batches at once (CPU, opt-in: ``threads=2, split=True``).**  The loss and every gradient are
  sums over the rows of the batch, so rows [0, h) and [h, N) can be computed separately -- each half with the
  same 1/N -- and added.  The halves run on two Python threads with one-thread BLAS calls (NumPy releases the
  GIL in matmul and in ufuncs), so the elementwise work of one half overlaps the other half's matmuls; the
  second half's gradients are added inside the Adam pass.  The grouping is fixed (first half + second half),
  so results are deterministic.

Supported: any hidden depth; every registered activation (ReLU is specialised, the others use the model's op
pair); Bernoulli and fixed-variance Gaussian likelihoods; one sample of z per example.  A learned output
variance, the convolutional architectures and the conditional VAE (``n_classes``) raise
:class:`FastPathError`: use the reference path for them (``minivae.train`` does so by itself).
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..backend import get_array_module
from ..optim import Adam
from . import cpu_kernels
from .adam import adam_begin_step, plain_adam
from .ops_numpy import NumpyOps, run_halves
from .threads import blas_control_available, set_blas_threads


class FastPathError(ValueError):
    """The fast path does not support this model or optimizer configuration."""


def check_supported(config):
    """Raise :class:`FastPathError` (one line) if the fast path cannot train ``config``."""
    if getattr(config, "kind", "vae") != "vae":
        raise FastPathError(f"the fast path covers the plain VAE, not the {config.kind!r} model kind "
                            "(minivae.families, minivae.twolayer, minivae.m2); use model.loss + optimizer.step instead")
    if getattr(config, "arch", "mlp") != "mlp":
        raise FastPathError(f"the fast path supports the fully connected VAE (arch 'mlp'), not arch "
                            f"{config.arch!r}; use model.loss + optimizer.step instead")
    if getattr(config, "dec_logvar_min", None) is not None:
        raise FastPathError("the fast path has no floor on the decoder's log-variance (dec_logvar_min); "
                            "use model.loss + optimizer.step instead")
    if getattr(config, "n_classes", None) is not None:
        raise FastPathError(f"the fast path supports the unconditional VAE, not a conditional one (n_classes="
                            f"{config.n_classes}); use model.loss(x, y=labels) + optimizer.step instead")
    if config.likelihood not in ("bernoulli", "gaussian"):
        raise FastPathError(f"the fast path supports the 'bernoulli' and 'gaussian' likelihoods, not "
                            f"{config.likelihood!r}; use model.loss + optimizer.step instead")


# Batches of fewer rows are not split: two halves of < 32 rows save less than the thread hand-off costs.
SPLIT_MIN_ROWS = 64


class Buffers:
    """Every array one training step at batch size N needs, allocated once."""

    def __init__(self, xp, dtype, N, config):
        e = lambda *shape: xp.empty(shape, dtype=dtype)  # noqa: E731
        H, L, D = config.hidden, config.z_dim, config.x_dim
        self.enc = [e(N, h) for h in H]              # encoder activations (in place: pre-act -> act)
        self.heads = e(N, 2 * L)                     # [mu | logvar]
        self.sig = e(N, L)
        self.z = e(N, L)
        self.dec = [e(N, h) for h in reversed(H)]
        self.out = e(N, D)                           # logits / means
        self.dout = e(N, D)                          # dloss/dlogits
        self.t1 = e(N, D)                            # scratch for the likelihood
        self.t2 = e(N, D)
        self.prod = e(2, D)                          # one row per thread
        widths = list(H) + [L]
        self.dh = {w: e(N, w) for w in set(widths) | {2 * L}}   # upstream gradients by width
        self.dheads = self.dh[2 * L]
        Hl = H[-1] if H else D
        self.dW_heads = e(Hl, 2 * L)                 # gradient of [W_mu | W_lv] and [b_mu | b_lv]
        self.db_heads = e(2 * L)
        self.mask = {w: xp.empty((N, w), dtype=bool) for w in set(H) | {D}}
        self.vectors = {}                            # the fused kernels' small scratch vectors, by name

    def vector(self, name, n, dtype=np.float64):
        """A host scratch vector of n entries (the fused kernels' partial sums, float64, and outputs they
        overwrite).  Its contents are whatever was there: callers write before they read."""
        a = self.vectors.get(name)
        if a is None or a.shape[0] != n or a.dtype != dtype:
            a = self.vectors[name] = np.empty(n, dtype=dtype)
        return a


def device_ops(model, threads=1, fused=None, pool=None, block=1 << 20):
    """The elementwise ops for ``model``'s backend: CuPy's kernels, numba's fused kernels (``fused`` None:
    when numba is there; True: required; False: never) or NumPy's ufuncs."""
    if fused and (model.backend != "numpy" or not cpu_kernels.AVAILABLE):
        raise ValueError("fused=True needs numba (pip install numba) and the NumPy backend")
    if model.backend == "cupy":
        from .ops_cupy import CupyOps
        return CupyOps(model.config, model.dtype)
    if fused is not False and cpu_kernels.AVAILABLE and model.dtype in (np.float32, np.float64):
        from .ops_numba import NumbaOps
        return NumbaOps(model.config, model.dtype, threads)
    return NumpyOps(model.config, model.dtype, pool, block)


class FastTrainer:
    """Fast loss, gradients and Adam step for a :class:`~minivae.model.VAE`.

    ``model``      the VAE to train (its ``flat`` buffer is updated in place)
    ``optimizer``  an optimizer from :mod:`minivae.optim`; a plain Adam (no weight decay, no clipping) gets
                   the fused update, anything else falls back to ``optimizer.step``
    ``threads``    CPU only: threads for the step (default 1; ``train`` passes
                   :func:`minivae.fast.threads.count`).  With the fused kernels, the number of cores they use
                   (BLAS has its own setting).  Without them, 2 or more means that Adam is split across two
                   Python threads, and so is the batch (``split``) or else the Bernoulli chain (batches of
                   128 rows or more)
    ``split``      CPU, 2 threads or more: each batch of ``SPLIT_MIN_ROWS`` rows or more is cut into two
                   halves whose forward and backward passes run at the same time, one per thread, each with
                   one-thread BLAS calls; the second half's gradients are added to the first's inside the
                   Adam update.  Needs threadpoolctl to set BLAS's thread count (to 1 while the two halves
                   run, then back).  Default off: no faster than multi-threaded BLAS on an idle machine, much
                   more robust when another process holds a core (benchmarks/README.md, "Notes from the code")
    ``block``      elements per Adam block (NumPy ufunc code)
    ``fused``      CPU only: use the fused kernels of :mod:`minivae.fast.cpu_kernels` (needs numba).  None
                   (default): when numba is importable; False: the NumPy ufunc code; True: require them

    The split changes nothing in the math: the loss and the gradients are sums over rows, and the split only
    groups those sums as (rows of the first half) + (rows of the second half), in a fixed order, so a step is
    deterministic and differs from the unsplit step by float rounding only.

    :meth:`loss_and_grads` returns the mean negative ELBO and the gradients (views of one flat buffer,
    reused between calls); :meth:`step` also applies the optimizer.  ``self.parts`` holds ``loss``,
    ``recon``, ``kl``.  ``self.ops`` is the device's elementwise ops.
    """

    def __init__(self, model, optimizer=None, threads=1, block=1 << 20, split=False, fused=None):
        check_supported(model.config)
        if int(threads) != threads or threads < 1:
            raise ValueError(f"threads must be a positive integer, got {threads}")
        self.model = model
        self.config = model.config
        self.xp = model.xp
        self.dtype = model.dtype
        self.on_gpu = model.backend == "cupy"
        self.opt = optimizer if optimizer is not None else Adam()
        self.grads = model.new_grads()
        self.threads = int(threads)
        self._pool = None                  # one helper thread: the two-way splits of the CPU code
        if self.threads > 1 and not self.on_gpu:
            self._pool = ThreadPoolExecutor(1)
        self.ops = device_ops(model, self.threads, fused, self._pool, block)
        self.fused = self.ops.name == "numba"
        if split and (self._pool is None or not blas_control_available()):
            raise ValueError("split=True needs threads=2 on NumPy and a BLAS whose thread count threadpoolctl "
                             "can set (to make its calls one-threaded while the two halves run)")
        self.split = bool(split)
        self._grads2 = None        # the second half's gradients (split step)
        self._pending = None       # ... still to be added to self.grads
        L = self.config.z_dim
        p = model.params
        H = self.config.hidden[-1] if self.config.hidden else self.config.x_dim
        self.W_heads = self.xp.empty((H, 2 * L), dtype=self.dtype)
        self.b_heads = self.xp.empty((2 * L,), dtype=self.dtype)
        self._heads = (p["enc.mu.W"], p["enc.logvar.W"], p["enc.mu.b"], p["enc.logvar.b"])
        self._bufs = {}
        self.parts = {}
        self.profile = None        # set to {} to accumulate seconds per part (forward/likelihood/backward/adam)
        self._t0 = 0.0

    # ------------------------------------------------------------- helpers
    def _tick(self, part):
        """Profiling only: add the time since the last tick to ``self.profile[part]``."""
        t = time.perf_counter()
        if part is not None:
            self.profile[part] = self.profile.get(part, 0.0) + t - self._t0
        self._t0 = t

    def _buffers(self, N, part=None):
        """Step buffers for N rows (``part`` 0 / 1: the two halves of a split step)."""
        key = N if part is None else (N, part)
        b = self._bufs.get(key)
        if b is None:
            b = self._bufs[key] = Buffers(self.xp, self.dtype, N, self.config)
        return b

    def _check(self, x, eps):
        xp, N = self.xp, x.shape[0] if getattr(x, "ndim", 0) == 2 else -1
        D, L = self.config.x_dim, self.config.z_dim
        if get_array_module(x) is not xp or get_array_module(eps) is not xp:
            raise TypeError(f"x and eps must be {xp.__name__} arrays (the model's backend)")
        if x.ndim != 2 or x.shape[1] != D or x.dtype != self.dtype:
            raise ValueError(f"x must be (N, {D}) {self.dtype}, got {tuple(x.shape)} {x.dtype}")
        if eps.shape != (N, L) or eps.dtype != self.dtype:
            raise ValueError(f"eps must be ({N}, {L}) {self.dtype}, got {tuple(eps.shape)} {eps.dtype}")

    # ------------------------------------------------------------------ API
    def loss_and_grads(self, x, eps, beta=1.0, need_loss=True):
        """Mean negative ELBO of ``x`` (N, D) with noise ``eps`` (N, L), and its gradients.

        Same numbers as ``model.loss(x, eps, beta)`` (up to float rounding).  ``need_loss=False`` skips the
        loss value (returns None); the gradients do not depend on it.
        """
        loss, g = self._loss_and_grads(x, eps, beta, need_loss)
        if self._pending is not None:                    # split: g += the second half's gradients
            run_halves(self._pool, self.grads.flat.size, self._add_pending)
            self._pending = None
        return loss, g

    def step(self, x, eps, beta=1.0, need_loss=True):
        """One training step: gradients of the loss at ``x`` then the optimizer update. Returns the loss."""
        loss, grads = self._loss_and_grads(x, eps, beta, need_loss)
        if self.profile is not None:
            self._tick(None)
            self.apply(grads)
            self._tick("adam")
        else:
            self.apply(grads)
        return loss

    def apply(self, grads):
        """Optimizer update of the model's parameters from ``grads`` (this trainer's buffer)."""
        opt, params = self.opt, self.model.params
        pending, self._pending = self._pending, None
        if not plain_adam(opt):
            if pending is not None:
                np.add(grads.flat, pending, out=grads.flat)
            opt.step(params, grads)
            return
        pf, gf, m, v, consts = adam_begin_step(opt, params, grads)
        self.ops.adam(opt, pf, gf, m, v, consts, pending)

    def close(self):
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    # ------------------------------------------------------------------ the step
    def _loss_and_grads(self, x, eps, beta, need_loss):
        """loss_and_grads, except that with the split the second half's gradients are left in
        ``self._pending`` (a flat buffer) for the caller to add: :meth:`step` adds them inside Adam."""
        self._check(x, eps)
        N = x.shape[0]
        invN = 1.0 / N
        if self.profile is not None:
            self._tick(None)
        L = self.config.z_dim                             # [W_mu | W_lv], (H, 2L), and [b_mu | b_lv]
        Wmu, Wlv, bmu, blv = self._heads
        self.W_heads[:, :L] = Wmu
        self.W_heads[:, L:] = Wlv
        self.b_heads[:L] = bmu
        self.b_heads[L:] = blv
        self._pending = None
        if self._use_split(N):
            recon, kl = self._split_pass(x, eps, beta, invN, need_loss)
        else:
            self.ops.prepare()
            recon, kl = self._pass(x, eps, beta, invN, need_loss, self._buffers(N), self.grads, self.ops,
                                   self.profile is not None)
        if not need_loss:
            self.parts = {}
            return None, self.grads
        recon_mean = recon * invN
        kl_mean = kl * invN
        loss = recon_mean + beta * kl_mean
        if self.on_gpu:                                   # device scalars: no synchronisation
            self.parts = {"loss": loss, "recon": recon_mean, "kl": kl_mean}
        else:
            dt = self.dtype.type
            self.parts = {"loss": dt(loss), "recon": dt(recon_mean), "kl": dt(kl_mean)}
            loss = self.parts["loss"]
        return loss, self.grads

    def _use_split(self, N):
        return self.split and N >= SPLIT_MIN_ROWS

    def _split_pass(self, x, eps, beta, invN, need_loss):
        """Rows [0, h) on this thread, [h, N) on the pool's thread, each with one-thread BLAS; the second
        half writes its own gradient buffer, left in ``self._pending``.  Every sum is over fixed rows in a
        fixed order, so the result does not depend on which thread finishes first."""
        N = x.shape[0]
        h = N - N // 2
        B0, B1 = self._buffers(h, 0), self._buffers(N - h, 1)
        if self._grads2 is None:
            self._grads2 = self.model.new_grads()
        ops = self.ops.for_halves()                         # two halves at once: no further threads
        prev = set_blas_threads(1)
        try:
            fut = self._pool.submit(self._pass, x[h:], eps[h:], beta, invN, need_loss, B1, self._grads2, ops, False)
            try:
                recon0, kl0 = self._pass(x[:h], eps[:h], beta, invN, need_loss, B0, self.grads, ops, False)
            finally:
                recon1, kl1 = fut.result()
        finally:
            set_blas_threads(prev)
        self._pending = self._grads2.flat
        if self.profile is not None:
            self._tick("forward+backward (two halves)")
        if not need_loss:
            return None, None
        return recon0 + recon1, kl0 + kl1

    def _pass(self, x, eps, beta, invN, need_loss, B, g, ops, prof):
        """Forward and backward for the rows of ``x``, gradients (scaled by ``invN``) into ``g``.

        Returns (sum over these rows of -log p(x|z), sum of KL), or (None, None) when ``need_loss`` is
        false.  ``ops``: the device's elementwise ops; ``prof``: tick the profile.
        """
        enc = self._encoder_forward(x, B, ops)                    # [(h, act cache)] per hidden layer
        ops.reparam(B.heads, eps, B.sig, B.z)                     # z = mu + exp(logvar / 2) * eps
        dec, negabs_done = self._decoder_forward(B.z, B, ops)
        if prof:
            self._tick("forward")
        # dout = dloss/dout (1/N folded in), recon = sum of nll, and the output bias gradient
        recon = ops.likelihood(B.out, x, B, invN, need_loss, g["dec.out.b"], negabs_done)
        if prof:
            self._tick("likelihood")
        dz = self._decoder_backward(dec, B, g, ops)
        # the latent layer: reparameterization + beta * KL, both with the 1/N
        kl = ops.latent_backward(dz, B.heads, B.sig, eps, beta * invN, B, need_loss)
        self._encoder_backward(x, enc, B, g, ops)
        if prof:
            self._tick("backward")
        return recon, kl

    def _dense_act(self, h, name, out, ops):
        """out = act(h @ W + b) for the hidden layer ``name``; returns (out, the activation's cache)."""
        p = self.model.params
        self.xp.matmul(h, p[name + ".W"], out=out)
        if self.config.activation == "relu":
            ops.bias_relu(out, p[name + ".b"])
            return out, None
        out += p[name + ".b"]
        return self.model.act_forward(out)

    def _act_backward_db(self, dh, h, cache, B, db, ops):
        """dL/da from dL/dh (in place for ReLU), and db = its sum over the rows (the layer's bias gradient)."""
        if self.config.activation == "relu":
            ops.relu_backward_db(h, dh, db, B)
            return dh
        da = self.model.act_backward(dh, cache)
        ops.col_sum(da, db)
        return da

    def _encoder_forward(self, x, B, ops):
        """The hidden layers, then both heads in one matmul into B.heads = [mu | logvar]."""
        h, layers = x, []
        for i in range(len(self.config.hidden)):
            h, c = self._dense_act(h, f"enc.{i}", B.enc[i], ops)
            layers.append((h, c))
        self.xp.matmul(h, self.W_heads, out=B.heads)
        B.heads += self.b_heads
        return layers

    def _decoder_forward(self, z, B, ops):
        """The hidden layers, then the output layer into B.out.  Returns the layers' (h, cache) and whether
        the ops also left -|out| in B.t1 (:meth:`~minivae.fast.ops_numba.NumbaOps.add_output_bias`)."""
        h, layers = z, []
        for i in range(len(self.config.hidden)):
            h, c = self._dense_act(h, f"dec.{i}", B.dec[i], ops)
            layers.append((h, c))
        self.xp.matmul(h, self.model.params["dec.out.W"], out=B.out)
        return layers, ops.add_output_bias(B.out, self.model.params["dec.out.b"], B)

    def _decoder_backward(self, layers, B, g, ops):
        """From B.dout back to dL/dz (N, L), writing every ``dec.*`` weight gradient."""
        xp, p = self.xp, self.model.params
        h_dec = layers[-1][0] if layers else B.z
        xp.matmul(h_dec.T, B.dout, out=g["dec.out.W"])
        dh = B.dh[h_dec.shape[1]]
        xp.matmul(B.dout, p["dec.out.W"].T, out=dh)
        for i in reversed(range(len(layers))):
            h, c = layers[i]
            da = self._act_backward_db(dh, h, c, B, g[f"dec.{i}.b"], ops)
            h_in = layers[i - 1][0] if i > 0 else B.z
            xp.matmul(h_in.T, da, out=g[f"dec.{i}.W"])
            dh = B.dh[h_in.shape[1]]
            xp.matmul(da, p[f"dec.{i}.W"].T, out=dh)
        return dh

    def _encoder_backward(self, x, layers, B, g, ops):
        """From B.dheads = [dmu | dlogvar] back through the encoder, writing every ``enc.*`` gradient
        (dL/dx itself is never needed)."""
        xp, p, L = self.xp, self.model.params, self.config.z_dim
        h_enc = layers[-1][0] if layers else x
        xp.matmul(h_enc.T, B.dheads, out=B.dW_heads)
        xp.sum(B.dheads, axis=0, out=B.db_heads)
        g["enc.mu.W"][...] = B.dW_heads[:, :L]
        g["enc.logvar.W"][...] = B.dW_heads[:, L:]
        g["enc.mu.b"][...] = B.db_heads[:L]
        g["enc.logvar.b"][...] = B.db_heads[L:]
        if layers:
            dh = B.dh[h_enc.shape[1]]
            xp.matmul(B.dheads, self.W_heads.T, out=dh)
        for i in reversed(range(len(layers))):
            h, c = layers[i]
            da = self._act_backward_db(dh, h, c, B, g[f"enc.{i}.b"], ops)
            h_in = layers[i - 1][0] if i > 0 else x
            xp.matmul(h_in.T, da, out=g[f"enc.{i}.W"])
            if i > 0:
                dh = B.dh[h_in.shape[1]]
                xp.matmul(da, p[f"enc.{i}.W"].T, out=dh)

    def _add_pending(self, lo, hi):
        """grads.flat[lo:hi] += the second half's gradients (the split step's reduction)."""
        gf = self.grads.flat
        np.add(gf[lo:hi], self._pending[lo:hi], out=gf[lo:hi])
