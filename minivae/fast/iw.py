"""Evaluation: the importance log-weights of :meth:`minivae.model.VAE.log_weights`, computed faster.

``evaluate.iw_log_likelihood`` asks :func:`log_weights` for blocks of log w = log p(x|z) + log p(z) - log q(z|x)
(S samples, N examples).  The reconstruction term of the Bernoulli likelihood dominates the cost; here it
takes far fewer logarithms (:func:`bernoulli_nll_rows`), and with numba the whole chain runs as fused kernels
on every core (:func:`_log_weights_fused`, the unconditional dense VAE).  Any other likelihood goes to the
model's own ``log_weights``.  ``tests/test_fast.py`` checks them against each other.
"""
from __future__ import annotations

import functools
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..backend import get_array_module
from ..gaussian import log_diag_normal, log_standard_normal, reparameterize_forward
from ..model import tile_labels
from . import cpu_kernels
from .threads import count as thread_count
from .threads import set_numba_threads


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
    numbers up to float rounding), or with numba the fused kernels of :mod:`minivae.fast.cpu_kernels` on
    every core (:func:`_log_weights_fused`, the unconditional dense VAE only); any other likelihood goes
    to ``model.log_weights``.  ``y``: the labels of a conditional model.
    """
    if model.config.likelihood != "bernoulli" or getattr(model.config, "kind", "vae") != "vae":
        return model.log_weights(x, eps, y)          # not the plain VAE (e.g. a flow or a MADE decoder): its own
    fusable = (model.backend == "numpy" and model.dtype in (np.float32, np.float64) and y is None
               and model.config.arch == "mlp" and model.config.n_classes is None)
    if fusable and cpu_kernels.AVAILABLE:
        return _log_weights_fused(model, x, eps)
    x = model.as_input(x, validate=False)
    y1h = model.labels_one_hot(y, x.shape[0])                         # one-hot (N, n_classes), or None
    mu, logvar, _ = model.encoder_forward(x, y1h)
    eps = model.as_eps(eps, x.shape[0])
    z = reparameterize_forward(mu, logvar, eps)[0]                    # (S, N, L)
    S, N, L = z.shape
    logits = model.decoder_forward(z.reshape(S * N, L), tile_labels(y1h, S))[0][0].reshape(S, N, -1)
    return -bernoulli_nll_rows(logits, x) + log_standard_normal(z) - log_diag_normal(z, mu, logvar)


# Per-thread scratch arrays of _log_weights_fused, reused from call to call: ``eval --iw-k 5000`` makes 5,000
# calls that each need ~100 MB of activations and logits, and arrays allocated afresh each time came back as
# new zeroed pages every call (benchmarks/README.md, "Notes from the code").  One set per thread, so that two
# threads evaluating at once never share one.
_iw_scratch = threading.local()


def scratch(name, shape, dtype):
    """A reusable array of ``shape`` and ``dtype`` for the calling thread (contents undefined)."""
    bufs = getattr(_iw_scratch, "bufs", None)
    if bufs is None:
        bufs = _iw_scratch.bufs = {}
    a = bufs.get(name)
    if a is None or a.shape != shape or a.dtype != dtype:
        a = bufs[name] = np.empty(shape, dtype=dtype)
    return a


# One helper thread for the NumPy ufuncs of _log_weights_fused that numba has no fast twin for (tanh and exp:
# NumPy's are SIMD, numba's math.tanh and math.exp scalar calls; benchmarks/README.md, "Notes from the code").
# The calling thread does the first half of the rows, the helper the second (ufuncs release the GIL).
_ufunc_pool = []


def rows_on_two_threads(fn, *arrays, threads=2):
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


def _log_weights_fused(model, x, eps):
    """:func:`log_weights` with the fused CPU kernels, on the cores :mod:`minivae.fast.threads` allows.

    z and log p(z) - log q(z|x) in one pass (``iw_latent``: the log 2 pi terms cancel); the decoder's
    matmuls (BLAS) with bias + ReLU fused, or bias + tanh with NumPy's tanh on two halves of the rows at
    once (other activations: the model's op); then the Bernoulli nll as in :func:`bernoulli_nll_rows` --
    sum (max(l, 0) - x l) with the output bias add and -|l| in one pass, NumPy's SIMD exp (two halves at
    once), and the logs of products of 64 factors (1 + e) in a second pass.  Every array of the pass is a
    per-thread scratch array reused by the next call (see ``_iw_scratch``); only the result is new.
    """
    dt = model.dtype
    kernels = cpu_kernels.KERNELS
    threads = thread_count()
    set_numba_threads(threads)
    x = np.ascontiguousarray(model.as_input(x, validate=False))
    mu, logvar, _ = model.encoder_forward(x)
    mu, logvar = np.ascontiguousarray(mu), np.ascontiguousarray(logvar)
    eps = np.ascontiguousarray(model.as_eps(eps, x.shape[0]), dtype=dt)
    S, N, L = eps.shape
    z = scratch("z", eps.shape, dt)
    lw = np.empty((S, N), dtype=np.float64)
    kernels["iw_latent"](mu, logvar, eps, z, lw)                   # z and log p(z) - log q(z|x)
    p, act = model.params, model.config.activation
    h = z.reshape(S * N, L)
    for i in range(len(model.config.hidden)):
        W = p[f"dec.{i}.W"]
        a = np.matmul(h, W, out=scratch(f"dec.{i}", (S * N, W.shape[1]), dt))
        if act == "relu":
            kernels["bias_relu"](a, p[f"dec.{i}.b"])
        elif act == "tanh":
            rows_on_two_threads(functools.partial(_bias_tanh, b=p[f"dec.{i}.b"]), a, threads=threads)
        else:
            a += p[f"dec.{i}.b"]
            a = model.act_forward(a)[0]
        h = a
    W = p["dec.out.W"]
    a = np.matmul(h, W, out=scratch("dec.out", (S * N, W.shape[1]), dt))   # (S N, D), logits before the bias
    e = scratch("e", a.shape, dt)
    lin = scratch("lin", (S * N,), np.float64)
    kernels["iw_bernoulli_pre"](a, p["dec.out.b"], x, e, lin)       # l = a + b, e = -|l|, lin = sum max(l,0) - x l
    rows_on_two_threads(_exp_inplace, e, threads=threads)          # e = exp(-|l|)
    nll = scratch("nll", (S * N,), np.float64)
    kernels["iw_bernoulli_post"](e, lin, nll)                       # nll = lin + sum log(1 + e)
    lw -= nll.reshape(S, N)
    return lw.astype(dt)


def _bias_tanh(a, b):
    """a = tanh(a + b) in place (a: (M, H), b: (H,))."""
    a += b
    np.tanh(a, out=a)


def _exp_inplace(e):
    np.exp(e, out=e)
