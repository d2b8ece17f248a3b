"""An optimized training step, kept apart from the reference code.

The reference path (:meth:`minivae.model.VAE.loss` followed by
:meth:`minivae.optim.Adam.step`) is the code to read: one op pair per line,
each with its derivation.  This module computes *the same numbers* -- the
same loss, the same gradients, the same Adam update -- but is written for
speed.  ``tests/test_fast.py`` checks it against the reference op by op and
for whole training steps.

    trainer = FastTrainer(model, Adam(lr=1e-3))
    for xb in batches:                       # xb (N, D) float32
        eps = rng.standard_normal((len(xb), model.config.z_dim), dtype=np.float32)
        loss = trainer.step(xb, eps)         # updates model.params in place

It trains the model's own parameters (``model.flat``), so the model stays
usable afterwards (encode, decode, checkpoints), and it keeps the
optimizer's state in the optimizer (``opt.state_dict()`` works).

What is done differently from the reference, and why it is the same math:

* **No per-step allocations.**  Every activation and gradient lives in a
  buffer allocated once per batch size; ops write with ``out=`` or in place.
* **The two Gaussian heads are one matmul.**  ``[mu | logvar] = h @ [W_mu | W_lv]``
  is one (H, 2L) product instead of two (H, L) ones; backward likewise gives
  ``dh = [dmu | dlogvar] @ [W_mu | W_lv].T = dmu @ W_mu.T + dlogvar @ W_lv.T``.
* **Weight gradients are written straight into the flat gradient buffer**
  (``np.matmul(h.T, d, out=grads["dec.out.W"])``), which is what Adam reads.
* **The Bernoulli loss and its gradient share one exponential.**  With
  ``e = exp(-|l|)`` and ``r = 1 / (1 + e)``:
  ``softplus(l) = max(l, 0) + log1p(e)`` and ``sigmoid(l) = r`` (l >= 0) or ``e r`` (l < 0).
* **The 1/N of the mean is applied once**, to dlogits (and to the KL
  gradient), exactly where the reference's ``drec = 1/N`` lands.
* **The input layer's dx is never computed** (nothing needs dL/dx).
* **Adam runs over the flat buffer in blocks**, optionally on two threads
  (NumPy ufuncs release the GIL), with the reference's exact op sequence.
* **Two half-batches at once (NumPy, opt-in: ``threads=2, split=True``).**
  The loss and every gradient are sums over the rows of the batch, so rows
  [0, h) and [h, N) can be computed separately -- each half with the same 1/N
  -- and added.  The halves run on two Python threads with one-thread BLAS
  calls (NumPy releases the GIL in matmul and in ufuncs), so the elementwise
  work of one half overlaps the other half's matmuls instead of leaving a core
  idle; the second half's gradients are added inside the Adam pass.  The
  grouping is fixed (first half + second half), so results are deterministic.
* **Fused CPU kernels (optional, with numba).**  When numba is installed
  (``pip install minivae[fast]``), the elementwise chains run as compiled
  loops from :mod:`minivae.cpu_kernels`, on ``threads`` cores: bias + ReLU in
  one pass; ReLU's backward with its bias gradient; the latent layer forward,
  and backward with the KL sum; the Bernoulli (or Gaussian) loss, gradient and
  output-bias gradient (after one NumPy SIMD exp); Adam in one pass, bit for
  bit NumPy's Adam.  Every sum is split into fixed blocks added in a fixed
  order, so the numbers do not depend on the thread count.  Without numba (or
  with ``fused=False``) the NumPy ufunc code below runs: the same numbers up
  to float rounding, checked by the same tests.
* **On CuPy**, the elementwise chains (bias + ReLU, the latent layer, the
  Bernoulli loss and gradient, Adam) are single fused kernels, and nothing
  synchronises with the host: the loss stays on the device.

Supported: any hidden depth; every activation (ReLU is specialised, the
others use the reference ops); Bernoulli and fixed-variance Gaussian
likelihoods; one sample of z per example.  A learned output variance, the
convolutional architectures and the conditional VAE (``n_classes``) raise :class:`FastPathError`: use the
reference path for them (``minivae.train`` does so by itself).
"""
from __future__ import annotations

import functools
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import kernels
from ..backend import get_array_module
from ..gaussian import LOG_2PI, log_diag_normal, log_standard_normal, reparameterize_forward
from ..model import _tile
from ..optim import Adam


def _cpu_kernels():
    """minivae.cpu_kernels if numba is importable (fused, multi-threaded CPU kernels), else None."""
    from . import cpu_kernels
    return cpu_kernels if cpu_kernels.AVAILABLE else None


class FastPathError(ValueError):
    """The fast path does not support this model or optimizer configuration."""


def check_supported(config):
    """Raise :class:`FastPathError` (one line) if the fast path cannot train ``config``."""
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


