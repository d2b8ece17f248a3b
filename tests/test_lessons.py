"""Every lesson is a notebook-style script: its format is checked here, and it runs in quick mode as a script.

Each lesson asserts its own claims (``check`` prints ``CHECK passed: ...``) and exits nonzero if one fails.
tests/test_notebooks.py runs the same files as Jupyter notebooks.
"""
import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LESSONS = sorted((ROOT / "lessons").glob("[0-9][0-9]_*.py"))
MARKER = re.compile(r"^\s*# %%")   # jupytext also cuts at an indented marker


def _cells(src):
    """Split a jupytext percent-format script into (kind, first line number, text) cells."""
    cells, kind, start, body = [], None, 0, []
    for i, line in enumerate(src.splitlines(), 1):
        if MARKER.match(line):
            if kind is not None:
                cells.append((kind, start, "\n".join(body)))
            kind, start, body = ("markdown" if "[markdown]" in line else "code"), i, []
        elif kind is not None:
            body.append(line)
    if kind is not None:
        cells.append((kind, start, "\n".join(body)))
    return cells


def _math_spans(markdown):
    """The LaTeX spans of one markdown cell (comment prefix stripped, code spans removed): display, then inline."""
    text = re.sub(r"`[^`]*`", "", "\n".join(line[2:] if line.startswith("# ") else line.lstrip("#")
                                             for line in markdown.splitlines()))
    display = re.findall(r"\$\$(.+?)\$\$", text, re.S)
    rest = re.sub(r"\$\$(.+?)\$\$", "", text, flags=re.S)
    return display, rest


def test_lessons_are_numbered_consecutively_from_01():
    nums = [int(p.name[:2]) for p in LESSONS]
    assert nums == list(range(1, len(nums) + 1)) and len(nums) >= 15, [p.name for p in LESSONS]


@pytest.mark.parametrize("path", LESSONS, ids=[p.stem for p in LESSONS])
def test_lesson_is_a_notebook_style_script_using_the_installed_package(path):
    src = path.read_text(encoding="utf-8")
    assert "sys.path" not in src, "lessons import the installed package, no sys.path hacks"
    assert re.search(r"^(import minivae|from minivae)", src, re.M)
    assert "lesson_args(" in src, "lessons parse --quick/--out/--seed (and MINIVAE_QUICK) with lessonkit.lesson_args"
    assert "matplotlib.use" not in src, "lessons never change matplotlib's backend (save_figure shows figures inline)"
    assert "save_figure(" in src, "figures go through lessonkit.save_figure (saved, and inline in a notebook)"
    assert "__main__" not in src, "a lesson runs top to bottom; no main guard"
    index = (ROOT / "lessons" / "README.md").read_text(encoding="utf-8")
    assert path.name in index, f"{path.name} is missing from lessons/README.md"


@pytest.mark.parametrize("path", LESSONS, ids=[p.stem for p in LESSONS])
def test_every_cell_is_top_level(path):
    src = path.read_text(encoding="utf-8")
    cells = _cells(src)
    assert src.startswith("# %% [markdown]"), "the first cell is a markdown title (what the lesson teaches, how to run)"
    assert cells and not src.lstrip().startswith('"""'), "no module docstring: the derivation lives in markdown cells"
    markers = [i for i, line in enumerate(src.splitlines(), 1) if MARKER.match(line)]
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.If, ast.For, ast.While,
                             ast.With, ast.Try)):
            inside = [m for m in markers if node.lineno < m <= node.end_lineno]
            assert not inside, f"{path.name}: cell marker at line {inside[0]} inside the block at line {node.lineno}"
    for kind, start, text in cells:
        first = next((ln for ln in text.splitlines() if ln.strip()), "")
        assert not first.startswith((" ", "\t")), f"{path.name}: the cell at line {start} starts indented"


@pytest.mark.parametrize("path", LESSONS, ids=[p.stem for p in LESSONS])
def test_derivations_are_markdown_cells_with_latex_math(path):
    cells = [(start, text) for kind, start, text in _cells(path.read_text(encoding="utf-8")) if kind == "markdown"]
    assert len(cells) >= 3, f"{path.name}: the narrative is in markdown cells beside the code"
    n_math = 0
    for start, text in cells:
        display, rest = _math_spans(text)
        assert rest.count("$") % 2 == 0, f"{path.name}: unbalanced $ in the markdown cell at line {start}"
        for span in display + re.findall(r"\$(.+?)\$", rest, re.S):
            n_math += 1
            depth = 0
            for ch in re.sub(r"\\[{}]", "", span):          # \{ and \} are literal braces
                depth += {"{": 1, "}": -1}.get(ch, 0)
                assert depth >= 0, f"{path.name}: unbalanced braces in ${span}$ (cell at line {start})"
            assert depth == 0, f"{path.name}: unbalanced braces in ${span}$ (cell at line {start})"
            assert span.count(r"\left") == span.count(r"\right"), f"{path.name}: \\left without \\right in ${span}$"
            for env in re.findall(r"\\begin\{(\w+)\}", span):
                assert span.count(rf"\end{{{env}}}") == span.count(rf"\begin{{{env}}}"), f"{path.name}: {env}"
    assert n_math >= 3, f"{path.name}: the derivation is written as LaTeX math ($...$, $$...$$) in markdown cells"


# Each lesson's quick (test) mode runs twice: under two seeds, the first with numba's fused kernels where numba is
# installed and the second with them switched off (MINIVAE_NO_NUMBA=1), so a check that only holds for one seed or
# one arithmetic order (numba's sums are ordered differently from NumPy's) fails here.
RUNS = [(0, False), (1, True)]


@pytest.mark.parametrize("seed, no_numba", RUNS, ids=["seed0", "seed1-no-numba"])
@pytest.mark.parametrize("path", LESSONS, ids=[p.stem for p in LESSONS])
def test_lesson_runs_quick_and_its_checks_pass(path, seed, no_numba, tmp_path):
    # One BLAS thread: the lesson shares the machine with pytest (and, on a busy box, with others); with
    # oversubscribed BLAS threads a small matmul can run 10x slower.
    env = dict(os.environ, MPLBACKEND="Agg", OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               NUMBA_NUM_THREADS="1")
    env.pop("MINIVAE_QUICK", None)                     # the flag, not the environment, asks for quick mode here
    env.pop("MINIVAE_NO_NUMBA", None)
    if no_numba:
        env["MINIVAE_NO_NUMBA"] = "1"
    proc = subprocess.run([sys.executable, str(path), "--quick", "--seed", str(seed), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, f"{path.name} (seed {seed}) failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    checks = [line for line in proc.stdout.splitlines() if line.startswith("CHECK passed")]
    assert checks, f"{path.name} asserted no claims (no 'CHECK passed' lines)"
    assert list(tmp_path.rglob("*.png")), f"{path.name} wrote no figure under --out"
