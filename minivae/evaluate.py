"""Evaluation: the negative ELBO and the importance-weighted log-likelihood.

The importance-weighted estimate (Burda et al. 2015) of log p(x) with k
samples z_i ~ q(z|x):

    log p(x) ~ log (1/k) sum_i w_i,     log w_i = log p(x|z_i) + log p(z_i) - log q(z_i|x)

It is a stochastic lower bound whose expectation increases with k and tends to
log p(x); k = 1 gives the ELBO.  The log-mean-exp is computed stably as
    m + log( (1/k) sum_i exp(log w_i - m) ),   m = max_i log w_i,
and accumulated in float64.

Also here: active units (Burda et al. 2015: unit j is active when the
variance over the data of its posterior mean, Cov_x(E_q[z_j]), exceeds 0.01),
the KL per latent dimension, and a posterior-collapse warning.

A conditional model (``n_classes``) takes the labels: every function has ``y=None``, the labels (N,) of the
rows of x, and then reports the bounds on log p(x|y) (q(z|x, y), p(x|z, y); the weights become
log w_i = log p(x|z_i, y) + log p(z_i) - log q(z_i|x, y)).
"""
from __future__ import annotations

import numpy as np

from .backend import to_numpy
from . import signals
from .gaussian import kl_per_dim as gaussian_kl_per_dim
from .networks import get_architecture


def _row_budget(model, rows):
    """``rows``, capped by the architecture's ``eval_rows`` (the conv VAEs hold im2col patch matrices:
    :data:`minivae.networks.ARCHITECTURES`), so memory stays bounded."""
    cap = get_architecture(getattr(model.config, "arch", "mlp")).eval_rows      # no arch field: an MLP
    return rows if cap is None else min(rows, cap)


