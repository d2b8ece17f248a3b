"""The whole training step of the dense VAE as one CUDA graph, replayed every step (CuPy).

On a GPU a step of the 784-400-20 VAE is a few microseconds of arithmetic in ~20 kernels; launched one by
one from Python (FastTrainer on CuPy) the step's time is nearly all launch overhead (the measurement:
benchmarks/README.md, "Notes from the code").
Here the step -- forward, backward and the Adam update of one batch shape -- is captured once into a CUDA
graph and replayed for every batch of the epoch: one launch per step, no Python in between, and no
synchronisation with the host inside an epoch.

What makes one graph serve every step:

* **The epoch's data is uploaded once per epoch** into fixed device buffers: the order of the rows, the
  binarization noise u and the reparameterization noise eps, all drawn on the host by the training run's
  NumPy Generators (the same draws, in the same order, as the eager loop makes: a bulk draw of n rows is the
  concatenation of the per-batch draws), and a per-step table (beta, beta/N, Adam's lr_t and eps_t).
* **A step counter lives in device memory.**  The first kernel gathers the step's rows,
  ``x_b = 1[u < x[order[s N + i]]]``, and every kernel that needs the step's eps or constants reads row s of
  the buffers; the latent layer's backward kernel advances the counter at its end.
* **The products are cuBLAS calls through ctypes** (:mod:`minivae.fast.cublas`) on the capturing stream:
  CuPy refuses its own cuBLAS wrappers during capture.  The elementwise work is 7 raw kernels, declared in
  :mod:`minivae.fast.kernels`' registry (compiled by ``tests/test_nvrtc.py`` without a GPU), each fusing what the
  eager step does in several: bias + activation; the output layer's bias, loss, gradient, bias gradient and
  partial loss sums; the activation backward with its bias gradient; the latent layer forward with the KL sum;
  its backward with the heads' bias gradients, the step's loss record and the counter; Adam.

The math is FastTrainer's (so the reference path's), only grouped differently; at capture time the run checks
it: one step of the graph against FastTrainer's eager step on the same inputs (loss, gradients, update), and
the graph's replay against the same kernels launched eagerly.  Any difference beyond float32 rounding, and
anything the graph does not cover, leaves the training to eager FastTrainer, with the reason in the log
(:func:`why_not`): never silently.  ``MINIVAE_CUDA_GRAPH=0`` turns it off (to compare, or to rule it out).  The last, short batch of an epoch runs eagerly (FastTrainer.step), one
step per epoch.

Covered: float32, any hidden depth, ReLU or tanh, the Bernoulli and fixed-variance Gaussian likelihoods, a
plain Adam (no weight decay, no clipping), any beta schedule (warm-up).  Not covered (eager): float64, the other
activations, other optimizers, and what FastTrainer itself does not cover (conv, conditional, learned variance,
IWAE, free bits: the readable path).
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np

from . import kernels
from ..backend import get_array_module, to_numpy
from ..gaussian import LOG_2PI
from ..gradcheck import rel_error

ACTS = {"relu": 0, "tanh": 1}
LIKS = {"bernoulli": 0, "gaussian": 1}
SCHED = 4                     # per-step table: beta, c = beta / N (float32), lr_t, eps_t
THREADS = 256

# ----------------------------------------------------------------------------------------------- kernels
_CODE_GATHER = r"""
extern "C" __global__ void minivae_g_gather(const float* __restrict__ x, const int* __restrict__ order,
        const float* __restrict__ u, const int* __restrict__ ctr, float* __restrict__ xb, int N, int D, int dyn)
{
    // x_b[i, c] = 1[u[s N + i, c] < x[order[s N + i], c]]  (dyn = 1; else the row itself), s = *ctr
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)N * D) return;
    int r = (int)(i / D);
    int c = (int)(i - (long long)r * D);
    long long row = (long long)ctr[0] * N + r;
    float v = x[(long long)order[row] * D + c];
    xb[i] = dyn ? (u[row * D + c] < v ? 1.0f : 0.0f) : v;
}
"""

_CODE_BIAS_ACT = r"""
extern "C" __global__ void minivae_g_bias_act(float* __restrict__ a, const float* __restrict__ b, int total,
        int H, int act)
{
    // a = act(a + b): act 0 = ReLU max(., 0), 1 = tanh
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total) return;
    float v = a[i] + b[i % H];
    a[i] = act == 0 ? fmaxf(v, 0.0f) : tanhf(v);
}
"""

# Column-tiled kernels: block (32, BY); thread (tx, ty) owns column blockIdx.x * 32 + tx and rows ty, ty + BY, ...
# The column sums (bias gradients) are then added in a fixed order: deterministic, no atomics.
_CODE_ACT_BWD_DB = r"""
extern "C" __global__ void minivae_g_act_bwd_db(const float* __restrict__ h, float* __restrict__ d,
        float* __restrict__ db, int N, int H, int act)
{
    // d = dL/dh -> dL/da in place (ReLU: d 1[h > 0]; tanh: d (1 - h^2)), db = sum over rows of dL/da
    __shared__ float sh[32][33];
    int col = blockIdx.x * 32 + threadIdx.x;
    float acc = 0.0f;
    if (col < H) {
        for (int r = threadIdx.y; r < N; r += blockDim.y) {
            long long i = (long long)r * H + col;
            float hv = h[i], g = d[i];
            g = act == 0 ? (hv > 0.0f ? g : 0.0f) : g * (1.0f - hv * hv);
            d[i] = g;
            acc += g;
        }
    }
    sh[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && col < H) {
        float s = 0.0f;
        for (int k = 0; k < (int)blockDim.y; ++k) s += sh[k][threadIdx.x];
        db[col] = s;
    }
}
"""

_CODE_OUT = r"""
extern "C" __global__ void minivae_g_out(float* __restrict__ a, const float* __restrict__ b,
        const float* __restrict__ x, float* __restrict__ db, double* __restrict__ part, int N, int D,
        float scale, int lik)
{
    // a: the output layer's product h W (N, D) -> dloss/dout, with l = a + b:
    //   Bernoulli (lik 0): e = exp(-|l|), r = 1 / (1 + e), sigmoid(l) = r (l >= 0) or e r;
    //                      d = (sigmoid(l) - x) scale, nll = max(l, 0) + log1p(e) - x l
    //   Gaussian  (lik 1): d = (l - x) scale, and the sum of (l - x)^2 (scaled on the host's side)
    // db[col] = sum over rows of d; part[blockIdx.x] = this block's sum of nll (added in order later)
    __shared__ float shd[32][33];
    __shared__ double shl[32][33];
    int col = blockIdx.x * 32 + threadIdx.x;
    float acc = 0.0f;
    double nll = 0.0;
    if (col < D) {
        float bc = b[col];
        for (int r = threadIdx.y; r < N; r += blockDim.y) {
            long long i = (long long)r * D + col;
            float l = a[i] + bc, xv = x[i], g;
            if (lik == 0) {
                float e = expf(-fabsf(l));
                float rr = 1.0f / (1.0f + e);
                g = ((l >= 0.0f ? rr : e * rr) - xv) * scale;
                nll += (double)(fmaxf(l, 0.0f) + log1pf(e) - xv * l);
            } else {
                float rr = l - xv;
                g = rr * scale;
                nll += (double)rr * (double)rr;
            }
            a[i] = g;
            acc += g;
        }
    }
    shd[threadIdx.y][threadIdx.x] = acc;
    shl[threadIdx.y][threadIdx.x] = nll;
    __syncthreads();
    if (threadIdx.y == 0) {
        float s = 0.0f;
        double t = 0.0;
        for (int k = 0; k < (int)blockDim.y; ++k) { s += shd[k][threadIdx.x]; t += shl[k][threadIdx.x]; }
        if (col < D) db[col] = s;
        shl[0][threadIdx.x] = t;
    }
    __syncthreads();
    if (threadIdx.x == 0 && threadIdx.y == 0) {
        double t = 0.0;
        for (int k = 0; k < 32; ++k) t += shl[0][k];
        part[blockIdx.x] = t;
    }
}
"""

# One block (blockDim.x a power of two, <= 1024): the latent layer is small (N x L).
_CODE_LATENT_FWD = r"""
extern "C" __global__ void minivae_g_latent_fwd(float* __restrict__ heads, const float* __restrict__ bmu,
        const float* __restrict__ blv, const float* __restrict__ eps_all, const int* __restrict__ ctr,
        float* __restrict__ sig, float* __restrict__ z, double* __restrict__ kl, int N, int L)
{
    // heads (N, 2L) = [h W_mu | h W_lv] -> [mu | logvar] (the biases added), sigma = exp(logvar / 2),
    // z = mu + sigma eps (eps: rows s N.. of the epoch's), kl = 1/2 sum (mu^2 + exp(logvar) - 1 - logvar)
    __shared__ double sh[1024];
    const float* eps = eps_all + (long long)ctr[0] * N * L;
    double acc = 0.0;
    for (int i = threadIdx.x; i < N * L; i += blockDim.x) {
        int r = i / L, c = i - r * L;
        float mu = heads[r * 2 * L + c] + bmu[c];
        float lv = heads[r * 2 * L + L + c] + blv[c];
        heads[r * 2 * L + c] = mu;
        heads[r * 2 * L + L + c] = lv;
        float s = expf(0.5f * lv);
        sig[i] = s;
        z[i] = mu + s * eps[i];
        acc += (double)(mu * mu + expf(lv) - 1.0f - lv);
    }
    sh[threadIdx.x] = acc;
    __syncthreads();
    for (int w = blockDim.x / 2; w > 0; w >>= 1) {
        if (threadIdx.x < w) sh[threadIdx.x] += sh[threadIdx.x + w];
        __syncthreads();
    }
    if (threadIdx.x == 0) kl[0] = 0.5 * sh[0];
}
"""

_CODE_LATENT_BWD = r"""
extern "C" __global__ void minivae_g_latent_bwd(const float* __restrict__ dz, const float* __restrict__ heads,
        const float* __restrict__ sig, const float* __restrict__ eps_all, int* ctr,
        const double* __restrict__ sched, float* __restrict__ dheads, float* __restrict__ dbmu,
        float* __restrict__ dblv, const double* __restrict__ part, int npart, const double* __restrict__ kl,
        double* __restrict__ losses, float* __restrict__ adam_cur, int N, int L, double invN,
        double recon_scale, double recon_const)
{
    // c = beta / N:  dmu = dz + c mu,  dlogvar = dz eps sigma / 2 + c (exp(logvar) - 1) / 2  (Kingma & Welling
    // 2014, App. B, for the KL); the heads' bias gradients are the column sums; then the step's record:
    // losses[s] = (recon / N + beta kl / N, recon / N, kl / N), this step's Adam constants, and s + 1.
    __shared__ float sh[1024];
    const int s = ctr[0];
    const float* eps = eps_all + (long long)s * N * L;
    const float c = (float)sched[4 * s + 1];
    const int W = 2 * L;
    for (int i = threadIdx.x; i < N * L; i += blockDim.x) {
        int r = i / L, k = i - r * L;
        float mu = heads[r * W + k], lv = heads[r * W + L + k], g = dz[i];
        dheads[r * W + k] = g + c * mu;
        dheads[r * W + L + k] = g * eps[i] * (0.5f * sig[i]) + c * (0.5f * (expf(lv) - 1.0f));
    }
    __syncthreads();
    int t = threadIdx.x, G = blockDim.x / W;
    float acc = 0.0f;
    if (t < G * W)
        for (int r = t / W; r < N; r += G) acc += dheads[r * W + t % W];
    sh[t] = acc;
    __syncthreads();
    if (t < W) {
        float sum = 0.0f;
        for (int q = 0; q < G; ++q) sum += sh[q * W + t];
        if (t < L) dbmu[t] = sum; else dblv[t - L] = sum;
    }
    if (t == 0) {
        double recon = 0.0;
        for (int q = 0; q < npart; ++q) recon += part[q];
        recon = recon * recon_scale + recon_const;
        double rm = recon * invN, km = kl[0] * invN;
        losses[3 * s] = rm + sched[4 * s] * km;
        losses[3 * s + 1] = rm;
        losses[3 * s + 2] = km;
        adam_cur[0] = (float)sched[4 * s + 2];
        adam_cur[1] = (float)sched[4 * s + 3];
    }
    __syncthreads();
    if (t == 0) ctr[0] = s + 1;
}
"""

_CODE_ADAM = r"""
extern "C" __global__ void minivae_g_adam(float* __restrict__ p, const float* __restrict__ g,
        float* __restrict__ m, float* __restrict__ v, const float* __restrict__ adam_cur, int n,
        float b1, float c1, float b2, float c2)
{
    // minivae.optim.Adam, op for op: m = b1 m + (1 - b1) g, v = b2 v + (1 - b2) g^2,
    // p -= lr_t m / (sqrt(v) + eps_t), with this step's lr_t, eps_t (written by the latent backward)
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float gi = g[i];
    float mi = b1 * m[i] + c1 * gi;
    float vi = b2 * v[i] + c2 * (gi * gi);
    m[i] = mi;
    v[i] = vi;
    p[i] -= adam_cur[0] * mi / (sqrtf(vi) + adam_cur[1]);
}
"""

KERNEL_SPECS = kernels.register(__name__, {
    "gather": kernels.raw("minivae_g_gather", _CODE_GATHER),
    "bias_act": kernels.raw("minivae_g_bias_act", _CODE_BIAS_ACT),
    "act_bwd_db": kernels.raw("minivae_g_act_bwd_db", _CODE_ACT_BWD_DB),
    "out": kernels.raw("minivae_g_out", _CODE_OUT),
    "latent_fwd": kernels.raw("minivae_g_latent_fwd", _CODE_LATENT_FWD),
    "latent_bwd": kernels.raw("minivae_g_latent_bwd", _CODE_LATENT_BWD),
    "adam": kernels.raw("minivae_g_adam", _CODE_ADAM),
})


class GraphUnavailable(RuntimeError):
    """The CUDA graph cannot train this run (the message says why); training goes on eagerly."""


# --------------------------------------------------------------------------------------------- coverage
def why_not(trainer, device=None):
    """None if the graph can train with ``trainer`` (a FastTrainer), else the reason, one line."""
    from .adam import plain_adam
    cfg, opt = trainer.config, trainer.opt
    if os.environ.get("MINIVAE_CUDA_GRAPH", "").strip().lower() in ("0", "off", "no", "false"):
        return f"MINIVAE_CUDA_GRAPH={os.environ['MINIVAE_CUDA_GRAPH']}"
    if device is None and trainer.model.backend != "cupy":
        return f"the model is on {trainer.model.backend}, the graph is CuPy's"
    if trainer.dtype != np.float32:
        return f"the graph step is float32 only (this model is {trainer.dtype})"
    if cfg.hidden and cfg.activation not in ACTS:
        return f"the graph step covers the ReLU and tanh activations, not {cfg.activation!r}"
    if cfg.likelihood not in LIKS:
        return f"the graph step covers the Bernoulli and fixed-variance Gaussian likelihoods, not {cfg.likelihood!r}"
    if not plain_adam(opt):
        return (f"the graph step has Adam's update only, without weight decay or clipping (the optimizer is "
                f"{type(opt).__name__}{' with weight decay or clipping' if type(opt).__name__ == 'Adam' else ''})")
    if 2 * cfg.z_dim > 1024:
        return f"the graph's latent kernels take 2 L <= 1024 (L = {cfg.z_dim})"
    if device is None:
        try:
            import cupy as cp
        except Exception as exc:  # noqa: BLE001
            return f"CuPy cannot be imported ({type(exc).__name__}: {exc})"
        if not hasattr(getattr(getattr(cp, "cuda", None), "Stream", None), "begin_capture"):
            return f"this CuPy ({cp.__version__}) cannot capture CUDA graphs (Stream.begin_capture)"
    return None


# ----------------------------------------------------------------------------------------------- device
class CudaDevice:
    """The GPU side of the graph step: a stream of its own, a cuBLAS handle on it, the raw kernels, capture."""

    name = "cuda"

    def __init__(self):
        import cupy as cp
        from . import cublas as cublas_ctypes
        self.cp = cp
        self.xp = cp
        self.stream = cp.cuda.Stream(non_blocking=True)
        self.blas = cublas_ctypes.Handle()
        self.workspace = cp.empty(32 << 20, dtype=np.uint8)       # cuBLAS's workspace, fixed (capture-safe)
        self.workspace_set = self.blas.set_stream(self.stream.ptr, self.workspace.data.ptr, self.workspace.nbytes)
        self.kern = {k: kernels.build(spec) for k, spec in KERNEL_SPECS.items()}
        self.library = self.blas.lib.path

    def gemm(self, ta, tb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc):
        self.blas.sgemm(ta, tb, m, n, k, alpha, A.data.ptr, lda, B.data.ptr, ldb, beta, C.data.ptr, ldc)

    def gemm_batched(self, ta, tb, m, n, k, alpha, A, lda, sA, B, ldb, sB, beta, C, ldc, sC, count):
        self.blas.sgemm_strided_batched(ta, tb, m, n, k, alpha, A.data.ptr, lda, sA, B.data.ptr, ldb, sB, beta,
                                        C.data.ptr, ldc, sC, count)

    def launch(self, key, grid, block, args):
        self.kern[key](grid, block, args)

    def run(self, fn):
        """fn() with its work on this device's stream."""
        with self.stream:
            return fn()

    def capture(self, fn):
        with self.stream:
            self.stream.begin_capture()
            try:
                fn()
            finally:
                graph = self.stream.end_capture()
        return graph

    def replay(self, graph):
        graph.launch(stream=self.stream)

    def synchronize(self):
        self.stream.synchronize()

    def wait_default(self):
        """Order this stream after the work queued so far on CuPy's default stream (setup, evaluation)."""
        self.cp.cuda.Device().synchronize()

    def close(self):
        self.blas.close()


