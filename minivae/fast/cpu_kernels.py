"""Fused, multi-threaded CPU kernels for the fast path (optional: needs numba).

The fast path's NumPy code (:mod:`minivae.fast.ops_numpy`) computes the reference
path's numbers with NumPy ufuncs, one pass over memory per ufunc, each on one core.  The kernels
here do the same elementwise work in fewer passes (one loop computes a whole
chain: Adam's 12 ufunc passes become one) and spread it over the cores
(numba ``prange``).  They are compiled by numba on first use (cached on disk);
without numba, ``AVAILABLE`` is False and the fast path keeps its NumPy code.
Why numba and not numexpr: benchmarks/README.md ("The fused kernels: numba").

Every kernel is the same math as the NumPy code it replaces (:mod:`minivae.fast.ops_numpy`,
:mod:`minivae.fast.adam`, :mod:`minivae.fast.iw`, and :mod:`minivae.conv` for the copies);
``tests/test_fast.py`` and ``tests/test_conv.py`` check both against the reference.
Two rules keep the results independent of the thread count:

* elementwise results are computed with the same float operations, in the
  same order, as the NumPy ops they replace (no fastmath, so no FMA
  contraction and no reassociation; only the two evaluation kernels that sum
  along a row allow reassociation, whose order is then fixed by the compiled
  code): Adam is bit for bit NumPy's;
* every sum is split into fixed pieces (a block of ROW_BLOCK rows, a row)
  whose partial results are added in a fixed order afterwards, never into
  "whatever each thread got": the same numbers on 1 thread or 16.

Each kernel exists twice: ``PARALLEL[name]`` and ``SERIAL[name]`` (for callers
already running on several Python threads, like the split step: two parallel
launches at once are not safe in every numba threading layer);
``KERNELS[name]`` runs the parallel one on large arrays and the serial one on
small ones (``PARALLEL_MIN``).  All release the GIL.  How many threads the
parallel ones use is set in one place, :mod:`minivae.fast.threads`.
"""
from __future__ import annotations

import math
import os

import numpy as np

try:
    if os.environ.get("MINIVAE_NO_NUMBA"):
        raise ImportError("MINIVAE_NO_NUMBA is set")
    import numba
    from numba import prange
    AVAILABLE = True
except ImportError:                      # the fast path's NumPy code is used instead
    numba = None
    prange = range
    AVAILABLE = False

# Rows per block in the kernels that also sum over rows: each block's partial sums are a fixed piece,
# and the pieces are added in order afterwards.
ROW_BLOCK = 32
# Elements per block of Adam's flat loop.
FLAT_BLOCK = 1 << 14


def _jit_inner(fn):
    """Plain loops over whole (sub)arrays: simple enough for LLVM to vectorise them (a loop whose
    bounds are computed inside a prange body is not), called once per block by the kernels below."""
    if AVAILABLE:
        return numba.njit(nogil=True, cache=True, error_model="numpy")(fn)
    return fn


@_jit_inner
def _adam_1d(p, g, m, v, b1, c1, b2, c2, lr_t, eps_t):
    for i in range(p.shape[0]):
        gi = g[i]
        mi = m[i] * b1 + gi * c1
        vi = v[i] * b2 + (gi * gi) * c2
        m[i] = mi
        v[i] = vi
        p[i] = p[i] - (mi / (np.sqrt(vi) + eps_t)) * lr_t


@_jit_inner
def _add_1d(g, g2):
    for i in range(g.shape[0]):
        g[i] = g[i] + g2[i]


def adam(p, g, m, v, b1, c1, b2, c2, lr_t, eps_t):
    """Adam on flat arrays, NumPy's op sequence (minivae.fast.adam.adam_update_block) in one pass:
    m = m b1 + g c1;  v = v b2 + (g g) c2;  p = p - (m / (sqrt(v) + eps_t)) lr_t.  c1 = 1 - b1, c2 = 1 - b2."""
    n = p.shape[0]
    nb = (n + FLAT_BLOCK - 1) // FLAT_BLOCK
    for k in prange(nb):
        lo, hi = k * FLAT_BLOCK, min(n, (k + 1) * FLAT_BLOCK)
        _adam_1d(p[lo:hi], g[lo:hi], m[lo:hi], v[lo:hi], b1, c1, b2, c2, lr_t, eps_t)


