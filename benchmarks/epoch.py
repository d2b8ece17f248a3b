"""Epoch-time benchmark: minivae vs plain PyTorch vs the matmul-only lower bound.

    python benchmarks/epoch.py                       # CPU, 2 threads, batch 128, 5 timed epochs
    python benchmarks/epoch.py --json result.json    # also write the numbers
    python benchmarks/epoch.py --backend cupy        # GPU: CuPy vs PyTorch CUDA, batch 128 and 1024
    python benchmarks/epoch.py --quick               # a smoke test (a few batches; torch optional)
    python benchmarks/epoch.py --arch conv --n-batches 20 --epochs 3   # the conv VAE (also conv-pool)

The model is the standard one: 784-400-20 ReLU, Bernoulli decoder, Adam(1e-3),
float32, on MNIST with dynamic binarization.  In one process the script times,
interleaved round by round (minivae, torch, bound, minivae, torch, bound, ...):

  minivae    minivae.fast.FastTrainer (the optimized step, tested against model.loss + Adam.step)
  reference  (with --reference) the readable path: model.loss + Adam.step
  torch      benchmarks/torch_reference.py, if torch is importable (same init values, data, eps)
  bound      the exact matrix products of the epoch alone (benchmarks/gemm_bound.py)
  bound_split  (when minivae uses the split step) the same products as two concurrent half-batches
             on two threads with one-thread BLAS, as the split step runs them

and on the GPU (``--backend cupy``, dense model) the fastest version of each, one column each, with their ratios:

  minivae_graph  minivae.fast.cuda_graph: the whole step as one CUDA graph, replayed per batch (FastTrainer's math)
  torch_graph    the whole PyTorch step in one torch.cuda.graph, Adam(capturable=True) (gpu_references.py)
  jax_jit        JAX, a jitted step per batch;  jax_scan  JAX, the epoch in one jit(lax.scan)  (when JAX sees
                 a GPU; on the CPU with --jax)

Each of these draws its epoch's data (order, binarization noise, eps) on the device in bulk and reads each
step's rows there.  A column that fails is dropped with its traceback in the JSON (``errors``); the others go on.

and reports the median epoch time of each over the timed rounds (after the
warm-up rounds), the ratios minivae/torch and minivae/bound, peak memory and
the machine.  Every epoch includes its data pipeline (gather, binarize, draw
eps), which is the same code for minivae and torch on the CPU.

``--arch conv`` / ``--arch conv-pool``: the convolutional VAEs (minivae.networks; VAEConfig(arch=...),
dense width 256, Bernoulli, Adam(1e-3)).  ``minivae`` is then the readable path that ``train`` runs for
them (model.loss + Adam.step; FastTrainer is dense only), ``torch`` is torch_conv_reference.TorchConvVAE
with the same initial values, and ``bound`` the products of minivae.conv's im2col form
(gemm_bound.conv_step_products).  Only the all-threads count is timed unless ``--one-thread on``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time


def _preparse_threads(argv):
    for i, a in enumerate(argv):
        if a == "--threads" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--threads="):
            return a.split("=", 1)[1]
    return str(os.cpu_count() or 1)


# BLAS thread counts are read when NumPy (and torch) load: set them first.
_THREADS = _preparse_threads(sys.argv[1:])
for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS"):
    os.environ[_v] = _THREADS
# OpenBLAS worker threads busy-wait for ~2^28 cycles after each call by default; on 2 cores they then
# compete with the elementwise work (Adam) that follows the last matmul of a step.  A short spin
# (2^12 cycles) lets them sleep; the bound is measured with the same setting.  Override by setting it.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "12")
os.environ.setdefault("CUPY_TF32", "0")          # CuPy: no TF32 in float32 matmuls
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")   # JAX shares the GPU with CuPy and torch
if _THREADS == "1":                              # JAX on the CPU (--jax): one thread too
    os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import minivae  # noqa: E402
from minivae.data import load_mnist  # noqa: E402
from minivae.fast import FastTrainer  # noqa: E402
from minivae.fast import threads as fast_threads  # noqa: E402  (the conv copies' thread count)

from gemm_bound import GemmBound, step_flops  # noqa: E402

QUICK_BATCHES = 12


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=5, help="timed rounds (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    p.add_argument("--batch-size", type=int, nargs="+", default=None,
                   help="batch size(s); default 128 on numpy, 128 and 1024 on cupy")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="'all threads': BLAS, torch and minivae threads (default: the logical CPUs)")
    p.add_argument("--one-thread", choices=("on", "off"), default=None,
                   help="also time everything on 1 thread, interleaved in the same rounds (default on for "
                        "--arch mlp, off for the conv archs; nothing to add when --threads is 1)")
    p.add_argument("--adam-threads", type=int, default=None,
                   help="minivae's FastTrainer threads at the all-threads count (default: --threads); "
                        "the fused kernels and, without numba, the NumPy Adam (2 threads at most)")
    p.add_argument("--split", choices=("on", "off"), default="off",
                   help="minivae's split step (two half-batches on two threads, one-thread BLAS; NumPy, "
                        "needs --adam-threads 2); default off, FastTrainer's default")
    p.add_argument("--data-threads", type=int, choices=(1, 2), default=1,
                   help="threads filling each batch of the shared CPU data pipeline (default 1)")
    p.add_argument("--backend", choices=("numpy", "cupy"), default="numpy")
    p.add_argument("--arch", choices=("mlp", "conv", "conv-pool"), default="mlp",
                   help="the model: the dense 784-400-20 VAE (default) or a convolutional VAE")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke test: {QUICK_BATCHES} batches per 'epoch', 1 warm-up and 2 timed rounds")
    p.add_argument("--reference", action="store_true", help="also time the readable path (model.loss + Adam.step)")
    p.add_argument("--numpy-path", action="store_true",
                   help="also time minivae's fast path without the fused kernels (FastTrainer(fused=False), the "
                        "NumPy ufunc code) as 'minivae_numpy'")
    p.add_argument("--no-torch", action="store_true", help="skip PyTorch even if it is installed")
    p.add_argument("--jax", action="store_true",
                   help="CPU: also time JAX (jit per step, and the epoch in one lax.scan) when it is installed; "
                        "on cupy the JAX columns are always added when JAX sees a GPU")
    p.add_argument("--torch-in-process", action="store_true",
                   help="CPU: run PyTorch in this process instead of a process of its own (see TorchProcess)")
    p.add_argument("--block-steps", type=int, default=0,
                   help="interleave the implementations every this many steps inside each round instead of "
                        "epoch by epoch (0, the default: whole epochs); each epoch time is the sum of its blocks. "
                        "Use it on a loaded machine, so that every implementation sees the same load")
    p.add_argument("--n-batches", type=int, default=None,
                   help="time only the first this many batches of each epoch (all 469 by default); the ratios "
                        "stay comparable, the times are then per partial epoch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    a = p.parse_args(argv)
    if a.quick:
        a.epochs, a.warmup = min(a.epochs, 2), min(a.warmup, 1)
    if a.epochs < 1 or a.warmup < 0 or a.block_steps < 0:
        p.error("--epochs must be >= 1, --warmup and --block-steps >= 0")
    if a.batch_size is None:
        a.batch_size = [128, 1024] if a.backend == "cupy" else [128]
    if any(b < 1 for b in a.batch_size):
        p.error("--batch-size must be positive")
    if a.threads < 1:
        p.error("--threads must be >= 1")
    if a.adam_threads is None:
        a.adam_threads = a.threads
    if a.one_thread is None:
        a.one_thread = "on" if a.arch == "mlp" else "off"
    if a.arch != "mlp" and (a.split == "on" or a.numpy_path or a.reference):
        p.error(f"--split, --numpy-path and --reference are options of the dense fast path, not of --arch {a.arch} "
                "(whose 'minivae' already is the readable path)")
    a.thread_counts = [a.threads] if a.one_thread == "off" or a.threads == 1 or a.backend == "cupy" else [1, a.threads]
    return a


class ThreadCount:
    """Switch the process between thread counts between epochs: NumPy's BLAS (threadpoolctl, or
    minivae.fast.threads' setter without it) and torch; minivae's trainers carry their own count."""

    def __init__(self, torch):
        self.torch, self.current, self._limits = torch, None, None
        try:
            from threadpoolctl import ThreadpoolController
            self._ctl = ThreadpoolController()
        except Exception:
            self._ctl = None

    def set(self, n):
        if n == self.current:
            return
        if self._ctl is not None:
            if self._limits is not None:
                self._limits.restore_original_limits()
            self._limits = self._ctl.limit(limits=n, user_api="blas")
        else:
            from minivae.fast.threads import blas_control_available, set_blas_threads
            if blas_control_available():
                set_blas_threads(n)
        if self.torch is not None:
            self.torch.set_num_threads(n)
        self.current = n


# ----------------------------------------------------------------------------
# machine description
# ----------------------------------------------------------------------------
def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _blas_info():
    info = {}
    try:
        cfg = np.show_config(mode="dicts")
        blas = cfg.get("Build Dependencies", {}).get("blas", {})
        info["numpy_blas"] = f"{blas.get('name', '?')} {blas.get('version', '')}".strip()
    except Exception:
        info["numpy_blas"] = "unknown"
    try:
        from threadpoolctl import threadpool_info
        info["threadpools"] = [{k: d.get(k) for k in ("internal_api", "version", "num_threads", "architecture")}
                               for d in threadpool_info()]
    except Exception:
        pass
    return info


def machine_torch(torch):
    cfg = torch.__config__.show()
    blas = [s.strip() for s in cfg.replace(",", "\n").splitlines() if "BLAS_INFO" in s or "LAPACK_INFO" in s]
    return {"torch": str(torch.__version__), "torch_threads": torch.get_num_threads(), "torch_blas": "; ".join(blas)}


def machine(args, torch=None):
    m = {"cpu": _cpu_name(), "logical_cpus": os.cpu_count(), "threads": args.threads,
         "adam_threads": args.adam_threads, "python": platform.python_version(), "numpy": np.__version__,
         "platform": platform.platform(), "loadavg_start": list(os.getloadavg()),
         "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                                                 "OPENBLAS_THREAD_TIMEOUT", "OMP_WAIT_POLICY")}}
    m.update(_blas_info())
    m["thread_counts"] = args.thread_counts
    try:
        from minivae.fast import cpu_kernels
        m["fused_kernels"] = (f"numba {cpu_kernels.numba.__version__}, threading layer "
                              f"{cpu_kernels.numba.config.THREADING_LAYER}" if cpu_kernels.AVAILABLE else None)
    except Exception:
        m["fused_kernels"] = None
    if torch is not None:
        m.update(machine_torch(torch))
    if args.backend == "cupy":
        import cupy as cp
        props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
        m["gpu"] = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        m["cupy"] = cp.__version__
        m["cuda_runtime"] = cp.cuda.runtime.runtimeGetVersion()
    return m


def max_rss_mib():
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024.0 if sys.platform != "darwin" else r / 2 ** 20


# ----------------------------------------------------------------------------
# data: the same permutation, binarization and eps for every implementation
# ----------------------------------------------------------------------------
class HostData:
    """Epoch e: order and noise from NumPy Generators seeded (seed, e); batches written into fixed buffers.

    ``threads=2``: each batch's rows are filled in two halves at once on two threads (NumPy's
    generators and ufuncs release the GIL), the second half with its own Generator seeded
    (seed, e, 1); still exact Bernoulli(pixel) draws and deterministic, but a different stream
    from ``threads=1``.  The same batches go to every implementation either way.
    """

    def __init__(self, x, batch_size, z_dim, seed, n_batches=None, threads=1):
        self.x, self.N, self.L, self.seed = x, batch_size, z_dim, seed
        n = len(x)
        self.sizes = [min(batch_size, n - i) for i in range(0, n, batch_size)][:n_batches]
        self.n = sum(self.sizes)
        self.buf = {}
        self.threads = threads
        self._pool = None
        if threads > 1:
            from concurrent.futures import ThreadPoolExecutor
            self._pool = ThreadPoolExecutor(1)

    def _bufs(self, N):
        if N not in self.buf:
            e = lambda *s: np.empty(s, np.float32)  # noqa: E731
            self.buf[N] = (e(N, self.x.shape[1]), e(N, self.x.shape[1]), e(N, self.L))
        return self.buf[N]

    def epoch(self, e):
        """Yields (x_binary, eps) per batch; the arrays are reused buffers."""
        rng = np.random.default_rng([self.seed, e])
        order = rng.permutation(len(self.x))
        rng2 = np.random.default_rng([self.seed, e, 1]) if self._pool is not None else None
        start = 0
        for N in self.sizes:
            bufs = self._bufs(N)
            idx = order[start:start + N]
            if rng2 is None:
                self._fill(rng, idx, bufs, 0, N)
            else:
                h = N - N // 2
                fut = self._pool.submit(self._fill, rng2, idx, bufs, h, N)
                self._fill(rng, idx, bufs, 0, h)
                fut.result()
            start += N
            yield bufs[0], bufs[2]

    def _fill(self, rng, idx, bufs, lo, hi):
        xb, u, eps = (b[lo:hi] for b in bufs)
        np.take(self.x, idx[lo:hi], axis=0, out=xb)
        rng.random(out=u, dtype=np.float32)
        np.less(u, xb, out=xb)                      # x ~ Bernoulli(pixel intensity)
        rng.standard_normal(out=eps, dtype=np.float32)


class DeviceData:
    """GPU: the training set lives on the device; per epoch, the order comes from a host Generator
    (uploaded once), the binarization noise and eps are drawn on the device in bulk."""

    def __init__(self, x, batch_size, z_dim, seed, n_batches, framework):
        self.framework, self.N, self.L, self.seed = framework, batch_size, z_dim, seed
        n = len(x)
        self.sizes = [min(batch_size, n - i) for i in range(0, n, batch_size)][:n_batches]
        self.n = sum(self.sizes)
        if framework == "cupy":
            import cupy as cp
            self.xp = cp
            self.x = cp.asarray(x)
        else:
            import torch
            self.torch = torch
            self.x = torch.as_tensor(x, device="cuda")

    def epoch_arrays(self, e):
        """CuPy: the epoch's (order, u, eps) on the device, in bulk (what each step slices)."""
        cp = self.xp
        order = np.random.default_rng([self.seed, e]).permutation(self.x.shape[0])[:self.n]
        rs = cp.random.RandomState(self.seed * 1000 + e)
        return (cp.asarray(order), rs.random_sample((self.n, self.x.shape[1]), dtype=cp.float32),
                rs.standard_normal((self.n, self.L), dtype=cp.float32))

    def epoch(self, e):
        order = np.random.default_rng([self.seed, e]).permutation(self.x.shape[0])[:self.n]
        if self.framework == "cupy":
            cp = self.xp
            order, u_all, eps_all = self.epoch_arrays(e)
            start = 0
            for N in self.sizes:
                sl = slice(start, start + N)
                xb = (u_all[sl] < self.x[order[sl]]).astype(cp.float32)
                start += N
                yield xb, eps_all[sl]
        else:
            torch = self.torch
            g = torch.Generator(device="cuda").manual_seed(self.seed * 1000 + e)
            order = torch.as_tensor(order, device="cuda")
            u_all = torch.rand((self.n, self.x.shape[1]), generator=g, device="cuda")
            eps_all = torch.randn((self.n, self.L), generator=g, device="cuda")
            start = 0
            for N in self.sizes:
                xb = (u_all[start:start + N] < self.x[order[start:start + N]]).float()
                eps = eps_all[start:start + N]
                start += N
                yield xb, eps


