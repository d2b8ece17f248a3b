"""Where ``eval --iw-k`` spends its time: one call for 100 samples x 100 test images, part by part.

    python benchmarks/profile_iw.py [--checkpoint DIR] [--calls 30] [--threads 2]

``minivae.evaluate.iw_log_likelihood`` makes k/100 x N/100 such calls (5,000 for k = 5000 on the 10,000
test images); each draws its eps on the host and asks ``minivae.fast.log_weights`` for a (100, 100) block of
log-weights.  This script times the parts of that call for the model in ``--checkpoint`` (default: a fresh ``burda2015``
model, 784-200-200-50 tanh: the cost does not depend on the weights), with the fused kernels (numba) as
``eval`` runs them, and the matrix products alone.  "unaccounted" is the call minus its parts.
Every part is listed per call and for a whole ``eval --iw-k 5000`` run (x 5,000).
"""
import argparse
import os
import sys
import time


def parse(argv=None):
    p = argparse.ArgumentParser(description="per-part profile of eval --iw-k")
    p.add_argument("--checkpoint", default=None, help="a run folder or checkpoint.npz (default: a fresh burda2015 model)")
    p.add_argument("--calls", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def main(argv=None, clock=time.perf_counter):
    """Profile and print the table.  ``clock`` is the timer (a test passes a fake one to check the accounting:
    every part timed by two reads of it, the whole call from its first read to its last)."""
    args = parse(argv)
    for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[v] = str(args.threads)
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "12")    # as in epoch.py and the CLI

    import functools
    import statistics
    from collections import defaultdict

    import numpy as np

    import minivae
    from minivae.fast import cpu_kernels
    import minivae.fast  # noqa: F401  (log_weights, as eval calls it)
    from minivae.fast import iw  # (its scratch arrays and two-thread ufuncs)
    from minivae.fast.threads import set_numba_threads
    from minivae.data import load_mnist

    if args.checkpoint:
        from minivae.checkpoint import load_checkpoint
        model = load_checkpoint(args.checkpoint).build_model("numpy")
    else:
        model = minivae.VAE(minivae.VAEConfig(hidden=(200, 200), z_dim=50, activation="tanh"), rng=0)
    if not cpu_kernels.AVAILABLE:
        sys.exit("numba is not installed: eval uses the NumPy code (pip install -e '.[fast]')")
    set_numba_threads(args.threads)
    K, dt, p = cpu_kernels.KERNELS, model.dtype, model.params
    x_test, _ = load_mnist("test")
    S, N = 100, 100
    rng = np.random.default_rng(0)
    rows = defaultdict(list)
    for call in range(args.calls + 3):
        xb = np.ascontiguousarray(x_test[(call * N) % 10000:(call * N) % 10000 + N], dtype=dt)
        t = {}
        t0 = clock()
        eps = rng.standard_normal((S, N, model.config.z_dim)).astype(dt)           # as iw_log_likelihood draws it
        t["eps draw (host RNG, float64 -> model dtype)"] = clock() - t0
        c0 = clock()
        t0 = clock()
        mu, logvar, _ = model.encoder_forward(xb)
        mu, logvar = np.ascontiguousarray(mu), np.ascontiguousarray(logvar)
        t["encoder (100 images)"] = clock() - t0
        t0 = clock()
        z = iw.scratch("z", eps.shape, dt)
        lw = np.empty((S, N), dtype=np.float64)
        K["iw_latent"](mu, logvar, eps, z, lw)
        t["z, log p(z) - log q(z given x) (fused)"] = clock() - t0
        h = z.reshape(S * N, -1)
        for i in range(len(model.config.hidden)):
            t0 = clock()
            W = p[f"dec.{i}.W"]
            a = np.matmul(h, W, out=iw.scratch(f"dec.{i}", (S * N, W.shape[1]), dt))
            t[f"matmul dec.{i}"] = clock() - t0
            t0 = clock()
            if model.config.activation == "relu":
                K["bias_relu"](a, p[f"dec.{i}.b"])
            elif model.config.activation == "tanh":
                iw.rows_on_two_threads(functools.partial(iw._bias_tanh, b=p[f"dec.{i}.b"]), a, threads=args.threads)
            else:
                a += p[f"dec.{i}.b"]
                a = model.act_forward(a)[0]
            h = a
            t[f"bias + {model.config.activation} dec.{i}"] = clock() - t0
        t0 = clock()
        W = p["dec.out.W"]
        a = np.matmul(h, W, out=iw.scratch("dec.out", (S * N, W.shape[1]), dt))
        t["matmul dec.out"] = clock() - t0
        t0 = clock()
        e = iw.scratch("e", a.shape, dt)
        lin = iw.scratch("lin", (S * N,), np.float64)
        K["iw_bernoulli_pre"](a, p["dec.out.b"], xb, e, lin)
        t["Bernoulli: bias, -abs(l), sum max(l,0) - x l (fused)"] = clock() - t0
        t0 = clock()
        iw.rows_on_two_threads(iw._exp_inplace, e, threads=args.threads)
        t["Bernoulli: exp (NumPy SIMD, row halves on two threads)"] = clock() - t0
        t0 = clock()
        nll = iw.scratch("nll", (S * N,), np.float64)
        K["iw_bernoulli_post"](e, lin, nll)
        lw -= nll.reshape(S, N)
        lw = lw.astype(dt).astype(np.float64)
        t["Bernoulli: sum log(1 + e) (fused)"] = clock() - t0
        t0 = clock()
        m = lw.max(axis=0)
        np.exp(lw - m).sum(axis=0)
        t["running log-sum-exp"] = clock() - t0
        call_t = clock() - c0 + t["eps draw (host RNG, float64 -> model dtype)"]
        t["unaccounted"] = call_t - sum(v for k, v in t.items() if not k.startswith("("))
        t["whole call"] = call_t
        t0 = clock()
        ref = minivae.fast.log_weights(model, xb, eps)                 # what eval calls, for the check below
        t["(fast.log_weights as eval calls it, without the eps draw)"] = clock() - t0
        t0 = clock()
        z2 = z.reshape(S * N, -1)
        h1 = z2 @ p["dec.0.W"]
        h2 = h1 @ p["dec.1.W"] if len(model.config.hidden) > 1 else h1
        h2 @ p["dec.out.W"]
        t["(the matmuls alone: the bound)"] = clock() - t0
        if call >= 3:
            for k, v in t.items():
                rows[k].append(v)
        assert np.allclose(ref, lw.reshape(S, N), rtol=1e-5, atol=1e-3)

    med = {k: statistics.median(v) for k, v in rows.items()}
    calls = 5000
    print(f"eval --iw-k 5000 profile: {model}, {args.threads} threads, median of {args.calls} calls of "
          f"{S} x {N}; load {os.getloadavg()[0]:.2f}")
    print("| part | ms per call | s per eval --iw-k 5000 (x 5,000 calls) | share |")
    print("|---|---:|---:|---:|")
    for k, v in med.items():
        share = f"{100 * v / med['whole call']:.0f}%" if not k.startswith("(") else ""
        print(f"| {k} | {v * 1e3:.2f} | {v * calls:.1f} | {share} |")


if __name__ == "__main__":
    main()
