"""minivae.notebook (percent script -> .ipynb, no jupytext) and ``minivae lessons DIR``.

The converter is checked cell by cell against jupytext's own reading of the same text (jupytext is a
test-only dependency; those tests skip, with the reason, without it).
"""
from __future__ import annotations

import json

import pytest

from minivae import cli
from minivae.lessonfiles import CHECKOUT, as_exported, export_lessons, lesson_scripts, lessons_dir
from minivae.notebook import percent_cells, percent_to_notebook

LESSONS = lesson_scripts(CHECKOUT)

# The forms of the percent format the converter handles, in one script.
SAMPLE = '''"""A module docstring before the first marker is a code cell."""
import numpy as np

# %% [markdown]
# # A title
#
# Math: $\\sigma = \\exp(\\tfrac12 \\log\\sigma^2)$
#no space after the hash
#
# $$
# \\mathrm{KL} = \\tfrac12 \\sum_j (\\mu_j^2 + \\sigma_j^2 - 1 - \\log\\sigma_j^2)
# $$

# %%
x = np.ones(3)


# %% A titled cell
def f(a):
    return a + 1
# %% tags=["hide-input", "x"] key="v"
s = """
# %% a marker inside a string is not a cell
"""
t = "# %% nor inside a one-line string"  # %% nor after code


# %% [markdown]
"""
A Markdown cell written as a string.
"""

# %% [raw]
# raw text

# %% [markdown] A titled markdown cell
# text
#
#     an indented line
# %%
y = 2
   
# %%
'''

EDGE_CASES = {
    "sample": SAMPLE,
    "header": "#!/usr/bin/env python\n# -*- coding: utf-8 -*-\n# ---\n# jupyter:\n#   jupytext:\n"
              "#     formats: py:percent\n# ---\n\n# %%\na = 1\n",
    "three blank lines": "# %%\na = 1\n\n\n\n# %%\nb = 2\n",
    "no marker": "x = 1\n\n\ny = 2\n",
    "empty": "",
    "one-line quoted markdown": '# %% [markdown]\n"""one line"""\n# %% [md]\n# short\n',
}


def _jupytext_cells(text):
    jupytext = pytest.importorskip("jupytext", reason="jupytext (a test dependency) is not installed")
    nb = jupytext.reads(text, fmt="py:percent")
    return [(c.cell_type, c.source, {k: v for k, v in c.metadata.items() if k != "lines_to_next_cell"})
            for c in nb.cells]


def _assert_same_cells(text, what):
    ref, mine = _jupytext_cells(text), percent_cells(text)
    for i, (r, m) in enumerate(zip(ref, mine)):
        assert m == r, f"{what}, cell {i}: minivae {m!r} != jupytext {r!r}"
    assert len(mine) == len(ref), f"{what}: {len(mine)} cells, jupytext finds {len(ref)}"


@pytest.mark.parametrize("name", sorted(EDGE_CASES))
def test_converter_matches_jupytext_on_the_format(name):
    _assert_same_cells(EDGE_CASES[name], name)


@pytest.mark.parametrize("script", LESSONS, ids=[p.stem for p in LESSONS])
def test_converter_matches_jupytext_on_every_lesson(script):
    _assert_same_cells(script.read_text(encoding="utf-8"), script.name)


def test_sample_cells():
    # what the cells are, independently of jupytext
    cells = percent_cells(SAMPLE)
    kinds = [c[0] for c in cells]
    assert kinds == ["code", "markdown", "code", "code", "code", "markdown", "raw", "markdown", "code", "code"]
    assert cells[0][1].startswith('"""A module docstring')
    assert cells[1][1].splitlines()[:3] == ["# A title", "", "Math: $\\sigma = \\exp(\\tfrac12 \\log\\sigma^2)$"]
    assert cells[1][1].splitlines()[3] == "no space after the hash"
    assert cells[3][2] == {"title": "A titled cell"}
    assert cells[4][2] == {"tags": ["hide-input", "x"], "key": "v"}
    assert "# %% a marker inside a string" in cells[4][1]
    assert cells[5][1] == "A Markdown cell written as a string."
    assert cells[7][1] == "text\n\n    an indented line"


def test_notebook_is_valid_nbformat4():
    nb = percent_to_notebook(SAMPLE)
    assert nb["nbformat"] == 4 and nb["metadata"]["kernelspec"]["name"] == "python3"
    assert all(c["execution_count"] is None and c["outputs"] == [] for c in nb["cells"] if c["cell_type"] == "code")
    assert "".join(nb["cells"][2]["source"]) == "x = np.ones(3)"
    nbformat = pytest.importorskip("nbformat", reason="nbformat (installed with jupytext) is not installed")
    nbformat.validate(nbformat.from_dict(json.loads(json.dumps(nb))))


def test_lessons_command_writes_py_and_ipynb_for_every_lesson(tmp_path, capsys):
    assert lessons_dir() == CHECKOUT and len(LESSONS) >= 15
    dest = tmp_path / "my lessons"
    assert cli.main(["lessons", str(dest)]) == 0
    assert f"wrote {len(LESSONS)} lessons" in capsys.readouterr().out
    for script in LESSONS:
        # the same script, but for the paths that name lessons/: in DIR the lessons lie side by side
        assert (dest / script.name).read_text(encoding="utf-8") == as_exported(script.read_text(encoding="utf-8"))
        nb = json.loads((dest / (script.stem + ".ipynb")).read_text(encoding="utf-8"))
        assert [c["cell_type"] for c in nb["cells"]] == [c[0] for c in percent_cells(script.read_text())]
        assert any(c["cell_type"] == "code" for c in nb["cells"])
    assert (dest / "README.md").is_file()


def test_lessons_command_into_an_empty_folder_works_and_a_full_one_is_refused(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["lessons", str(empty)]) == 0
    capsys.readouterr()
    assert cli.main(["lessons", str(empty)]) == cli.EXIT_ERROR             # now it is not empty
    err = capsys.readouterr().err
    assert err.startswith("minivae: error: ") and "is not empty" in err and len(err.splitlines()) == 1
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    assert cli.main(["lessons", str(a_file)]) == cli.EXIT_ERROR
    assert "not a folder" in capsys.readouterr().err


def test_export_without_lessons_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no lesson scripts"):
        export_lessons(tmp_path / "out", source=tmp_path)
