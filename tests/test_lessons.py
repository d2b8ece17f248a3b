"""Run every lesson in --quick mode; each lesson asserts its own claims and exits nonzero if one fails."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LESSONS = sorted((ROOT / "lessons").glob("[0-9][0-9]_*.py"))


def test_there_are_fifteen_lessons_in_order():
    nums = [int(p.name[:2]) for p in LESSONS]
    assert nums == list(range(1, len(nums) + 1)) and len(nums) >= 15, [p.name for p in LESSONS]


@pytest.mark.parametrize("path", LESSONS, ids=[p.stem for p in LESSONS])
def test_lesson_is_a_notebook_style_script_using_the_installed_package(path):
    src = path.read_text(encoding="utf-8")
    assert "# %%" in src, "lessons use # %% cell markers"
    assert "sys.path" not in src, "lessons import the installed package, no sys.path hacks"
    assert re.search(r"^\s*(import minivae|from minivae)", src, re.M)
    assert "--quick" in src
    index = (ROOT / "lessons" / "README.md").read_text(encoding="utf-8")
    assert path.name in index, f"{path.name} is missing from lessons/README.md"


@pytest.mark.parametrize("path", LESSONS, ids=[p.stem for p in LESSONS])
def test_lesson_runs_quick_and_its_checks_pass(path, tmp_path):
    # One BLAS thread: the lesson shares the machine with pytest (and, on a busy box, with others); with
    # oversubscribed BLAS threads a small matmul can run 10x slower.
    env = dict(os.environ, MPLBACKEND="Agg", OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(path), "--quick", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, f"{path.name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    checks = [line for line in proc.stdout.splitlines() if line.startswith("CHECK passed")]
    assert checks, f"{path.name} asserted no claims (no 'CHECK passed' lines)"
    assert list(tmp_path.rglob("*.png")), f"{path.name} wrote no figure under --out"
