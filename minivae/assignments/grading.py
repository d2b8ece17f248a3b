"""Grade a student copy: every exercise in its own isolated, time-limited process.

For each exercise the grader starts ``python -I harness.py grade ...`` (the
harness and the reference formulas come from *this* installation, never from
the student's copy), with the student's folder first on ``sys.path`` and a
fresh temporary working directory.  A crash, a hang (killed after
``timeout`` seconds), a wrong shape or a wrong value is reported for that
exercise and grading goes on with the next one.

Score: every exercise weighs the same, ``score = 100 * passed / total``.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import harness
from .exercises import BY_ID, IDS

HERE = Path(__file__).resolve().parent
HARNESS = HERE / "harness.py"
REFERENCE = HERE / "reference.py"
DEFAULT_TIMEOUT = 60.0
DEFAULT_SEED = 1


def check_student_dir(student_dir):
    d = Path(student_dir)
    if not d.is_dir():
        raise ValueError(f"{d} is not a directory")
    if not (d / "minivae" / "__init__.py").is_file():
        raise ValueError(f"{d} has no minivae/__init__.py: give the folder that holds the student's minivae package")
    return d.resolve()


def _env():
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(MPLBACKEND="Agg", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def _kill(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, AttributeError):
        proc.kill()


def grade_one(student_dir, exercise_id, timeout=DEFAULT_TIMEOUT, seed=DEFAULT_SEED, python=None):
    """Run one exercise's check in a subprocess; return its result dict."""
    ex = BY_ID[exercise_id]
    base = {"id": exercise_id, "title": ex.title, "passed": False, "worst_rel_error": None, "gradient": None}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="minivae-grade-") as tmp:
        result_file = Path(tmp) / "result.json"
        cmd = [python or sys.executable, "-I", "-B", str(HARNESS), "grade", "--student", str(student_dir),
               "--exercise", exercise_id, "--reference", str(REFERENCE), "--result", str(result_file),
               "--seed", str(seed)]
        proc = subprocess.Popen(cmd, cwd=tmp, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill(proc)
            proc.communicate()
            return dict(base, status="timeout", seconds=round(time.perf_counter() - t0, 3),
                        message=f"no result within {timeout:g} s (an endless loop?); the check was stopped")
        finally:
            if proc.poll() is None:
                _kill(proc)
        seconds = round(time.perf_counter() - t0, 3)
        if result_file.is_file():
            try:
                res = json.loads(result_file.read_text())
            except ValueError:
                res = None
            if isinstance(res, dict) and res.get("id") == exercise_id:
                res.update(title=ex.title, seconds=seconds)
                res.setdefault("message", "")
                return dict(base, **res)
        tail = err.decode("utf-8", "replace").strip().splitlines()[-1:] if err else []
        why = f"; last output: {tail[0][:300]}" if tail else ""
        return dict(base, status="error", seconds=seconds,
                    message=f"the check exited (code {proc.returncode}) without a result{why}")


def grade(student_dir, exercises=None, timeout=DEFAULT_TIMEOUT, seed=DEFAULT_SEED, progress=None):
    """Grade ``student_dir``; return the report dict (see :func:`format_report`)."""
    student_dir = check_student_dir(student_dir)
    if not timeout > 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    ids = IDS if exercises is None else tuple(exercises)
    results = []
    for ex in ids:
        r = grade_one(student_dir, ex, timeout=timeout, seed=seed)
        results.append(r)
        if progress is not None:
            progress(r)
    passed = sum(1 for r in results if r["passed"])
    total = len(results)
    return {
        "dir": str(student_dir),
        "score": round(100.0 * passed / total, 2) if total else 0.0,
        "passed": passed,
        "total": total,
        "exercises": results,
        "seed": seed,
        "timeout_s": timeout,
        "tolerances": {"gradient": harness.GRAD_TOL, "value": harness.VALUE_TOL, "finite_difference_h": harness.H},
    }


def format_header(report_dir):
    return f"grading {report_dir}"


def format_footer(report):
    failed = [r["id"] for r in report["exercises"] if not r["passed"]]
    lines = [f"score: {report['score']:g}/100 ({report['passed']} of {report['total']} exercises passed)"]
    if failed:
        lines.append(f"not passed: {', '.join(failed)}")
    return "\n".join(lines)


def format_report(report):
    return "\n".join([format_header(report["dir"])] + [harness.format_line(r) for r in report["exercises"]]
                     + [format_footer(report)])