# ----------------------------------------------------------------------------
# the implementations: each is a callable running one epoch, returning the mean loss
# ----------------------------------------------------------------------------
def make_minivae(cfg, args, data, sync, backend, threads, fused=None):
    model = minivae.VAE(cfg, rng=args.seed, backend=backend)
    split = args.split == "on" and backend == "numpy"
    trainer = FastTrainer(model, minivae.Adam(lr=1e-3), threads=threads if backend == "numpy" else 1,
                          split=split if threads >= 2 else False, fused=fused)

    def epoch(e, block):
        total = 0.0
        for i, (xb, eps) in enumerate(data.epoch(e), 1):
            loss = trainer.step(xb, eps)                 # a device scalar on CuPy: no sync here
            total = total + (float(loss) if backend == "numpy" else loss) * xb.shape[0]
            if i % block == 0:
                sync()
                yield None
        sync()
        yield float(total) / data.n

    return epoch, model, trainer


def make_minivae_graph(cfg, args, data, sync, log):
    """minivae's CUDA-graph step (minivae.fast.cuda_graph.GraphRunner over FastTrainer): the epoch's data drawn on the
    device in bulk (DeviceData.epoch_arrays), one graph replay per full batch, the short batch eagerly.  The first
    epoch captures the graph and checks it against eager FastTrainer (the log says how it went)."""
    from minivae.fast.cuda_graph import GraphRunner
    model = minivae.VAE(cfg, rng=args.seed, backend="cupy")
    trainer = FastTrainer(model, minivae.Adam(lr=1e-3))
    runner = GraphRunner.create(trainer, data.N, data.n, True, log=log)
    if runner is None:
        return None
    sizes = data.xp.asarray(data.sizes, dtype=np.float64)

    def epoch(e, block):
        order, u_all, eps_all = data.epoch_arrays(e)
        losses = runner.run_epoch(data.x, order, u_all, eps_all)
        total = (losses[:, 0] * sizes).sum()
        sync()
        yield float(total) / data.n

    epoch.runner = runner
    return epoch


