"""Discrete latents: the semi-supervised M2 model (Kingma, Rezende, Mohamed & Welling 2014), by hand.

A digit x has a class y in 0..K-1 that is sometimes observed and a continuous style z:

    p(y) = 1/K          p(z) = N(0, I)          p(x|y, z) = Bernoulli(sigmoid(f(y, z)))
    q(y|x) = softmax(a(x))                      q(z|x, y) = N(mu(x, y), diag exp(logvar(x, y)))

q(y|x) is a classifier; the label enters q(z|x, y) and p(x|y, z) through the first dense layer of each
network (:func:`label_dense_forward`: h W + onehot(y) V + b).  The bounds, in nats per example:

    labelled     L(x, y) = E_q(z|x,y)[-log p(x|y, z)] + KL(q(z|x, y) || N(0, I)) + log K    >= -log p(x, y)
    unlabelled   U(x)    = sum_y q(y|x) (L(x, y) + log q(y|x))                             >= -log p(x)

U enumerates the K classes: it is the labelled bound averaged under q(y|x), minus the entropy H(q(y|x)).
The objective of the paper (its eq. 9, written per data point of a training set of N digits) adds the
classifier's cross-entropy on the labelled digits with weight alpha.  The paper's alpha = 0.1 N multiplies
E_labelled[-log q(y|x)]: read as a mean over the labelled digits it is ``alpha = 0.1`` here (our objective is
divided by N, the default); read as a sum over them, as common reimplementations do, it is 0.1 N_l (10 for 100
labels), which gives the classifier much more of the gradient and is ``train --labels N``'s default (with
0.1 the error stays near 50%: docs/results.md):

    J = 1/N [ sum_{labelled} L(x, y) + sum_{unlabelled} U(x) ] + alpha * mean_{labelled} -log q(y|x)

:meth:`M2VAE.loss` takes a minibatch x with labels y (-1 for an unlabelled row): its mean over rows of L or U
is an unbiased estimate of the first part when the rows are drawn uniformly from the training set, and the
cross-entropy is averaged over the labelled rows (or over a separate labelled batch ``x_cls, y_cls``: with
100 labels in 50,000 digits a uniform batch rarely holds one, so training appends one).

The op pairs (each checked against central differences in float64 with a random upstream gradient):

    label_dense       out = h W + Y V + b, Y the (one-hot or relaxed) labels, h shared by label copies
    log_softmax       log q = a - logsumexp(a)
    enumerate_bound   U = sum_k exp(log q_k) (L_k + log q_k)
    pick_nll          -log q_{y}
    gumbel_softmax    y~ = softmax((a + g) / tau)   (Jang et al. 2017; Maddison et al. 2017)
    score_function    the REINFORCE estimator of dU/da from one draw y ~ q(y|x) (Williams 1992)

Parameters (H the hidden widths, L = z_dim, K classes):

    cls.i.W, cls.i.b, cls.out.W (H, K), cls.out.b (K,)         the classifier q(y|x)
    enc.0.W (D, H0), enc.0.V (K, H0), enc.0.b; enc.i.*; enc.mu.*, enc.logvar.*       q(z|x, y)
    dec.0.W (L, H0), dec.0.V (K, H0), dec.0.b; dec.i.*; dec.out.W (H0, D), dec.out.b  p(x|y, z), mirrored

The fast path (:mod:`minivae.fast`) does not cover this model: training and evaluation run this code.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .backend import asarray, get_array_module, get_backend, get_xp, to_numpy
from .config import VAEConfig
from .gaussian import LOG_2PI, kl_backward, kl_forward, reparameterize_backward, reparameterize_forward
from .layers import activation, dense_backward, dense_forward
from .likelihoods import bernoulli_nll_backward, bernoulli_nll_forward
from .model import VAE, ParamDict, _layout, as_generator

UNLABELLED = -1
ESTIMATORS = ("enumerate", "gumbel", "reinforce")


# ============================================================================ the op pairs
def _sum_to(G, ndim):
    """Sum the leading axes of G until it has ``ndim`` axes (the backward of broadcasting over them)."""
    while G.ndim > ndim:
        G = G.sum(axis=0)
    return G


def label_dense_forward(h, Y, W, V, b):
    """A dense layer that also reads labels: ``out = h @ W + Y @ V + b``.

    Shapes: h (N, I) or (C, N, I), Y (N, K) or (C, N, K), W (I, O), V (K, O), b (O,) -> out (C, N, O) or
    (N, O).  C copies of the labels share one h: with Y[c] = onehot(c) for c = 0..K-1 the K classes of an
    enumeration cost one h @ W, not K (row c of V is then the class's bias).  Y may be a relaxed one-hot
    (a Gumbel-softmax draw), so its gradient is returned too.
    """
    out = h @ W + Y @ V + b                      # (C, N, O) by broadcasting h over the C label copies
    return out, (h, Y, W, V)


def label_dense_backward(dout, cache):
    """Gradients of out = h W + Y V + b, with G = dL/dout of out's shape:

        dL/dh = sum_c G_c W^T        (h's shape; the sum over the copies that shared h)
        dL/dW = h^T sum_c G_c        (I, O)
        dL/dY = G V^T                (Y's shape)
        dL/dV = sum_{c,n} Y_cn^T G_cn (K, O)
        dL/db = sum_{c,n} G_cn       (O,)

    Returns ``(dh, dY, dW, dV, db)``.
    """
    h, Y, W, V = cache
    G_h = _sum_to(dout, h.ndim)                  # h was shared by the label copies: add their gradients
    G_Y = _sum_to(dout, Y.ndim)
    dh = G_h @ W.T                               # dL/dh = G W^T
    dW = h.reshape(-1, h.shape[-1]).T @ G_h.reshape(-1, G_h.shape[-1])   # dL/dW = h^T G
    dY = G_Y @ V.T                               # dL/dY = G V^T
    dV = Y.reshape(-1, Y.shape[-1]).T @ G_Y.reshape(-1, G_Y.shape[-1])   # dL/dV = Y^T G
    db = dout.reshape(-1, dout.shape[-1]).sum(axis=0)                     # dL/db = sum of G's rows
    return dh, dY, dW, dV, db


def log_softmax_forward(a):
    """log q_k = a_k - logsumexp_j a_j, along the last axis.  Shapes: a (N, K) -> log q (N, K).

    Stable: the max is subtracted before exp, so no exp overflows and log never sees 0.
    """
    xp = get_array_module(a)
    m = a.max(axis=-1, keepdims=True)
    s = a - m
    logq = s - xp.log(xp.exp(s).sum(axis=-1, keepdims=True))
    return logq, xp.exp(logq)


def log_softmax_backward(dlogq, cache):
    """d log q_k / d a_j = delta_kj - q_j, so with G = dL/dlog q (N, K):

        dL/da_j = G_j - q_j sum_k G_k          (N, K)
    """
    q = cache
    return dlogq - q * dlogq.sum(axis=-1, keepdims=True)     # G_j - q_j sum_k G_k


def enumerate_bound_forward(logq, Lk):
    """The unlabelled bound, the K classes enumerated: U = sum_k q_k (L_k + log q_k), q_k = exp(log q_k).

    Shapes: log q (N, K), L (N, K) (the labelled bound of each class) -> U (N,).
    sum_k q_k log q_k = -H(q(y|x)): the entropy bonus of the paper's U.
    """
    xp = get_array_module(logq)
    q = xp.exp(logq)
    return (q * (Lk + logq)).sum(axis=-1), (q, Lk, logq)


def enumerate_bound_backward(dU, cache):
    """With G = dL/dU (N,):

        dL/dlog q_k = G q_k (L_k + log q_k + 1)     (d q_k / d log q_k = q_k, and d(q log q)/d log q = q (log q + 1))
        dL/dL_k     = G q_k                          (each class's bound, weighted by its probability)

    Returns ``(dlogq, dL)``, (N, K) each.
    """
    q, Lk, logq = cache
    dlogq = dU[:, None] * q * (Lk + logq + 1.0)    # through q_k in both terms, and the log q_k term
    dL = dU[:, None] * q                           # the class's bound enters with weight q_k
    return dlogq, dL


def pick_nll_forward(logq, y):
    """The cross-entropy of the true class: nll_n = -log q_{n, y_n}.  Shapes: log q (N, K), y (N,) int -> (N,)."""
    xp = get_array_module(logq)
    rows = xp.arange(logq.shape[0])
    return -logq[rows, y], (logq.shape, y)


def pick_nll_backward(dnll, cache):
    """dL/dlog q_{n,k} = -G_n if k = y_n else 0, G = dL/dnll (N,).  Returns (N, K)."""
    shape, y = cache
    xp = get_array_module(dnll)
    d = xp.zeros(shape, dtype=dnll.dtype)
    d[xp.arange(shape[0]), y] = -dnll              # only the picked entry moves the loss
    return d


def gumbel_softmax_forward(a, g, tau):
    """The Gumbel-softmax (concrete) relaxation of a draw y ~ softmax(a):  y~ = softmax((a + g) / tau).

    g are standard Gumbel draws (g = -log(-log u), u ~ U(0, 1), an argument: randomness is an argument); the
    argmax of a + g is an exact draw of the class, and as tau -> 0 the relaxed y~ tends to its one-hot
    (Jang, Gu & Poole 2017; Maddison, Mnih & Teh 2017).  Shapes: a, g (N, K) -> y~ (N, K).
    Stable like a softmax: the row's max is subtracted first.
    """
    xp = get_array_module(a)
    s = (a + g) / tau
    s = s - s.max(axis=-1, keepdims=True)
    e = xp.exp(s)
    y = e / e.sum(axis=-1, keepdims=True)
    return y, (y, tau)


def gumbel_softmax_backward(dy, cache):
    """d y~_k / d a_j = y~_k (delta_kj - y~_j) / tau, so with G = dL/dy~ (N, K):

        dL/da_j = y~_j (G_j - sum_k G_k y~_k) / tau      (N, K)   (the same for g, which is not learned)
    """
    y, tau = cache
    return y * (dy - (dy * y).sum(axis=-1, keepdims=True)) / tau


def score_function_backward(f, y, q):
    """The score-function (REINFORCE) estimate of d E_q(y)[f(y)] / d a for q = softmax(a), one draw y per row:

        d/da E_q[f] = E_q[f(y) d log q(y) / d a],     d log q(y) / d a_j = onehot(y)_j - q_j

    so the estimate is  f(y) (onehot(y) - q), unbiased (Williams 1992).  Here f is the unlabelled bound's
    integrand L(x, y) + log q(y|x); its own dependence on a through log q(y) adds d log q(y)/da, whose mean
    under q is 0, and is left out.  A baseline b may be subtracted from f (any b not depending on y keeps
    the estimate unbiased).  Shapes: f (N,), y (N,) int, q (N, K) -> (N, K).
    """
    xp = get_array_module(q)
    onehot = xp.zeros_like(q)
    onehot[xp.arange(q.shape[0]), y] = 1.0
    return f[:, None] * (onehot - q)               # f(y) times the score of the draw


def gumbel_noise(rng, shape, dtype=np.float64):
    """Standard Gumbel draws -log(-log u), u ~ U(0, 1) kept off 0 (so no log(0))."""
    u = rng.random(shape)
    u = np.clip(u, np.finfo(np.float64).tiny, 1.0)
    return (-np.log(-np.log(u))).astype(dtype)


# ============================================================================ the model
@dataclass
class M2Config(VAEConfig):
    """A :class:`~minivae.config.VAEConfig` for M2: ``classes`` K (10 digits); the Bernoulli likelihood on an MLP.
    ``n_classes`` stays None: M2 models p(x) (its labels are partly observed), not p(x|y)."""

    classes: int = 10
    kind: ClassVar[str] = "m2"

    def __post_init__(self):
        super().__post_init__()
        self.classes = int(self.classes)
        if self.classes < 2:
            raise ValueError(f"M2 needs at least 2 classes, got {self.classes}")
        if self.arch != "mlp" or self.n_classes is not None or self.likelihood != "bernoulli":
            raise ValueError("M2 is built on the fully connected Bernoulli VAE (arch 'mlp', likelihood "
                             "'bernoulli', no n_classes)")

    def to_dict(self):
        d = super().to_dict()
        d["kind"] = self.kind
        return d


def param_shapes(config):
    """``[(name, shape)]`` of an M2Config (module docstring)."""
    c = config
    D, L, K, H = c.x_dim, c.z_dim, c.classes, tuple(c.hidden)
    out = []
    prev = D
    for i, w in enumerate(H):
        out += [(f"cls.{i}.W", (prev, w)), (f"cls.{i}.b", (w,))]
        prev = w
    out += [("cls.out.W", (prev, K)), ("cls.out.b", (K,))]
    for net, n_in, widths in (("enc", D, H), ("dec", L, tuple(reversed(H)))):
        prev = n_in
        for i, w in enumerate(widths):
            out += [(f"{net}.{i}.W", (prev, w))] + ([(f"{net}.{i}.V", (K, w))] if i == 0 else []) + \
                   [(f"{net}.{i}.b", (w,))]
            prev = w
        heads = (("mu", L), ("logvar", L)) if net == "enc" else (("out", D),)
        for head, n in heads:
            out += [(f"{net}.{head}.W", (prev, n)), (f"{net}.{head}.b", (n,))]
    return out


class M2VAE(VAE):
    """The M2 model (module docstring).  ``M2VAE(M2Config(x_dim=784, hidden=(500,), z_dim=50))``."""

    output_bias = "dec.out.b"
    semi_supervised = True             # the training loop hands it partial labels (-1: unlabelled)

    def __init__(self, config=None, rng=None, backend=None):
        self.config = config if config is not None else M2Config()
        if not isinstance(self.config, M2Config):
            raise TypeError("config must be a minivae.m2.M2Config")
        c = self.config
        self.backend = backend or get_backend()
        self.xp = get_xp(self.backend)
        self.dtype = np.dtype(c.dtype)
        self.rng = as_generator(rng)
        shapes = param_shapes(c)
        self.layout, self.size = _layout(shapes)
        host = np.empty(self.size, dtype=self.dtype)
        for name, shape in shapes:   # a layer's W, V and b: U(-1/sqrt(m), 1/sqrt(m)), m its fan-in (W's and V's rows)
            stem = name.rsplit(".", 1)[0]
            fan = self.layout[stem + ".W"][1][0] + (self.layout[stem + ".V"][1][0] if stem + ".V" in self.layout
                                                    else 0)
            offset, n = self.layout[name][0], int(np.prod(shape))
            host[offset:offset + n] = self.rng.uniform(-1 / np.sqrt(fan), 1 / np.sqrt(fan), size=n)
        self.flat = asarray(host, self.xp, self.dtype)
        self.params = ParamDict(self.flat, self.layout)
        self.act_forward, self.act_backward = activation(c.activation)
        self.depth = len(c.hidden)
        self.K = c.classes
        self.parts = {}

    # ------------------------------------------------------------ the networks
    def _mlp_forward(self, net, h, heads, Y=None):
        """``net``'s hidden layers (the first reads the labels Y when given) then its heads."""
        p, caches = self.params, []
        for i in range(self.depth):
            if i == 0 and Y is not None:
                h, c1 = label_dense_forward(h, Y, p[f"{net}.0.W"], p[f"{net}.0.V"], p[f"{net}.0.b"])
                c1 = (c1, h.shape)                                     # (C, N, H): rows C*N from here on
                h = h.reshape(-1, h.shape[-1])
            else:
                h, c1 = dense_forward(h, p[f"{net}.{i}.W"], p[f"{net}.{i}.b"])
            h, c2 = self.act_forward(h)
            caches.append((c1, c2))
        outs, c_heads = [], []
        for head in heads:
            o, c = dense_forward(h, p[f"{net}.{head}.W"], p[f"{net}.{head}.b"])
            outs.append(o)
            c_heads.append(c)
        return outs, (caches, c_heads, heads, Y is not None)

    def _mlp_backward(self, net, douts, cache, grads):
        """dL/d(heads) -> (dL/d(input), dL/dY or None); writes ``net``'s gradients into ``grads``."""
        caches, c_heads, heads, labelled = cache
        dh = 0
        for head, d, c in zip(heads, douts, c_heads):
            dx, grads[f"{net}.{head}.W"], grads[f"{net}.{head}.b"] = dense_backward(d, c)
            dh = dh + dx                                               # the heads read the same h: add
        dY = None
        for i in reversed(range(self.depth)):
            c1, c2 = caches[i]
            dh = self.act_backward(dh, c2)
            if i == 0 and labelled:
                c1, shape = c1
                dh, dY, grads[f"{net}.0.W"], grads[f"{net}.0.V"], grads[f"{net}.0.b"] = \
                    label_dense_backward(dh.reshape(shape), c1)
            else:
                dh, grads[f"{net}.{i}.W"], grads[f"{net}.{i}.b"] = dense_backward(dh, c1)
        return dh, dY

    def classifier_forward(self, x):
        """x (N, D) -> (log q(y|x) (N, K), cache)."""
        (a,), c_net = self._mlp_forward("cls", x, ("out",))
        logq, c_sm = log_softmax_forward(a)
        return logq, (c_net, c_sm)

    def classifier_backward(self, dlogq, cache, grads):
        """dL/dlog q (N, K) -> writes every ``cls.*`` gradient (the input x is data)."""
        c_net, c_sm = cache
        self._mlp_backward("cls", [log_softmax_backward(dlogq, c_sm)], c_net, grads)

    def _bound_forward(self, x, Y, eps):
        """The labelled bound L(x, y) for C label copies: x (N, D), Y (C, N, K), eps (S, N, L) -> L (C, N).

        z = mu(x, y) + sigma eps with the same eps for every copy (each copy's estimate is unbiased).
        """
        xp = self.xp
        C, N, K = Y.shape
        S, L, D = eps.shape[0], self.config.z_dim, self.config.x_dim
        (mu, logvar), c_enc = self._mlp_forward("enc", x, ("mu", "logvar"), Y)      # (C*N, L) each
        e = xp.broadcast_to(eps[:, None], (S, C, N, L)).reshape(S, C * N, L)
        z, c_rep = reparameterize_forward(mu, logvar, e)                             # (S, C*N, L)
        Yd = xp.broadcast_to(Y[None], (S, C, N, K)).reshape(S * C * N, K)
        (logits,), c_dec = self._mlp_forward("dec", z.reshape(S * C * N, L), ("out",), Yd)
        xr = xp.broadcast_to(x[None], (C, N, D)).reshape(C * N, D)
        rec, c_rec = bernoulli_nll_forward(logits.reshape(S, C * N, D), xr)         # (S, C*N)
        kl, c_kl = kl_forward(mu, logvar)                                            # (C*N,)
        Lb = rec.mean(axis=0) + kl + math.log(self.K)                                # + log K: -log p(y)
        parts = (rec.mean(axis=0).reshape(C, N), kl.reshape(C, N))
        return Lb.reshape(C, N), parts, (S, C, N, c_enc, c_rep, c_dec, c_rec, c_kl)

    def _bound_backward(self, dL, cache, grads):
        """dL/dL (C, N) -> writes every ``enc.*`` and ``dec.*`` gradient; returns dL/dY (C, N, K)."""
        S, C, N, c_enc, c_rep, c_dec, c_rec, c_kl = cache
        L, D = self.config.z_dim, self.config.x_dim
        dLf = dL.reshape(C * N)
        drec = self.xp.broadcast_to(dLf / S, (S, C * N))                    # L = 1/S sum_s rec_s + ...
        dlogits = bernoulli_nll_backward(drec, c_rec).reshape(S * C * N, D)
        dz, dYd = self._mlp_backward("dec", [dlogits], c_dec, grads)        # (S*C*N, L), (S*C*N, K)
        dmu, dlogvar = reparameterize_backward(dz.reshape(S, C * N, L), c_rep)   # summed over S
        dmu_kl, dlogvar_kl = kl_backward(dLf, c_kl)                         # KL: Kingma & Welling 2014, App. B
        _, dY = self._mlp_backward("enc", [dmu + dmu_kl, dlogvar + dlogvar_kl], c_enc, grads)
        return dY + dYd.reshape(S, C, N, -1).sum(axis=0)                    # Y feeds both networks

    # ---------------------------------------------------------------- checks
    def _labels(self, y, N):
        """Partial labels (N,) int64: a class 0..K-1, or -1 for an unlabelled row; None -> all unlabelled."""
        if y is None:
            return np.full(N, UNLABELLED, dtype=np.int64)
        a = np.asarray(to_numpy(y))
        if a.shape != (N,):
            raise ValueError(f"y must hold one label per row of x, shape ({N},), got {a.shape}")
        if a.dtype.kind not in "iu" and not (a.dtype.kind == "f" and np.isfinite(a).all() and (a == np.round(a)).all()):
            raise ValueError(f"y must be integer labels (-1 for an unlabelled row), got dtype {a.dtype}")
        a = a.astype(np.int64)
        if a.size and (a.min() < UNLABELLED or a.max() >= self.K):
            raise ValueError(f"y holds label {int(a[(a < -1) | (a >= self.K)][0])}, outside -1..{self.K - 1} "
                             f"(-1: unlabelled; {self.K} classes)")
        return a

    def one_hot(self, y):
        """Rows of the K x K identity for int labels y (N,), on the model's backend."""
        return self.xp.eye(self.K, dtype=self.dtype)[self.xp.asarray(y)]

    # ------------------------------------------------------------------ loss
    def loss(self, x, eps=None, beta=1.0, n_samples=1, backward=True, validate=True, iwae_k=None,
             free_bits=0.0, y=None, alpha=0.1, x_cls=None, y_cls=None):
        """The M2 objective J (module docstring) on a minibatch, and its gradients.

        x (N, D); y (N,) the partial labels (-1 or None: unlabelled); eps (S, N, L); alpha the weight of the
        classifier's cross-entropy per data point; x_cls, y_cls a separate labelled batch for it (default: the
        labelled rows of x).  ``self.parts``: loss, recon and kl (the bound's parts per row:
        U = sum_y q(y|x) recon_y + [sum_y q(y|x) (KL_y + log K + log q(y|x))], KL(q(y,z|x) || p(y)p(z))),
        ce (the mean cross-entropy, or None) and n_labelled.
        """
        if iwae_k is not None or free_bits or beta != 1.0:
            raise ValueError("M2 trains on its own bound (no --iwae-k, --free-bits or --beta)")
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha >= 0):
            raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
        xp = self.xp
        x = self.as_input(x, validate)
        N = x.shape[0]
        eps = self.as_eps(eps, N, n_samples)
        yl = self._labels(y, N)
        lab, unl = np.flatnonzero(yl >= 0), np.flatnonzero(yl < 0)
        if x_cls is not None:
            x_c = self.as_input(x_cls, validate)
            y_c = self._labels(y_cls, x_c.shape[0])
            if (y_c < 0).any():
                raise ValueError("y_cls must label every row of x_cls (no -1)")
        else:
            x_c, y_c = (x[xp.asarray(lab)], yl[lab]) if lab.size else (None, None)

        # ---- forward
        terms = xp.zeros(N, dtype=self.dtype)
        recon = xp.zeros(N, dtype=self.dtype)
        c_l = c_u = c_c = None
        if lab.size:
            il = xp.asarray(lab)
            Lb, (rec, _), c_bl = self._bound_forward(x[il], self.one_hot(yl[lab])[None], eps[:, il])
            terms[il] = Lb[0]
            recon[il] = rec[0]
            c_l = (il, c_bl)
        if unl.size:
            iu = xp.asarray(unl)
            xu = x[iu]
            logq, c_q = self.classifier_forward(xu)
            Y = xp.broadcast_to(xp.eye(self.K, dtype=self.dtype)[:, None], (self.K, len(unl), self.K))
            Lb, (rec, _), c_bu = self._bound_forward(xu, Y, eps[:, iu])    # (K, Nu): every class
            U, c_en = enumerate_bound_forward(logq, Lb.T)
            terms[iu] = U
            recon[iu] = (xp.exp(logq) * rec.T).sum(axis=1)
            c_u = (iu, c_q, c_bu, c_en)
        loss = terms.mean()
        ce = None
        if x_c is not None and alpha:
            logq_c, c_qc = self.classifier_forward(x_c)
            nll, c_nll = pick_nll_forward(logq_c, xp.asarray(y_c))
            ce = nll.mean()
            loss = loss + self.dtype.type(alpha) * ce
            c_c = (c_qc, c_nll, nll.shape[0])
        self.parts = {"loss": loss, "recon": recon.mean(), "kl": (terms - recon).mean(), "ce": ce,
                      "n_labelled": int(lab.size)}
        if not backward:
            return loss, None

        # ---- backward
        grads = self.new_grads()
        acc = self.new_grads()                       # each backward writes; the three parts are added here
        dterm = self.dtype.type(1.0 / N)             # loss = 1/N sum_n term_n
        if c_l is not None:
            il, c_bl = c_l
            g = self.new_grads()
            self._bound_backward(xp.full((1, len(il)), dterm, dtype=self.dtype), c_bl, g)
            acc.flat += g.flat
        if c_u is not None:
            iu, c_q, c_bu, c_en = c_u
            dlogq, dLk = enumerate_bound_backward(xp.full(len(iu), dterm, dtype=self.dtype), c_en)
            g = self.new_grads()
            self._bound_backward(dLk.T, c_bu, g)     # each class's bound, weighted by q_k / N
            self.classifier_backward(dlogq, c_q, g)
            acc.flat += g.flat
        if c_c is not None:
            c_qc, c_nll, M = c_c
            dlogq = pick_nll_backward(xp.full(M, alpha / M, dtype=self.dtype), c_nll)   # alpha * mean -log q_y
            g = self.new_grads()
            self.classifier_backward(dlogq, c_qc, g)
            acc.flat += g.flat
        grads.flat[...] = acc.flat
        return loss, grads

    # ---------------------------------------------------- U by one draw of y
    def unlabelled_estimate(self, x, eps, estimator, noise=None, tau=0.5, baseline=0.0):
        """The mean unlabelled bound 1/N sum_n U(x_n) and an estimate of its gradient from one draw of y per row.

        estimator  "enumerate": the exact sum over the K classes (``loss`` with no labels; noise unused);
                   "gumbel":    the relaxed draw y~ = softmax((a + g) / tau) in place of the one-hot, noise = g
                                (N, K) Gumbel draws:  U~ = L(x, y~) + sum_k q_k log q_k, its exact gradient
                                (biased for U's: the relaxation);
                   "reinforce": a class y ~ q(y|x) per row, noise = y (N,) ints: the value L(x, y) + log q(y|x);
                                the bound's parameters get dL(x, y), the classifier the score-function
                                estimate (f(y) - baseline)(onehot(y) - q) (unbiased).
        Returns ``(value, grads)``.
        """
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}")
        if estimator == "enumerate":
            return self.loss(x, eps=eps)
        xp = self.xp
        x = self.as_input(x)
        N = x.shape[0]
        eps = self.as_eps(eps, N)
        logq, c_q = self.classifier_forward(x)
        q = xp.exp(logq)
        grads = self.new_grads()
        dterm = xp.full(N, 1.0 / N, dtype=self.dtype)
        if estimator == "gumbel":
            ys, c_gs = gumbel_softmax_forward(logq, xp.asarray(noise, dtype=self.dtype), tau)   # softmax(log q) = q
            Lb, _, c_b = self._bound_forward(x, ys[None], eps)
            value = (Lb[0] + (q * logq).sum(axis=1)).mean()
            dY = self._bound_backward(dterm[None], c_b, grads)[0]          # through the relaxed labels too
            dlogq = gumbel_softmax_backward(dY, c_gs)                       # y~ = softmax((log q + g)/tau)
            dlogq += dterm[:, None] * q * (logq + 1.0)                       # -H(q) = sum_k q_k log q_k
        else:
            yv = np.asarray(to_numpy(noise)).astype(np.int64)
            Lb, _, c_b = self._bound_forward(x, self.one_hot(yv)[None], eps)
            f = Lb[0] + logq[xp.arange(N), xp.asarray(yv)]
            value = f.mean()
            self._bound_backward(dterm[None], c_b, grads)                    # the drawn class's bound
            da = score_function_backward((f - baseline) / N, xp.asarray(yv), q)
            g = self.new_grads()
            self._mlp_backward("cls", [da], c_q[0], g)                       # da is already d/d logits
            grads.flat += g.flat
            return value, grads
        g = self.new_grads()
        self.classifier_backward(dlogq, c_q, g)
        grads.flat += g.flat
        return value, grads

    # ------------------------------------------------------------- the rest
    def classify(self, x, batch_size=1000):
        """The most probable class under q(y|x), (N,) int64 on the host."""
        x = self.as_input(x, validate=False)
        out = [to_numpy(self.classifier_forward(x[i:i + batch_size])[0].argmax(axis=1))
               for i in range(0, x.shape[0], batch_size)]
        return np.concatenate(out).astype(np.int64)

    def error_rate(self, x, y):
        """The fraction of rows whose most probable class under q(y|x) is not the label y."""
        y = np.asarray(to_numpy(y)).astype(np.int64)
        return float((self.classify(x) != y).mean())

    def log_weights(self, x, eps, y=None):
        """The y-enumerated importance log-weights, (S, N):

            log w_s = log sum_y p(y) p(x|y, z_sy) p(z_sy) / q(z_sy|x, y),   z_sy = mu(x, y) + sigma(x, y) eps_s

        Each class's average over s is an unbiased estimate of p(x|y), so (1/S) sum_s w_s is an unbiased
        estimate of p(x) = sum_y p(y) p(x|y), and the IW bound log (1/S) sum_s w_s <= log p(x) (Jensen)
        tightens with S.  q(y|x) is not used: every class is enumerated, so a wrong classifier cannot
        loosen the bound.
        """
        if y is not None:
            raise ValueError("M2's bound on log p(x) sums over the classes itself: give no labels y")
        xp = self.xp
        x = self.as_input(x, validate=False)
        N, L, D, K = x.shape[0], self.config.z_dim, self.config.x_dim, self.K
        eps = self.as_eps(eps, N)
        S = eps.shape[0]
        Y = xp.broadcast_to(xp.eye(K, dtype=self.dtype)[:, None], (K, N, K))
        (mu, logvar), _ = self._mlp_forward("enc", x, ("mu", "logvar"), Y)
        z = reparameterize_forward(mu, logvar, xp.broadcast_to(eps[:, None], (S, K, N, L)).reshape(S, K * N, L))[0]
        Yd = xp.broadcast_to(Y[None], (S, K, N, K)).reshape(S * K * N, K)
        (logits,), _ = self._mlp_forward("dec", z.reshape(S * K * N, L), ("out",), Yd)
        rec = bernoulli_nll_forward(logits.reshape(S, K * N, D), xp.broadcast_to(x[None], (K, N, D)).reshape(K * N, D))[0]
        e = xp.broadcast_to(eps[:, None], (S, K, N, L)).reshape(S, K * N, L)
        log_pz = -0.5 * (z * z + LOG_2PI).sum(axis=-1)
        log_qz = -0.5 * (e * e + logvar + LOG_2PI).sum(axis=-1)
        lw = (-rec + log_pz - log_qz).reshape(S, K, N) - math.log(K)                  # + log p(y)
        m = lw.max(axis=1, keepdims=True)
        return (m + xp.log(xp.exp(lw - m).sum(axis=1, keepdims=True)))[:, 0]           # stable logsumexp over y

    def encode(self, x, y=None):
        """mu and logvar of q(z|x, y), (N, L) each; y defaults to the classifier's most probable class."""
        x = self.as_input(x)
        yv = self.classify(x) if y is None else self._labels(y, x.shape[0])
        (mu, logvar), _ = self._mlp_forward("enc", x, ("mu", "logvar"), self.one_hot(yv))
        return mu, logvar

    def reconstruct(self, x, y=None):
        """E[x|y, mu(x, y)], y defaulting to the classifier's most probable class: (N, D)."""
        x = self.as_input(x)
        yv = self.classify(x) if y is None else self._labels(y, x.shape[0])
        return self.decode(self.encode(x, yv)[0], yv)

    def decode(self, z, y=None):
        """E[x|y, z] for z (N, L) and classes y (N,) or one class (default 0)."""
        z = self.xp.asarray(z, dtype=self.dtype)
        yv = np.full(z.shape[0], 0 if y is None else y, dtype=np.int64) if np.ndim(y) == 0 else np.asarray(y)
        (logits,), _ = self._mlp_forward("dec", z, ("out",), self.one_hot(yv))
        from .layers import sigmoid
        return sigmoid(logits)

    def sample(self, n, rng=None, y=None):
        """y ~ p(y) (or the class ``y``), z ~ N(0, I), then E[x|y, z]: (n, D)."""
        g = as_generator(rng) if rng is not None else self.rng
        yv = g.integers(0, self.K, size=int(n)) if y is None else np.full(int(n), int(y))
        z = g.standard_normal((int(n), self.config.z_dim))
        return self.decode(z, yv)

    def __repr__(self):
        c = self.config
        return (f"M2VAE({c.x_dim}-{'-'.join(map(str, c.hidden))}-{c.z_dim}, {self.K} classes, {c.activation}, "
                f"{c.dtype}, backend={self.backend}, {self.size} params)")


def choose_labelled(y, n_labels, n_classes, seed):
    """The rows of a training set whose labels M2 may see: ``n_labels / n_classes`` of each class, drawn without
    replacement with the generator of ``seed`` (the paper's protocol: a balanced random subset).  Returns the
    sorted row indices (n_labels,); ValueError (one line) when n_labels is not a positive multiple of the
    number of classes or a class has too few rows."""
    y = np.asarray(y)
    if n_labels < n_classes or n_labels % n_classes:
        raise ValueError(f"--labels {n_labels}: M2 draws the same number of labelled digits from each of the "
                         f"{n_classes} classes, so the count must be a positive multiple of {n_classes}")
    if n_labels > len(y):
        raise ValueError(f"--labels {n_labels} is more than the {len(y)} training images")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 2014]))
    per = n_labels // n_classes
    rows = []
    for k in range(n_classes):
        of_k = np.flatnonzero(y == k)
        if len(of_k) < per:
            raise ValueError(f"--labels {n_labels} needs {per} training images of class {k}, which has only "
                             f"{len(of_k)}")
        rows.append(rng.choice(of_k, size=per, replace=False))
    return np.sort(np.concatenate(rows))


def work(config, labelled=False):
    """``(once, per_draw)`` multiply-adds per example (minivae.limits), for the C classes an example enumerates
    (an unlabelled one all K, a labelled one its own).  Once: the classifier q(y|x), the encoder's x @ enc.0.W,
    which the class copies share (:func:`label_dense_forward`), and C times the rest of q(z|x, y) (its label term
    Y @ enc.0.V, the hidden layers, the heads).  Per draw of z: C times the decoder p(x|y, z)."""
    size = {name: math.prod(s) for name, s in param_shapes(config) if not name.endswith(".b")}   # b: adds
    C = 1 if labelled else config.classes
    enc_rest = sum(n for name, n in size.items() if name.startswith("enc.")) - size["enc.0.W"]
    once = sum(n for name, n in size.items() if name.startswith("cls.")) + size["enc.0.W"] + C * enc_rest
    return once, C * sum(n for name, n in size.items() if name.startswith("dec."))


def _register():
    from .model import ModelKind, register_model_kind
    register_model_kind("m2", ModelKind(M2Config, M2VAE, param_shapes, work))


_register()