def adam_add(p, g, g2, m, v, b1, c1, b2, c2, lr_t, eps_t):
    """The split step's Adam: first g = g + g2 (the two half-batches' gradients, stored), then :func:`adam`."""
    n = p.shape[0]
    nb = (n + FLAT_BLOCK - 1) // FLAT_BLOCK
    for k in prange(nb):
        lo, hi = k * FLAT_BLOCK, min(n, (k + 1) * FLAT_BLOCK)
        _add_1d(g[lo:hi], g2[lo:hi])
        _adam_1d(p[lo:hi], g[lo:hi], m[lo:hi], v[lo:hi], b1, c1, b2, c2, lr_t, eps_t)


def bias_relu(a, b):
    """a = max(a + b, 0) in place; a (N, H) from the matmul, b (H,)."""
    N, H = a.shape
    zero = a.dtype.type(0)
    for i in prange(N):
        for j in range(H):
            t = a[i, j] + b[j]
            a[i, j] = zero if t < zero else t          # max(t, 0); a NaN stays NaN, as in np.maximum


@_jit_inner
def _relu_bwd_rows(h, d, acc):
    zero = d.dtype.type(0)
    for j in range(d.shape[1]):
        acc[j] = zero
    for i in range(d.shape[0]):
        for j in range(d.shape[1]):
            t = d[i, j] if h[i, j] > zero else zero
            d[i, j] = t
            acc[j] += t


@_jit_inner
def _sum_rows(d, acc):
    zero = d.dtype.type(0)
    for j in range(d.shape[1]):
        acc[j] = zero
    for i in range(d.shape[0]):
        for j in range(d.shape[1]):
            acc[j] += d[i, j]


@_jit_inner
def _add_blocks(acc, db):
    """db = sum over the blocks (rows of acc), in order."""
    for j in range(db.shape[0]):
        db[j] = acc[0, j]
    for k in range(1, acc.shape[0]):
        for j in range(db.shape[0]):
            db[j] += acc[k, j]


def relu_backward_db(h, d, db):
    """d = d * 1[h > 0] in place (dL/da from dL/dh, h = max(a, 0)) and db = sum over rows of d,
    summed per block of ROW_BLOCK rows (in parallel), then over the blocks in order."""
    N, H = d.shape
    nb = (N + ROW_BLOCK - 1) // ROW_BLOCK
    acc = np.empty((nb, H), dtype=d.dtype)
    for k in prange(nb):
        lo, hi = k * ROW_BLOCK, min(N, (k + 1) * ROW_BLOCK)
        _relu_bwd_rows(h[lo:hi], d[lo:hi], acc[k])
    _add_blocks(acc, db)


def col_sum(d, db):
    """db = sum over the rows of d (N, H): per block of ROW_BLOCK rows, then over the blocks in order."""
    N, H = d.shape
    nb = (N + ROW_BLOCK - 1) // ROW_BLOCK
    acc = np.empty((nb, H), dtype=d.dtype)
    for k in prange(nb):
        lo, hi = k * ROW_BLOCK, min(N, (k + 1) * ROW_BLOCK)
        _sum_rows(d[lo:hi], acc[k])
    _add_blocks(acc, db)


def reparam(heads, eps, sig, z):
    """sig = exp(logvar / 2), z = mu + sig eps; heads (N, 2L) = [mu | logvar], eps, sig, z (N, L)."""
    N, L = z.shape
    half = z.dtype.type(0.5)
    for i in prange(N):
        for j in range(L):
            s = math.exp(heads[i, L + j] * half)
            sig[i, j] = s
            z[i, j] = s * eps[i, j] + heads[i, j]


def latent_backward(dz, heads, sig, eps, c, hc, dheads, kl_rows):
    """The latent layer's backward with the KL term, and the KL per row.

    dmu = dz + c mu;  dlogvar = dz eps sigma / 2 + c (exp(logvar) - 1) / 2, into dheads (N, 2L) = [dmu | dlogvar];
    kl_rows[i] = 1/2 sum_j (mu^2 + exp(logvar) - 1 - logvar) (float64).  c = beta / N, hc = c / 2."""
    N, L = dz.shape
    one = dz.dtype.type(1)
    half = dz.dtype.type(0.5)
    for i in prange(N):
        acc = 0.0
        for j in range(L):
            mu = heads[i, j]
            lv = heads[i, L + j]
            ev = math.exp(lv)
            dheads[i, j] = mu * c + dz[i, j]
            dheads[i, L + j] = (ev - one) * hc + ((dz[i, j] * eps[i, j]) * sig[i, j]) * half
            acc += float(mu) * float(mu) + float(ev) - 1.0 - float(lv)
        kl_rows[i] = 0.5 * acc


