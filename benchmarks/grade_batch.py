"""Time the grader at course scale: N correct submissions of every exercise, graded with --jobs J.

    python benchmarks/grade_batch.py [--n 100] [--jobs 2] [--no-sandbox] [--json FILE]

Makes one solved student copy (``make --exercises none``: the reference code in every region), copies
it N times into a folder of folders, and runs ``python -m minivae.assignments grade FOLDER --jobs J``
once (every check in a fresh bubblewrap sandbox unless --no-sandbox), reporting the wall time and the
CPU time of the grader and all its children (each child is asked to exit, so its time is counted).
Every submission must score 100.  The wall time depends on what else runs on the machine: the CPU time,
divided by the cores, is what the batch costs on an idle one.
"""
import argparse
import csv
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--no-sandbox", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    import numpy

    from minivae import __version__
    from minivae.assignments import IDS, make_starter
    root = Path(tempfile.mkdtemp(prefix="minivae-batch-"))
    try:
        make_starter(root / "solved", (), record_expected=False, lessons=False)
        subs = root / "subs"
        subs.mkdir()
        for i in range(args.n):
            shutil.copytree(root / "solved" / "minivae", subs / f"student{i:03d}" / "minivae")
        out = root / "grades"
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        load0 = os.getloadavg()[0]
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "minivae.assignments", "grade", str(subs), "--jobs", str(args.jobs),
               "--exercises", "all", "--out", str(out)] + (["--no-sandbox"] if args.no_sandbox else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode != 0:
            sys.exit(proc.stderr)
        rows = list(csv.DictReader((out / "gradebook.csv").open()))
        scores = [float(r["total"]) for r in rows]
        assert len(scores) == args.n and all(s == 100 for s in scores), scores
        cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
        res = {"submissions": args.n, "exercises": len(IDS), "jobs": args.jobs,
               "sandbox": rows[0]["sandbox"], "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
               "cpu_s_per_submission": round(cpu / args.n, 2), "cpus": os.cpu_count(),
               "loadavg_1min_before": load0, "loadavg_1min_after": os.getloadavg()[0],
               "machine": platform.machine(), "python": platform.python_version(), "numpy": numpy.__version__,
               "minivae": __version__}
        print(json.dumps(res, indent=1))
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
