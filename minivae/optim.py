"""Optimizers: SGD with momentum, Adagrad and Adam, with one interface.

    opt = Adam(lr=1e-3)
    loss, grads = model.loss(x)
    opt.step(model.params, grads)        # updates params in place

Every optimizer also takes ``weight_decay`` (an L2 penalty: ``g <- g + wd * p``,
applied before the update) and ``clip_norm`` (rescale the gradient so its
global L2 norm is at most ``clip_norm``, see :func:`clip_grad_norm`).

When ``params`` and ``grads`` are the model's :class:`~minivae.model.ParamDict`
objects, the update runs on their flat buffers: a handful of in-place passes
over one array instead of a loop over every tensor.  Plain dicts work too.

``state_dict()`` / ``load_state_dict()`` give the optimizer state as NumPy
arrays and numbers, for checkpoints.
"""
from __future__ import annotations

import math

import numpy as np

from .backend import asarray, get_array_module, to_numpy


def _pairs(params, grads):
    """[(param, grad)] over the flat buffers when both have one, else per key."""
    pf, gf = getattr(params, "flat", None), getattr(grads, "flat", None)
    if pf is not None and gf is not None and getattr(params, "layout", None) == getattr(grads, "layout", None):
        return [(pf, gf)]
    if set(params) != set(grads):
        raise KeyError(f"params and grads have different keys: {sorted(set(params) ^ set(grads))}")
    return [(params[k], grads[k]) for k in params]


def global_norm(grads):
    """sqrt(sum of squares of every gradient entry), as a 0-d device array."""
    arrays = [grads.flat] if getattr(grads, "flat", None) is not None else list(grads.values())
    xp = get_array_module(arrays[0])
    total = sum(xp.vdot(a.ravel(), a.ravel()) for a in arrays)
    return xp.sqrt(total)


def clip_grad_norm(grads, max_norm):
    """Scale all gradients in place by min(1, max_norm / ||g||); return ||g|| (before).

    The scale is computed on the device, so no host synchronisation happens.
    """
    norm = global_norm(grads)
    xp = get_array_module(norm)
    scale = xp.minimum(1.0, max_norm / (norm + 1e-6)).astype(norm.dtype)
    arrays = [grads.flat] if getattr(grads, "flat", None) is not None else list(grads.values())
    for a in arrays:
        a *= scale
    return norm