# ----------------------------------------------------------------------------
# CuPy kernels: declared as data in minivae.kernels' registry (which tests/test_nvrtc.py
# compiles with NVRTC, no GPU needed), built on first use (CuPy is imported only then)
# ----------------------------------------------------------------------------
_KERNEL_SPECS = kernels.register(__name__, {
    "bias_relu": kernels.elementwise(
        "minivae_bias_relu", "T b", "T a", "a = max(a + b, (T)0)"),
    "relu_bwd": kernels.elementwise(
        "minivae_relu_bwd", "T h", "T d", "d = h > (T)0 ? d : (T)0"),
    "reparam": kernels.elementwise(
        "minivae_reparam", "T mu, T lv, T eps", "T sig, T z",
        "sig = exp((T)0.5 * lv); z = mu + sig * eps"),
    "latent_bwd": kernels.elementwise(
        "minivae_latent_bwd", "T dz, T mu, T lv, T sig, T eps, T c", "T dmu, T dlv",
        "dmu = dz + c * mu; dlv = dz * eps * ((T)0.5 * sig) + c * ((T)0.5 * (exp(lv) - (T)1))",
        scalar_args=("c",)),
    "kl_terms": kernels.reduction(
        "minivae_kl", "T mu, T lv", "T y", "mu * mu + exp(lv) - (T)1 - lv", "a + b", "y = (T)0.5 * a", "0"),
    "bernoulli": kernels.elementwise(
        "minivae_bernoulli", "T l, T x, T invn", "T d, T nll",
        """
        T e = exp(-fabs(l));
        T r = (T)1 / ((T)1 + e);
        d = ((l >= (T)0 ? r : e * r) - x) * invn;
        nll = max(l, (T)0) + log1p(e) - x * l;
        """, scalar_args=("invn",)),
    # 1 - b1 and 1 - b2 come in as arguments, computed in double on the host and then
    # rounded once, as NumPy rounds the Python float (1.0 - b2) it multiplies by; in the
    # kernel, (T)1 - b2 in float32 would give 0.00099998713 instead of 0.001f.
    "adam": kernels.elementwise(
        "minivae_adam", "T g, T b1, T c1, T b2, T c2, T lr_t, T eps_t", "T p, T m, T v",
        """
        m = b1 * m + c1 * g;
        v = b2 * v + c2 * (g * g);
        p -= lr_t * m / (sqrt(v) + eps_t);
        """, scalar_args=("b1", "c1", "b2", "c2", "lr_t", "eps_t")),
})
_KERNELS = {}


def _cupy_kernels():
    if not _KERNELS:
        _KERNELS.update(kernels.build_all(_KERNEL_SPECS))
    return _KERNELS


# ----------------------------------------------------------------------------
# One-thread BLAS calls during the split step (OpenBLAS)
# ----------------------------------------------------------------------------
# The split step (see FastTrainer) runs two halves of a batch on two Python
# threads at once; each half's matmuls must then use one BLAS thread, or the two
# halves would fight over OpenBLAS's worker threads.  So for the duration of
# the two halves we set OpenBLAS's thread count to 1 and then restore it.
# (openblas_set_num_threads_local, in OpenBLAS >= 0.3.27, looked like the
# right tool but in NumPy's scipy-openblas 0.3.31 it changed the count seen by
# every thread, so we use the plain global setter, and say so.)  The setter is
# threadpoolctl's, which finds the BLAS that NumPy has loaded (OpenBLAS, MKL,
# BLIS, Accelerate...) on every OS; without it there is no split.
_BLAS = []                # [(set, get) or None], filled on first use


def _find_blas_threads():
    """(set(n), get()) for the thread count of NumPy's BLAS, through threadpoolctl; None if unavailable."""
    if _BLAS:
        return _BLAS[0]
    found = None
    try:
        from threadpoolctl import ThreadpoolController
        libs = ThreadpoolController().select(user_api="blas").lib_controllers
        if libs:
            def fset(n, libs=libs):
                for lib in libs:
                    lib.set_num_threads(int(n))

            def fget(lib=libs[0]):
                return int(lib.get_num_threads())
            found = (fset, fget)
    except Exception:                                     # threadpoolctl missing or no BLAS found: no split
        found = None
    _BLAS.append(found)
    return found


def blas_threads_control_available():
    """True if we can set the thread count of NumPy's BLAS (OpenBLAS), as the split step needs."""
    return _find_blas_threads() is not None


def _set_blas_threads(n):
    """Set OpenBLAS's thread count (process-wide); returns the previous one."""
    fset, fget = _find_blas_threads()
    prev = fget()
    if prev != n:
        fset(n)
    return prev


# Batches of fewer rows are not split: two halves of < 32 rows save less than the thread hand-off costs.
SPLIT_MIN_ROWS = 64


# ----------------------------------------------------------------------------
# Adam over the flat buffer
# ----------------------------------------------------------------------------
def adam_update_block(p, g, m, v, tmp, b1, b2, lr_t, eps_t):
    """The reference Adam update (minivae.optim.Adam) on one block, op for op."""
    m *= b1                                  # m = b1 m + (1 - b1) g
    np.multiply(g, 1.0 - b1, out=tmp)
    m += tmp
    v *= b2                                  # v = b2 v + (1 - b2) g^2
    np.multiply(g, g, out=tmp)
    tmp *= 1.0 - b2
    v += tmp
    np.sqrt(v, out=tmp)                      # p -= lr_t m / (sqrt(v) + eps_t)
    tmp += eps_t
    np.divide(m, tmp, out=tmp)
    tmp *= lr_t
    p -= tmp


def _plain_adam(opt):
    """An :class:`~minivae.optim.Adam` without weight decay or clipping: the one update the fused passes make."""
    return type(opt) is Adam and not opt.weight_decay and opt.clip_norm is None


def adam_begin_step(opt, params, grads):
    """Advance a plain Adam by one step; return the flat buffers p, g, m, v and the kernel constants.

    The constants are those of :meth:`minivae.optim.Adam._update`, in the buffers' dtype:
    (b1, 1 - b1, b2, 1 - b2, lr_t, eps_t) with lr_t = lr·sqrt(1 - b2^t)/(1 - b1^t) and
    eps_t = eps·sqrt(1 - b2^t).  The caller then runs the update on them.
    """
    from ..optim import _pairs
    pairs = _pairs(params, grads)
    if opt.state is None or len(opt.state) != len(pairs):
        opt._init_state(pairs)
    opt.t += 1
    st = opt.state[0]
    b1, b2 = opt.b1, opt.b2
    bc1, bc2 = 1.0 - b1 ** opt.t, 1.0 - b2 ** opt.t
    f = params.flat.dtype.type
    consts = (f(b1), f(1.0 - b1), f(b2), f(1.0 - b2), f(opt.lr * math.sqrt(bc2) / bc1), f(opt.eps * math.sqrt(bc2)))
    return params.flat, grads.flat, st["m"], st["v"], consts