def bias_negabs(a, b, t):
    """a = a + b in place (the logits) and t = -|a| (N, D), ready for one NumPy SIMD exp."""
    N, D = a.shape
    for i in prange(N):
        for j in range(D):
            l = a[i, j] + b[j]  # noqa: E741
            a[i, j] = l
            t[i, j] = -abs(l)


@_jit_inner
def _bernoulli_rows(l, x, e, invn, d, acc, need_loss, pr, lin):
    zero = l.dtype.type(0)
    one = l.dtype.type(1)
    D = l.shape[1]
    for j in range(D):
        acc[j] = zero
        pr[j] = one
        lin[j] = 0.0
    for i in range(l.shape[0]):
        for j in range(D):
            li = l[i, j]
            ei = e[i, j]
            xi = x[i, j]
            op = one + ei
            r = one / op
            s = r if li >= zero else ei * r
            di = (s - xi) * invn
            d[i, j] = di
            acc[j] += di
        if need_loss:
            for j in range(D):
                li = l[i, j]
                pr[j] *= one + e[i, j]
                lin[j] += float(max(li, zero) - x[i, j] * li)
    total = 0.0
    if need_loss:
        for j in range(D):
            total += math.log(pr[j]) + lin[j]
    return total


def bernoulli(l, x, e, invn, d, db, need_loss, parts):
    """The Bernoulli loss and gradient from the logits l and e = exp(-|l|) (N, D).

    r = 1 / (1 + e);  sigmoid(l) = r (l >= 0) or e r (l < 0);  d = (sigmoid(l) - x) invn;  db = sum_rows d.
    With ``need_loss``: sum of nll = sum (max(l, 0) - x l) + sum log(1 + e), the latter as logs of
    products of (1 + e) over the ROW_BLOCK (<= 64) rows of a block: each factor is in [1, 2], so a
    product stays below 2^64.  Blocks of rows run in parallel; parts[k] (float64) gets block k's sum
    and db block k's column sums in ``acc``, added in block order: the same on any thread count."""
    N, D = l.shape
    nb = (N + ROW_BLOCK - 1) // ROW_BLOCK
    acc = np.empty((nb, D), dtype=l.dtype)
    pr = np.empty((nb, D), dtype=l.dtype)
    lin = np.empty((nb, D), dtype=np.float64)
    for k in prange(nb):
        lo, hi = k * ROW_BLOCK, min(N, (k + 1) * ROW_BLOCK)
        parts[k] = _bernoulli_rows(l[lo:hi], x[lo:hi], e[lo:hi], invn, d[lo:hi], acc[k], need_loss, pr[k], lin[k])
    _add_blocks(acc, db)


@_jit_inner
def _gaussian_rows(out, x, scale, d, acc):
    zero = out.dtype.type(0)
    D = out.shape[1]
    for j in range(D):
        acc[j] = zero
    total = 0.0
    for i in range(out.shape[0]):
        for j in range(D):
            r = out[i, j] - x[i, j]
            total += float(r) * float(r)
            di = r * scale
            d[i, j] = di
            acc[j] += di
    return total


def gaussian(out, x, scale, d, db, parts):
    """Fixed-variance Gaussian: r = out - x;  d = r scale (scale = 1 / (N var));  db = sum_rows d;
    parts[k] = sum of r^2 over row block k (float64)."""
    N, D = out.shape
    nb = (N + ROW_BLOCK - 1) // ROW_BLOCK
    acc = np.empty((nb, D), dtype=out.dtype)
    for k in prange(nb):
        lo, hi = k * ROW_BLOCK, min(N, (k + 1) * ROW_BLOCK)
        parts[k] = _gaussian_rows(out[lo:hi], x[lo:hi], scale, d[lo:hi], acc[k])
    _add_blocks(acc, db)


