"""A CPU stand-in for :class:`minivae.fast.cuda_graph.CudaDevice`: cuBLAS and the graph's kernels in NumPy.

* ``gemm`` follows the cuBLAS documentation of ``cublasSgemm`` literally, in column-major storage:
  ``C[i + j ldc] = alpha sum_l op(A)[i, l] op(B)[l, j] + beta C[i + j ldc]`` with ``op(A)[i, l] = A[i + l lda]``
  (CUBLAS_OP_N) or ``A[l + i lda]`` (CUBLAS_OP_T); it refuses what cuBLAS refuses (a leading dimension below
  the stored rows) and what would read or write past a buffer's end.  So the row-major -> column-major
  argument mapping of the graph's products is checked here, not assumed.
* ``launch`` runs the NumPy twin of each raw kernel (the formulas of its CUDA source), after checking that the
  launch configuration covers the work as the kernel indexes it, and that every read of the epoch's buffers
  (the step counter's rows) stays inside them.
* ``capture`` records the step and ``replay`` runs it again, as a CUDA graph replays the same work.

The CUDA sources themselves are compiled by tests/test_nvrtc.py and run on a GPU by the gpu-marked tests.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import as_strided

from minivae.fast.cublas import OP_N, OP_T


def _h(a):
    """A plain NumPy view (the stand-in CuPy's arrays are a NumPy subclass)."""
    return a.view(np.ndarray) if isinstance(a, np.ndarray) else a


def _colmajor(buf, rows, cols, ld, what):
    buf = _h(buf)
    if ld < max(1, rows):
        raise ValueError(f"cuBLAS would refuse {what}: leading dimension {ld} < rows {rows}")
    if rows and cols and (rows - 1) + (cols - 1) * ld >= buf.size:
        raise IndexError(f"{what} ({rows} x {cols}, ld {ld}) reaches past its buffer of {buf.size}")
    s = buf.strides[0]
    return as_strided(buf, shape=(rows, cols), strides=(s, s * ld), writeable=True)


class StubDevice:
    name = "numpy-stub"
    library = ""

    def __init__(self, xp=np, twins=None):
        self.xp = xp
        self.calls = {"gemm": 0, "gemm_batched": 0, "launch": 0, "replay": 0, "capture": 0}
        self.twins = dict(TWINS if twins is None else twins)
        self.capturing = False

    # -------------------------------------------------------------- cuBLAS, column-major
    def gemm(self, ta, tb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc):
        self.calls["gemm"] += 1
        self._gemm(ta, tb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc)

    def _gemm(self, ta, tb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc):
        assert ta in (OP_N, OP_T) and tb in (OP_N, OP_T)
        a = _colmajor(A, m, k, lda, "A") if ta == OP_N else _colmajor(A, k, m, lda, "A").T
        b = _colmajor(B, k, n, ldb, "B") if tb == OP_N else _colmajor(B, n, k, ldb, "B").T
        c = _colmajor(C, m, n, ldc, "C")
        prod = np.float32(alpha) * (a @ b)
        c[...] = prod if beta == 0 else prod + np.float32(beta) * c

    def gemm_batched(self, ta, tb, m, n, k, alpha, A, lda, sA, B, ldb, sB, beta, C, ldc, sC, count):
        self.calls["gemm_batched"] += 1
        A, B, C = _h(A), _h(B), _h(C)
        for j in range(count):
            self._gemm(ta, tb, m, n, k, alpha, A[j * sA:], lda, B[j * sB:], ldb, beta, C[j * sC:], ldc)

    # -------------------------------------------------------------- kernels
    def launch(self, key, grid, block, args):
        self.calls["launch"] += 1
        _check_launch(key, grid, block, args)
        self.twins[key](*[_h(a) for a in args])

    def run(self, fn):
        return fn()

    def capture(self, fn):
        self.calls["capture"] += 1
        return fn                                    # the recorded step: replay runs the same work again

    def replay(self, graph):
        self.calls["replay"] += 1
        graph()

    def synchronize(self):
        pass

    def wait_default(self):
        pass


def _check_launch(key, grid, block, args):
    """The grid covers the work as each kernel indexes it (see the CUDA sources in minivae.fast.cuda_graph)."""
    threads = int(np.prod(block))
    if key in ("gather", "bias_act", "adam"):
        total = {"gather": lambda: int(args[5]) * int(args[6]), "bias_act": lambda: int(args[2]),
                 "adam": lambda: int(args[5])}[key]()
        assert len(block) == 1 and grid[0] * block[0] >= total, (key, grid, block, total)
    elif key in ("act_bwd_db", "out"):
        cols = int(args[4]) if key == "act_bwd_db" else int(args[6])
        assert block[0] == 32 and 1 <= block[1] <= 32 and grid[0] * 32 >= cols, (key, grid, block, cols)
    elif key in ("latent_fwd", "latent_bwd"):
        L = int(args[-1] if key == "latent_fwd" else args[15])
        assert grid == (1,) and threads <= 1024 and threads & (threads - 1) == 0, (key, grid, block)
        if key == "latent_bwd":
            assert threads >= 2 * L, (key, block, L)
    else:
        raise KeyError(key)


def _rows(buf, start, count, what):
    if start < 0 or start + count > buf.size:
        raise IndexError(f"{what}: elements [{start}, {start + count}) of a buffer of {buf.size}")
    return buf[start:start + count]


# ---------------------------------------------------------------------------------- the kernels' twins
def gather(x, order, u, ctr, xb, N, D, dyn):
    s = int(ctr[0])
    rows = _rows(order, s * N, N, "order")
    v = x[rows].reshape(N, D)
    out = xb[:N * D].reshape(N, D)
    if dyn:
        out[...] = (_rows(u, s * N * D, N * D, "u").reshape(N, D) < v).astype(np.float32)
    else:
        out[...] = v


def bias_act(a, b, total, H, act):
    A = a[:total].reshape(-1, H)
    v = A + b[:H]
    A[...] = np.maximum(v, np.float32(0)) if act == 0 else np.tanh(v)


def act_bwd_db(h, d, db, N, H, act):
    hv, dv = h[:N * H].reshape(N, H), d[:N * H].reshape(N, H)
    g = np.where(hv > 0, dv, np.float32(0)) if act == 0 else dv * (np.float32(1) - hv * hv)
    dv[...] = g
    db[:H] = g.sum(axis=0)


def out(a, b, x, db, part, N, D, scale, lik):
    A = a[:N * D].reshape(N, D)
    lg = A + b[:D]
    xv = x[:N * D].reshape(N, D)
    one = np.float32(1)
    if lik == 0:
        e = np.exp(-np.abs(lg))
        r = one / (one + e)
        g = (np.where(lg >= 0, r, e * r) - xv) * scale
        nll = (np.maximum(lg, np.float32(0)) + np.log1p(e) - xv * lg).astype(np.float64)
    else:
        rr = lg - xv
        g = rr * scale
        nll = rr.astype(np.float64) ** 2
    A[...] = g
    db[:D] = g.sum(axis=0)
    nb = -(-D // 32)
    part[:nb] = [nll[:, 32 * j:32 * (j + 1)].sum() for j in range(nb)]


def latent_fwd(heads, bmu, blv, eps_all, ctr, sig, z, kl, N, L):
    s = int(ctr[0])
    hd = heads[:N * 2 * L].reshape(N, 2 * L)
    hd[:, :L] += bmu[:L]
    hd[:, L:] += blv[:L]
    mu, lv = hd[:, :L], hd[:, L:]
    eps = _rows(eps_all, s * N * L, N * L, "eps").reshape(N, L)
    sg = sig[:N * L].reshape(N, L)
    sg[...] = np.exp(np.float32(0.5) * lv)
    z[:N * L].reshape(N, L)[...] = mu + sg * eps
    kl[0] = 0.5 * (mu * mu + np.exp(lv) - np.float32(1) - lv).astype(np.float64).sum()


def latent_bwd(dz, heads, sig, eps_all, ctr, sched, dheads, dbmu, dblv, part, npart, kl, losses, adam_cur, N, L,
               invN, recon_scale, recon_const):
    s = int(ctr[0])
    row = _rows(sched, 4 * s, 4, "sched")
    eps = _rows(eps_all, s * N * L, N * L, "eps").reshape(N, L)
    c = np.float32(row[1])
    hd = heads[:N * 2 * L].reshape(N, 2 * L)
    mu, lv = hd[:, :L], hd[:, L:]
    g = dz[:N * L].reshape(N, L)
    sg = sig[:N * L].reshape(N, L)
    dh = dheads[:N * 2 * L].reshape(N, 2 * L)
    half = np.float32(0.5)
    dh[:, :L] = g + c * mu
    dh[:, L:] = g * eps * (half * sg) + c * (half * (np.exp(lv) - np.float32(1)))
    col = dh.sum(axis=0)
    dbmu[:L], dblv[:L] = col[:L], col[L:]
    recon = float(part[:npart].sum()) * recon_scale + recon_const
    rm, km = recon * invN, float(kl[0]) * invN
    _rows(losses, 3 * s, 3, "losses")[...] = (rm + row[0] * km, rm, km)
    adam_cur[0], adam_cur[1] = np.float32(row[2]), np.float32(row[3])
    ctr[0] = s + 1


def adam(p, g, m, v, cur, n, b1, c1, b2, c2):
    m[:n] = b1 * m[:n] + c1 * g[:n]
    v[:n] = b2 * v[:n] + c2 * (g[:n] * g[:n])
    p[:n] -= cur[0] * m[:n] / (np.sqrt(v[:n]) + cur[1])


TWINS = {"gather": gather, "bias_act": bias_act, "act_bwd_db": act_bwd_db, "out": out, "latent_fwd": latent_fwd,
         "latent_bwd": latent_bwd, "adam": adam}
