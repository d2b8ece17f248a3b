"""Where a conv VAE training step (the readable path ``train`` runs) spends its time, op by op.

    python benchmarks/profile_conv.py [--arch conv|conv-pool] [--steps 30] [--threads 2]

Each step is what ``train`` does: the batch (gather + dynamic binarization + eps, the data pipeline),
``model.loss(xb, eps, validate=False)`` (forward and every gradient), then Adam as ``train`` runs it (one
fused pass when numba is installed, else ``Adam.step``).  The model's layer walk
is instrumented: every layer's forward and backward is timed (``VAE._layer_forward`` /
``VAE._layer_backward``), and inside the convolutions so are ``im2col`` and ``col2im``, so that

    conv/deconv GEMM + layout = the layer's time - its im2col/col2im time
                                (the matrix products plus the NCHW <-> (C, H·W·N) layout changes and the bias)

"loss head" is ``model.loss`` minus all layer times (reparameterization, Bernoulli likelihood, KL and
their gradients).  ``gemm only`` is the time of the same products alone (benchmarks/gemm_bound.py).
Times are the median over steps, per step; the first 3 steps are a warm-up.
"""
import argparse
import os
import sys

p = argparse.ArgumentParser(description="per-op profile of one conv VAE training step")
p.add_argument("--arch", choices=("conv", "conv-pool"), default="conv")
p.add_argument("--steps", type=int, default=30)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--batch-size", type=int, default=128)
args = p.parse_args()
for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[v] = str(args.threads)
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "12")    # as in epoch.py

import statistics  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import minivae  # noqa: E402
from minivae import conv as conv_mod  # noqa: E402
from minivae.fast import threads as fast_threads  # noqa: E402
from minivae.data import load_mnist  # noqa: E402

from gemm_bound import GemmBound  # noqa: E402

clock = time.perf_counter
acc = defaultdict(float)          # seconds of the current step, by part


def timed(name, fn):
    def wrapper(*a, **k):
        t0 = clock()
        out = fn(*a, **k)
        acc[name] += clock() - t0
        return out
    return wrapper


conv_mod.im2col = timed("im2col", conv_mod.im2col)      # conv2d_* look these names up at call time
conv_mod.col2im = timed("col2im", conv_mod.col2im)

cfg = minivae.VAEConfig(arch=args.arch)
model = minivae.VAE(cfg, rng=0)
opt = minivae.Adam(lr=1e-3)
fast_threads.set_count(args.threads)                     # as train's --threads: the fused copies (numba)
from minivae.fast import fused_adam_step                  # noqa: E402  train's Adam for the conv models
fwd0, bwd0 = model._layer_forward, model._layer_backward


def label(layer, d):
    return f"{d} {layer.op}" + (f" {layer.name}" if layer.name else "")


def layer_forward(layer, h, y=None):
    t0 = clock()
    out = fwd0(layer, h, y)
    acc["layers"] += clock() - t0
    acc[label(layer, "fwd")] += clock() - t0
    return out


def layer_backward(layer, dout, cache, grads):
    t0 = clock()
    out = bwd0(layer, dout, cache, grads)
    acc["layers"] += clock() - t0
    acc[label(layer, "bwd")] += clock() - t0
    return out


model._layer_forward, model._layer_backward = layer_forward, layer_backward
x, _ = load_mnist("train")
rng = np.random.default_rng(0)
N = args.batch_size
gb = GemmBound(cfg)
rows = defaultdict(list)
for step in range(args.steps + 3):
    acc.clear()
    t0 = clock()
    xb = x[rng.integers(0, len(x), N)]
    xb = (rng.random(xb.shape, dtype=np.float32) < xb).astype(np.float32)
    eps = rng.standard_normal((N, cfg.z_dim), dtype=np.float32)
    t1 = clock()
    loss, grads = model.loss(xb, eps, validate=False)
    t2 = clock()
    if not fused_adam_step(opt, model.params, grads, args.threads):   # as train: fused when numba is there
        opt.step(model.params, grads)
    t3 = clock()
    gb.run([N])
    t4 = clock()
    acc.update({"data": t1 - t0, "model.loss": t2 - t1, "adam": t3 - t2, "step": t3 - t0, "gemm only": t4 - t3})
    if step >= 3:
        for k, v in acc.items():
            rows[k].append(v)

med = {k: statistics.median(v) for k, v in rows.items()}

def op_of(k):
    return k.split()[1] if k.startswith(("fwd ", "bwd ")) else None


conv_layers = [k for k in med if op_of(k) in ("conv", "deconv")]
med["loss head"] = med["model.loss"] - med["layers"]
med["conv/deconv GEMM + layout"] = sum(med[k] for k in conv_layers) - med.get("im2col", 0) - med.get("col2im", 0)
groups = {"dense layers": [k for k in med if op_of(k) == "dense"],
          "elementwise layers (act, pool, upsample, reshape)": [k for k in med if op_of(k) in
                                                                ("act", "maxpool", "upsample", "flatten", "unflatten")]}
for g, ks in groups.items():
    med[g] = sum(med[k] for k in ks)
print(f"{args.arch}, batch {N}, {args.threads} threads, median of {args.steps} steps; load {os.getloadavg()[0]:.2f}")
step = med["step"]
summary = ["step", "data", "model.loss", "adam", "im2col", "col2im", "conv/deconv GEMM + layout", "dense layers",
           "elementwise layers (act, pool, upsample, reshape)", "loss head", "gemm only"]
print("| part | ms/step | share of step |\n|---|---:|---:|")
for k in summary:
    if k in med:
        print(f"| {k} | {med[k] * 1e3:.1f} | {med[k] / step:.0%} |")
print("\nper layer (ms/step):")
for k in med:
    if k.startswith(("fwd ", "bwd ")):
        print(f"  {k:28s} {med[k] * 1e3:7.2f}")
