"""The inputs of every check, written once: the grader (:mod:`.checks`) and the student's ``check.py``
(:mod:`.harness`, which ``make`` ships with a copy of this file as ``check_cases.py``) both draw them here.

NumPy and the standard library only.  Every maker takes a ``numpy.random.Generator`` (see :func:`rng_for`:
the grader seeds it from the run's secret and the student's name, ``check.py`` from a fixed seed), so the two
see the same kind of inputs, drawn the same way, and judge them with the same tolerances.

A backward case is a :class:`Case`: the forward op's name, the inputs it is differentiated in, the trailing
arguments held fixed (``eps``, ``x``, a stride...), and the names of the gradients the backward returns.
"""
import zlib

import numpy as np


def rng_for(seed, key):
    """The generator of one check (``key``: the exercise, and what is drawn) under ``seed``."""
    return np.random.default_rng([int(seed), zlib.crc32(key.encode())])


class Case:
    """One backward case: ``forward(*inputs, *extra) -> (out, cache)`` and the names of the input gradients."""

    def __init__(self, label, fwd, inputs, extra, names):
        self.label, self.fwd, self.inputs, self.extra, self.names = label, fwd, inputs, tuple(extra), names


def gauss(rng, N=4, L=3):
    """mu, and logvar far from 0 (so sigma != sigma^2 shows)."""
    return rng.standard_normal((N, L)), rng.uniform(-2.5, 2.5, (N, L))


def away_from_zero(rng, shape):
    x = rng.standard_normal(shape)
    return np.sign(x) * (0.2 + np.abs(x))      # ReLU's kink at 0 breaks finite differences


def distinct(rng, shape):
    """Well-separated values (0.01 apart): no two entries of a pooling window within h of each other."""
    n = int(np.prod(shape))
    return (rng.permutation(n) * 0.01 - n * 0.005).reshape(shape)


# ------------------------------------------------------------ backward exercises
def dense_backward(rng, big):
    shapes = ((128, 256), (256, 256), (256,)) if big else ((4, 3), (3, 5), (5,))
    return [Case("", "dense_forward", [rng.standard_normal(s) for s in shapes], (), ["dx", "dW", "db"])]


def _act(fwd, make, rng, big):
    return [Case("", fwd, [make(rng, (256, 512) if big else (4, 6))], (), ["dx"])]


def relu_backward(rng, big):
    return _act("relu_forward", away_from_zero, rng, big)


def tanh_backward(rng, big):
    return _act("tanh_forward", lambda rng, s: 1.5 * rng.standard_normal(s), rng, big)


def sigmoid_backward(rng, big):
    return _act("sigmoid_forward", lambda rng, s: 3.0 * rng.standard_normal(s), rng, big)


def reparameterize_backward(rng, big):
    out = []
    for label, S in (("", None), (" (S, N, L)", 3)):
        mu, logvar = gauss(rng, *((256, 256) if big else (4, 3)))
        eps = rng.standard_normal(mu.shape if S is None else (S,) + mu.shape)
        out.append(Case(label, "reparameterize_forward", [mu, logvar], (eps,), ["dmu", "dlogvar"]))
        if big:
            break
    return out


def kl_backward(rng, big):
    return [Case("", "kl_forward", list(gauss(rng, *((256, 256) if big else (5, 3)))), (), ["dmu", "dlogvar"])]


def bernoulli_nll_backward(rng, big):
    out = []
    N, D = (256, 784) if big else (4, 5)
    x = rng.uniform(0, 1, (N, D))
    for label, shape in (("", (N, D)), (" (S, N, D)", (2, N, D))):
        out.append(Case(label, "bernoulli_nll_forward", [2.0 * rng.standard_normal(shape)], (x,), ["dlogits"]))
        if big:
            break
    return out


def conv2d_backward(rng, big):
    if big:
        x, W = rng.standard_normal((8, 16, 28, 28)), rng.standard_normal((32, 16, 3, 3))
        return [Case("", "conv2d_forward", [x, W, rng.standard_normal(32)], (1, 1), ["dx", "dW", "db"])]
    out = []
    for label, (N, C, H, Wd), (F, K), s, p in ((" (stride 1, padding 0)", (2, 3, 5, 6), (4, 3), 1, 0),
                                              (" (stride 2, padding 1)", (3, 2, 7, 6), (3, 4), 2, 1)):
        x, W, b = rng.standard_normal((N, C, H, Wd)), rng.standard_normal((F, C, K, K)), rng.standard_normal(F)
        out.append(Case(label, "conv2d_forward", [x, W, b], (s, p), ["dx", "dW", "db"]))
    return out


def maxpool2d_backward(rng, big):
    if big:
        return [Case("", "maxpool2d_forward", [distinct(rng, (16, 16, 28, 28))], (2,), ["dx"])]
    return [Case(" (size 2, odd H)", "maxpool2d_forward", [distinct(rng, (2, 3, 5, 6))], (2,), ["dx"]),
            Case(" (size 3)", "maxpool2d_forward", [distinct(rng, (2, 2, 6, 7))], (3,), ["dx"])]


def upsample_nearest2d_backward(rng, big):
    if big:
        return [Case("", "upsample_nearest2d_forward", [rng.standard_normal((16, 16, 14, 14))], (2,), ["dx"])]
    return [Case(" (scale 2)", "upsample_nearest2d_forward", [rng.standard_normal((2, 3, 3, 4))], (2,), ["dx"]),
            Case(" (scale 3)", "upsample_nearest2d_forward", [rng.standard_normal((2, 2, 2, 3))], (3,), ["dx"])]


