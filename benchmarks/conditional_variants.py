"""Which conditional VAE draws the digit it is asked for?  Train variants with the CLI, judge their samples.

For each variant: ``python -m minivae train --conditional <flags>`` (in a child process, one BLAS thread), then
``python -m minivae eval --checkpoint RUN --label-accuracy --json``.  Reports, per variant: the fraction of
1000 prior samples (100 per label) that the judge (:mod:`minivae.judge`, trained once on the real training
digits and copied into every run folder) recognises as their label, overall and for the worst label; the test
bound on -log p(x|y) (the final test -ELBO); and the training's CPU time (user + system of the child).

    python benchmarks/conditional_variants.py --out runs/variants --epochs 10 [--only NAME ...] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

# flags after --recipe default (--base), except "recipe": the conditional recipe itself
VARIANTS = {
    "recipe": ["--recipe", "conditional"],
    "input": [],                                                     # the label into the first layer only
    "every": ["--label-decoder", "every"],
    "outer": ["--label-decoder", "outer"],
    "input+anneal": ["--beta-start", "4", "--warmup", "2"],
    "every+anneal": ["--label-decoder", "every", "--beta-start", "4", "--warmup", "2"],
    "outer+anneal": ["--label-decoder", "outer", "--beta-start", "4", "--warmup", "2"],
    "latent10": ["--latent", "10"],
}


def child_cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run(cmd, env):
    print("$", " ".join(cmd), flush=True)
    t0 = child_cpu()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return child_cpu() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/variants", help="folder of the runs (one subfolder per variant)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--only", nargs="*", help="variant names (default: all); extra ones as NAME=FLAGS")
    p.add_argument("--base", default="--recipe default", help="flags before each variant's (default: --recipe default)")
    p.add_argument("--json", help="append the results to this JSON-lines file")
    a = p.parse_args(argv)
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    names = a.only or list(VARIANTS)
    for name in names:
        flags = VARIANTS[name] if name in VARIANTS else name.split("=", 1)[1].split()
        name = name.split("=", 1)[0]
        run_dir = out / name
        base = [] if "--recipe" in flags else a.base.split()
        train = [py, "-m", "minivae", "train", "--conditional", *base, *flags, "--epochs",
                 str(a.epochs), "--threads", "1", "--no-figures", "--quiet", "--out", str(run_dir), "--force"]
        cpu = run(train, env)
        judge = out / "judge.npz"
        if judge.exists():
            shutil.copy(judge, run_dir / "judge.npz")
        ev = run([py, "-m", "minivae", "eval", "--checkpoint", str(run_dir), "--label-accuracy", "--threads", "1",
                  "--json", str(run_dir / "eval.json")], env)
        if not judge.exists():
            shutil.copy(run_dir / "judge.npz", judge)
        rep = json.loads((run_dir / "eval.json").read_text())
        la = rep["label_accuracy"]
        row = {"variant": name, "flags": " ".join([*base, *flags]), "epochs": a.epochs,
               "recognised": la["overall"], "worst": la["worst"], "worst_label": la["worst_label"],
               "per_label": la["per_label"], "judge_test_accuracy": la["judge_test_accuracy"],
               "test_neg_elbo": rep["neg_elbo"], "test_kl": rep["kl"], "train_cpu_s": cpu, "eval_cpu_s": ev}
        print(f"{name:16s} recognised {100 * row['recognised']:5.1f}%  worst {100 * row['worst']:3.0f}% "
              f"(label {row['worst_label']})  test -ELBO {row['test_neg_elbo']:.2f} (KL {row['test_kl']:.2f})  "
              f"train CPU {cpu:.0f} s", flush=True)
        if a.json:
            with open(a.json, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