def log_mean_exp(a, axis=0):
    """Stable log(mean(exp(a))) along ``axis`` (float64 on the host)."""
    a = np.asarray(a, dtype=np.float64)
    m = np.max(a, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    out = m + np.log(np.mean(np.exp(a - m), axis=axis, keepdims=True))
    return np.squeeze(out, axis=axis)


def iw_log_likelihood(model, x, k, rng, chunk=100, batch_size=100, progress=False, y=None):
    """Per-example importance-weighted estimate of log p(x), shape (N,), float64.

    ``k`` samples per example, drawn in chunks of ``chunk`` samples for
    ``batch_size`` examples at a time.  The log-mean-exp over the chunks is a
    running log-sum-exp in float64 (keep the running max m and the sum of
    exp(log w - m), rescaled whenever m grows), so the result does not depend
    on the chunking beyond float round-off.

    The log-weights come from ``model.log_weights`` -- or, when ``minivae.fast``
    is present, from its twin ``minivae.fast.log_weights``, which gives the same
    numbers up to float rounding with about 12x fewer logarithms for the
    Bernoulli likelihood (the test suite compares them; the speed-up is in
    benchmarks/README.md, "Notes from the code").

    Memory bound: one call for the log-weights sees at most
    ``chunk * batch_size`` rows z, so the peak is a few arrays of
    ``chunk * batch_size * max(D, H)`` model-dtype numbers (decoder
    activations and logits), whatever k and N are: with the defaults, 10,000
    rows of 784 float32 values = 31 MB per array.  k = 5000 on the full
    10k test set therefore runs in the same memory as k = 100.  For the conv
    architectures the chunk shrinks so that a call sees at most the architecture's ``eval_rows``
    rows (the draws, and so the result, do not depend on the chunk).

    ``rng`` is a NumPy Generator: the eps noise comes from it on the host, in
    the order (example batch, sample, example, latent), so any ``chunk`` gives
    the same draws.  ``progress=True`` shows a tqdm bar (on stderr) counting
    samples.
    """
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k}")
    if int(chunk) != chunk or chunk < 1 or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"chunk and batch_size must be positive integers, got {chunk} and {batch_size}")
    k, chunk, batch_size = int(k), int(chunk), int(batch_size)
    chunk = max(1, _row_budget(model, chunk * batch_size) // batch_size)   # conv: at most eval_rows z per call
    x = np.asarray(to_numpy(x))
    N, L = x.shape[0], model.config.z_dim
    out = np.empty(N, dtype=np.float64)
    ys = _label_batches(y, N)
    bar = _progress_bar(progress, total=N * k, desc=f"IW log p(x), k={k}")
    try:
        for start in range(0, N, batch_size):
            xb = x[start:start + batch_size]
            n = xb.shape[0]
            # running log-sum-exp over chunks: keep max and the scaled sum
            run_max = np.full(n, -np.inf)
            run_sum = np.zeros(n)
            done = 0
            while done < k:
                signals.check()          # a Ctrl-C or SIGTERM whose exception a library swallowed stops here
                s = min(chunk, k - done)
                eps = rng.standard_normal((s, n, L)).astype(model.dtype)
                yb = ys(start, n)                                                  # labels, or None
                lw = _log_weights(model, xb, eps) if yb is None else _log_weights(model, xb, eps, yb)
                lw = to_numpy(lw).astype(np.float64)                               # (s, n)
                new_max = np.maximum(run_max, lw.max(axis=0))
                run_sum = run_sum * np.exp(run_max - new_max) + np.exp(lw - new_max).sum(axis=0)
                run_max = new_max
                done += s
                if bar is not None:
                    bar.update(s * n)
            out[start:start + n] = run_max + np.log(run_sum / k)
    finally:
        if bar is not None:
            bar.close()
    return out


def _log_weights(model, x, eps, y=None):
    """model.log_weights, or its faster twin in minivae.fast (the same numbers up to float rounding).

    A copy of minivae without the fast package, minivae/fast/ (a course assignment's), evaluates with the
    model's own (the student's) code.  ``y``: labels, for a conditional model only.
    """
    kw = {} if y is None else {"y": y}
    try:
        from .fast import log_weights
    except ImportError:
        return model.log_weights(x, eps, **kw)
    return log_weights(model, x, eps, **kw)


def _label_batches(y, N):
    """``rows(start, n)``: the labels of rows start..start+n of x as a host array, or None without labels."""
    if y is None:
        return lambda start, n: None
    y = np.asarray(to_numpy(y))
    if y.shape != (N,):
        raise ValueError(f"y must hold one label per row of x: shape ({N},), got {y.shape}")
    return lambda start, n: y[start:start + n]


def _progress_bar(progress, total, desc):
    if not progress:
        return None
    from tqdm import tqdm
    # disable=None: no bar when stderr is not a terminal
    return tqdm(total=total, desc=desc, unit="sample", unit_scale=True, leave=False, disable=None)


def negative_elbo(model, x, rng, batch_size=1000, y=None, per_unit=False):
    """Mean negative ELBO and its parts over a dataset (one eps draw per example; labels y if conditional).

    Returns ``{"loss", "recon", "kl"}`` as Python floats, nats per example.  The eps draws, and so the
    result up to float rounding, do not depend on ``batch_size`` (capped for the conv architectures).
    ``per_unit=True``, for a model with ``kl_per_unit`` (two stochastic layers, whose KL term is a Monte Carlo
    estimate): also ``"kl_per_unit"``, (L,) float64, each unit's share of ``kl`` from the same draws (it sums to
    ``kl``).
    """
    batch_size = _row_budget(model, batch_size)
    x = np.asarray(to_numpy(x))
    N = x.shape[0]
    tot = {"loss": 0.0, "recon": 0.0, "kl": 0.0}
    units = np.zeros(model.config.z_dim) if per_unit else None
    ys = _label_batches(y, N)
    for start in range(0, N, batch_size):
        xb = x[start:start + batch_size]
        eps = rng.standard_normal((1, xb.shape[0], model.config.z_dim)).astype(model.dtype)
        yb = ys(start, xb.shape[0])
        model.loss(xb, eps=eps, backward=False, **({} if yb is None else {"y": yb}))
        for key in tot:
            tot[key] += float(to_numpy(model.parts[key])) * xb.shape[0]
        if per_unit:
            units += to_numpy(model.kl_per_unit(xb, eps)).astype(np.float64).sum(axis=(0, 1))
    out = {key: v / N for key, v in tot.items()}
    if per_unit:
        out["kl_per_unit"] = units / N
    return out


def posterior_mean_variance(model, x, batch_size=1000, y=None):
    """Cov_x(E_q[z_j]) per latent dimension: the variance over the data of mu_j(x), (L,) float64.

    E_q[z] = mu(x) is the encoder's mean; the variance is taken over the
    examples of ``x`` (1/N normalisation).
    """
    x = np.asarray(to_numpy(x))
    ys = _label_batches(y, x.shape[0])
    mus = [to_numpy(_encode(model, x[i:i + batch_size], ys(i, len(x[i:i + batch_size])))[0]).astype(np.float64)
           for i in range(0, x.shape[0], batch_size)]
    return np.concatenate(mus, axis=0).var(axis=0)


def active_units(model, x, threshold=0.01, batch_size=1000, y=None):
    """Number of active latent units (Burda et al. 2015): unit j is active if Cov_x(E_q[z_j]) > threshold.

    An inactive unit's posterior mean does not move with x: the decoder
    gets (almost) no information about x through it.  In practice its posterior
    is then the prior ("posterior collapse" of that unit), but the statistic only
    sees the mean: sigma_j(x) could still vary with x.
    """
    return int((posterior_mean_variance(model, x, batch_size, y=y) > threshold).sum())


def _encode(model, x, y):
    """model.encode(x), or model.encode(x, y) when labels are given."""
    return model.encode(x) if y is None else model.encode(x, y)


def kl_per_dim(model, x, batch_size=1000, y=None):
    """Mean analytic KL(q(z_j|x) || N(0, 1)) over the examples of x, per latent dimension, (L,) float64.

    The entries sum to the mean KL term of the ELBO.  A dimension with KL
    near 0 carries (almost) no information about x.
    """
    x = np.asarray(to_numpy(x))
    tot = np.zeros(model.config.z_dim)
    ys = _label_batches(y, x.shape[0])
    for i in range(0, x.shape[0], batch_size):
        mu, logvar = _encode(model, x[i:i + batch_size], ys(i, len(x[i:i + batch_size])))
        tot += to_numpy(gaussian_kl_per_dim(mu, logvar)).astype(np.float64).sum(axis=0)
    return tot / x.shape[0]


def collapse_warning(n_active, n_latent):
    """A message when fewer than half of the latent units are active, else False."""
    if n_active < n_latent / 2:
        return (f"posterior collapse: only {n_active} of {n_latent} latent units are active; the rest carry "
                "no information about x (partial collapse is normal for a wide latent: Burda et al. 2015 report "
                "19-20 of 50 for their VAE; to fight it, try KL warm-up or free bits)")
    return False


# Active units are a variance over the data: with fewer examples than this the estimate means nothing,
# so report() gives None (and no collapse warning) instead of a count.
AU_MIN_N = 20


def report(model, x, rng, iw_k=0, chunk=100, batch_size=100, progress=False, au_threshold=0.01, y=None):
    """Evaluation summary of ``model`` on data ``x`` (already binarized if needed; labels ``y`` if conditional).

    Returns a dict of plain Python numbers (JSON-serialisable):

    n               number of examples
    neg_elbo, recon, kl   negative ELBO and its parts, nats per example (one eps draw each)
    iw_k, iw_nll    importance-weighted NLL -1/N sum_n log p_hat_k(x_n) (None when iw_k = 0)
    iw_nll_sem      its standard error over examples (None when iw_k = 0)
    iw_seconds      time spent on the IW estimate
    active_units, n_latent, au_threshold   units with Cov_x(E_q[z_j]) > au_threshold (active_units is
                    None below AU_MIN_N examples, with the reason in ``au_note``)
    kl_per_dim      list of the mean KL of each latent dimension (sums to ``kl``)
    collapse_warning  False, or a message when fewer than half of the units are active

    Two stochastic layers (a model with ``kl_per_unit``, ``L1`` and ``L2``): ``kl`` is a Monte Carlo estimate of
    E_q[log q(z1|x) + log q(z2|z1) - log p(z1|z2) - log p(z2)], and ``kl_per_dim`` holds each unit's share of it
    from the same draws (z1's L1 units, then z2's L2; it sums to ``kl``; a z1 share is against p(z1|z2), not
    N(0, 1)).  Also ``latent_layers`` {"z1": L1, "z2": L2} and ``active_units_z1``, ``active_units_z2``
    (z2's posterior mean is taken at z1 = E_q[z1|x], as ``encode`` gives it).
    """
    import time
    x = np.asarray(to_numpy(x))
    two_layers = hasattr(model, "kl_per_unit")
    parts = negative_elbo(model, x, rng, batch_size=batch_size, y=y, per_unit=two_layers)
    out = {"n": int(x.shape[0]), "neg_elbo": parts["loss"], "recon": parts["recon"], "kl": parts["kl"],
           "iw_k": int(iw_k) if iw_k else 0, "iw_nll": None, "iw_nll_sem": None, "iw_seconds": None}
    if iw_k:
        t0 = time.perf_counter()
        ll = iw_log_likelihood(model, x, iw_k, rng, chunk=chunk, batch_size=batch_size, progress=progress, y=y)
        out["iw_seconds"] = time.perf_counter() - t0
        out["iw_nll"] = float(-ll.mean())
        out["iw_nll_sem"] = float(ll.std(ddof=1) / np.sqrt(len(ll))) if len(ll) > 1 else None
    n_latent = int(model.config.z_dim)
    if x.shape[0] >= AU_MIN_N:
        active = posterior_mean_variance(model, x, y=y) > au_threshold
        n_active = int(active.sum())
        warn = collapse_warning(n_active, n_latent)
        if two_layers:
            out.update(active_units_z1=int(active[:model.L1].sum()), active_units_z2=int(active[model.L1:].sum()))
    else:
        n_active, warn = None, False
        out["au_note"] = (f"active units not counted: they need at least {AU_MIN_N} examples, got "
                          f"{x.shape[0]}")
    per = parts["kl_per_unit"] if two_layers else kl_per_dim(model, x, y=y)
    out.update(active_units=n_active, n_latent=n_latent, au_threshold=float(au_threshold),
               kl_per_dim=[float(v) for v in per], collapse_warning=warn)
    if two_layers:
        out["latent_layers"] = {"z1": int(model.L1), "z2": int(model.L2)}
    return out