# ---------------------------------------------------------------- evaluation (importance weights)
def iw_latent(mu, logvar, eps, z, lw):
    """z = mu + exp(logvar / 2) eps (S, N, L) and lw[s, n] = log p(z) - log q(z|x) (float64 sums):
    sum_j ( -z^2 / 2 + logvar / 2 + (z - mu)^2 exp(-logvar) / 2 )   (the log 2 pi terms cancel)."""
    S, N, L = z.shape
    half = z.dtype.type(0.5)
    # sigma and 1/sigma^2 depend on (n, j) only: two exps for each of the N L entries, not for each of the
    # S N L draws (the same values, so the same bits, as taking them inside the loop below)
    sig = np.empty((N, L), dtype=z.dtype)
    ivar = np.empty((N, L), dtype=np.float64)
    for n in prange(N):
        for j in range(L):
            lv = logvar[n, j]
            sig[n, j] = math.exp(lv * half)
            ivar[n, j] = math.exp(-float(lv))
    for s in prange(S):
        for n in range(N):
            acc = 0.0
            for j in range(L):
                lv = logvar[n, j]
                zz = sig[n, j] * eps[s, n, j] + mu[n, j]
                z[s, n, j] = zz
                dd = zz - mu[n, j]
                acc += -0.5 * float(zz) * float(zz) + 0.5 * float(lv) + 0.5 * float(dd * dd) * ivar[n, j]
            lw[s, n] = acc


def iw_bernoulli_pre(a, b, x, t, lin):
    """Logits l = a + b (in place), t = -|l|, and lin[m] = sum_d (max(l, 0) - x l), rows m of (S*N, D),
    x (N, D) repeated over the S samples."""
    M, D = a.shape
    N = x.shape[0]
    zero = a.dtype.type(0)
    for m in prange(M):
        am, tm, xm = a[m], t[m], x[m % N]           # row views: simple loops that LLVM vectorises
        acc = 0.0
        for j in range(D):
            li = am[j] + b[j]
            am[j] = li
            tm[j] = -abs(li)
            acc += float(max(li, zero) - xm[j] * li)
        lin[m] = acc


def iw_bernoulli_post(e, lin, nll):
    """nll[m] = lin[m] + sum_d log(1 + e[m, d]), the logs taken of products of 64 factors (each in [1, 2])."""
    M, D = e.shape
    one = e.dtype.type(1)
    for m in prange(M):
        acc = lin[m]
        row = e[m]
        for j0 in range(0, D, 64):
            blk = row[j0:j0 + 64]
            pr = one
            for j in range(blk.shape[0]):
                pr *= one + blk[j]
            acc += math.log(pr)
        nll[m] = acc


# ----------------------------------------------------------------------------
# the conv ops' copies (minivae.conv): im2col / col2im with the batch last, and the layout changes
# ----------------------------------------------------------------------------
# Pure copies and additions, one channel per prange iteration: no sum is split, so the bits are those of
# minivae.conv's NumPy code on any thread count.  Each fuses what the NumPy code does in several passes
# (NCHW -> batch last, the zero padding, then KH·KW strided slices) into one pass over the output; the
# inner loop runs over the batch, contiguous in the batch-last array, while the NCHW side is read or
# written with a stride that revisits the same N cache lines for neighbouring pixels.
def im2col(x, s, p, col):
    """col[c, i, j, oh, ow, n] = x[n, c, oh·s + i - p, ow·s + j - p], 0 where that falls in the padding.

    x (N, C, H, W), col (C, KH, KW, OH, OW, N): minivae.conv.im2col's col, before its reshape.  Per channel,
    the padded image is first copied batch-last into a small buffer (it stays in cache), then every column
    run of N numbers is one contiguous copy out of it."""
    N, C, H, W = x.shape
    KH, KW, OH, OW = col.shape[1], col.shape[2], col.shape[3], col.shape[4]
    for c in prange(C):
        buf = np.zeros((H + 2 * p, W + 2 * p, N), dtype=x.dtype)
        for h in range(H):
            for w in range(W):
                for n in range(N):
                    buf[h + p, w + p, n] = x[n, c, h, w]
        for i in range(KH):
            for j in range(KW):
                for oh in range(OH):
                    for ow in range(OW):
                        src = buf[oh * s + i, ow * s + j]
                        dst = col[c, i, j, oh, ow]
                        for n in range(N):
                            dst[n] = src[n]


def col2im(col, s, p, x):
    """x[n, c, h, w] = the sum of col[c, i, j, oh, ow, n] over oh·s + i - p = h, ow·s + j - p = w.

    Added from 0 in the (i, j) order of minivae.conv.col2im's loop, so the same bits.
    col (C, KH, KW, OH, OW, N), x (N, C, H, W)."""
    N, C, H, W = x.shape
    KH, KW, OH, OW = col.shape[1], col.shape[2], col.shape[3], col.shape[4]
    for c in prange(C):
        acc = np.empty(N, dtype=x.dtype)
        for h in range(H):
            for w in range(W):
                for n in range(N):
                    acc[n] = 0
                for i in range(KH):
                    t = h + p - i
                    if t < 0 or t % s != 0 or t // s >= OH:
                        continue
                    oh = t // s
                    for j in range(KW):
                        u = w + p - j
                        if u < 0 or u % s != 0 or u // s >= OW:
                            continue
                        ow = u // s
                        for n in range(N):
                            acc[n] += col[c, i, j, oh, ow, n]
                for n in range(N):
                    x[n, c, h, w] = acc[n]


