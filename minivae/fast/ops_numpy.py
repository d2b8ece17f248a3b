"""The training step's elementwise work as NumPy ufuncs: the code the fused kernels must match.

:class:`~minivae.fast.FastTrainer` runs the matrix products itself and hands everything elementwise to an
"ops" object, one per device: this one (NumPy, any CPU), :class:`~minivae.fast.ops_numba.NumbaOps` (the
same work in fused, multi-threaded loops) and :class:`~minivae.fast.ops_cupy.CupyOps` (fused CUDA kernels).
The three have the same methods and compute the same numbers (up to float rounding; Adam bit for bit).

Every array is a preallocated buffer (:class:`~minivae.fast.trainer.Buffers`): each op writes with ``out=``
or in place.  With a thread ``pool`` (``threads`` >= 2), Adam runs over two halves of the flat buffer at
once, and the Bernoulli chain over two blocks of rows (NumPy ufuncs release the GIL).
"""
from __future__ import annotations

import math

import numpy as np

from ..gaussian import LOG_2PI
from .adam import adam_update_block

# the Bernoulli chain is split over two threads from this many rows of a batch on
BERNOULLI_SPLIT_ROWS = 128


def run_halves(pool, n, fn):
    """fn(lo, hi) over [0, n): on one thread, or the two halves at once (a pool of one helper thread).

    The first half is cut at a multiple of 64 elements (aligned blocks for SIMD); the caller always waits
    for the helper's half, even when its own half raises."""
    if pool is None:
        fn(0, n)
        return
    half = (n // 2) // 64 * 64
    fut = pool.submit(fn, half, n)
    try:
        fn(0, half)
    finally:
        fut.result()


def gaussian_ufuncs(xp, out, x, B, invN, need_loss, var, host=True):
    """The fixed-variance Gaussian loss and gradient with array ops (NumPy or CuPy): B.dout = (out - x) / (N var);
    returns the sum over the batch of -log p(x|z) (a float, or a device scalar when ``host`` is False)."""
    D = x.shape[1]
    xp.subtract(out, x, out=B.dout)             # r = mean - x
    recon = None
    if need_loss:
        r = B.dout.ravel()
        recon = float(r @ r) * (0.5 / var) if host else (r @ r) * (0.5 / var)
        recon = recon + x.shape[0] * 0.5 * D * (LOG_2PI + math.log(var))
    B.dout *= invN / var                         # dnll/dmean = (mean - x) / var, times 1/N
    return recon


class NumpyOps:
    """The step's elementwise ops as NumPy ufuncs (see the module docstring).

    ``pool``: a ThreadPoolExecutor of one helper thread, or None for one thread.  ``block``: elements per
    Adam block.
    """

    name = "numpy"

    def __init__(self, config, dtype, pool=None, block=1 << 20):
        self.config = config
        self.dtype = np.dtype(dtype)
        self.pool = pool
        self.block = int(block)
        self._tmp = None

    def prepare(self):
        """Before a step's launches from the calling thread (nothing to set for NumPy)."""

    def for_halves(self):
        """The ops for the split step's two half-batches, which already run on two threads: no pool."""
        return NumpyOps(self.config, self.dtype, None, self.block)

    # ---------------------------------------------------------------- layers
    def bias_relu(self, a, b):
        """a = max(a + b, 0) in place; a (N, H), b (H,)."""
        a += b
        np.maximum(a, 0, out=a)

    def relu_backward_db(self, h, d, db, B):
        """d = d * 1[h > 0] in place (dL/da from dL/dh, h = max(a, 0)); db = the sum of d over the rows."""
        mask = B.mask[h.shape[1]]
        np.greater(h, 0, out=mask)             # dL/da = dL/dh * 1[a > 0]  (h = max(a, 0))
        np.multiply(d, mask, out=d)
        np.sum(d, axis=0, out=db)

    def col_sum(self, d, db):
        """db = the sum of d (N, H) over the rows."""
        np.sum(d, axis=0, out=db)

    # ---------------------------------------------------------------- latent layer
    def reparam(self, heads, eps, sig, z):
        """sig = exp(logvar / 2), z = mu + sig eps; heads (N, 2L) = [mu | logvar]."""
        L = z.shape[1]
        mu, logvar = heads[:, :L], heads[:, L:]
        np.multiply(logvar, 0.5, out=sig)
        np.exp(sig, out=sig)
        np.multiply(sig, eps, out=z)
        z += mu

    def latent_backward(self, dz, heads, sig, eps, c, B, need_loss):
        """The reparameterization's backward with the KL term, into B.dheads = [dmu | dlogvar]:

            dmu = dz + c mu;   dlogvar = dz eps sigma / 2 + c (exp(logvar) - 1) / 2,   c = beta / N.

        Returns the KL summed over the batch (float), or None without ``need_loss``.  dz is overwritten."""
        L = dz.shape[1]
        mu, logvar = heads[:, :L], heads[:, L:]
        dmu, dlv = B.dheads[:, :L], B.dheads[:, L:]
        np.multiply(mu, c, out=dmu)
        dmu += dz
        np.exp(logvar, out=dlv)
        dlv -= 1.0
        dlv *= 0.5 * c
        np.multiply(dz, eps, out=dz)
        dz *= sig
        dz *= 0.5
        dlv += dz
        if not need_loss:
            return None
        return 0.5 * float((mu * mu).sum() + (np.exp(logvar) - 1.0 - logvar).sum())

    # ---------------------------------------------------------------- likelihood
    def add_output_bias(self, out, b, B):
        """The logits (or means): out += b.  Returns whether B.t1 now holds -|out| (not here)."""
        out += b
        return False

    def likelihood(self, out, x, B, invN, need_loss, db=None, negabs_done=False):
        """Fill B.dout with dloss/dout (the 1/N folded in) and ``db`` (when given) with its sum over the rows,
        the output bias gradient; return the sum over the batch of -log p(x|z), or None."""
        if self.config.likelihood == "gaussian":
            recon = gaussian_ufuncs(np, out, x, B, invN, need_loss, float(self.config.obs_var))
        else:
            recon = self._bernoulli(out, x, B, invN, need_loss)
        if db is not None:
            np.sum(B.dout, axis=0, out=db)
        return recon

    def _bernoulli(self, out, x, B, invN, need_loss):
        N = out.shape[0]
        if self.pool is None or N < BERNOULLI_SPLIT_ROWS:
            return self._bernoulli_rows(out, x, B, invN, need_loss, 0, N)
        half = (N // 2 + 63) // 64 * 64                  # two row blocks on two threads
        fut = self.pool.submit(self._bernoulli_rows, out, x, B, invN, need_loss, half, N)
        first = self._bernoulli_rows(out, x, B, invN, need_loss, 0, half)
        second = fut.result()
        return first + second if need_loss else None

    @staticmethod
    def _bernoulli_rows(out, x, B, invN, need_loss, lo, hi):
        """The Bernoulli loss and gradient on rows lo:hi; returns their sum of nll (or None)."""
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

    # ---------------------------------------------------------------- Adam
    def adam(self, opt, pf, gf, m, v, consts, pending=None):
        """Adam over the flat buffers in blocks of ``block`` elements (two halves at once with a pool),
        the reference's op sequence (:func:`~minivae.fast.adam.adam_update_block`).  ``pending``: the split
        step's second-half gradients, added to gf block by block first."""
        if self._tmp is None or self._tmp.shape != pf.shape:
            self._tmp = np.empty_like(pf)
        tmp, C = self._tmp, self.block
        # the reference's scalars: NumPy rounds each to the buffers' dtype, as the kernels' constants are
        b1, b2, lr_t, eps_t = opt.b1, opt.b2, float(consts[4]), float(consts[5])

        def run(lo, hi):
            for s in range(lo, hi, C):
                e = min(s + C, hi)
                if pending is not None:                  # split step: g = g(first half) + g(second half)
                    np.add(gf[s:e], pending[s:e], out=gf[s:e])
                adam_update_block(pf[s:e], gf[s:e], m[s:e], v[s:e], tmp[s:e], b1, b2, lr_t, eps_t)

        run_halves(self.pool, pf.size, run)
