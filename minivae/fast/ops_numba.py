"""The training step's elementwise work as the fused CPU kernels of :mod:`minivae.fast.cpu_kernels` (numba).

The same methods as :class:`~minivae.fast.ops_numpy.NumpyOps` and the same numbers (up to float rounding;
Adam bit for bit), each chain in fewer passes over memory and on several cores: bias + ReLU in one pass; ReLU's
backward with its bias gradient; the latent layer forward, and backward with the KL sum; the Bernoulli (or
Gaussian) loss, gradient and output-bias gradient (after one NumPy SIMD exp); Adam in one pass.  Every sum is
split into fixed blocks added in a fixed order, so the numbers do not depend on the thread count.
"""
from __future__ import annotations

import math

import numpy as np

from ..gaussian import LOG_2PI
from . import cpu_kernels
from .threads import set_numba_threads


class NumbaOps:
    """The step's elementwise ops as fused kernels.

    ``kernels``: ``cpu_kernels.KERNELS`` (parallel on large arrays) or ``cpu_kernels.SERIAL`` (for callers
    that already run on several Python threads: the split step's halves).  ``threads``: numba's thread count,
    set on the calling thread by :meth:`prepare`.
    """

    name = "numba"

    def __init__(self, config, dtype, threads=1, kernels=None):
        if not cpu_kernels.AVAILABLE:
            raise ValueError("the fused kernels need numba (pip install numba)")
        self.config = config
        self.dtype = np.dtype(dtype)
        self.threads = int(threads)
        self.kernels = cpu_kernels.KERNELS if kernels is None else kernels

    def prepare(self):
        """Before a step's launches from the calling thread: numba's thread count (a per-thread setting)."""
        set_numba_threads(self.threads)

    def for_halves(self):
        """The ops for the split step's two half-batches, which already run on two threads: the serial twins."""
        return NumbaOps(self.config, self.dtype, 1, cpu_kernels.SERIAL)

    # ---------------------------------------------------------------- layers
    def bias_relu(self, a, b):
        self.kernels["bias_relu"](a, b)

    def relu_backward_db(self, h, d, db, B):
        self.kernels["relu_backward_db"](h, d, db)       # one pass: mask and column sums

    def col_sum(self, d, db):
        self.kernels["col_sum"](d, db)

    # ---------------------------------------------------------------- latent layer
    def reparam(self, heads, eps, sig, z):
        self.kernels["reparam"](heads, eps, sig, z)

    def latent_backward(self, dz, heads, sig, eps, c, B, need_loss):
        f = self.dtype.type
        kl_rows = B.vector("kl_rows", dz.shape[0])
        self.kernels["latent_backward"](dz, heads, sig, eps, f(c), f(0.5 * c), B.dheads, kl_rows)
        return float(kl_rows.sum()) if need_loss else None

    # ---------------------------------------------------------------- likelihood
    def add_output_bias(self, out, b, B):
        """out += b; for the Bernoulli likelihood also B.t1 = -|out| in the same pass (returns True)."""
        if self.config.likelihood == "bernoulli":
            self.kernels["bias_negabs"](out, b, B.t1)     # logits = out + b, t1 = -|logits|
            return True
        out += b
        return False

    def likelihood(self, out, x, B, invN, need_loss, db=None, negabs_done=False):
        """As :meth:`NumpyOps.likelihood`; ``negabs_done``: B.t1 already holds -|out|."""
        N, D = out.shape
        f = self.dtype.type
        if db is None:
            db = B.vector("db", D, self.dtype)             # a throw-away bias gradient (the kernel overwrites it)
        parts = B.vector("parts", -(-N // cpu_kernels.ROW_BLOCK))
        if self.config.likelihood == "gaussian":
            var = float(self.config.obs_var)
            self.kernels["gaussian"](out, x, f(invN / var), B.dout, db, parts)
            if not need_loss:
                return None
            return float(parts.sum()) * (0.5 / var) + N * 0.5 * D * (LOG_2PI + math.log(var))
        if not negabs_done:
            np.abs(out, out=B.t1)
            np.negative(B.t1, out=B.t1)
        np.exp(B.t1, out=B.t1)                          # e = exp(-|l|): NumPy's SIMD exp, one pass
        self.kernels["bernoulli"](out, x, B.t1, f(invN), B.dout, db, bool(need_loss), parts)
        return float(parts.sum()) if need_loss else None

    # ---------------------------------------------------------------- Adam
    def adam(self, opt, pf, gf, m, v, consts, pending=None):
        """One pass over p, g, m, v: NumPy's op sequence, bit for bit, on ``threads`` threads.
        ``pending``: the split step's second-half gradients, added to g in the same pass."""
        self.prepare()
        if pending is not None:                          # split step: g = g(first half) + g(second half)
            self.kernels["adam_add"](pf, gf, pending, m, v, *consts)
        else:
            self.kernels["adam"](pf, gf, m, v, *consts)
