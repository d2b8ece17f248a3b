"""Adam over the flat parameter buffer: the reference's update (:class:`minivae.optim.Adam`), op for op.

Three implementations of one update, m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;
p -= lr_t m / (sqrt(v) + eps_t):

* :func:`adam_update_block`, NumPy ufuncs on one block of the buffer (the code the others match);
* the fused kernel ``cpu_kernels.KERNELS["adam"]`` (numba): the same op sequence in one pass, bit for bit;
* the CuPy kernel of :mod:`minivae.fast.ops_cupy`.

:func:`fused_adam_step` is ``opt.step`` in one fused pass for any model whose parameters share the flat layout
(``train`` uses it for the models :class:`~minivae.fast.FastTrainer` does not cover, the conv VAEs).
"""
from __future__ import annotations

import math

import numpy as np

from ..optim import Adam
from . import cpu_kernels
from .threads import set_numba_threads


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


def plain_adam(opt):
    """An :class:`~minivae.optim.Adam` without weight decay or clipping: the one update the fused passes make."""
    return type(opt) is Adam and not opt.weight_decay and opt.clip_norm is None


def adam_begin_step(opt, params, grads):
    """Advance a plain Adam by one step; return the flat buffers p, g, m, v and the kernel constants.

    The constants are those of :meth:`minivae.optim.Adam._update`, in the buffers' dtype:
    (b1, 1 - b1, b2, 1 - b2, lr_t, eps_t) with lr_t = lr·sqrt(1 - b2^t)/(1 - b1^t) and
    eps_t = eps·sqrt(1 - b2^t).  The caller then runs the update on them.
    """
    ((pf, gf), state), = opt.begin_step(params, grads)          # one pair: the flat buffers
    b1, b2 = opt.b1, opt.b2
    bc1, bc2 = 1.0 - b1 ** opt.t, 1.0 - b2 ** opt.t
    f = pf.dtype.type
    consts = (f(b1), f(1.0 - b1), f(b2), f(1.0 - b2), f(opt.lr * math.sqrt(bc2) / bc1), f(opt.eps * math.sqrt(bc2)))
    return pf, gf, state["m"], state["v"], consts


def fused_adam_step(opt, params, grads, threads=1):
    """``opt.step(params, grads)`` in one fused pass over the flat buffers, when it applies.

    It applies to a plain :class:`~minivae.optim.Adam` (no weight decay, no clipping) with numba installed,
    on NumPy float32 or float64 parameters and gradients that share one flat layout (a model's ``params``
    and the ``grads`` of ``model.loss``): the update is then NumPy's op sequence bit for bit, on ``threads``
    threads.  Returns True when it made the step, False when it did nothing and the caller must call
    ``opt.step``.
    """
    pf, gf = getattr(params, "flat", None), getattr(grads, "flat", None)
    if (not cpu_kernels.AVAILABLE or not plain_adam(opt) or type(pf) is not np.ndarray or type(gf) is not np.ndarray
            or pf.dtype != gf.dtype or pf.dtype not in (np.float32, np.float64)
            or getattr(params, "layout", None) != getattr(grads, "layout", None)):
        return False
    pf, gf, m, v, consts = adam_begin_step(opt, params, grads)
    set_numba_threads(threads)
    cpu_kernels.KERNELS["adam"](pf, gf, m, v, *consts)
    return True
