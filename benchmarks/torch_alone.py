"""Is the epoch benchmark's PyTorch column PyTorch at its best?  Both in one run, interleaved.

    python benchmarks/torch_alone.py --threads 2 --n-batches 150 --rounds 8

Round by round it times the same PyTorch training epoch (torch_reference.TorchVAE, Adam, the benchmark's
HostData pipeline: gather, binarize, eps) two ways:

  benchmark   epoch.py's TorchProcess: the child process the benchmark starts (spawned from epoch.py), one block
              per request over a pipe, its time as the benchmark takes it (the child's own clock);
  alone       a process of its own that imports nothing but NumPy, torch and minivae's data and initial values,
              and times its own epochs.

It prints, per round, the wall and CPU seconds of each and their ratios, the medians, and the load average.
CPU seconds (user + system of the whole child) are less sensitive than wall time to other processes on a shared
machine; with 2 threads, OpenMP's spinning adds to both.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def child(threads, n_batches):
    """The 'alone' process: one epoch per line on stdin; prints 'wall cpu mean_loss'."""
    import numpy as np
    import torch

    import minivae
    from minivae.data import load_mnist
    sys.path.insert(0, str(HERE))
    from torch_reference import TorchTrainer, TorchVAE
    torch.set_num_threads(threads)
    x, _ = load_mnist("train")
    n = len(x)
    sizes = [min(128, n - i) for i in range(0, n, 128)][:n_batches]
    bufs = {}
    tr = TorchTrainer(TorchVAE.from_minivae(minivae.VAE(minivae.VAEConfig(), rng=0)))
    print("ready", flush=True)
    for line in sys.stdin:
        e = int(line)
        c0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        rng = np.random.default_rng([0, e])             # epoch.HostData's stream, threads=1
        order = rng.permutation(n)
        total, start = torch.zeros(()), 0
        for N in sizes:
            if N not in bufs:
                bufs[N] = (np.empty((N, 784), np.float32), np.empty((N, 784), np.float32), np.empty((N, 20), np.float32))
            xb, u, eps = bufs[N]
            np.take(x, order[start:start + N], axis=0, out=xb)
            rng.random(out=u, dtype=np.float32)
            np.less(u, xb, out=xb)
            rng.standard_normal(out=eps, dtype=np.float32)
            start += N
            total += tr.step(torch.from_numpy(xb), torch.from_numpy(eps)) * N
        c1, dt = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - t0
        print(f"{dt:.4f} {c1.ru_utime - c0.ru_utime + c1.ru_stime - c0.ru_stime:.4f} {float(total) / start:.4f}",
              flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n-batches", type=int, default=150)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a.threads, a.n_batches)
    sys.argv = ["epoch.py", "--threads", str(a.threads), "--n-batches", str(a.n_batches)]
    sys.path.insert(0, str(HERE))
    import epoch as E                                   # sets the benchmark's thread variables, as a run does
    args = E.parse_args(sys.argv[1:])
    bench = E.TorchProcess(args, 128, a.n_batches, [a.threads])
    run_bench = bench.make(a.threads)
    alone = subprocess.Popen([sys.executable, __file__, "--child", "--threads", str(a.threads), "--n-batches",
                              str(a.n_batches)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert alone.stdout.readline().strip() == "ready"
    load0 = os.getloadavg()
    wall, cpu = [], []
    for e in range(a.rounds):
        loss_b = next(run_bench(e, 10 ** 9))
        tb, cb = run_bench.self_time()
        alone.stdin.write(f"{e}\n")
        alone.stdin.flush()
        ta, ca, loss_a = (float(v) for v in alone.stdout.readline().split())
        wall.append(tb / ta)
        cpu.append(cb / ca)
        print(f"round {e}: benchmark {tb:.3f} s wall, {cb:.2f} s cpu (loss {loss_b:.3f}) | alone {ta:.3f} s wall, "
              f"{ca:.2f} s cpu (loss {loss_a:.3f}) | benchmark/alone wall {tb / ta:.3f} cpu {cb / ca:.3f} | "
              f"load {os.getloadavg()[0]:.1f}", flush=True)
    print(f"median benchmark/alone: wall {statistics.median(wall):.3f}, cpu {statistics.median(cpu):.3f}; "
          f"{a.threads} threads, {a.n_batches} batches a round; load average {load0[0]:.1f} at the start, "
          f"{os.getloadavg()[0]:.1f} at the end, {os.cpu_count()} CPUs")
    bench.close()
    alone.stdin.close()
    alone.wait()


if __name__ == "__main__":
    sys.exit(main())