def fused_adam_step(opt, params, grads, threads=1):
    """``opt.step(params, grads)`` in one fused pass over the flat buffers, when it applies.

    It applies to a plain :class:`~minivae.optim.Adam` (no weight decay, no clipping) with numba installed,
    on NumPy float32 or float64 parameters and gradients that share one flat layout (a model's ``params``
    and the ``grads`` of ``model.loss``): the update is then NumPy's op sequence bit for bit, on ``threads``
    threads.  ``train`` uses it for the models FastTrainer does not cover (the conv VAEs).  Returns True when
    it made the step, False when it did nothing and the caller must call ``opt.step``.
    """
    ck = _cpu_kernels()
    pf, gf = getattr(params, "flat", None), getattr(grads, "flat", None)
    if (ck is None or not _plain_adam(opt) or type(pf) is not np.ndarray or type(gf) is not np.ndarray or pf.dtype != gf.dtype
            or pf.dtype not in (np.float32, np.float64)
            or getattr(params, "layout", None) != getattr(grads, "layout", None)):
        return False
    pf, gf, m, v, consts = adam_begin_step(opt, params, grads)
    ck.set_threads(threads)
    ck.K["adam"](pf, gf, m, v, *consts)
    return True


class _Buffers:
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


class FastTrainer:
    """Fast loss, gradients and Adam step for a :class:`~minivae.model.VAE`.

    ``model``      the VAE to train (its ``flat`` buffer is updated in place)
    ``optimizer``  an optimizer from :mod:`minivae.optim`; a plain Adam (no
                   weight decay, no clipping) gets the blocked/threaded update,
                   anything else falls back to ``optimizer.step``
    ``threads``    NumPy only: threads for the step (default 1).  With the
                   fused kernels, the number of cores they use (BLAS has its
                   own setting).  Without them, 2 or more means that Adam is
                   split across two Python threads, and so is the batch
                   (``split``) or else the Bernoulli chain (batches of 128
                   rows or more)
    ``split``      NumPy, 2 threads only: each batch of ``SPLIT_MIN_ROWS`` rows or
                   more is cut into two halves whose forward and backward passes
                   run at the same time, one per thread, each with one-thread
                   BLAS calls; the second half's gradients are added to the
                   first's inside the Adam update.  Needs NumPy's BLAS to be
                   OpenBLAS (whose thread count we set to 1 while the two
                   halves run, then restore).  Default off: on an idle 2-CPU
                   machine it measured no faster than 2-thread BLAS (see
                   benchmarks/README.md), but it is much more robust when the
                   other core is busy (OpenBLAS's 2-thread calls then stall)
    ``block``      elements per Adam block (NumPy ufunc code)
    ``fused``      NumPy only: use the fused kernels of :mod:`minivae.cpu_kernels`
                   (needs numba).  None (default): when numba is importable;
                   False: the NumPy ufunc code; True: require them

    Why the split: of a step's ~4 ms on 2 CPUs, ~2.6 ms are matmuls that BLAS
    runs on both cores, and ~2 ms are NumPy elementwise passes (bias, ReLU, the
    Bernoulli chain, Adam) that run on one core while the other waits.  With
    two half-batches on two threads, every part of the step keeps both cores
    busy.  Measured (benchmarks/README.md): two concurrent one-thread products
    do run in parallel (0.48 ms for two 64x784x400 products vs 0.95 ms one after
    the other), but the halves slow each other's elementwise work, and on an
    idle machine the split step is no faster than 2-thread BLAS; it is far
    faster when another process holds a core.  The numbers are the same math: the loss and the gradients are sums
    over rows, and the split only groups those sums as (rows of the first half)
    + (rows of the second half), in a fixed order, so a step is deterministic
    and differs from the unsplit step by float rounding only.

    :meth:`loss_and_grads` returns the mean negative ELBO and the gradients
    (views of one flat buffer, reused between calls); :meth:`step` also
    applies the optimizer.  ``self.parts`` holds ``loss``, ``recon``, ``kl``.
    """

    def __init__(self, model, optimizer=None, threads=1, block=1 << 20, split=False, fused=None):
        check_supported(model.config)
        self.model = model
        self.config = model.config
        self.xp = model.xp
        self.dtype = model.dtype
        self.on_gpu = model.backend == "cupy"
        self.opt = optimizer if optimizer is not None else Adam()
        self.grads = model.new_grads()
        if int(threads) != threads or threads < 1:
            raise ValueError(f"threads must be a positive integer, got {threads}")
        self.threads = int(threads)
        # The fused CPU kernels (minivae.cpu_kernels, with numba): None = use them when numba is there.
        ck = None if self.on_gpu or fused is False else _cpu_kernels()
        if fused and ck is None:
            raise ValueError("fused=True needs numba (pip install numba) and the NumPy backend")
        if ck is not None and self.dtype not in (np.float32, np.float64):
            ck = None
        self._ck = ck
        self.fused = ck is not None
        self.block = int(block)
        self._pool = None
        if self.threads > 1 and not self.on_gpu:
            self._pool = ThreadPoolExecutor(1)     # the NumPy code's two-way splits and the split step
        if split and (self._pool is None or not blas_threads_control_available()):
            raise ValueError("split=True needs threads=2 on NumPy and NumPy's BLAS to be OpenBLAS "
                             "(to make its calls one-threaded while the two halves run)")
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
        self._acc = {}             # float64 scratch of the fused kernels, per buffer set
        self._tmp = None
        self.parts = {}
        self.profile = None        # set to {} to accumulate seconds per part (forward/backward/adam)
        self._t0 = 0.0
        if self.on_gpu:
            _cupy_kernels()

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
            b = self._bufs[key] = _Buffers(self.xp, self.dtype, N, self.config)
        return b

    def _vec(self, B, name, n, dtype=np.float64):
        """A scratch vector of n entries belonging to buffer set B (the fused kernels' partial sums, float64,
        and outputs they overwrite).  Its contents are whatever was there: callers write before they read."""
        key = (id(B), name)
        a = self._acc.get(key)
        if a is None or a.shape[0] != n or a.dtype != dtype:
            a = self._acc[key] = np.empty(n, dtype=dtype)
        return a

    def _check(self, x, eps):
        xp, N = self.xp, x.shape[0] if getattr(x, "ndim", 0) == 2 else -1
        D, L = self.config.x_dim, self.config.z_dim
        if get_array_module(x) is not xp or get_array_module(eps) is not xp:
            raise TypeError(f"x and eps must be {xp.__name__} arrays (the model's backend)")
        if x.ndim != 2 or x.shape[1] != D or x.dtype != self.dtype:
            raise ValueError(f"x must be (N, {D}) {self.dtype}, got {tuple(x.shape)} {x.dtype}")
        if eps.shape != (N, L) or eps.dtype != self.dtype:
            raise ValueError(f"eps must be ({N}, {L}) {self.dtype}, got {tuple(eps.shape)} {eps.dtype}")

    def _act_forward(self, a):
        """In place when ReLU; returns (h, cache)."""
        if self.config.activation == "relu":
            if self.on_gpu or self.fused:
                return a, None                      # bias + relu already fused
            np.maximum(a, 0, out=a)
            return a, None
        h, cache = self.model.act_forward(a)
        return h, cache

    def _act_backward(self, dh, h, cache, B):
        if self.config.activation == "relu":
            if self.on_gpu:
                _KERNELS["relu_bwd"](h, dh)
                return dh
            mask = B.mask[h.shape[1]]
            np.greater(h, 0, out=mask)             # dL/da = dL/dh * 1[a > 0]  (h = max(a, 0))
            np.multiply(dh, mask, out=dh)
            return dh
        return self.model.act_backward(dh, cache)

    def _act_backward_db(self, dh, h, cache, B, db, kern):
        """dL/da from dL/dh (in place for ReLU), and db = its sum over the rows (the layer's bias gradient)."""
        if kern is not None:
            if self.config.activation == "relu":
                kern["relu_backward_db"](h, dh, db)       # one pass: mask and column sums
                return dh
            da = self._act_backward(dh, h, cache, B)
            kern["col_sum"](da, db)
            return da
        da = self._act_backward(dh, h, cache, B)
        self.xp.sum(da, axis=0, out=db)
        return da

    def _dense(self, h, W, b, out, relu, kern=None):
        """out = h @ W + b (and ReLU on CuPy or with the fused kernels when the layer has one)."""
        xp = self.xp
        xp.matmul(h, W, out=out)
        if self.on_gpu and relu:
            _KERNELS["bias_relu"](b, out)
        elif kern is not None and relu:
            kern["bias_relu"](out, b)
        else:
            out += b
        return out

    # ------------------------------------------------------------------ API
    def loss_and_grads(self, x, eps, beta=1.0, need_loss=True):
        """Mean negative ELBO of ``x`` (N, D) with noise ``eps`` (N, L), and its gradients.

        Same numbers as ``model.loss(x, eps, beta)`` (up to float rounding).
        ``need_loss=False`` skips the loss value (returns None); the
        gradients do not depend on it.
        """
        loss, g = self._loss_and_grads(x, eps, beta, need_loss)
        if self._pending is not None:                    # split: g += the second half's gradients
            self._run_halves(self.grads.flat.size, lambda lo, hi: self._add_pending(lo, hi))
            self._pending = None
        return loss, g

    def _loss_and_grads(self, x, eps, beta, need_loss):
        """loss_and_grads, except that with the split the second half's gradients are left in
        ``self._pending`` (a flat buffer) for the caller to add: :meth:`step` adds them inside Adam."""
        self._check(x, eps)
        cfg, N = self.config, x.shape[0]
        invN = 1.0 / N
        prof = self.profile is not None
        if prof:
            self._tick(None)
        # [W_mu | W_lv], (H, 2L), and [b_mu | b_lv]: both heads in one matmul
        L = cfg.z_dim
        Wmu, Wlv, bmu, blv = self._heads
        self.W_heads[:, :L] = Wmu
        self.W_heads[:, L:] = Wlv
        self.b_heads[:L] = bmu
        self.b_heads[L:] = blv
        self._pending = None
        if self._use_split(N):
            # Rows [0, h) on this thread, [h, N) on the pool's thread, each with one-thread BLAS;
            # the second half writes its own gradient buffer.  Every sum is over fixed rows in a
            # fixed order, so the result does not depend on which thread finishes first.
            h = N - N // 2
            B0, B1 = self._buffers(h, 0), self._buffers(N - h, 1)
            if self._grads2 is None:
                self._grads2 = self.model.new_grads()
            prev = _set_blas_threads(1)
            try:
                kern = self._ck.S if self.fused else None         # two halves at once: serial kernels
                fut = self._pool.submit(self._pass, x[h:], eps[h:], beta, invN, need_loss, B1, self._grads2,
                                        False, False, kern)
                try:
                    recon0, kl0 = self._pass(x[:h], eps[:h], beta, invN, need_loss, B0, self.grads, False, False,
                                             kern)
                finally:
                    recon1, kl1 = fut.result()
            finally:
                _set_blas_threads(prev)
            self._pending = self._grads2.flat
            recon = kl = None
            if need_loss:
                recon, kl = recon0 + recon1, kl0 + kl1
            if prof:
                self._tick("forward+backward (two halves)")
        else:
            kern = None
            if self.fused:
                kern = self._ck.K
                self._ck.set_threads(self.threads)
            recon, kl = self._pass(x, eps, beta, invN, need_loss, self._buffers(N), self.grads, prof, True, kern)
        g = self.grads
        if not need_loss:
            self.parts = {}
            return None, g
        recon_mean = recon * invN
        kl_mean = kl * invN
        loss = recon_mean + beta * kl_mean
        if self.on_gpu:
            self.parts = {"loss": loss, "recon": recon_mean, "kl": kl_mean}
        else:
            dt = self.dtype.type
            self.parts = {"loss": dt(loss), "recon": dt(recon_mean), "kl": dt(kl_mean)}
            loss = self.parts["loss"]
        return loss, g

    def _use_split(self, N):
        return self.split and N >= SPLIT_MIN_ROWS

    def _pass(self, x, eps, beta, invN, need_loss, B, g, prof, lik_threads, kern=None):
        """Forward and backward for the rows of ``x``, gradients (scaled by ``invN``) into ``g``.

        Returns (sum over these rows of -log p(x|z), sum of KL), or (None, None)
        when ``need_loss`` is false.  ``lik_threads``: the Bernoulli chain may use the pool.
        ``kern``: the fused CPU kernels to use (``cpu_kernels.K`` or its serial twins ``S``), or None
        for the NumPy ufuncs.
        """
        xp, cfg, p = self.xp, self.config, self.model.params
        L = cfg.z_dim
        K = len(cfg.hidden)
        relu = cfg.activation == "relu"
        # ---- encoder
        h, enc_caches = x, []
        for i in range(K):
            a = self._dense(h, p[f"enc.{i}.W"], p[f"enc.{i}.b"], B.enc[i], relu, kern)
            h, c = self._act_forward(a)
            enc_caches.append((h, c))
        h_enc = h
        heads = self._dense(h_enc, self.W_heads, self.b_heads, B.heads, False)
        mu, logvar = heads[:, :L], heads[:, L:]

        # ---- z = mu + exp(logvar / 2) * eps
        if self.on_gpu:
            _KERNELS["reparam"](mu, logvar, eps, B.sig, B.z)
        elif kern is not None:
            kern["reparam"](heads, eps, B.sig, B.z)
        else:
            np.multiply(logvar, 0.5, out=B.sig)
            np.exp(B.sig, out=B.sig)
            np.multiply(B.sig, eps, out=B.z)
            B.z += mu

        # ---- decoder
        h, dec_caches = B.z, []
        for i in range(K):
            a = self._dense(h, p[f"dec.{i}.W"], p[f"dec.{i}.b"], B.dec[i], relu, kern)
            h, c = self._act_forward(a)
            dec_caches.append((h, c))
        h_dec = h
        fused_lik = kern is not None
        if fused_lik and cfg.likelihood == "bernoulli":
            xp.matmul(h_dec, p["dec.out.W"], out=B.out)
            kern["bias_negabs"](B.out, p["dec.out.b"], B.t1)      # logits = out + b, t1 = -|logits|
        else:
            self._dense(h_dec, p["dec.out.W"], p["dec.out.b"], B.out, False)
        out = B.out

        if prof:
            self._tick("forward")
        # ---- likelihood: dout = dloss/dout (1/N folded in), recon = sum of nll
        #      (fused: also the output bias gradient, the sum of dout over the rows)
        recon = self._likelihood(out, x, B, invN, need_loss, lik_threads,
                                 kern=kern, db=g["dec.out.b"] if fused_lik else None, negabs_done=True)

        if prof:
            self._tick("likelihood")
        # ---- backward through the decoder
        d = B.dout
        xp.matmul(h_dec.T, d, out=g["dec.out.W"])
        if not fused_lik:
            xp.sum(d, axis=0, out=g["dec.out.b"])
        dh = B.dh[h_dec.shape[1]]
        xp.matmul(d, p["dec.out.W"].T, out=dh)
        for i in reversed(range(K)):
            hi, c = dec_caches[i]
            da = self._act_backward_db(dh, hi, c, B, g[f"dec.{i}.b"], kern)
            h_in = dec_caches[i - 1][0] if i > 0 else B.z
            xp.matmul(h_in.T, da, out=g[f"dec.{i}.W"])
            dh = B.dh[h_in.shape[1]]
            xp.matmul(da, p[f"dec.{i}.W"].T, out=dh)
        dz = dh                                          # (N, L)

        # ---- latent layer: reparameterization + beta * KL, both with the 1/N
        dmu, dlv = B.dheads[:, :L], B.dheads[:, L:]
        c = beta * invN
        kl = None
        if self.on_gpu:
            _KERNELS["latent_bwd"](dz, mu, logvar, B.sig, eps, self.dtype.type(c), dmu, dlv)
        elif kern is not None:
            f = self.dtype.type
            kl_rows = self._vec(B, "kl_rows", x.shape[0])
            kern["latent_backward"](dz, heads, B.sig, eps, f(c), f(0.5 * c), B.dheads, kl_rows)
            if need_loss:
                kl = float(kl_rows.sum())
        else:
            # dmu = dz + c mu ;  dlogvar = dz eps sigma / 2 + c (exp(logvar) - 1) / 2
            np.multiply(mu, c, out=dmu)
            dmu += dz
            np.exp(logvar, out=dlv)
            dlv -= 1.0
            dlv *= 0.5 * c
            np.multiply(dz, eps, out=dz)
            dz *= B.sig
            dz *= 0.5
            dlv += dz
        if need_loss and kl is None:
            if self.on_gpu:
                kl = _KERNELS["kl_terms"](mu, logvar)
            else:
                kl = 0.5 * float((mu * mu).sum() + (xp.exp(logvar) - 1.0 - logvar).sum())

        # ---- backward through the encoder
        xp.matmul(h_enc.T, B.dheads, out=B.dW_heads)
        xp.sum(B.dheads, axis=0, out=B.db_heads)
        g["enc.mu.W"][...] = B.dW_heads[:, :L]
        g["enc.logvar.W"][...] = B.dW_heads[:, L:]
        g["enc.mu.b"][...] = B.db_heads[:L]
        g["enc.logvar.b"][...] = B.db_heads[L:]
        if K:
            dh = B.dh[h_enc.shape[1]]
            xp.matmul(B.dheads, self.W_heads.T, out=dh)
        for i in reversed(range(K)):
            hi, c_act = enc_caches[i]
            da = self._act_backward_db(dh, hi, c_act, B, g[f"enc.{i}.b"], kern)
            h_in = enc_caches[i - 1][0] if i > 0 else x
            xp.matmul(h_in.T, da, out=g[f"enc.{i}.W"])
            if i > 0:                                    # dL/dx itself is never needed
                dh = B.dh[h_in.shape[1]]
                xp.matmul(da, p[f"enc.{i}.W"].T, out=dh)

        if prof:
            self._tick("backward")
        return recon, kl

    def _likelihood(self, out, x, B, invN, need_loss, threads=True, kern="auto", db=None, negabs_done=False):
        """Fill B.dout with dloss/dout; return sum over the batch of -log p(x|z) (or None).

        With the fused kernels (``kern``; "auto": this trainer's parallel kernels, if any) ``db``, when
        given, receives the output bias gradient (the sum of dout over the rows), and ``negabs_done``
        says that B.t1 already holds -|out| (written with the output bias add)."""
        xp = self.xp
        if kern == "auto":
            kern = self._ck.K if self.fused else None
            if kern is not None:
                self._ck.set_threads(self.threads)
        if kern is not None:
            N, D = out.shape
            f = self.dtype.type
            if db is None:
                db = self._vec(B, "db", D, self.dtype)       # a throw-away bias gradient (the kernel overwrites it)
            nb = -(-N // self._ck.ROW_BLOCK)
            parts = self._vec(B, "parts", nb)
            if self.config.likelihood == "gaussian":
                var = float(self.config.obs_var)
                kern["gaussian"](out, x, f(invN / var), B.dout, db, parts)
                if not need_loss:
                    return None
                return float(parts.sum()) * (0.5 / var) + N * 0.5 * D * (LOG_2PI + math.log(var))
            if not negabs_done:
                np.abs(out, out=B.t1)
                np.negative(B.t1, out=B.t1)
            np.exp(B.t1, out=B.t1)                      # e = exp(-|l|): NumPy's SIMD exp, one pass
            kern["bernoulli"](out, x, B.t1, f(invN), B.dout, db, bool(need_loss), parts)
            return float(parts.sum()) if need_loss else None
        if self.config.likelihood == "gaussian":
            var = float(self.config.obs_var)
            D = x.shape[1]
            xp.subtract(out, x, out=B.dout)             # r = mean - x
            recon = None
            if need_loss:
                r = B.dout.ravel()
                recon = float(r @ r) * (0.5 / var) if not self.on_gpu else (r @ r) * (0.5 / var)
                recon = recon + x.shape[0] * 0.5 * D * (LOG_2PI + math.log(var))
            B.dout *= invN / var                         # dnll/dmean = (mean - x) / var, times 1/N
            return recon
        if self.on_gpu:
            _KERNELS["bernoulli"](out, x, self.dtype.type(invN), B.dout, B.t1)
            return B.t1.sum() if need_loss else None
        N = out.shape[0]
        if threads and self._pool is not None and N >= 128:   # two row blocks on two threads
            half = (N // 2 + 63) // 64 * 64
            fut = self._pool.submit(self._bernoulli_rows, out, x, B, invN, need_loss, half, N)
            first = self._bernoulli_rows(out, x, B, invN, need_loss, 0, half)
            second = fut.result()
            return first + second if need_loss else None
        return self._bernoulli_rows(out, x, B, invN, need_loss, 0, N)

    def _bernoulli_rows(self, out, x, B, invN, need_loss, lo, hi):
        """The Bernoulli loss and gradient on rows lo:hi (NumPy); returns their sum of nll (or None)."""
        out, x = out[lo:hi], x[lo:hi]
        e, r, d, mask = B.t1[lo:hi], B.t2[lo:hi], B.dout[lo:hi], B.mask[out.shape[1]][lo:hi]
        prod = B.prod[0 if lo == 0 else 1]
        # e = exp(-|l|) in (0, 1], r = 1 / (1 + e) in [1/2, 1).
        # sigmoid(l) = r for l >= 0 and e r for l < 0, i.e. sigmoid(l) = max(e, 1[l >= 0]) * r.
        np.abs(out, out=e)
        np.negative(e, out=e)
        np.exp(e, out=e)
        np.add(e, 1.0, out=r)
        np.divide(1.0, r, out=r)
        np.greater_equal(out, 0, out=mask)
        np.maximum(e, mask, out=d)
        d *= r                                           # sigmoid(l)
        d -= x                                           # dnll/dl = sigmoid(l) - x
        d *= invN
        if not need_loss:
            return None
        # sum of softplus(l) - x l = sum max(l, 0) - x . l + sum log(1 + e), and
        # sum log(1 + e) = -log prod r.  A product of 64 factors in [1/2, 1) stays
        # above 2^-64, so we multiply 64 rows at a time and take ~N D / 64 logs
        # instead of N D (a log1p pass costs more than the rest of this function).
        logs = 0.0
        for k in range(0, r.shape[0], 64):
            np.multiply.reduce(r[k:k + 64], axis=0, out=prod)
            np.log(prod, out=prod)
            logs -= float(prod.sum(dtype=np.float64))
        np.maximum(out, 0, out=e)
        return logs + float(e.sum(dtype=np.float64)) - float(np.vdot(x, out))

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

    # ------------------------------------------------------------- optimizer
    def _run_halves(self, n, fn):
        """fn(lo, hi) over [0, n): on one thread, or the two halves on two threads."""
        if self._pool is None:
            fn(0, n)
            return
        half = (n // 2) // 64 * 64
        fut = self._pool.submit(fn, half, n)
        try:
            fn(0, half)
        finally:
            fut.result()

    def _add_pending(self, lo, hi):
        """grads.flat[lo:hi] += the second half's gradients (the split step's reduction)."""
        gf = self.grads.flat
        np.add(gf[lo:hi], self._pending[lo:hi], out=gf[lo:hi])

    def apply(self, grads):
        """Optimizer update of the model's parameters from ``grads`` (this trainer's buffer)."""
        opt, params = self.opt, self.model.params
        pending, self._pending = self._pending, None
        if not _plain_adam(opt):
            if pending is not None:
                np.add(grads.flat, pending, out=grads.flat)
            opt.step(params, grads)
            return
        pf, gf, m, v, consts = adam_begin_step(opt, params, grads)
        if self.on_gpu:
            _KERNELS["adam"](gf, *consts, pf, m, v)
            return
        if self.fused:
            # one pass over p, g, m, v: NumPy's op sequence below, bit for bit, on self.threads threads
            self._ck.set_threads(self.threads)
            if pending is not None:                      # split step: g = g(first half) + g(second half)
                self._ck.K["adam_add"](pf, gf, pending, m, v, *consts)
            else:
                self._ck.K["adam"](pf, gf, m, v, *consts)
            return
        if self._tmp is None or self._tmp.shape != pf.shape:
            self._tmp = np.empty_like(pf)
        tmp, n, C = self._tmp, pf.size, self.block

        # the reference's scalars: NumPy rounds each to the buffers' dtype, as the kernels' constants are
        b1, b2, lr_t, eps_t = opt.b1, opt.b2, float(consts[4]), float(consts[5])

        def run(lo, hi):
            for s in range(lo, hi, C):
                e = min(s + C, hi)
                if pending is not None:                  # split step: g = g(first half) + g(second half)
                    np.add(gf[s:e], pending[s:e], out=gf[s:e])
                adam_update_block(pf[s:e], gf[s:e], m[s:e], v[s:e], tmp[s:e], b1, b2, lr_t, eps_t)

        self._run_halves(n, run)

    def close(self):
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


# ----------------------------------------------------------------------------
# Evaluation: importance log-weights with a cheaper Bernoulli log-likelihood
# ----------------------------------------------------------------------------
def bernoulli_nll_rows(logits, x):
    """Same numbers as ``likelihoods.bernoulli_nll_forward(logits, x)[0]``, with far fewer logarithms.

    Per pixel, softplus(l) - x l = max(l, 0) - x l + log(1 + e) with e = exp(-|l|) in (0, 1].
    The reference takes one ``log1p`` per pixel, which on the CPU costs more than the rest of the
    chain together (NumPy's float32 ``log1p`` is not vectorised).  Here the factors (1 + e), each in
    [1, 2], are multiplied column block by column block -- at most 64 factors meet in one product,
    so a product stays below 2^64, far from overflow -- and only the products are logged:
    ``sum_d log(1 + e_d) = sum_c log prod_{d in c} (1 + e_d)``.  When e < 6e-8 in float32, 1 + e
    rounds to 1, which loses at most 6e-8 nats per pixel (log1p would keep it); that is below 5e-5
    nats per 784-pixel image, far under the Monte Carlo error of any importance-weighted estimate.

    Shapes: logits (..., N, D), x (N, D) or broadcastable -> nll (..., N).
    """
    xp = get_array_module(logits)
    D = logits.shape[-1]
    e = xp.abs(logits)
    xp.negative(e, out=e)
    xp.exp(e, out=e)
    e += 1.0                                          # 1 + exp(-|l|), in [1, 2]
    w = max(64, -(-D // 64))                          # block width: at most 64 blocks, so <= 64 factors
    prod = e[..., :min(w, D)].copy()
    for k in range(w, D, w):
        blk = e[..., k:k + w]
        prod[..., :blk.shape[-1]] *= blk
    xp.log(prod, out=prod)
    lin = xp.maximum(logits, 0)                       # max(l, 0) - x l
    lin -= x * logits
    return lin.sum(axis=-1) + prod.sum(axis=-1)


def log_weights(model, x, eps, y=None):
    """``model.log_weights(x, eps, y)`` -- log p(x|z) + log p(z) - log q(z|x), (S, N) -- faster.

    For the Bernoulli likelihood the reconstruction term uses :func:`bernoulli_nll_rows` (the same
    numbers up to float rounding), or with numba the fused kernels of :mod:`minivae.cpu_kernels` on
    every core (:func:`_log_weights_fused`, the unconditional dense VAE only); any other likelihood goes
    to ``model.log_weights``.  ``tests/test_fast.py`` checks them against each other.  ``y``: the labels
    of a conditional model.
    """
    if model.config.likelihood != "bernoulli":
        return model.log_weights(x, eps, y)
    fusable = (model.backend == "numpy" and model.dtype in (np.float32, np.float64) and y is None
               and model.config.arch == "mlp" and model.config.n_classes is None)
    ck = _cpu_kernels() if fusable else None
    if ck is not None:
        return _log_weights_fused(model, x, eps, ck)
    x = model._as_input(x, validate=False)
    y1h = model._as_labels(y, x.shape[0])                             # one-hot (N, K), or None
    mu, logvar, _ = model._encoder_forward(x, y1h)
    eps = model._as_eps(eps, x.shape[0])
    z = reparameterize_forward(mu, logvar, eps)[0]                    # (S, N, L)
    S, N, L = z.shape
    logits = model._decoder_forward(z.reshape(S * N, L), _tile(y1h, S))[0][0].reshape(S, N, -1)
    return -bernoulli_nll_rows(logits, x) + log_standard_normal(z) - log_diag_normal(z, mu, logvar)


# Per-thread scratch arrays of _log_weights_fused, reused from call to call: ``eval --iw-k 5000`` makes 5,000
# calls that each need ~100 MB of activations and logits.  Allocated afresh each time, they came back from the
# kernel as new zeroed pages every call (glibc returns such large blocks to the system when freed): 9 million
# page faults and 83 s of system time in a 395 s run (/usr/bin/time -v).  One set per thread, so that two
# threads evaluating at once never share one.
_iw_scratch = threading.local()


def _scratch(name, shape, dtype):
    """A reusable array of ``shape`` and ``dtype`` for the calling thread (contents undefined)."""
    bufs = getattr(_iw_scratch, "bufs", None)
    if bufs is None:
        bufs = _iw_scratch.bufs = {}
    a = bufs.get(name)
    if a is None or a.shape != shape or a.dtype != dtype:
        a = bufs[name] = np.empty(shape, dtype=dtype)
    return a


# One helper thread for the NumPy ufuncs of _log_weights_fused that numba has no fast twin for (tanh and
# exp: NumPy's are SIMD, numba's math.tanh and math.exp are scalar calls: on 10,000 x 200 floats, numba's tanh
# on 2 threads took 16.9 ms against NumPy's 0.85 on one; on 10,000 x 784, exp 15.5 ms against 4.8);
# the calling thread does the first half of the rows, the helper the second (ufuncs release the GIL).
_ufunc_pool = []


def _rows_on_two_threads(fn, *arrays, threads=2):
    """``fn(*[a[lo:hi] for a in arrays])`` for the two halves of the rows at once, when ``threads`` > 1."""
    M = arrays[0].shape[0]
    if threads < 2 or M < 2:
        fn(*arrays)
        return
    if not _ufunc_pool:
        _ufunc_pool.append(ThreadPoolExecutor(max_workers=1, thread_name_prefix="minivae-ufunc"))
    h = M // 2
    other = _ufunc_pool[0].submit(fn, *[a[h:] for a in arrays])
    try:
        fn(*[a[:h] for a in arrays])
    finally:                                        # never leave the helper writing into a scratch array
        other.result()


def _log_weights_fused(model, x, eps, ck):
    """:func:`log_weights` with the fused CPU kernels, on every core numba uses.

    z and log p(z) - log q(z|x) in one pass (``iw_latent``: the log 2 pi terms cancel); the decoder's
    matmuls (BLAS) with bias + ReLU fused, or bias + tanh with NumPy's tanh on two halves of the rows at
    once (other activations: the model's op); then the Bernoulli nll as in :func:`bernoulli_nll_rows` --
    sum (max(l, 0) - x l) with the output bias add and -|l| in one pass, NumPy's SIMD exp (two halves at
    once), and the logs of products of 64 factors (1 + e) in a second pass.  Every array of the pass is a
    per-thread scratch array reused by the next call (see ``_iw_scratch``); only the result is new.
    """
    dt = model.dtype
    K = ck.K
    threads = ck.numba.get_num_threads()                         # ck is only passed when numba is there
    x = np.ascontiguousarray(model._as_input(x, validate=False))
    mu, logvar, _ = model._encoder_forward(x)
    mu, logvar = np.ascontiguousarray(mu), np.ascontiguousarray(logvar)
    eps = np.ascontiguousarray(model._as_eps(eps, x.shape[0]), dtype=dt)
    S, N, L = eps.shape
    z = _scratch("z", eps.shape, dt)
    lw = np.empty((S, N), dtype=np.float64)
    K["iw_latent"](mu, logvar, eps, z, lw)                       # z and log p(z) - log q(z|x)
    p, act = model.params, model.config.activation
    h = z.reshape(S * N, L)
    for i in range(len(model.config.hidden)):
        W = p[f"dec.{i}.W"]
        a = np.matmul(h, W, out=_scratch(f"dec.{i}", (S * N, W.shape[1]), dt))
        if act == "relu":
            K["bias_relu"](a, p[f"dec.{i}.b"])
        elif act == "tanh":
            _rows_on_two_threads(functools.partial(_bias_tanh, b=p[f"dec.{i}.b"]), a, threads=threads)
        else:
            a += p[f"dec.{i}.b"]
            a = model.act_forward(a)[0]
        h = a
    W = p["dec.out.W"]
    a = np.matmul(h, W, out=_scratch("dec.out", (S * N, W.shape[1]), dt))   # (S N, D), logits before the bias
    e = _scratch("e", a.shape, dt)
    lin = _scratch("lin", (S * N,), np.float64)
    K["iw_bernoulli_pre"](a, p["dec.out.b"], x, e, lin)             # l = a + b, e = -|l|, lin = sum max(l,0) - x l
    _rows_on_two_threads(_exp_inplace, e, threads=threads)         # e = exp(-|l|)
    nll = _scratch("nll", (S * N,), np.float64)
    K["iw_bernoulli_post"](e, lin, nll)                             # nll = lin + sum log(1 + e)
    lw -= nll.reshape(S, N)
    return lw.astype(dt)


def _bias_tanh(a, b):
    """a = tanh(a + b) in place (a: (M, H), b: (H,))."""
    a += b
    np.tanh(a, out=a)


def _exp_inplace(e):
    np.exp(e, out=e)