def make_torch_graph(cfg, args, x, N, n, torch):
    """PyTorch at its best on the GPU: the whole step in one torch.cuda.graph (gpu_references.TorchGraph)."""
    from gpu_references import TorchGraph
    tg = TorchGraph(minivae.VAE(cfg, rng=args.seed), torch.as_tensor(x, device="cuda"), n, N, args.seed)

    def epoch(e, block):
        loss = tg.epoch(e)
        torch.cuda.synchronize()
        yield float(loss)

    return epoch


def make_jax(cfg, args, x, N, n, mode):
    """JAX: a jitted step per batch (mode "jit") or the epoch in one jit(lax.scan) ("scan"); gpu_references."""
    from gpu_references import JaxTrainer
    jt = JaxTrainer(minivae.VAE(cfg, rng=args.seed), x, n, N, args.seed, mode=mode)

    def epoch(e, block):
        yield jt.block(jt.epoch(e))

    return epoch


def jax_module(backend):
    """jax when it is installed and runs on the benchmark's device ("gpu" for cupy), else (None, reason)."""
    import importlib.util
    if importlib.util.find_spec("jax") is None:
        return None, "JAX is not installed"
    try:
        import jax
        platform = jax.devices()[0].platform
    except Exception as exc:  # noqa: BLE001
        return None, f"JAX cannot start ({type(exc).__name__}: {exc})"
    want = "gpu" if backend == "cupy" else "cpu"
    if platform != want and not (want == "gpu" and platform == "cuda"):
        return None, f"JAX runs on {platform}, not {want}"
    return jax, None