# ------------------------------------------------------------------------------------------- row-major gemm
class Mat:
    """A row-major matrix inside a flat buffer: ``buf[off + r * ld + c]`` for r < rows, c < cols."""

    __slots__ = ("buf", "off", "rows", "cols", "ld")

    def __init__(self, buf, off, rows, cols, ld=None):
        self.buf, self.off, self.rows, self.cols = buf, int(off), int(rows), int(cols)
        self.ld = int(cols if ld is None else ld)
        need = self.off + (self.rows - 1) * self.ld + self.cols
        if self.rows and need > buf.size:
            raise ValueError(f"matrix ({rows}, {cols}) ld {self.ld} at {off} overruns its buffer of {buf.size}")

    def view(self):
        """The flat buffer from the matrix's first element (what a kernel or cuBLAS receives)."""
        return self.buf[self.off:]


def _mm(dev, C, A, B, ta=False, tb=False, beta=0.0):
    """``C = op(A) @ op(B) + beta C`` (row-major), through column-major cuBLAS (see minivae.fast.cublas)."""
    from .cublas import rowmajor_gemm
    ar, ac = (A.cols, A.rows) if ta else (A.rows, A.cols)
    br, bc = (B.cols, B.rows) if tb else (B.rows, B.cols)
    if ac != br or C.rows != ar or C.cols != bc:
        raise ValueError(f"gemm shapes: ({ar}, {ac}) @ ({br}, {bc}) -> ({C.rows}, {C.cols})")
    opb, opa, m, n, k, _, ldb, lda, ldc = rowmajor_gemm(C.rows, C.cols, ac, ta, tb, A.ld, B.ld, C.ld)
    return lambda: dev.gemm(opb, opa, m, n, k, 1.0, B.view(), ldb, A.view(), lda, beta, C.view(), ldc)


