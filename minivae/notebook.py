"""Percent-format scripts to Jupyter notebooks, without jupytext.

The lessons are Python scripts in the *percent* format that Jupyter, VS Code and
Spyder understand: ``# %%`` starts a code cell, ``# %% [markdown]`` a Markdown
cell whose lines are comments (``# ``), and the text before the first marker is
a code cell of its own.  :func:`percent_to_notebook` turns such a script into
an nbformat-4 notebook (a plain ``dict``, ready for ``json.dump``), so that an
installed minivae can hand out its lessons as ``.ipynb`` files
(``python -m minivae lessons DIR``) without depending on jupytext, which stays
a test-only dependency.  The test suite checks the cells against jupytext's
own conversion, cell by cell.

The rules follow jupytext's percent reader for what the lessons use:

* a cell starts at a line ``# %%`` (optionally ``# %% [markdown]``, ``[md]``,
  ``[raw]``, a title and ``key=value`` metadata), unless the line sits inside a
  multi-line (triple-quoted) string;
* one blank line, or two after a non-blank line, before the next marker only
  separate the cells and are not part of either;
* Markdown and raw cells lose the comment prefix ``# `` (or ``#``) of each
  line, or, if the cell is one triple-quoted string, its quotes;
* a ``#!`` first line, a ``coding:`` line and a ``# ---`` YAML header are
  file headers, not cells.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

NBFORMAT, NBFORMAT_MINOR = 4, 4

# "# %%", "# %% [markdown] title key=value", "#%%": the cell marker (jupytext's two forms).
_MARKER = re.compile(r"^\s*#\s*%%(%*)\s(.*)$")
_BARE_MARKER = re.compile(r"^\s*#\s*(%%|<codecell>|In\[[0-9 ]*\]:?)\s*$")
_BLANK = re.compile(r"^\s*$")
_CODING = re.compile(r"^[ \t\f]*#.*?coding[:=][ \t]*([-_.a-zA-Z0-9]+)")
_TYPES = {"markdown": "markdown", "md": "markdown", "raw": "raw"}


def _is_marker(line):
    return bool(_MARKER.match(line) or _BARE_MARKER.match(line))


class _Quotes:
    """Tracks whether the next line starts inside a Python string (as jupytext's StringParser)."""

    def __init__(self):
        self.single = None          # the quote char of an open one-line string
        self.triple = None          # the quote char of an open triple-quoted string

    def quoted(self):
        return bool(self.single or self.triple)

    def read(self, line):
        if not self.quoted() and line.lstrip().startswith("#"):
            return                                   # a comment line: its quotes do not count
        triple_start = -1
        for i, c in enumerate(line):
            if self.single is None and self.triple is None and c == "#":
                break                                # the rest of the line is a comment
            if c not in "\"'" or line[i - 1:i] == "\\":
                continue
            if self.single == c:
                self.single = None
                continue
            if self.single is not None:
                continue
            if line[i - 2:i + 1] == 3 * c and i >= triple_start + 3:
                if self.triple == c:                 # closes the triple quote
                    self.triple, triple_start = None, i
                elif self.triple is None:            # opens one
                    self.triple, triple_start = c, i
                continue
            if self.triple is not None:
                continue
            self.single = c
        self.single = None                           # a one-line string never spans lines


def _options(text):
    """``[markdown] title key=value ...`` after ``%%`` -> (cell type, metadata).

    Values are JSON (``tags=["a", "b"]``) or else plain words; the words before the first ``key=`` are
    the cell's title.
    """
    text = text.strip()
    cell_type, metadata = "code", {}
    m = re.match(r"^\[(\w+)\]\s*(.*)$", text)
    if m and m.group(1) in _TYPES:
        cell_type, text = _TYPES[m.group(1)], m.group(2)
        if m.group(1) == "md":
            metadata["region_name"] = "md"           # as jupytext records the short spelling
    first = re.search(r"(^|\s)[A-Za-z_][\w.-]*=", text)
    title, rest = (text[:first.start()], text[first.start():]) if first else (text, "")
    if title.strip():
        metadata["title"] = title.strip()
    decoder, pos = json.JSONDecoder(), 0
    while True:
        m = re.compile(r"\s*([A-Za-z_][\w.-]*)=").match(rest, pos)
        if not m:
            break
        pos = m.end()
        try:
            value, pos = decoder.raw_decode(rest, pos)
        except ValueError:
            word = re.compile(r"\S*").match(rest, pos)
            value, pos = word.group(0), word.end()
        metadata[m.group(1)] = value
    return cell_type, metadata


def _uncomment(lines):
    return [ln[2:] if ln.startswith("# ") else ln[1:] if ln.startswith("#") else ln for ln in lines]


def _unquote(lines):
    """A Markdown cell written as one triple-quoted string -> (its lines, the quote marker), else None."""
    text = "\n".join(lines).strip()
    for prefix in ("", "r", "R"):
        for q in ('"""', "'''"):
            left, right = prefix + q, q
            if text.startswith(left) and text.endswith(right) and len(text) >= len(left) + len(right):
                body = text[len(left):-len(right)]
                if body.startswith("\n"):
                    body, left = body[1:], left + "\n"
                if body.endswith("\n"):
                    body, right = body[:-1], "\n" + right
                # jupytext records the quotes (cell_marker) of a string whose quotes stand on lines of their own
                marker = left[:len(prefix) + 3] if len(left) - len(prefix) == len(right) == 4 else None
                return body.splitlines(), marker
    return None


def _skip_header(lines):
    """Index of the first line after a ``#!`` line, a coding line and a ``# ---`` YAML header."""
    i = 0
    if lines and lines[0].startswith("#!"):
        i = 1
    if i < len(lines) and i <= 1 and _CODING.match(lines[i]):
        i += 1
    if i < len(lines) and lines[i].rstrip() == "# ---":
        for j in range(i + 1, len(lines)):
            if lines[j].rstrip() == "# ---":
                i = j + 1
                if i < len(lines) and _BLANK.match(lines[i]):
                    i += 1                           # the blank line after the header
                break
            if not lines[j].startswith("#"):
                break
    return i


def percent_cells(text):
    """The cells of a percent-format script: a list of ``(cell_type, source, metadata)``."""
    lines = text.splitlines()
    lines = lines[_skip_header(lines):]
    cells = []
    start = 0
    while start < len(lines):
        m = _MARKER.match(lines[start])
        if m:
            cell_type, metadata = _options(m.group(2))
            body = start + 1
        elif _BARE_MARKER.match(lines[start]):
            cell_type, metadata, body = "code", {}, start + 1
        else:                                        # text before the first marker
            cell_type, metadata, body = "code", {}, start
        # the cell runs to the next marker that is not inside a string
        quotes, end = _Quotes(), len(lines)
        for i in range(start, len(lines)):
            line = lines[i]
            if quotes.quoted():
                quotes.read(line)
                continue
            quotes.read(line)
            if i > start and _is_marker(line):
                end = i
                break
        stop = end                                   # blank lines before the next marker separate cells
        if stop - start >= 3 and not _BLANK.match(lines[stop - 3]) and _BLANK.match(lines[stop - 2]) \
                and _BLANK.match(lines[stop - 1]):
            stop -= 2
        elif stop > 0 and lines[stop - 1] == "":
            stop -= 1
        src = lines[body:max(stop, body)]
        if cell_type != "code":
            unquoted = _unquote(src)
            if unquoted is None:
                src = _uncomment(src)
            else:
                src, marker = unquoted
                if marker:
                    metadata["cell_marker"] = marker
        cells.append((cell_type, "\n".join(src), metadata))
        start = end
    return cells


def percent_to_notebook(text):
    """An nbformat-4 notebook (a dict) with the cells of the percent-format script ``text``."""
    cells = []
    for cell_type, source, metadata in percent_cells(text):
        cell = {"cell_type": cell_type, "metadata": metadata, "source": source.splitlines(keepends=True)}
        if cell_type == "code":
            cell["execution_count"] = None
            cell["outputs"] = []
        cells.append(cell)
    return {
        "cells": cells,
        "metadata": {
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        },
        "nbformat": NBFORMAT,
        "nbformat_minor": NBFORMAT_MINOR,
    }


def write_notebook(script, path):
    """Convert the percent-format script file ``script`` to the notebook file ``path``."""
    from .atomic import atomic_write
    nb = percent_to_notebook(Path(script).read_text(encoding="utf-8"))
    text = json.dumps(nb, indent=1, ensure_ascii=False) + "\n"
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))