def make_reference(cfg, args, data, backend="numpy", sync=lambda: None, adam_threads=None):
    """The readable path: ``model.loss(xb, eps, validate=False)`` (forward and every gradient), then
    ``Adam.step``.  With ``adam_threads`` it is exactly what ``train`` runs per step when FastTrainer does not
    apply (the conv VAEs): the Adam step is then :func:`minivae.fast.fused_adam_step` on that many threads when
    numba is installed (the same bits as ``Adam.step``).  The batch ``xb`` is already gathered and binarized
    by the shared data pipeline, as ``train`` does."""
    model = minivae.VAE(cfg, rng=args.seed, backend=backend)
    opt = minivae.Adam(lr=1e-3)
    from minivae.fast import fused_adam_step

    def step(params, grads):
        if adam_threads is None or not fused_adam_step(opt, params, grads, adam_threads):
            opt.step(params, grads)

    def epoch(e, block):
        total = 0.0
        for i, (xb, eps) in enumerate(data.epoch(e), 1):
            fast_threads.set_count(adam_threads or 1)    # as train's --threads (the runs interleave)
            loss, grads = model.loss(xb, eps, validate=False)
            step(model.params, grads)
            total = total + (float(loss) if backend == "numpy" else loss) * xb.shape[0]
            if i % block == 0:
                sync()
                yield None
        sync()
        yield float(total) / data.n

    return epoch, model, opt


class ConvTorchTrainer:
    """torch_conv_reference.TorchConvVAE + torch.optim.Adam(1e-3): the loss 1/N Σ_n [rec_n + KL_n]."""

    def __init__(self, net):
        import torch
        self.net, self.opt = net, torch.optim.Adam(net.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8)

    def step(self, x, eps):
        rec, kl = self.net.parts(x, eps)
        loss = (rec + kl).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.detach()