def masked_dense_backward(rng, big):
    """A MADE input mask (degrees 1..n_in against evenly spread hidden degrees, as minivae.made builds it)."""
    n_in, width, N = (256, 256, 128) if big else (5, 7, 4)
    deg_h = 1 + (np.arange(width) * (n_in - 1)) // width
    mask = (deg_h[None, :] >= np.arange(1, n_in + 1)[:, None]).astype(np.float64)
    return [Case("", "masked_dense_forward", [rng.standard_normal(s) for s in ((N, n_in), (n_in, width), (width,))],
                 (mask,), ["dx", "dW", "db"])]


def planar_joint_backward(rng, big):
    """z, u, w, b with w . u = 0.5 (an invertible step, det = 1 + (1 - h^2)/2 > 1)."""
    M, L = (4096, 64) if big else (5, 3)
    z, u, w, b = rng.standard_normal((M, L)), rng.standard_normal(L), rng.standard_normal(L), rng.standard_normal(1)
    u = u + (0.5 - w @ u) * w / (w @ w)
    return [Case("", "planar_joint_forward", [z, u, w, b], (), ["dz", "du", "dw", "db"])]


# exercise id -> (minivae module, the backward's name, maker(rng, big) -> [Case]); big: the cost check's input
BACKWARD = {
    "dense_backward": ("layers", dense_backward),
    "relu_backward": ("layers", relu_backward),
    "tanh_backward": ("layers", tanh_backward),
    "sigmoid_backward": ("layers", sigmoid_backward),
    "reparameterize_backward": ("gaussian", reparameterize_backward),
    "kl_backward": ("gaussian", kl_backward),
    "bernoulli_nll_backward": ("likelihoods", bernoulli_nll_backward),
    "conv2d_backward": ("conv", conv2d_backward),
    "maxpool2d_backward": ("conv", maxpool2d_backward),
    "upsample_nearest2d_backward": ("conv", upsample_nearest2d_backward),
    "masked_dense_backward": ("made", masked_dense_backward),
    "planar_joint_backward": ("flows", planar_joint_backward),
}


# ------------------------------------------------------------- forward exercises
def reparameterize_forward(rng):
    """[(label, mu, logvar, eps)]: eps (N, L), then a leading sample axis."""
    mu, logvar = gauss(rng)
    return [(label, mu, logvar, rng.standard_normal(shape)) for label, shape in
            (("", (4, 3)), (" (S, N, L) eps", (2, 4, 3)))]


def kl_forward(rng):
    """(mu, logvar)"""
    return gauss(rng, 5, 3)


def bernoulli_nll_forward(rng):
    """[(label, logits, x)]: soft targets, a sample axis with binary targets, logits as large as +-60."""
    N, D = 4, 6
    return [
        ("", 3.0 * rng.standard_normal((N, D)), rng.uniform(0, 1, (N, D))),
        (" (S, N, D) logits", 3.0 * rng.standard_normal((2, N, D)), (rng.uniform(size=(N, D)) < 0.5) * 1.0),
        (" (large |logits|)", rng.choice([-1.0, 1.0], (N, D)) * rng.uniform(30, 60, (N, D)),
         (rng.uniform(size=(N, D)) < 0.5) * 1.0),
    ]


def conv_transpose2d_forward(rng):
    """[(label, x, W, b, stride, padding)]"""
    out = []
    for label, (N, C, H, Wd), (Cout, K), s, p in ((" (stride 2, padding 1)", (2, 3, 4, 5), (2, 4), 2, 1),
                                                  (" (stride 1, padding 0)", (3, 2, 3, 4), (3, 3), 1, 0)):
        x, W, b = rng.standard_normal((N, C, H, Wd)), rng.standard_normal((C, Cout, K, K)), rng.standard_normal(Cout)
        out.append((label, x, W, b, s, p))
    return out


def adam_step(rng):
    """Six steps on two arrays: (shapes, p0, grads per step, lr, betas, eps), the hyperparameters random."""
    shapes = {"a": (3, 4), "b": (5,)}
    p0 = {k: rng.standard_normal(s) for k, s in shapes.items()}
    grads = [{k: rng.standard_normal(s) * 10.0 ** rng.uniform(-3, 1) for k, s in shapes.items()} for _ in range(6)]
    lr, betas = 10.0 ** rng.uniform(-2.5, -1), (rng.uniform(0.7, 0.9), rng.uniform(0.9, 0.99))
    eps = 10.0 ** rng.uniform(-3, -2)       # large enough that where eps goes shows in the result
    return shapes, p0, grads, lr, betas, eps


# ------------------------------------------------------------------ vae_backward
VAE_CASES = (
    # (config kwargs, N, S, beta, objective kwargs)
    (dict(x_dim=5, hidden=(4, 3), z_dim=2, activation="tanh", likelihood="bernoulli"), 3, 3, 0.7, {}),
    (dict(x_dim=4, hidden=(3,), z_dim=2, activation="sigmoid", likelihood="gaussian_learned_var"), 3, 2, 1.3, {}),
    (dict(x_dim=4, hidden=(3,), z_dim=2, activation="relu", likelihood="bernoulli"), 3, 3, 0.9, {"iwae_k": 3}),
    (dict(x_dim=4, hidden=(3,), z_dim=3, activation="tanh", likelihood="bernoulli"), 4, 1, 1.1, {"free_bits": 0.05}),
)


def vae_inputs(rng, params, x_dim, z_dim, N, S):
    """Moves every parameter off its initial value (in place) and draws x (N, x_dim) and eps (S, N, z_dim)."""
    for p in params.values():
        p += 0.1 * rng.standard_normal(p.shape)
    return rng.uniform(0.05, 0.95, (N, x_dim)), rng.standard_normal((S, N, z_dim))
