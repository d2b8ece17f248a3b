"""Where the lessons are, and ``python -m minivae lessons DIR``, which copies them out as scripts and notebooks.

The lessons live in the repository's ``lessons/`` folder.  A wheel ships a copy inside the package
(``minivae/lesson_files/``, put there at build time by ``setup.py``), so an installed minivae can hand
them out too: :func:`export_lessons` writes every ``NN_name.py`` (the percent-format script), its
``NN_name.ipynb`` (converted by :mod:`minivae.notebook`, no jupytext needed) and the lessons' README.
"""
from __future__ import annotations

import re
from pathlib import Path

from .atomic import atomic_write
from .notebook import write_notebook

PACKAGE_DIR = Path(__file__).resolve().parent
PACKAGED = PACKAGE_DIR / "lesson_files"          # in a wheel (copied there at build time)
CHECKOUT = PACKAGE_DIR.parent / "lessons"        # in a source checkout or an editable install
LESSON_NAME = re.compile(r"^\d\d_\w+\.py$")


class LessonsNotFound(FileNotFoundError):
    """This copy of minivae has no lessons (neither packaged nor in a source checkout)."""


def lesson_scripts(folder):
    """The lesson scripts ``NN_name.py`` in ``folder``, sorted."""
    return sorted(p for p in Path(folder).glob("*.py") if LESSON_NAME.match(p.name))


def lessons_dir():
    """The folder holding the lessons: the packaged copy of a wheel, else a source checkout's ``lessons/``."""
    for folder in (PACKAGED, CHECKOUT):
        if folder.is_dir() and lesson_scripts(folder):
            return folder
    raise LessonsNotFound(f"no lessons found in {PACKAGED} or {CHECKOUT}: this copy of minivae was installed "
                          f"without them (build it from the repository, whose setup.py packages lessons/)")


def export_lessons(dest, source=None):
    """Write every lesson into the new or empty folder ``dest`` as ``.py`` and ``.ipynb`` (plus the README).

    Returns the list of written paths.  Raises ValueError (one line) if ``dest`` is a file or a non-empty
    folder, and :class:`LessonsNotFound` if there are no lessons to copy.
    """
    src = Path(source) if source is not None else lessons_dir()
    scripts = lesson_scripts(src)
    if not scripts:
        raise LessonsNotFound(f"no lesson scripts (NN_name.py) in {src}")
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise ValueError(f"{dest} exists and is not a folder")
    if dest.is_dir() and any(dest.iterdir()):
        raise ValueError(f"{dest} is not empty; give a new or empty folder for the lessons")
    created = not dest.exists()
    written = []
    try:
        dest.mkdir(parents=True, exist_ok=True)
        for script in scripts:           # every file through the atomic writer (minivae.atomic)
            copy = dest / script.name
            written.append(_write_text(copy, as_exported(script.read_text(encoding="utf-8"))))
            written.append(write_notebook(copy, dest / (script.stem + ".ipynb")))
        for doc in sorted(src.glob("*.md")):
            written.append(_write_text(dest / doc.name, exported_doc(doc.name, doc.read_text(encoding="utf-8"))))
    except BaseException:
        # all or nothing: a failed or interrupted export (full disk, Ctrl-C, SIGTERM) takes back what it wrote
        from .signals import deferred
        with deferred():
            for p in written:
                try:
                    p.unlink()
                except OSError:
                    pass
            if created:
                try:
                    dest.rmdir()
                except OSError:
                    pass
        raise
    return written


# "lessons/05_elbo.py", "lessons/MISTAKES.md": a lesson file named by its path in the repository
_IN_LESSONS = re.compile(r"(?<![\w/.])lessons/(?=\d\d_\w+\.(?:py|ipynb)\b|[A-Z]+\.md\b)")


def _write_text(path, text):
    return Path(atomic_write(path, lambda f: f.write(text.encode("utf-8"))))


# The lessons' docs speak from the repository ("pip install -e ." at its root, its test suite); the exported
# folder is not the repository, so these sentences are rewritten for it (the repository's test_docs.py checks that
# each one is still in lessons/ and that no exported text sends the reader to the repository's root as if it were
# here).  Every rewritten sentence that names a test file says it is the repository's.
DOC_REWRITES = {
    "README.md": [
        ("pip install -e .                       # once, from the repository root; lessons import the installed "
         "package\npython lessons/05_elbo.py              # the lesson, figures under lesson_output/05_elbo/\n",
         "# the lessons import minivae: run them with the Python whose minivae wrote this folder (python -m minivae\n"
         "# lessons DIR), or install minivae into yours from a clone of its repository: pip install -e . at the\n"
         "# clone's root (its README, \"Install\"); then, from this folder:\n"
         "python 05_elbo.py                      # the lesson, figures under lesson_output/05_elbo/ here\n"),
        ("`jupytext --to ipynb lessons/05_elbo.py`",
         "`jupytext --to ipynb 05_elbo.py` (this folder holds the notebooks already: `05_elbo.ipynb`)"),
        ("mode. `tests/test_lessons.py` runs", "mode. In the minivae repository, `tests/test_lessons.py` runs"),
        ("(see the main\nREADME, *Assignments*)", "(see the README of the\nminivae repository, *Assignments*)"),
    ],
    "MISTAKES.md": [
        ("(`tests/test_mistakes.py` holds the cheap checks; run\n`python -m pytest tests/test_mistakes.py -v`)",
         "(`tests/test_mistakes.py` of the minivae repository holds the cheap checks; run\n"
         "`python -m pytest tests/test_mistakes.py -v` at the root of a clone of it)"),
        ("`tests/test_gaussian.py` (the sampler's statistics)",
         "`tests/test_gaussian.py` of the repository (the sampler's statistics)"),
    ],
}


def exported_doc(name, text):
    """A lessons doc (``README.md``, ``MISTAKES.md``) as it must read in the exported folder: its sentences about
    the repository rewritten (:data:`DOC_REWRITES`), then :func:`as_exported`."""
    for old, new in DOC_REWRITES.get(name, []):
        text = text.replace(old, new)
    return as_exported(text)


def as_exported(text):
    """A lesson's text as it must read in the exported folder, where the lessons lie side by side: a path
    ``lessons/05_elbo.py`` (run it as ``python lessons/05_elbo.py`` from the repository root) becomes
    ``05_elbo.py``, and ``lessons/MISTAKES.md`` becomes ``MISTAKES.md``; nothing else changes."""
    return _IN_LESSONS.sub("", text)
