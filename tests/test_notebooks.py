"""Run every lesson as a Jupyter notebook: jupytext turns the script into an .ipynb, nbclient executes it.

This is how a student opens the lessons.  Each lesson must run top to bottom in a kernel with no error, in quick
mode (``MINIVAE_QUICK=1``: a kernel cannot be given ``--quick``), and show at least one figure inline.
jupytext, nbclient and ipykernel are test dependencies (requirements-test.txt), not dependencies of minivae.
"""
import os
from pathlib import Path

import pytest

jupytext = pytest.importorskip("jupytext", reason="jupytext is a test dependency: pip install -r requirements-test.txt")
nbclient = pytest.importorskip("nbclient", reason="nbclient is a test dependency: pip install -r requirements-test.txt")
pytest.importorskip("ipykernel", reason="ipykernel is a test dependency: pip install -r requirements-test.txt")

ROOT = Path(__file__).resolve().parents[1]
LESSONS = sorted((ROOT / "lessons").glob("[0-9][0-9]_*.py"))


def _images(nb):
    return sum(1 for cell in nb.cells if cell.cell_type == "code"
               for out in cell.get("outputs", []) if "image/png" in out.get("data", {}))


@pytest.mark.parametrize("path", LESSONS, ids=[p.stem for p in LESSONS])
def test_lesson_runs_as_a_notebook_with_inline_figures(path, tmp_path, monkeypatch):
    nb = jupytext.read(path)
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert code_cells, f"{path.name} has no code cells"
    for cell in code_cells:
        # A cell cut out of a function body runs dedented at top level and fails; every cell must be top level.
        first = next((ln for ln in cell.source.splitlines() if ln.strip()), "")
        assert not first.startswith((" ", "\t")), f"{path.name}: a cell starts indented (inside a function?)"
    # The kernel inherits this environment: quick mode, one BLAS thread (the machine is shared).
    for k, v in {"MINIVAE_QUICK": "1", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
                 "MKL_NUM_THREADS": "1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("MPLBACKEND", raising=False)      # let the kernel use its inline backend
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    text = "\n".join(out.get("text", "") for c in nb.cells if c.cell_type == "code"
                     for out in c.get("outputs", []) if out.get("output_type") == "stream")
    assert "CHECK passed" in text, f"{path.name} asserted no claims in the notebook run"
    assert _images(nb) >= 1, f"{path.name} showed no figure inline"
    assert list(tmp_path.rglob("*.png")), f"{path.name} saved no figure"