def _mm_pair(dev, C, A, B, ta=False, tb=False):
    """Two products of one shape at once: C[j] = op(A[j]) @ op(B[j]), j = 0, 1, each list's two matrices at a
    constant distance in one buffer (cublasSgemmStridedBatched, stride = that distance)."""
    from .cublas import rowmajor_gemm
    for X in (C, A, B):
        if X[0].buf is not X[1].buf or (X[0].rows, X[0].cols, X[0].ld) != (X[1].rows, X[1].cols, X[1].ld):
            raise ValueError("a batched product needs two matrices of one shape in one buffer")
    C0, A0, B0 = C[0], A[0], B[0]
    ar, ac = (A0.cols, A0.rows) if ta else (A0.rows, A0.cols)
    br, bc = (B0.cols, B0.rows) if tb else (B0.rows, B0.cols)
    if ac != br or C0.rows != ar or C0.cols != bc:
        raise ValueError(f"gemm shapes: ({ar}, {ac}) @ ({br}, {bc}) -> ({C0.rows}, {C0.cols})")
    sA, sB, sC = (X[1].off - X[0].off for X in (A, B, C))
    opb, opa, m, n, k, _, ldb, lda, ldc = rowmajor_gemm(C0.rows, C0.cols, ac, ta, tb, A0.ld, B0.ld, C0.ld)
    return lambda: dev.gemm_batched(opb, opa, m, n, k, 1.0, B0.view(), ldb, sB, A0.view(), lda, sA, 0.0,
                                    C0.view(), ldc, sC, 2)


