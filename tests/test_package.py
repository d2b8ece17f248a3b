"""The wheel: built from the files an sdist carries, it holds the lessons, the data and the license.

The build runs in a temporary copy of the project (so the checkout gets no build/ or egg-info), and
the wheel is then unpacked into a temporary folder and asked, from outside the repository, to write
the lessons out (``python -m minivae lessons DIR``), which must come from the packaged copy.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SDIST_FILES = ("pyproject.toml", "setup.py", "MANIFEST.in", "LICENSE", "README.md")


def _setuptools_new_enough():
    try:
        import setuptools
    except ImportError:
        return False
    return int(setuptools.__version__.split(".")[0]) >= 77


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    for name in SDIST_FILES:
        shutil.copy2(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "lesson_output", "lesson_files")
    shutil.copytree(ROOT / "minivae", src / "minivae", ignore=ignore)
    shutil.copytree(ROOT / "lessons", src / "lessons", ignore=ignore)
    out = tmp_path_factory.mktemp("wheel")
    # With setuptools >= 77 here, build without isolation (no download); else let pip fetch it.
    isolation = ["--no-build-isolation"] if _setuptools_new_enough() else []
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", *isolation, "-w", str(out), str(src)],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    (whl,) = out.glob("minivae-*.whl")
    return whl


@pytest.mark.slow
def test_wheel_holds_lessons_data_and_license(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    lessons = sorted(p.name for p in (ROOT / "lessons").glob("*.py")) + ["README.md"]
    missing = [n for n in lessons if f"minivae/lesson_files/{n}" not in names]
    assert not missing, f"lessons missing from the wheel: {missing}"
    for gz in sorted((ROOT / "minivae" / "data").glob("*.gz")):
        assert f"minivae/data/{gz.name}" in names
    assert {"minivae/__init__.py", "minivae/cli.py", "minivae/notebook.py", "minivae/fast/kernels.py",
            "minivae/fast/__init__.py", "minivae/train/__init__.py",
            "minivae/assignments/__init__.py"} <= names
    assert any(re.match(r"minivae-[^/]+\.dist-info/licenses/LICENSE$", n) for n in names)
    assert not any(n.startswith(("tests/", "lessons/", "benchmarks/")) for n in names)
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: MIT" in meta
    assert 'Requires-Dist: cupy-cuda12x[ctk]>=14; extra == "cuda12x"' in meta     # the extra brings NVRTC
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "minivae = minivae.cli:main" in entry


@pytest.mark.slow
def test_installed_wheel_writes_the_packaged_lessons(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)                  # a wheel install is this unpacking
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    code = "import minivae.lessonfiles as l; print(l.lessons_dir())"
    r = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True)
    assert r.returncode == 0 and Path(r.stdout.strip()) == site / "minivae" / "lesson_files", r.stderr
    r = subprocess.run([sys.executable, "-m", "minivae", "lessons", "out"], cwd=work, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    stems = sorted(p.stem for p in (ROOT / "lessons").glob("[0-9][0-9]_*.py"))
    assert sorted(p.stem for p in (work / "out").glob("*.ipynb")) == stems
    assert sorted(p.stem for p in (work / "out").glob("*.py")) == stems
