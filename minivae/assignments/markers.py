"""Find and replace the exercise regions of a source file.

A region is the lines strictly between a line whose text (after indentation)
is ``### BEGIN SOLUTION <exercise_id>`` and the next line whose text is
``### END SOLUTION`` -- the markers nbgrader uses, with an exercise id added.
Markers must be on their own lines, regions cannot nest, and an id may mark
several regions (all of them belong to that one exercise).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

BEGIN = "### BEGIN SOLUTION"
END = "### END SOLUTION"
_BEGIN_RE = re.compile(r"^(?P<indent>[ \t]*)### BEGIN SOLUTION(?:[ \t]+(?P<id>\S+))?[ \t]*$")
_END_RE = re.compile(r"^[ \t]*### END SOLUTION[ \t]*$")


_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+\Z")


def split_lines(text, keepends=False):
    """Lines as Python itself counts them (ends: \\n, \\r\\n, \\r only).  ``str.splitlines`` also splits at
    U+2028, U+0085, form feeds and more, which Python's parser does not: one rule everywhere, so the grader's
    line numbers are the AST's."""
    found = _LINE.findall(text)
    return found if keepends else [ln.rstrip("\r\n") for ln in found]


class MarkerError(ValueError):
    """Unbalanced, nested or unnamed solution markers."""


@dataclass(frozen=True)
class Region:
    id: str
    begin: int      # 0-based index of the BEGIN line
    end: int        # 0-based index of the END line
    indent: str


def find_regions(text, name="<source>"):
    """All regions of ``text`` in order.  Raises :class:`MarkerError` naming the line."""
    regions, open_ = [], None
    for i, line in enumerate(split_lines(text)):
        m = _BEGIN_RE.match(line)
        if m:
            if open_ is not None:
                raise MarkerError(f"{name}:{i + 1}: BEGIN SOLUTION inside the region opened at line {open_[0] + 1}")
            if not m.group("id"):
                raise MarkerError(f"{name}:{i + 1}: BEGIN SOLUTION needs an exercise id")
            open_ = (i, m.group("id"), m.group("indent"))
        elif _END_RE.match(line):
            if open_ is None:
                raise MarkerError(f"{name}:{i + 1}: END SOLUTION without a BEGIN SOLUTION")
            regions.append(Region(open_[1], open_[0], i, open_[2]))
            open_ = None
        elif line.lstrip().startswith(BEGIN) or line.lstrip().startswith(END):
            raise MarkerError(f"{name}:{i + 1}: malformed solution marker {line.strip()!r}")
    if open_ is not None:
        raise MarkerError(f"{name}:{open_[0] + 1}: BEGIN SOLUTION {open_[1]} is never closed")
    return regions


def stub_line(indent, exercise_id, hint):
    """The one line that replaces a region's body."""
    msg = f"exercise {exercise_id}: {hint}"
    return f"{indent}raise NotImplementedError({msg!r})"


def stub_text(text, ids, hints, name="<source>"):
    """Replace the body of every region whose id is in ``ids`` by a stub.

    The markers stay, so the student sees where to write; every other line is
    unchanged.  ``hints`` maps id -> hint.  Returns ``(new_text, stubbed_ids)``.
    """
    lines = split_lines(text, True)
    newline = "\n"
    out, pos, done = [], 0, []
    for r in find_regions(text, name):
        if r.id not in ids:
            continue
        out.extend(lines[pos:r.begin + 1])
        out.append(stub_line(r.indent, r.id, hints.get(r.id, "see the docstring")) + newline)
        pos = r.end
        done.append(r.id)
    out.extend(lines[pos:])
    return "".join(out), done


def region_bodies(text, name="<source>"):
    """``[(id, body_text)]`` for every region, in order."""
    lines = split_lines(text, True)
    return [(r.id, "".join(lines[r.begin + 1:r.end])) for r in find_regions(text, name)]


def fill_text(text, solutions, name="<source>"):
    """Put region bodies back: ``solutions`` is a list of bodies, one per region, in order.

    The inverse of :func:`stub_text` (used to build a solved copy from a
    starter and the reference).
    """
    lines = split_lines(text, True)
    regions = find_regions(text, name)
    if len(regions) != len(solutions):
        raise MarkerError(f"{name}: {len(regions)} regions but {len(solutions)} solutions")
    out, pos = [], 0
    for r, body in zip(regions, solutions):
        out.extend(lines[pos:r.begin + 1])
        out.append(body)
        pos = r.end
    out.extend(lines[pos:])
    return "".join(out)
