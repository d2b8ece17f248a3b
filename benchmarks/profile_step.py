"""Where a training step spends its time: data, forward, backward, Adam; reference vs fast path.

    python benchmarks/profile_step.py [--steps 200] [--threads 2] [--adam-threads 2]

The fast path is profiled with the fused kernels ("fast", when numba is
installed) and with its NumPy ufunc code ("numpy"), taking turns step by step
on the same batches (so both see the same load);
with 2 threads also with the split step ("split": the two concurrent
half-batch passes as one part, then Adam, which also adds the second half's
gradients).  "unaccounted" is the step time minus its parts (the profiler's
own ticks and the Python between them).

Reference path: ``model.loss(backward=False)`` times the forward; ``model.loss()``
minus that is the backward; ``Adam.step`` the update.  Fast path:
``FastTrainer.profile`` (forward, likelihood = Bernoulli loss + its gradient,
backward, adam).  ``gemm only`` is the matmul-only time of one step (benchmarks/gemm_bound.py),
``gemm only, split halves`` the same products as two concurrent half-batches with one-thread BLAS.
Times are per step and per 469-step epoch (batch 128).
"""
import argparse
import os
import sys

p = argparse.ArgumentParser(description="per-part profile of one training step")
p.add_argument("--steps", type=int, default=200)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--adam-threads", type=int, default=None, help="FastTrainer threads (default: --threads)")
p.add_argument("--batch-size", type=int, default=128)
args = p.parse_args()
for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[v] = str(args.threads)
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "12")    # as in epoch.py: see the note there

import time  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import minivae  # noqa: E402
from minivae.data import load_mnist  # noqa: E402
from minivae.fast import FastTrainer  # noqa: E402
from minivae.fast.threads import blas_control_available  # noqa: E402

from epoch import HostData  # noqa: E402
from gemm_bound import GemmBound  # noqa: E402

N, S, W = args.batch_size, args.steps, 10
steps_per_epoch = -(-60000 // N)
x_all, _ = load_mnist("train")
cfg = minivae.VAEConfig()
data = HostData(x_all, N, cfg.z_dim, seed=0, n_batches=S + W)
T = {}


def add(k, t):
    T[k] = T.get(k, 0.0) + t


model, opt = minivae.VAE(cfg, rng=0), minivae.Adam()
it = data.epoch(0)
for i in range(S + W):
    t0 = time.perf_counter()
    x, e = next(it)
    t1 = time.perf_counter()
    model.loss(x, e, backward=False, validate=False)
    t2 = time.perf_counter()
    _, g = model.loss(x, e, validate=False)
    t3 = time.perf_counter()
    opt.step(model.params, g)
    t4 = time.perf_counter()
    if i >= W:
        add("data", t1 - t0)
        add("reference forward", t2 - t1)
        add("reference backward", (t3 - t2) - (t2 - t1))
        add("reference adam", t4 - t3)
        add("reference step (fwd+bwd+adam)", t4 - t2)

adam_threads = args.adam_threads or args.threads
modes = [("fast", False, None), ("numpy", False, False)]
if adam_threads >= 2 and blas_control_available():
    modes.append(("split", True, None))
trainers = {}
for label, split, fused in modes:
    tr = FastTrainer(minivae.VAE(cfg, rng=0), minivae.Adam(), threads=adam_threads, split=split, fused=fused)
    if label == "fast" and not tr.fused:
        continue                                   # no numba: "numpy" is the fast path
    trainers[label] = tr
# The modes (and the matmul-only bound) take turns step by step on the same batches, so that they see
# the same load.
gb = GemmBound(cfg)
it = data.epoch(0)
for i in range(S + W):
    x, e = next(it)
    t0 = time.perf_counter()
    gb.run([N])
    if i >= W:
        add("gemm only", time.perf_counter() - t0)
    for label, tr in trainers.items():
        if i == W:
            tr.profile = {}
        t0 = time.perf_counter()
        tr.step(x, e)
        if i >= W:
            add(f"{label} step (fwd+bwd+adam)", time.perf_counter() - t0)
for label, tr in trainers.items():
    for k, v in tr.profile.items():
        add(f"{label} {k}", v)
    add(f"{label} unaccounted", T[f"{label} step (fwd+bwd+adam)"] - sum(tr.profile.values()))
    tr.close()

for label, split in ([("gemm only, split halves", True)] if "split" in trainers else []):
    gb = GemmBound(cfg, split=split)
    gb.run([N] * W)
    t0 = time.perf_counter()
    gb.run([N] * S)
    add(label, time.perf_counter() - t0)
print(f"batch {N}, {args.threads} BLAS threads, {adam_threads} FastTrainer threads, {S} steps, "
      f"load average {os.getloadavg()[0]:.1f}")
for k in sorted(T):
    print(f"  {k:38s} {T[k] / S * 1e3:7.3f} ms/step  {T[k] / S * steps_per_epoch:6.3f} s/epoch")