def make_torch(cfg, args, data, device, torch):
    from torch_reference import TorchTrainer, TorchVAE
    init = minivae.VAE(cfg, rng=args.seed)          # the same initial values as minivae's model
    if cfg.arch != "mlp":
        from torch_conv_reference import TorchConvVAE
        tr = ConvTorchTrainer(TorchConvVAE.from_minivae(init).to(device))
    else:
        tr = TorchTrainer(TorchVAE.from_minivae(init, device=device))
    on_cuda = device != "cpu"

    def epoch(e, block):
        total = torch.zeros((), device=device)
        for i, (xb, eps) in enumerate(data.epoch(e), 1):
            if not on_cuda:
                xb, eps = torch.from_numpy(xb), torch.from_numpy(eps)
            total += tr.step(xb, eps) * xb.shape[0]
            if i % block == 0:
                if on_cuda:
                    torch.cuda.synchronize()
                yield None
        if on_cuda:
            torch.cuda.synchronize()
        yield float(total) / data.n

    return epoch


class TorchProcess:
    """PyTorch CPU in a process of its own, taking turns with minivae block by block (the default on CPU).

    In one process, each library's idle worker threads get in the other's way: PyTorch's OpenMP threads
    spin after its last parallel loop while minivae's step starts, and on 2 cores that took minivae's
    2-thread conv step from about 59 ms to 100 ms (measured; 1 thread was unaffected).  A user never runs
    both in one process, so each gets its own, one per thread count (resizing PyTorch's thread pool between
    the 1-thread and 2-thread runs slowed its 2-thread step from 6.5 to 9.7 ms).  The parent sends "run the
    next block", the child runs it (its own HostData, same seed: the same batches and eps), times it itself
    (wall and CPU seconds around its own steps) and answers; that time is the torch column, and the round trip's
    remainder (the pipe, the parent's wake-up) is reported apart (``own_process``).  Meanwhile the other process
    waits on the pipe, so the two never run at once.  The child sets its thread count once (resizing PyTorch's
    pool per block was measurable).  ``--torch-in-process`` restores the old way."""

    def __init__(self, args, N, n_batches, thread_counts):
        import multiprocessing as mp
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_torch_worker, daemon=True,
                                args=(child, vars(args), N, n_batches, list(thread_counts)))
        self.proc.start()
        child.close()
        msg = self.conn.recv()
        if isinstance(msg, str):
            raise RuntimeError(f"the PyTorch process failed to start: {msg}")
        self.info = msg                                 # torch version and build, for the report

    def make(self, T):
        last = {"s": 0.0, "cpu": 0.0}

        def epoch(e, block):
            while True:
                self.conn.send((T, e, block))
                out = self.conn.recv()
                if isinstance(out, str):
                    raise RuntimeError(f"the PyTorch process failed: {out}")
                out, last["s"], last["cpu"] = out
                yield out
                if out is not None:
                    return
        # the block's time as the child measured it around its own steps: the pipe round trip and the
        # parent's wake-up are not PyTorch's time (the round loop records both; see run_batch_size)
        epoch.self_time = lambda: (last["s"], last["cpu"])
        return epoch

    def close(self):
        try:
            self.conn.send(None)
        except (OSError, BrokenPipeError):
            pass
        self.proc.join(10)


def _torch_worker(conn, args_dict, N, n_batches, thread_counts):
    """The child of :class:`TorchProcess`: PyTorch's trainer per thread count, one block per request."""
    try:
        import torch
        args = argparse.Namespace(**args_dict)
        cfg = minivae.VAEConfig(arch=args.arch)
        x, _ = load_mnist("train")
        data = HostData(x, N, cfg.z_dim, args.seed, n_batches, threads=args.data_threads)
        impls = {T: make_torch(cfg, args, data, "cpu", torch) for T in thread_counts}
        gens = {}
        conn.send(machine_torch(torch))
    except Exception as exc:                            # noqa: BLE001 (reported to the parent, one line)
        conn.send(f"{type(exc).__name__}: {exc}")
        return
    if len(thread_counts) == 1:
        torch.set_num_threads(thread_counts[0])         # once: the pool is never resized between blocks
    while True:
        msg = conn.recv()
        if msg is None:
            return
        T, e, block = msg
        try:
            if len(thread_counts) > 1:
                torch.set_num_threads(T)
            if T not in gens:
                gens[T] = impls[T](e, block)
            c0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            out = next(gens[T])
            dt, c1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
            if out is not None:
                del gens[T]
            conn.send((out, dt, c1.ru_utime - c0.ru_utime + c1.ru_stime - c0.ru_stime))
        except Exception as exc:                        # noqa: BLE001
            conn.send(f"{type(exc).__name__}: {exc}")
            return


def make_bound(cfg, data, xp, sync, split=False):
    gb = GemmBound(cfg, xp=xp, sync=sync, split=split)

    def epoch(e, block):
        for i in range(0, len(data.sizes), block):
            gb.run(data.sizes[i:i + block])
            if i + block < len(data.sizes):
                yield None
        yield float("nan")

    return epoch