def to_batch_last(x, out):
    """out[c, h, w, n] = x[n, c, h, w]: x (N, C, H, W), out (C, H, W, N)."""
    N, C, H, W = x.shape
    for c in prange(C):
        for h in range(H):
            for w in range(W):
                for n in range(N):
                    out[c, h, w, n] = x[n, c, h, w]


def to_batch_first(a, out):
    """out[n, c, h, w] = a[c, h, w, n]: a (C, H, W, N), out (N, C, H, W)."""
    C, H, W, N = a.shape
    for c in prange(C):
        for h in range(H):
            for w in range(W):
                for n in range(N):
                    out[n, c, h, w] = a[c, h, w, n]


_NAMES = ("adam", "adam_add", "bias_relu", "relu_backward_db", "col_sum", "reparam", "latent_backward",
          "bias_negabs", "bernoulli", "gaussian", "iw_latent", "iw_bernoulli_pre", "iw_bernoulli_post",
          "im2col", "col2im", "to_batch_last", "to_batch_first")
# Reassociation lets LLVM vectorise these two kernels' row sums and products (the order is then fixed by
# the compiled code, still the same on any thread count); every other kernel keeps IEEE order.
_FASTMATH = {"iw_bernoulli_pre": {"reassoc"}, "iw_bernoulli_post": {"reassoc"}}
# Below this many elements (in the kernel's first array) KERNELS runs the serial twin: waking the other
# threads costs more than they save on a small array, so a training step of the standard model (128 x 784
# logits) has one parallel loop, Adam's; the evaluation's 10,000-row arrays are parallel.  The measurement
# behind the threshold: benchmarks/README.md, "Notes from the code".
PARALLEL_MIN = 1 << 18

PARALLEL = {}   # name -> the kernel compiled with prange over the cores
SERIAL = {}     # name -> its serial twin, for callers already running on several Python threads
KERNELS = {}    # name -> the one to call: PARALLEL on arrays of PARALLEL_MIN elements or more, else SERIAL


# OpenMP threads (numba's usual threading layer) busy-wait for ~300,000 spins after each parallel loop by
# default.  On a machine whose cores are all busy (a shared machine, or BLAS and these kernels taking turns)
# a spinning thread holds a core that another thread needs, and a parallel loop then waits for a descheduled
# thread (benchmarks/README.md, "Notes from the code").  So, unless the user has set OMP_WAIT_POLICY or
# GOMP_SPINCOUNT, numba's threads are started with a short spin (GOMP_SPINCOUNT=1000); the variable is set
# only while numba's OpenMP library starts (it reads it then) and removed afterwards, so other libraries
# never see it.
SPINCOUNT = "1000"
_started = []


def start_threads():
    """Start numba's worker threads (once), with the short OpenMP spin described above."""
    if _started or not AVAILABLE:
        return
    _started.append(True)
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return                                       # the user's setting wins; numba starts them lazily
    os.environ["GOMP_SPINCOUNT"] = SPINCOUNT
    try:
        from numba.np.ufunc.parallel import _launch_threads
        _launch_threads()
    except Exception:                                # another numba layout: start lazily, default spin
        pass
    finally:
        del os.environ["GOMP_SPINCOUNT"]


def _by_size(parallel, serial):
    def run(*args):
        if args[0].size >= PARALLEL_MIN:
            if not _started:
                start_threads()
            return parallel(*args)
        return serial(*args)
    run.__doc__ = parallel.__doc__
    return run


if AVAILABLE:
    _g = globals()
    for _name in _NAMES:
        _fm = _FASTMATH.get(_name, False)
        PARALLEL[_name] = numba.njit(parallel=True, nogil=True, cache=True, error_model="numpy",
                                     fastmath=_fm)(_g[_name])
        SERIAL[_name] = numba.njit(parallel=False, nogil=True, cache=True, error_model="numpy",
                                   fastmath=_fm)(_g[_name])
        KERNELS[_name] = _by_size(PARALLEL[_name], SERIAL[_name])