# ------------------------------------------------------------------------------------------------ program
def _blocks(n, t=THREADS):
    return (max(1, -(-n // t)),)


def _pow2(n, lo=64, hi=1024):
    p = lo
    while p < n and p < hi:
        p *= 2
    return p


def _rows_per_block(N):
    """BY of the column-tiled kernels: 8 rows of threads for small batches, up to 32 for large ones."""
    return int(min(32, max(4, _pow2(N // 16, 4, 32))))


class Program:
    """The ops of one step for batches of N rows, as closures over fixed buffers (captured, or run eagerly).

    Buffers: the model's parameters (``model.flat``), FastTrainer's gradient buffer, Adam's m and v, the
    activations (``ws``), and the epoch data (``data``: x, order, u, eps, sched, losses, ctr, adam_cur, part,
    kl).  Every op writes only these.
    """

    def __init__(self, dev, trainer, N, data):
        xp = dev.xp
        self.dev, self.N = dev, N
        model, cfg = trainer.model, trainer.config
        self.cfg = cfg
        H, L, D = list(cfg.hidden), cfg.z_dim, cfg.x_dim
        n_hidden = len(H)
        f32, i32, f64 = np.float32, np.int32, np.float64
        P, G = model.flat, trainer.grads.flat
        st = trainer.opt.state[0]
        lay = model.layout

        def par(buf, name):
            off, shape = lay[name]
            return Mat(buf, off, shape[0], shape[1]) if len(shape) == 2 else Mat(buf, off, 1, shape[0])

        # activations: one flat float32 workspace
        sizes = {"xb": N * D, "heads": N * 2 * L, "sig": N * L, "z": N * L, "out": N * D, "dheads": N * 2 * L}
        Hd = H[::-1]                                            # the decoder mirrors the encoder
        for i, h in enumerate(H):
            sizes[f"enc{i}"] = N * h
            sizes[f"dec{i}"] = N * Hd[i]
        wmax = max([L] + H)
        sizes["dh0"] = sizes["dh1"] = N * wmax                 # two upstream-gradient buffers, used in turn
        offs, o = {}, 0
        for k, n in sizes.items():
            offs[k] = o
            o += n
        self.ws = ws = xp.zeros(o, dtype=f32)
        M = lambda k, rows, cols, ld=None: Mat(ws, offs[k], rows, cols, ld)  # noqa: E731
        self.xb = M("xb", N, D)
        act = ACTS.get(cfg.activation, 0)
        ops = []
        by = _rows_per_block(N)
        d = data

        def k(key, grid, block, args):
            ops.append(lambda: dev.launch(key, grid, block, args))

        # ---- x_b: the step's rows, binarized
        k("gather", _blocks(N * D), (THREADS,),
          (d.x, d.order, d.u, d.ctr, ws[offs["xb"]:], i32(N), i32(D), i32(d.dynamic)))
        # ---- encoder
        h = self.xb
        enc = []
        for i in range(n_hidden):
            a = M(f"enc{i}", N, H[i])
            ops.append(_mm(dev, a, h, par(P, f"enc.{i}.W")))
            k("bias_act", _blocks(N * H[i]), (THREADS,),
              (a.view(), par(P, f"enc.{i}.b").view(), i32(N * H[i]), i32(H[i]), i32(act)))
            enc.append(a)
            h = a
        h_enc = h
        Hl = h_enc.cols
        # ---- heads: [h W_mu | h W_lv] in one batched product (the biases are added by latent_fwd)
        heads = M("heads", N, 2 * L)
        hmu, hlv = Mat(ws, offs["heads"], N, L, 2 * L), Mat(ws, offs["heads"] + L, N, L, 2 * L)
        Wmu, Wlv = par(P, "enc.mu.W"), par(P, "enc.logvar.W")
        ops.append(_mm_pair(dev, [hmu, hlv], [h_enc, h_enc], [Wmu, Wlv]))
        lat_threads = _pow2(N * L)
        k("latent_fwd", (1,), (lat_threads,),
          (heads.view(), par(P, "enc.mu.b").view(), par(P, "enc.logvar.b").view(), d.eps, d.ctr,
           ws[offs["sig"]:], ws[offs["z"]:], d.kl, i32(N), i32(L)))
        # ---- decoder
        h = M("z", N, L)
        dec = []
        for i in range(n_hidden):
            a = M(f"dec{i}", N, Hd[i])
            ops.append(_mm(dev, a, h, par(P, f"dec.{i}.W")))
            k("bias_act", _blocks(N * Hd[i]), (THREADS,),
              (a.view(), par(P, f"dec.{i}.b").view(), i32(N * Hd[i]), i32(Hd[i]), i32(act)))
            dec.append(a)
            h = a
        h_dec = h
        out = M("out", N, D)
        ops.append(_mm(dev, out, h_dec, par(P, "dec.out.W")))
        invN = 1.0 / N
        if cfg.likelihood == "gaussian":
            var = float(cfg.obs_var)
            scale, lik = f32(invN / var), 1
            self.recon_scale, self.recon_const = 0.5 / var, N * 0.5 * D * (LOG_2PI + math.log(var))
        else:
            scale, lik = f32(invN), 0
            self.recon_scale, self.recon_const = 1.0, 0.0
        n_part = -(-D // 32)
        k("out", (n_part,), (32, by),
          (out.view(), par(P, "dec.out.b").view(), self.xb.view(), par(G, "dec.out.b").view(), d.part,
           i32(N), i32(D), scale, i32(lik)))
        # ---- backward through the decoder (dout is in `out`)
        ops.append(_mm(dev, par(G, "dec.out.W"), h_dec, out, ta=True))
        dh_names = ["dh0", "dh1"]
        turn = [0]

        def next_dh(cols):
            name = dh_names[turn[0] % 2]
            turn[0] += 1
            return M(name, N, cols)

        dh = next_dh(h_dec.cols)
        ops.append(_mm(dev, dh, out, par(P, "dec.out.W"), tb=True))
        for i in reversed(range(n_hidden)):
            hi = dec[i]
            k("act_bwd_db", (-(-Hd[i] // 32),), (32, by),
              (hi.view(), dh.view(), par(G, f"dec.{i}.b").view(), i32(N), i32(Hd[i]), i32(act)))
            h_in = dec[i - 1] if i > 0 else M("z", N, L)
            ops.append(_mm(dev, par(G, f"dec.{i}.W"), h_in, dh, ta=True))
            nxt = next_dh(h_in.cols)
            ops.append(_mm(dev, nxt, dh, par(P, f"dec.{i}.W"), tb=True))
            dh = nxt
        dz = dh                                                     # (N, L)
        # ---- latent backward (+ the heads' bias gradients, the step's loss record, the counter)
        dheads = M("dheads", N, 2 * L)
        lat_b = max(_pow2(N * L), _pow2(2 * L))
        k("latent_bwd", (1,), (lat_b,),
          (dz.view(), heads.view(), ws[offs["sig"]:], d.eps, d.ctr, d.sched, dheads.view(),
           par(G, "enc.mu.b").view(), par(G, "enc.logvar.b").view(), d.part, i32(n_part), d.kl, d.losses,
           d.adam_cur, i32(N), i32(L), f64(invN), f64(self.recon_scale), f64(self.recon_const)))
        dmu, dlv = Mat(ws, offs["dheads"], N, L, 2 * L), Mat(ws, offs["dheads"] + L, N, L, 2 * L)
        ops.append(_mm_pair(dev, [par(G, "enc.mu.W"), par(G, "enc.logvar.W")], [h_enc, h_enc], [dmu, dlv], ta=True))
        # ---- backward through the encoder
        if n_hidden:
            dh = next_dh(Hl)
            ops.append(_mm(dev, dh, dmu, Wmu, tb=True))
            ops.append(_mm(dev, dh, dlv, Wlv, tb=True, beta=1.0))
        for i in reversed(range(n_hidden)):
            hi = enc[i]
            k("act_bwd_db", (-(-H[i] // 32),), (32, by),
              (hi.view(), dh.view(), par(G, f"enc.{i}.b").view(), i32(N), i32(H[i]), i32(act)))
            h_in = enc[i - 1] if i > 0 else self.xb
            ops.append(_mm(dev, par(G, f"enc.{i}.W"), h_in, dh, ta=True))
            if i > 0:
                nxt = next_dh(h_in.cols)
                ops.append(_mm(dev, nxt, dh, par(P, f"enc.{i}.W"), tb=True))
                dh = nxt
        # ---- Adam over the flat buffers
        opt = trainer.opt
        n = P.size
        k("adam", _blocks(n), (THREADS,),
          (P, G, st["m"], st["v"], d.adam_cur, i32(n), f32(opt.b1), f32(1.0 - opt.b1), f32(opt.b2), f32(1.0 - opt.b2)))
        self.ops = ops
        self.n_kernels = len(ops)

    def __call__(self):
        for op in self.ops:
            op()


class EpochData:
    """The device buffers of one epoch (fixed addresses: the graph reads them)."""

    def __init__(self, xp, x, n, N, D, L, steps, dynamic):
        self.x = x
        self.n, self.dynamic = n, int(bool(dynamic))
        self.order = xp.zeros(n, dtype=np.int32)
        self.u = xp.zeros((n * D) if dynamic else 1, dtype=np.float32)
        self.eps = xp.zeros(n * L, dtype=np.float32)
        self.sched = xp.zeros(max(steps, 1) * SCHED, dtype=np.float64)
        self.losses = xp.zeros(max(steps, 1) * 3, dtype=np.float64)
        self.ctr = xp.zeros(1, dtype=np.int32)
        self.adam_cur = xp.zeros(2, dtype=np.float32)
        self.part = xp.zeros(-(-D // 32), dtype=np.float64)
        self.kl = xp.zeros(1, dtype=np.float64)


def adam_schedule(opt, steps, betas, N):
    """(steps, 4) float64: beta, beta / N as float32, lr_t and eps_t as float32, for Adam's steps t + 1 .. t + steps
    (the constants of minivae.fast.adam_begin_step, computed the same way)."""
    out = np.empty((steps, SCHED), dtype=np.float64)
    f = np.float32
    for s in range(steps):
        t = opt.t + 1 + s
        bc1, bc2 = 1.0 - opt.b1 ** t, 1.0 - opt.b2 ** t
        beta = float(betas[s])
        out[s] = (beta, f(beta * (1.0 / N)), f(opt.lr * math.sqrt(bc2) / bc1), f(opt.eps * math.sqrt(bc2)))
    return out


# --------------------------------------------------------------------------------------------- the runner
DEVICE = None          # None: the GPU (CudaDevice); the tests put a CPU stand-in here (tests/graph_stub.py)


def runner_for_training(trainer, settings, n, x, log=print):
    """``minivae.train``'s graph runner for a CuPy run, captured and checked, or None with the reason logged."""
    if settings.backend != "cupy":
        return None
    runner = GraphRunner.create(trainer, settings.batch_size, n, settings.binarize == "dynamic", log=log,
                                device=DEVICE() if DEVICE is not None else None)
    if runner is None:
        return None
    try:
        runner.prepare(x)
    except GraphUnavailable as exc:
        log(f"CUDA graph: off ({exc}); FastTrainer runs each step eagerly")
        runner.close()
        return None
    return runner


class GraphRunner:
    """Trains whole epochs of a FastTrainer's model with one captured step per batch.

    ``runner = GraphRunner.create(trainer, batch_size, n, dynamic, log)`` returns None (and logs why) when the
    graph cannot be used; then :meth:`run_epoch` per epoch.  The first call captures (and checks) the graph.
    """

    def __init__(self, trainer, batch_size, n, dynamic, device=None, log=print):
        reason = why_not(trainer, device)
        if reason:
            raise GraphUnavailable(reason)
        self.trainer, self.N, self.n, self.dynamic, self.log = trainer, int(batch_size), int(n), bool(dynamic), log
        self.steps = self.n // self.N                              # full batches: the graph's steps
        self.short = self.n - self.steps * self.N                 # the last batch's rows (eager), or 0
        if self.steps == 0:
            raise GraphUnavailable(f"no full batch of {self.N} rows in {self.n} examples")
        self.dev = device
        self.graph = None
        self.program = None
        self.data = None
        self._key = None
        self.check = {}

    @classmethod
    def create(cls, trainer, batch_size, n, dynamic, log=print, device=None):
        """A runner, or None with the reason in the log."""
        try:
            return cls(trainer, batch_size, n, dynamic, device=device, log=log)
        except GraphUnavailable as exc:
            log(f"CUDA graph: off ({exc}); FastTrainer runs each step eagerly")
            return None

    # ------------------------------------------------------------------ capture
    def _state_key(self, x):
        tr = self.trainer
        st = tr.opt.state[0] if tr.opt.state else {}
        ptr = lambda a: (a.data.ptr if hasattr(a, "data") and hasattr(a.data, "ptr") else a.__array_interface__["data"][0])  # noqa: E731
        return (ptr(tr.model.flat), ptr(tr.grads.flat), ptr(st["m"]) if st else None, ptr(st["v"]) if st else None,
                ptr(x), x.shape, tr.opt.b1, tr.opt.b2)

    def _ensure_state(self):
        self.trainer.opt.ensure_state(self.trainer.model.params, self.trainer.grads)

    def prepare(self, x):
        """Capture the step for the training set ``x`` (device, (n_all, D)) and check it; raises GraphUnavailable."""
        t0 = time.perf_counter()
        if self.dev is None:
            try:
                self.dev = CudaDevice()
            except Exception as exc:  # noqa: BLE001  (no cuBLAS found, a missing symbol, ...)
                raise GraphUnavailable(f"cannot set up cuBLAS for the graph ({type(exc).__name__}: {exc})") from None
        dev, tr, cfg = self.dev, self.trainer, self.trainer.config
        if getattr(x, "ndim", 0) != 2 or x.shape[1] != cfg.x_dim or x.dtype != np.float32 \
                or not x.flags.c_contiguous:
            raise GraphUnavailable(f"the training set must be a C-contiguous float32 (n, {cfg.x_dim}) array on the "
                                   f"device, got {getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}")
        self._ensure_state()
        xp = dev.xp
        dev.wait_default()
        snap = dev.run(self._snapshot)
        try:
            self.data = EpochData(xp, x, self.n, self.N, cfg.x_dim, cfg.z_dim, self.steps, self.dynamic)
            self.program = Program(dev, tr, self.N, self.data)
            self.check = dev.run(lambda: self._self_check(x, snap))   # all of it on the graph's stream, in order
        except Exception as exc:
            self.graph = None
            try:                                  # whatever failed, the model and Adam are as they were
                dev.run(lambda: self._restore(snap))
                dev.synchronize()
            except Exception:  # noqa: BLE001
                pass
            if isinstance(exc, GraphUnavailable):
                raise
            import traceback
            where = traceback.extract_tb(exc.__traceback__)[-1]
            raise GraphUnavailable(f"setting the graph up failed ({type(exc).__name__}: {exc}; at "
                                   f"{Path(where.filename).name}:{where.lineno})") from exc
        self._key = self._state_key(x)
        self.log(f"CUDA graph: on, one captured step for batches of {self.N} rows ({self.program.n_kernels} kernels"
                 f"{', cuBLAS ' + getattr(dev, 'library', '') if getattr(dev, 'library', '') else ''}); "
                 + (f"the last batch of {self.short} rows of each epoch runs eagerly; " if self.short else "")
                 + f"captured and checked in {time.perf_counter() - t0:.2f} s ({self.check['summary']})")

    def _snapshot(self):
        tr = self.trainer
        st = tr.opt.state[0]
        return tr.model.flat.copy(), st["m"].copy(), st["v"].copy(), tr.opt.t

    def _restore(self, snap):
        tr = self.trainer
        st = tr.opt.state[0]
        tr.model.flat[...] = snap[0]
        st["m"][...] = snap[1]
        st["v"][...] = snap[2]
        tr.opt.t = snap[3]

    def _self_check(self, x, snap):
        """One step three ways on the same synthetic batch -- FastTrainer eagerly, the program's kernels
        eagerly, the captured graph -- from the same state ``snap``, which is restored afterwards."""
        dev, tr, d, N = self.dev, self.trainer, self.data, self.N
        xp = dev.xp
        cfg = tr.config
        rng = np.random.default_rng(12345)                       # a fixed check batch; the run's RNGs are untouched
        rows = np.arange(self.n, dtype=np.int32) % x.shape[0]
        u = rng.random((self.n, cfg.x_dim), dtype=np.float32) if self.dynamic else None
        eps = rng.standard_normal((self.n, cfg.z_dim), dtype=np.float32)
        self._upload(rows, u, eps, [1.0] * self.steps)
        # 1. FastTrainer, eagerly, on the same x_b and eps
        xb = x[xp.asarray(rows[:N])]
        if self.dynamic:
            xb = (xp.asarray(u[:N]) < xb).astype(np.float32)
        loss_e, g = tr.loss_and_grads(xb, xp.asarray(eps[:N]), beta=1.0)
        loss_e = float(loss_e)
        g_e = to_numpy(g.flat).copy()
        tr.apply(g)
        step_e = to_numpy(tr.model.flat) - to_numpy(snap[0])
        self._restore(snap)
        # 2. the program's kernels, eagerly (also compiles them and warms cuBLAS up before the capture)
        d.ctr[...] = 0
        try:
            self.program()
            dev.synchronize()
        except Exception as exc:  # noqa: BLE001
            raise GraphUnavailable(f"the graph's kernels failed when run eagerly ({type(exc).__name__}: {exc})") from None
        out_k = self._read_step(snap)
        self._restore(snap)
        # 3. the captured graph
        d.ctr[...] = 0
        try:
            self.graph = dev.capture(self.program)
            dev.replay(self.graph)
            dev.synchronize()
        except Exception as exc:  # noqa: BLE001
            self._restore(snap)
            raise GraphUnavailable(f"capturing or replaying the step failed ({type(exc).__name__}: {exc})") from None
        out_g = self._read_step(snap)
        self._restore(snap)
        d.ctr[...] = 0
        lr = tr.opt.lr
        res = {"loss_eager": loss_e, "loss_kernels": out_k["loss"], "loss_graph": out_g["loss"],
               "grad_rel_error_kernels_vs_eager": rel_error(out_k["g"], g_e),
               "step_max_diff_kernels_vs_eager_over_lr": float(np.max(np.abs(out_k["step"] - step_e))) / lr,
               "grad_rel_error_graph_vs_kernels": rel_error(out_g["g"], out_k["g"]),
               "param_max_diff_graph_vs_kernels": float(np.max(np.abs(out_g["step"] - out_k["step"]))),
               "counter_after_one_step": out_g["ctr"]}
        res["summary"] = (f"one step: loss {out_g['loss']:.6g} vs eager {loss_e:.6g}, gradients rel. error "
                          f"{res['grad_rel_error_kernels_vs_eager']:.1e}, graph vs its kernels max diff "
                          f"{res['param_max_diff_graph_vs_kernels']:.1e}")
        problems = []
        if not abs(out_k["loss"] - loss_e) <= 1e-4 * max(1.0, abs(loss_e)):
            problems.append(f"loss {out_k['loss']!r} vs eager {loss_e!r}")
        if not res["grad_rel_error_kernels_vs_eager"] < 1e-4:
            problems.append(f"gradients rel. error {res['grad_rel_error_kernels_vs_eager']:.3g}")
        # Adam's first steps are ~lr sign(g): a sign that rounds the other way moves a parameter by up to 2 lr
        if not res["step_max_diff_kernels_vs_eager_over_lr"] <= 2.01:
            problems.append(f"update differs by {res['step_max_diff_kernels_vs_eager_over_lr']:.3g} lr")
        if not (out_g["loss"] == out_k["loss"] or abs(out_g["loss"] - out_k["loss"]) <= 1e-6 * abs(out_k["loss"])):
            problems.append(f"graph loss {out_g['loss']!r} vs its kernels run eagerly {out_k['loss']!r}")
        # the same kernels: equal, unless cuBLAS picks another algorithm inside a capture (float rounding, and
        # then Adam's first step can again flip a sign where g ~ 0)
        if not res["grad_rel_error_graph_vs_kernels"] < 1e-5:
            problems.append(f"graph gradients differ from its kernels run eagerly by "
                            f"{res['grad_rel_error_graph_vs_kernels']:.3g} (rel.)")
        if not res["param_max_diff_graph_vs_kernels"] <= 2.01 * lr:
            problems.append(f"graph parameters differ from its kernels run eagerly by "
                            f"{res['param_max_diff_graph_vs_kernels']:.3g}")
        if out_g["ctr"] != 1:
            problems.append(f"step counter {out_g['ctr']} after one step (expected 1)")
        if problems:
            self.graph = None
            raise GraphUnavailable("self-check failed: " + "; ".join(problems))
        return res

    def _read_step(self, snap):
        tr, d = self.trainer, self.data
        return {"loss": float(to_numpy(d.losses[0])), "g": to_numpy(tr.grads.flat).copy(),
                "step": to_numpy(tr.model.flat) - to_numpy(snap[0]), "ctr": int(to_numpy(d.ctr)[0])}

    # ------------------------------------------------------------------ epochs
    def _upload(self, order, u, eps, betas):
        """Copy the epoch's data into the fixed buffers (host or device arrays); the per-step table from opt."""
        d, xp, tr = self.data, self.dev.xp, self.trainer

        def put(dst, src, dtype):
            src = src.reshape(-1)
            if get_array_module(src) is np:
                dst[:src.size] = xp.asarray(np.ascontiguousarray(src, dtype=dtype))
            else:
                dst[:src.size] = src.astype(dtype, copy=False)

        self.dev.run(lambda: (put(d.order, order, np.int32), put(d.eps, eps, np.float32),
                              self.dynamic and put(d.u, u, np.float32),
                              put(d.sched, adam_schedule(tr.opt, self.steps, betas, self.N), np.float64)))

    def run_epoch(self, x, order, u, eps, betas=None):
        """Train one epoch: ``order`` (n,) rows of ``x`` (device, (n_all, D)) in batch order; ``u`` (n, D) the
        binarization noise (None unless dynamic), ``eps`` (n, L); ``betas`` the KL weight per step (steps + 1
        with a short last batch; None: 1).  Host or device arrays.  Returns the (steps [+1], 3) device array
        of (loss, recon, kl) per step.  The host waits for the GPU once, at the end of the epoch."""
        dev, tr, N = self.dev, self.trainer, self.N
        n_steps = self.steps + (1 if self.short else 0)
        betas = [1.0] * n_steps if betas is None else list(betas)
        if len(betas) != n_steps or len(order) != self.n:
            raise ValueError(f"an epoch has {self.n} rows in {n_steps} steps; got {len(order)} rows, {len(betas)} betas")
        if self.graph is None or self._state_key(x) != self._key:
            if self.graph is not None:
                self.log("CUDA graph: the parameters, optimizer state or data moved; capturing again")
            self.prepare(x)
        xp = dev.xp
        self._upload(order, u, eps, betas[:self.steps])
        d = self.data

        def launch_all():
            d.ctr[...] = 0
            for _ in range(self.steps):
                dev.replay(self.graph)
        dev.wait_default()
        dev.run(launch_all)
        tr.opt.t += self.steps
        losses = d.losses[:self.steps * 3].reshape(self.steps, 3)
        if not self.short:
            dev.synchronize()      # once per epoch: evaluation and checkpoints (default stream) read the parameters
            return losses

        def last():                                     # the short last batch: FastTrainer, eagerly
            lo = self.steps * N
            idx = d.order[lo:]
            xb = x[idx]
            if self.dynamic:
                xb = (d.u[lo * x.shape[1]:].reshape(-1, x.shape[1]) < xb).astype(np.float32)
            e = d.eps[lo * tr.config.z_dim:].reshape(-1, tr.config.z_dim)
            loss = tr.step(xb, e, beta=betas[-1])
            p = tr.parts
            return xp.concatenate([losses, xp.stack([xp.asarray(loss, dtype=np.float64),
                                                     xp.asarray(p["recon"], dtype=np.float64),
                                                     xp.asarray(p["kl"], dtype=np.float64)])[None]])
        losses = dev.run(last)
        dev.synchronize()          # once per epoch: evaluation and checkpoints (default stream) read the parameters
        return losses

    def train_epoch(self, x, batches, rng_binarize, rng_eps, betas):
        """One epoch of ``minivae.train``: the batches' rows in order, and the same draws as its eager loop makes
        (a bulk draw is the concatenation of the per-batch ones): u from ``rng_binarize`` (dynamic binarization
        only), eps from ``rng_eps`` (the model's rng).  Returns the (steps, 3) device array of (loss, recon, kl)."""
        cfg = self.trainer.config
        order = np.concatenate([np.asarray(b) for b in batches])
        u = rng_binarize.random((len(order), cfg.x_dim), dtype=np.float32) if self.dynamic else None
        eps = rng_eps.standard_normal((len(order), cfg.z_dim), dtype=np.float32)
        return self.run_epoch(x, order, u, eps, betas)

    def close(self):
        if self.dev is not None and hasattr(self.dev, "close"):
            self.dev.close()