# ----------------------------------------------------------------------------
def run_batch_size(args, x, N, torch, report, tc):
    """Time every implementation at every thread count of ``args.thread_counts``, interleaved round by
    round (1 thread: minivae, torch, bound; all threads: minivae, torch, bound; next round ...).
    Appends one result per thread count to report["runs"] and returns them."""
    cfg = minivae.VAEConfig(arch=args.arch)
    conv = args.arch != "mlp"
    n_batches = QUICK_BATCHES if args.quick else args.n_batches
    gpu = args.backend == "cupy"
    impls, loss_log, rss, trainers, proc_log = {}, {}, {}, {}, {}
    tprocs = {}
    if gpu:
        import cupy as cp
        sync = cp.cuda.Device().synchronize
        data_mv = DeviceData(x, N, cfg.z_dim, args.seed, n_batches, "cupy")
        data_t = DeviceData(x, N, cfg.z_dim, args.seed, n_batches, "torch") if torch is not None else None
        xp = cp
    else:
        sync = lambda: None  # noqa: E731
        data_mv = data_t = HostData(x, N, cfg.z_dim, args.seed, n_batches, threads=args.data_threads)
        xp = np
    for T in args.thread_counts:
        mv_threads = args.adam_threads if T == args.threads else T
        if conv:        # the readable path, as `train` runs the conv VAEs
            impls[T, "minivae"], *trainers[T] = make_reference(cfg, args, data_mv, args.backend, sync,
                                                               adam_threads=mv_threads)
        else:
            impls[T, "minivae"], _, trainers[T] = make_minivae(cfg, args, data_mv, sync, args.backend, mv_threads)
        if args.numpy_path and not gpu:
            impls[T, "minivae_numpy"] = make_minivae(cfg, args, data_mv, sync, args.backend, min(mv_threads, 2),
                                                     fused=False)[0]
        if args.reference and not gpu:
            impls[T, "reference"] = make_reference(cfg, args, data_mv)
        if torch == "process":                 # one process per thread count: its pool is never resized
            tprocs[T] = TorchProcess(args, N, n_batches, [T])
            report["machine"].update(tprocs[T].info)
            impls[T, "torch"] = tprocs[T].make(T)
        elif torch is not None:
            impls[T, "torch"] = make_torch(cfg, args, data_t, "cuda" if gpu else "cpu", torch)
        if gpu and not conv:           # the fastest versions of each: whole-step graphs, jit, scan
            _try_column(impls, report, (T, "minivae_graph"),
                        lambda: make_minivae_graph(cfg, args, data_mv, sync, lambda m: _note(report, N, m)))
            if torch is not None:
                _try_column(impls, report, (T, "torch_graph"),
                            lambda: make_torch_graph(cfg, args, x, N, data_mv.n, torch))
        if not conv and (gpu or args.jax):
            jax, why = jax_module(args.backend)
            if jax is None:
                _note(report, N, f"no JAX columns: {why}")
            else:
                for mode in ("jit", "scan"):
                    _try_column(impls, report, (T, f"jax_{mode}"),
                                lambda mode=mode: make_jax(cfg, args, x, N, data_mv.n, mode))
        impls[T, "bound"] = make_bound(cfg, data_mv, xp, sync)
        if not conv and trainers[T].split:
            # the same products as two concurrent half-batches with one-thread BLAS, as the split step runs them
            impls[T, "bound_split"] = make_bound(cfg, data_mv, xp, sync, split=True)

    times = {k: [] for k in impls}
    block = args.block_steps or len(data_mv.sizes)
    failed = set()
    for r in range(args.warmup + args.epochs):
        gens = {key: run(r, block) for key, run in impls.items()}
        spent = dict.fromkeys(impls, 0.0)
        overhead, cpu_s = {}, {}
        result = {}
        before = {}
        while gens:                     # round-robin: `block` steps of each implementation in turn
            for key in list(gens):
                tc.set(key[0])
                if r == 0 and key not in before:
                    before[key] = max_rss_mib()
                t0 = time.perf_counter()
                try:
                    out = next(gens[key])
                except Exception as exc:  # noqa: BLE001  (one failing column must not end the benchmark)
                    if key[1] not in OPTIONAL_COLUMNS:
                        raise
                    _column_failed(report, N, key, exc)
                    failed.add(key)
                    del gens[key]
                    continue
                wall = time.perf_counter() - t0
                own = getattr(impls[key], "self_time", None)
                if own is not None:             # PyTorch's process timed its own block (TorchProcess)
                    child_s, child_cpu = own()
                    spent[key] += child_s
                    overhead[key] = overhead.get(key, 0.0) + wall - child_s
                    cpu_s[key] = cpu_s.get(key, 0.0) + child_cpu
                else:
                    spent[key] += wall
                if out is not None:
                    result[key] = out
                    del gens[key]
                    if r == 0:
                        rss[key] = max_rss_mib() - before[key]
        for key in list(impls):
            if key in failed:
                del impls[key]
                times.pop(key, None)
                continue
            (T, name), dt, loss = key, spent[key], result[key]
            if r >= args.warmup:
                times[key].append(dt)
                if key in overhead:
                    proc_log.setdefault(key, []).append({"pipe_and_wakeup_s": overhead[key], "child_cpu_s": cpu_s[key]})
            if name != "bound" and name != "bound_split":
                loss_log.setdefault(key, []).append(loss)
            print(f"  batch {N:5d} round {r:2d}{' (warm-up)' if r < args.warmup else '          '}  "
                  f"{T:2d} thr  {name:13s} {dt:7.3f} s" + (f"  loss {loss:8.3f}" if loss == loss else ""), flush=True)

    for tp in tprocs.values():
        tp.close()
    out = []
    for T in args.thread_counts:
        keys = [k for k in impls if k[0] == T]
        med = {k[1]: statistics.median(times[k]) for k in keys}
        trainer = trainers[T]
        n_full = len(x)                     # examples in a whole epoch (60 000 for MNIST)
        res = {"arch": args.arch, "batch_size": N, "threads": T, "n_examples": data_mv.n,
               "n_steps": len(data_mv.sizes),
               "gflop_per_epoch": sum(step_flops(cfg, n) for n in data_mv.sizes) / 1e9,
               "times_s": {k[1]: times[k] for k in keys}, "median_s": med,
               # per step, and the whole epoch extrapolated from the timed examples (exact without --n-batches)
               "median_step_s": {k: v / len(data_mv.sizes) for k, v in med.items()},
               "full_epoch_examples": n_full, "full_epoch_steps": -(-n_full // N),
               "extrapolated_epoch_s": {k: v * n_full / data_mv.n for k, v in med.items()},
               "mean_loss_per_round": {k[1]: loss_log[k] for k in keys if k in loss_log},
               "peak_rss_increase_first_epoch_mib": {k[1]: rss[k] for k in keys if k in rss},
               "own_process": {k[1]: proc_log[k] for k in keys if k in proc_log}}
        if conv:
            model, opt = trainer
            from minivae.fast import cpu_kernels
            fused = args.backend == "numpy" and cpu_kernels.AVAILABLE
            res.update({"minivae_path": "readable (model.loss), then Adam "
                        + ("fused (minivae.fast.fused_adam_step)" if fused else "Adam.step"),
                        "minivae_array_bytes": int(model.flat.nbytes + sum(a.nbytes for st in opt.state or []
                                                                           for a in st.values())),
                        "minivae_split": False, "minivae_threads": T, "minivae_fused": fused})
        else:
            res.update({"minivae_array_bytes": trainer_bytes(trainer), "minivae_split": trainer.split,
                        "minivae_threads": trainer.threads, "minivae_fused": getattr(trainer, "fused", False)})
        res["ratio_minivae_over_bound"] = med["minivae"] / med["bound"]
        if "bound_split" in med:
            res["ratio_minivae_over_bound_split"] = med["minivae"] / med["bound_split"]
            res["ratio_minivae_over_fastest_bound"] = med["minivae"] / min(med["bound"], med["bound_split"])
        if "torch" in med:
            res["ratio_minivae_over_torch"] = med["minivae"] / med["torch"]
            res["ratio_torch_over_bound"] = med["torch"] / med["bound"]
        # every fast column against every fast reference: the targets are minivae_graph / torch_graph
        # and minivae_graph / jax_scan
        for mine in ("minivae", "minivae_graph"):
            for ref in ("torch", "torch_graph", "jax_jit", "jax_scan"):
                if mine in med and ref in med and (mine, ref) != ("minivae", "torch"):
                    res[f"ratio_{mine}_over_{ref}"] = med[mine] / med[ref]
        if "reference" in med:
            res["ratio_reference_over_torch"] = med["reference"] / med["torch"] if "torch" in med else None
            res["ratio_reference_over_bound"] = med["reference"] / med["bound"]
        lm = res["mean_loss_per_round"]
        if "minivae_graph" in lm and "minivae" in lm:
            # the same data (DeviceData.epoch_arrays) and initial values: the same first-round loss, to float32
            a, b = lm["minivae"][0], lm["minivae_graph"][0]
            res["graph_vs_eager_first_round_loss_rel"] = abs(a - b) / abs(a)
            if not res["graph_vs_eager_first_round_loss_rel"] < 1e-4:
                _note(report, N, f"minivae_graph's first-round loss {b:.6g} differs from eager minivae's {a:.6g}")
        runner = getattr(impls.get((T, "minivae_graph")), "runner", None)
        if runner is not None:
            res["minivae_graph"] = {"kernels_per_step": runner.program.n_kernels, "graph_steps": runner.steps,
                                    "eager_last_batch_rows": runner.short,
                                    "self_check": {k: v for k, v in runner.check.items() if k != "summary"}}
        if gpu:
            import cupy as cp
            res["gpu_memory_mib"] = {"cupy_pool_total": cp.get_default_memory_pool().total_bytes() / 2 ** 20}
            if torch is not None:
                res["gpu_memory_mib"]["torch_max_allocated"] = torch.cuda.max_memory_allocated() / 2 ** 20
        report["runs"].append(res)
        out.append(res)
    return out


OPTIONAL_COLUMNS = ("minivae_graph", "torch_graph", "jax_jit", "jax_scan")


def _note(report, N, msg):
    print(f"  batch {N}: {msg}", flush=True)
    report.setdefault("notes", []).append(f"batch {N}: {msg}")


def _try_column(impls, report, key, make):
    """impls[key] = make(), or a note with the traceback when it fails (or returns None): the other columns go on."""
    import traceback
    try:
        fn = make()
    except Exception:  # noqa: BLE001
        report.setdefault("errors", {})[f"{key[1]} (setup)"] = traceback.format_exc()
        print(f"  {key[1]}: setup failed, column skipped:\n{traceback.format_exc()}", flush=True)
        return
    if fn is None:
        _note(report, "-", f"{key[1]}: not available (see the line above)")
        return
    impls[key] = fn


def _column_failed(report, N, key, exc):
    import traceback
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    report.setdefault("errors", {})[f"{key[1]} (batch {N})"] = tb
    print(f"  {key[1]}: failed during the run, column dropped:\n{tb}", flush=True)


def trainer_bytes(tr):
    """Bytes of every array the fast trainer owns: parameters, gradients (two sets with the split step),
    Adam moments, step buffers."""
    total = tr.model.flat.nbytes + tr.grads.flat.nbytes
    total += tr._grads2.flat.nbytes if tr._grads2 is not None else 0     # the split step's second half
    for st in tr.opt.state or []:
        total += sum(a.nbytes for a in st.values())
    tmp = getattr(tr.ops, "_tmp", None)                                   # the NumPy Adam's scratch
    total += tmp.nbytes if tmp is not None else 0
    for b in tr._bufs.values():
        for v in vars(b).values():
            arrays = v.values() if isinstance(v, dict) else (v if isinstance(v, list) else [v])
            total += sum(a.nbytes for a in arrays)
    return int(total)


def main(argv=None):
    args = parse_args(argv)
    torch = None
    if not args.no_torch and args.backend == "numpy" and not args.torch_in_process:
        import importlib.util
        if importlib.util.find_spec("torch") is not None:
            torch = "process"                 # started per batch size in run_batch_size (TorchProcess)
    elif not args.no_torch:
        try:
            import torch
            torch.set_num_threads(args.threads)
            if args.backend == "cupy":
                torch.backends.cuda.matmul.allow_tf32 = False
                torch.backends.cudnn.allow_tf32 = False
                torch.set_float32_matmul_precision("highest")
        except ImportError:
            torch = None
    if args.backend == "cupy":
        try:
            minivae.backend.get_xp("cupy")
        except minivae.BackendError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    x, _ = load_mnist("train")
    report = {"command": " ".join([os.path.basename(sys.executable), "benchmarks/epoch.py",
                                   *(sys.argv[1:] if argv is None else argv)]),
              "arch": args.arch, "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "split": args.split,
              "backend": args.backend, "quick": args.quick, "epochs": args.epochs, "warmup": args.warmup,
              "block_steps": args.block_steps, "data_threads": args.data_threads, "n_batches": args.n_batches,
              "machine": machine(args, None if torch == "process" else torch),
              "torch_available": torch is not None, "torch_process": "own" if torch == "process" else "same",
              "runs": []}
    print(f"minivae epoch benchmark ({args.arch}): {report['machine']['cpu']}, {args.threads} threads, "
          f"{report['machine'].get('numpy_blas')}, backend {args.backend}"
          + ("" if torch is not None else
             " (--no-torch: PyTorch skipped)" if args.no_torch else
             " (PyTorch is not installed: no torch column and no minivae/torch ratio; pip install torch)"))
    tc = ThreadCount(None if torch == "process" else torch)
    results = [res for N in args.batch_size for res in run_batch_size(args, x, N, torch, report, tc)]
    for res in results:
        N = res["batch_size"]
        med = res["median_s"]
        T = res["threads"]
        print(f"batch {N}, {T} thr: median epoch  " + "  ".join(f"{k} {v:.3f} s" for k, v in med.items()))
        line = f"batch {N}, {T} thr: minivae/bound {res['ratio_minivae_over_bound']:.2f}"
        if "ratio_minivae_over_bound_split" in res:
            line += f"  minivae/bound_split {res['ratio_minivae_over_bound_split']:.2f}"
        if "ratio_minivae_over_torch" in res:
            line += f"  minivae/torch {res['ratio_minivae_over_torch']:.2f}"
        if "ratio_reference_over_bound" in res:
            line += f"  reference/bound {res['ratio_reference_over_bound']:.2f}"
        if "minivae_numpy" in med:
            res["ratio_minivae_numpy_over_torch"] = med["minivae_numpy"] / med["torch"] if "torch" in med else None
            res["ratio_minivae_numpy_over_bound"] = med["minivae_numpy"] / med["bound"]
            line += f"  minivae_numpy/bound {res['ratio_minivae_numpy_over_bound']:.2f}"
        print(line + f"  ({res['gflop_per_epoch']:.1f} GFLOP of matmuls per epoch)")
        best = [f"{k[6:].replace('_over_', '/')} {v:.2f}" for k, v in res.items()
                if k.startswith("ratio_minivae_graph_over_") or k.startswith("ratio_minivae_over_") and
                k.split("_over_")[1] in ("torch_graph", "jax_jit", "jax_scan")]
        if best:
            print(f"batch {N}, {T} thr: " + "  ".join(best))
        if res["n_examples"] != res["full_epoch_examples"]:
            print(f"batch {N}, {T} thr: per step  " + "  ".join(f"{k} {v * 1e3:.1f} ms"
                                                             for k, v in res["median_step_s"].items())
                  + f";  a whole epoch ({res['full_epoch_steps']} steps), extrapolated  "
                  + "  ".join(f"{k} {v:.1f} s" for k, v in res["extrapolated_epoch_s"].items()))
    report["scaling"] = [{k: res.get(k) for k in ("batch_size", "threads", "ratio_minivae_over_torch",
                                                   "ratio_minivae_over_bound", "ratio_torch_over_bound")}
                         for res in results]
    report["machine"]["loadavg_end"] = list(os.getloadavg())
    report["peak_rss_mib"] = max_rss_mib()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
