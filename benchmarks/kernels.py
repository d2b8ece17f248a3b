"""The fast path's elementwise work three ways: NumPy ufuncs, numexpr, numba (minivae.fast.cpu_kernels).

    python benchmarks/kernels.py [--threads 2] [--json out.json]

For each piece of a training step of the standard model (batch 128) it times,
interleaved repetition by repetition, the NumPy code of minivae.fast, the same
math as numexpr expressions (if numexpr is installed) and the fused numba
kernel (if numba is installed), at 1 thread and at --threads threads, and
reports the median time of each.  This is how the tool was chosen
(benchmarks/README.md, "The fused kernels").
"""
import argparse
import json
import os
import statistics
import sys
import time

p = argparse.ArgumentParser(description="NumPy vs numexpr vs numba on the fast path's elementwise work")
p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
p.add_argument("--reps", type=int, default=7)
p.add_argument("--json")
args = p.parse_args()
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from minivae.fast import cpu_kernels  # noqa: E402
from minivae.fast import adam_update_block  # noqa: E402
from minivae.fast.threads import set_numba_threads  # noqa: E402

try:
    import numexpr as ne
except ImportError:
    ne = None

f = np.float32
rng = np.random.default_rng(0)
P = 648_824                                           # parameters of the standard model
p_, g, m, v, tmp = [rng.random(P, dtype=f) for _ in range(5)]
b1, b2, lr_t, eps_t = 0.9, 0.999, 1e-3, 1e-8
B1, C1, B2, C2, LR, EP = f(b1), f(1 - b1), f(b2), f(1 - b2), f(lr_t), f(eps_t)
a = rng.standard_normal((128, 400), dtype=f)
b = rng.standard_normal(400, dtype=f)
h = np.maximum(rng.standard_normal((128, 400), dtype=f), 0)
db = np.empty(400, f)
mask = np.empty((128, 400), bool)
lg = (rng.standard_normal((128, 784)) * 4).astype(f)
x = (rng.random((128, 784)) < 0.3).astype(f)
e, d, t2 = (np.empty_like(lg) for _ in range(3))
dbo = np.empty(784, f)
mask_o = np.empty((128, 784), bool)
parts = np.empty(4)
I = f(1 / 128)
K = cpu_kernels.KERNELS


def np_bernoulli():
    """minivae.fast.ops_numpy's NumPy chain: exp(-|l|), sigmoid, d, the bias gradient and the loss's sums."""
    np.abs(lg, out=e)
    np.negative(e, out=e)
    np.exp(e, out=e)
    np.add(e, 1.0, out=t2)
    np.divide(1.0, t2, out=t2)
    np.greater_equal(lg, 0, out=mask_o)
    np.maximum(e, mask_o, out=d)
    np.multiply(d, t2, out=d)
    np.subtract(d, x, out=d)
    np.multiply(d, I, out=d)
    np.sum(d, axis=0, out=dbo)
    prod = np.multiply.reduce(t2[:64], axis=0) * np.multiply.reduce(t2[64:], axis=0)
    return -np.log(prod).sum() + np.maximum(lg, 0).sum() - np.vdot(x, lg)


CASES = {
    "adam (648,824 floats)": {
        "numpy": lambda: adam_update_block(p_, g, m, v, tmp, b1, b2, lr_t, eps_t),
        "numexpr": lambda: (ne.evaluate("B1*m + C1*g", out=m), ne.evaluate("B2*v + C2*(g*g)", out=v),
                            ne.evaluate("p_ - (m / (sqrt(v) + EP)) * LR", out=p_)),
        "numba": lambda: cpu_kernels.PARALLEL["adam"](p_, g, m, v, B1, C1, B2, C2, LR, EP),
    },
    "bias + ReLU (128 x 400)": {
        "numpy": lambda: (np.add(a, b, out=a), np.maximum(a, 0, out=a)),
        "numexpr": lambda: ne.evaluate("where(a + b > 0, a + b, 0)", out=a),
        "numba": lambda: K["bias_relu"](a, b),
    },
    "ReLU backward + bias gradient (128 x 400)": {
        "numpy": lambda: (np.greater(h, 0, out=mask), np.multiply(a, mask, out=a), np.sum(a, axis=0, out=db)),
        "numexpr": lambda: (ne.evaluate("where(h > 0, a, 0)", out=a), np.sum(a, axis=0, out=db)),
        "numba": lambda: K["relu_backward_db"](h, a, db),
    },
    "Bernoulli loss + gradient + bias gradient (128 x 784)": {
        "numpy": np_bernoulli,
        "numexpr": lambda: (ne.evaluate("exp(-abs(lg))", out=e), ne.evaluate("(where(lg >= 0, 1, e) / (1 + e) - x) * I",
                                                                             out=d),
                            np.sum(d, axis=0, out=dbo), ne.evaluate("sum(where(lg > 0, lg, 0) - x * lg + log1p(e))")),
        "numba": lambda: (np.abs(lg, out=e), np.negative(e, out=e), np.exp(e, out=e),
                          K["bernoulli"](lg, x, e, I, d, dbo, True, parts)),
    },
}


def set_threads(n):
    if ne is not None:
        ne.set_num_threads(n)
    set_numba_threads(n)


def time_it(fn, n):
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


out = {"threads": sorted({1, args.threads}), "load_start": os.getloadavg()[0],
       "numexpr": ne.__version__ if ne else None,
       "numba": cpu_kernels.numba.__version__ if cpu_kernels.AVAILABLE else None, "ms": {}}
for T in out["threads"]:
    set_threads(T)
    for case, impls in CASES.items():
        impls = {k: fn for k, fn in impls.items() if (k != "numexpr" or ne) and (k != "numba" or cpu_kernels.AVAILABLE)}
        n = 5 if "adam" in case else 50
        for fn in impls.values():
            fn()                                           # compile / warm up
        times = {k: [] for k in impls}
        for _ in range(args.reps):
            for k, fn in impls.items():
                times[k].append(time_it(fn, n))
        med = {k: statistics.median(ts) * 1e3 for k, ts in times.items()}
        out["ms"][f"{T} thr: {case}"] = med
        print(f"{T} thr  {case:52s} " + "  ".join(f"{k} {v:7.3f} ms" for k, v in med.items()), flush=True)
out["load_end"] = os.getloadavg()[0]
print(f"load average {out['load_start']:.1f} -> {out['load_end']:.1f}")
if args.json:
    with open(args.json, "w") as fh:
        json.dump(out, fh, indent=2)