class Optimizer:
    """Base class: handles weight decay, clipping, step counting and state."""

    state_names = ()
    nonneg_state = ()           # state arrays that are sums of squares: a negative entry is corrupt

    def __init__(self, lr, weight_decay=0.0, clip_norm=None):
        if not lr > 0:
            raise ValueError(f"learning rate must be positive, got {lr}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if clip_norm is not None and not clip_norm > 0:
            raise ValueError(f"clip_norm must be positive, got {clip_norm}")
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.clip_norm = clip_norm
        self.t = 0
        self.state = None       # list (one entry per param array) of {name: array}

    def _init_state(self, pairs):
        self.state = [{n: get_array_module(p).zeros_like(p) for n in self.state_names} for p, _ in pairs]

    def step(self, params, grads):
        """One update of ``params`` in place from ``grads`` (which may be modified)."""
        if self.clip_norm is not None:
            clip_grad_norm(grads, self.clip_norm)
        for (p, g), st in self.begin_step(params, grads):
            if self.weight_decay:
                g += self.weight_decay * p       # L2 penalty wd/2 ||p||^2 has gradient wd * p
            self._update(p, g, st)

    def begin_step(self, params, grads):
        """Count one more step (``t``) and return ``[((param, grad), state)]``: the arrays to update, with
        the optimizer state of each (created on the first step).

        The arrays are the flat buffers when ``params`` and ``grads`` share one layout (a model's
        :class:`~minivae.model.ParamDict` and the ``grads`` of ``model.loss``), so there is one pair; else
        one pair per key.  :meth:`step` runs its update on them; another implementation of the same update
        (minivae.fast's fused Adam) starts here too.
        """
        pairs = self.ensure_state(params, grads)
        self.t += 1
        return list(zip(pairs, self.state))

    def ensure_state(self, params, grads):
        """Create the optimizer state for these arrays if it is not there yet, without counting a step (the
        CUDA-graph step of minivae.fast captures an update on it before the first step); returns the pairs
        ``[(param, grad)]`` as :meth:`begin_step` sees them."""
        pairs = _pairs(params, grads)
        if self.state is None or len(self.state) != len(pairs):
            self._init_state(pairs)
        return pairs

    def _update(self, p, g, st):
        raise NotImplementedError

    # -------------------------------------------------------------- state
    def state_dict(self):
        d = {"t": self.t, "lr": self.lr}
        for i, st in enumerate(self.state or []):
            for n, a in st.items():
                d[f"{i}.{n}"] = to_numpy(a)
        return d

    def load_state_dict(self, d, params):
        """Restore from :meth:`state_dict` output; ``params`` fixes backend and layout."""
        pairs = _pairs(params, params)
        self.t = int(d["t"])
        self.lr = float(d.get("lr", self.lr))
        self._init_state(pairs)
        for i, st in enumerate(self.state):
            for n in st:
                key = f"{i}.{n}"
                if key not in d:
                    if self.t == 0:
                        continue
                    raise ValueError(f"optimizer state is missing {key!r}")
                src = np.asarray(d[key])
                if src.shape != st[n].shape:
                    raise ValueError(f"optimizer state {key!r} has shape {src.shape}, expected {st[n].shape}")
                st[n][...] = asarray(src, get_array_module(st[n]))


class SGD(Optimizer):
    """SGD with (heavy-ball) momentum:  v <- mu v - lr g;  p <- p + v."""

    state_names = ("velocity",)

    def __init__(self, lr=1e-2, momentum=0.9, weight_decay=0.0, clip_norm=None):
        super().__init__(lr, weight_decay, clip_norm)
        self.momentum = float(momentum)

    def _update(self, p, g, st):
        v = st["velocity"]
        v *= self.momentum
        v -= self.lr * g
        p += v


class Adagrad(Optimizer):
    """Adagrad (Duchi et al. 2011; the optimizer of the AEVB paper):

        G <- G + g^2;    p <- p - lr * g / (sqrt(G) + eps)
    """

    state_names = ("sum_sq",)
    nonneg_state = ("sum_sq",)

    def __init__(self, lr=1e-2, eps=1e-10, weight_decay=0.0, clip_norm=None):
        super().__init__(lr, weight_decay, clip_norm)
        self.eps = float(eps)

    def _update(self, p, g, st):
        xp = get_array_module(p)
        G = st["sum_sq"]
        G += g * g
        p -= self.lr * g / (xp.sqrt(G) + self.eps)


class Adam(Optimizer):
    """Adam (Kingma & Ba 2015), with bias correction:

        m <- b1 m + (1 - b1) g                 first moment
        v <- b2 v + (1 - b2) g^2               second moment
        p <- p - lr * m_hat / (sqrt(v_hat) + eps),   m_hat = m / (1 - b1^t),  v_hat = v / (1 - b2^t)

    The last line is computed in the equivalent form
        p <- p - lr_t * m / (sqrt(v) + eps_t),
        lr_t = lr * sqrt(1 - b2^t) / (1 - b1^t),   eps_t = eps * sqrt(1 - b2^t),
    so the bias corrections are two scalars instead of two extra array passes.
    """

    state_names = ("m", "v")
    nonneg_state = ("v",)

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, clip_norm=None):
        super().__init__(lr, weight_decay, clip_norm)
        self.b1, self.b2 = (float(b) for b in betas)
        self.eps = float(eps)
        self._tmp = None

    def _update(self, p, g, st):
        xp = get_array_module(p)
        if self._tmp is None or self._tmp.shape != p.shape or get_array_module(self._tmp) is not xp:
            self._tmp = xp.empty_like(p)
        tmp = self._tmp
        m, v, b1, b2 = st["m"], st["v"], self.b1, self.b2
        ### BEGIN SOLUTION adam_step
        bc1 = 1.0 - b1 ** self.t                 # bias corrections for step t (t starts at 1)
        bc2 = 1.0 - b2 ** self.t
        lr_t = self.lr * math.sqrt(bc2) / bc1
        eps_t = self.eps * math.sqrt(bc2)
        m *= b1                                  # m = b1 m + (1 - b1) g
        xp.multiply(g, 1.0 - b1, out=tmp)
        m += tmp
        v *= b2                                  # v = b2 v + (1 - b2) g^2
        xp.multiply(g, g, out=tmp)
        tmp *= 1.0 - b2
        v += tmp
        xp.sqrt(v, out=tmp)                      # p -= lr_t m / (sqrt(v) + eps_t)
        tmp += eps_t
        xp.divide(m, tmp, out=tmp)
        tmp *= lr_t
        p -= tmp
        ### END SOLUTION


# ----------------------------------------------------------------------------
# The registry: the optimizers a training run can name
# ----------------------------------------------------------------------------
OPTIMIZERS = {}   # name -> Optimizer subclass


def register_optimizer(name, cls):
    """Make ``name`` an optimizer that :func:`make_optimizer` and the command line accept."""
    if not (isinstance(cls, type) and issubclass(cls, Optimizer)):
        raise TypeError(f"optimizer {name!r}: expected an Optimizer subclass, got {cls!r}")
    OPTIMIZERS[name] = cls
    return cls


register_optimizer("sgd", SGD)
register_optimizer("adagrad", Adagrad)
register_optimizer("adam", Adam)


def make_optimizer(name, lr, **kwargs):
    """Build a registered optimizer by name ("sgd", "adagrad", "adam")."""
    try:
        cls = OPTIMIZERS[name]
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r}: choose one of {', '.join(OPTIMIZERS)}") from None
    return cls(lr=lr, **kwargs)
