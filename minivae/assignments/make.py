"""Generate the student copy (the "starter") from the reference code.

``make_starter(out_dir, exercises)`` writes:

* ``minivae/``: the package, with the body of every selected exercise region
  replaced by ``raise NotImplementedError("exercise <id>: <hint>")``.  The
  markers, the docstrings (with the math) and every other line stay as they
  are.  Left out: the ``assignments`` subpackage (the grader), and the
  ``minivae/fast/`` package, the optimized training step with its kernels, which
  holds fused versions of the exercise solutions.  Without it, ``minivae.train`` runs the readable path,
  so a student's training runs the student's own ops.
* ``lessons/``, ``pyproject.toml`` and ``requirements.txt`` as in the
  reference, so ``pip install -e OUT_DIR`` works and the package keeps its name.
* ``check.py`` (the grader's harness), ``check_cases.py`` (the inputs of every check, the grader's
  too) and ``check_expected.npz`` (the
  reference's forward values on the local check inputs, recorded here), so a
  student can run ``python check.py EXERCISE`` without seeing the formulas.
* ``README.md``: what to do, for the student.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

from . import harness
from .exercises import BY_ID, EXERCISES, IDS
from .markers import find_regions, stub_text

HERE = Path(__file__).resolve().parent
DEFAULT_SOURCE = HERE.parents[1]          # the folder holding the reference minivae/


# not copied into the student package: the grader, and the minivae/fast/ package (the optimized step with its
# fused kernels, which contain the solutions, fused)
PACKAGE_LEFT_OUT = ("assignments", "fast", "lesson_files")     # (a wheel's copy of the lessons: not stubbed)


def _ignore_package(root):
    root = Path(root).resolve()

    def ignore(folder, names):
        skip = {n for n in names if n == "__pycache__" or n.endswith((".pyc", ".pyo", ".egg-info"))}
        if Path(folder).resolve() == root:
            skip.update(n for n in names if n in PACKAGE_LEFT_OUT)
        return skip
    return ignore


def _ignore_misc(folder, names):
    return {n for n in names if n in ("__pycache__", ".ipynb_checkpoints") or n.endswith((".pyc", ".pyo"))}


def grader_hashes(package=None):
    """sha256 of every file of the grader and of the reference package it imports."""
    package = Path(package or HERE.parent)
    out = {}
    for path in sorted(package.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        out[path.relative_to(package).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def scan_regions(package_dir):
    """{exercise id: [(relative file, line)]} for every marked region under ``package_dir``."""
    found = {}
    for path in sorted(Path(package_dir).rglob("*.py")):
        if "assignments" in path.relative_to(package_dir).parts[:1]:
            continue
        rel = path.relative_to(Path(package_dir).parent).as_posix()
        for r in find_regions(path.read_text(encoding="utf-8"), rel):
            found.setdefault(r.id, []).append((rel, r.begin + 1))
    return found


def make_starter(out_dir, exercises=None, source=None, record_expected=True, lessons=True,
                 hide_derivations=False, manifest=None):
    """Write the student copy to ``out_dir`` (which must not exist or be empty).

    ``exercises``: ids to stub (default: all; an empty tuple stubs nothing).
    ``lessons``: copy ``lessons/`` (stubbing the chosen exercises' regions there too); a source without
    it is an error.  ``hide_derivations``: the marked derivation blocks of the exercise docstrings become
    "derive this: ...".  ``manifest``: a path *outside* the copy where the hashes of every written file
    and of the grader are stored for ``grade --manifest``.
    ``record_expected=False`` skips ``check_expected.npz`` (the grader's own pristine copies).
    Returns ``{"out", "stubbed", "regions"}``.
    """
    source = Path(source or DEFAULT_SOURCE).resolve()
    pkg = source / "minivae"
    if not (pkg / "__init__.py").is_file():
        raise ValueError(f"{source} has no minivae/__init__.py")
    ids = IDS if exercises is None else tuple(exercises)
    unknown = [e for e in ids if e not in BY_ID]
    if unknown:
        raise ValueError(f"unknown exercise {', '.join(unknown)}: choose from {', '.join(IDS)}")
    if lessons and not (source / "lessons").is_dir():
        raise ValueError(f"cannot find the lessons folder {source / 'lessons'}: make copies it into the student "
                         "copy; run from a minivae source checkout or give --source")
    out = Path(out_dir)
    if manifest is not None and (Path(manifest).resolve() == out.resolve()
                                 or out.resolve() in Path(manifest).resolve().parents):
        raise ValueError(f"the manifest {manifest} must not be inside the student copy {out}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} already exists and is not an empty folder: choose a new OUT_DIR")
    if out.resolve() == pkg or pkg in out.resolve().parents:
        raise ValueError(f"{out} is inside the reference package {pkg}")

    found = scan_regions(pkg)
    unmarked = [e for e in IDS if e not in found]
    if unmarked:
        raise ValueError(f"exercise {', '.join(unmarked)} has no ### BEGIN SOLUTION region in {pkg}")
    extra = sorted(set(found) - set(IDS))
    if extra:
        where = ", ".join(f"{e} ({found[e][0][0]}:{found[e][0][1]})" for e in extra)
        raise ValueError(f"regions with ids the exercise table does not know: {where}")

    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    try:
        info = _write(out, pkg, source, ids, found, record_expected, lessons, hide_derivations)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)       # it was empty or absent: leave no half-made copy
        raise
    if manifest is not None:
        files = {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                 for p in sorted(out.rglob("*")) if p.is_file()}
        data = {"exercises": info["stubbed"], "hide_derivations": bool(hide_derivations), "files": files,
                "grader": grader_hashes()}
        from ..atomic import atomic_write
        text = json.dumps(data, indent=1) + "\n"
        atomic_write(manifest, lambda f: f.write(text.encode("utf-8")))
        info["manifest"] = str(manifest)
    return info


def _write(out, pkg, source, ids, found, record_expected=True, lessons=True, hide_derivations=False):
    shutil.copytree(pkg, out / "minivae", ignore=_ignore_package(pkg))
    hints = {e.id: (HIDDEN_HINTS.get(e.id, HIDDEN_HINT) if hide_derivations and (e.kind == "backward"
                                                                               or e.id in HIDDEN_HINTS) else e.hint)
             for e in EXERCISES}
    lessons = lessons and not hide_derivations      # the lessons derive every gradient: left out
    stubbed = set()
    if lessons:
        shutil.copytree(source / "lessons", out / "lessons", ignore=_ignore_misc)
    files = sorted((out / "minivae").rglob("*.py")) + (sorted((out / "lessons").glob("*.py")) if lessons else [])
    for path in files:
        text = path.read_text(encoding="utf-8")
        new, done = stub_text(text, set(ids), hints, path.relative_to(out).as_posix())
        if hide_derivations and path.parent.name == "minivae":
            new = hide_derivation_blocks(new)
        if new != text:
            compile(new, str(path), "exec")          # the stubbed file must still import
            path.write_text(new, encoding="utf-8")
        if path.parent.name == "minivae":
            stubbed.update(done)
    for name in ("pyproject.toml", "requirements.txt", "LICENSE"):
        if (source / name).is_file():
            shutil.copy2(source / name, out / name)
    if (out / "pyproject.toml").is_file():          # the student copy has no tests/ folder
        text = (out / "pyproject.toml").read_text(encoding="utf-8")
        (out / "pyproject.toml").write_text(re.sub(r"(?m)^testpaths\s*=.*\n", "", text), encoding="utf-8")
    if not (out / "pyproject.toml").exists():
        (out / "pyproject.toml").write_text(MINIMAL_PYPROJECT, encoding="utf-8")
    layout = {}
    for e, places in found.items():
        for rel, line in places:
            layout.setdefault(rel, []).append((line, e))
    layout = {rel: [e for _, e in sorted(v)] for rel, v in sorted(layout.items())}
    check = (HERE / "harness.py").read_text(encoding="utf-8")
    if check.count("\nREGIONS = {}\n") != 1:
        raise RuntimeError("harness.py must hold exactly one line 'REGIONS = {}'")
    (out / "check.py").write_text(check.replace("\nREGIONS = {}\n", f"\nREGIONS = {json.dumps(layout)}\n"),
                                  encoding="utf-8")
    shutil.copy2(HERE / "cases.py", out / "check_cases.py")      # the check inputs, the grader's too
    if record_expected:
        _record_expected(source, out / harness.EXPECTED_FILE)
    (out / "README.md").write_text(student_readme([e for e in IDS if e in stubbed], hide_derivations),
                                   encoding="utf-8")
    return {"out": str(out), "stubbed": [e for e in IDS if e in stubbed], "regions": found}


HIDDEN_HINT = "derive this gradient yourself from the forward formula in the docstring, and match every shape"
# forward exercises whose usual hint states a backward formula (conv_transpose2d is conv2d's dx)
HIDDEN_HINTS = {"conv_transpose2d_forward": "the transpose (adjoint) of conv2d with the same stride and padding, "
                                            "plus b on each output channel: work out what that does to each "
                                            "input pixel"}
_DERIV_BEGIN = re.compile(r"^(?P<indent>[ \t]*)Derivation \((?P<what>.*)\):[ \t]*$")
_DERIV_END = re.compile(r"^[ \t]*\(end of derivation\)[ \t]*$")


def hide_derivation_blocks(text):
    """Replace each marked derivation block of a docstring by one line "derive this: <what>".

    A block starts with a line ``Derivation (<what>):`` and ends with a line ``(end of derivation)``;
    the forward formula and the shapes, outside the block, stay.
    """
    out, skipping = [], False
    for line in text.splitlines(keepends=True):
        m = _DERIV_BEGIN.match(line.rstrip("\n"))
        if m and not skipping:
            out.append(f"{m.group('indent')}derive this: {m.group('what')}\n")
            skipping = True
        elif skipping:
            if _DERIV_END.match(line.rstrip("\n")):
                skipping = False
        else:
            out.append(line)
    if skipping:
        raise ValueError("a 'Derivation (...):' block is never closed by '(end of derivation)'")
    return "".join(out)


MINIMAL_PYPROJECT = """[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "minivae"
version = "0.1.0"
requires-python = ">=3.9"
dependencies = ["numpy>=1.22", "matplotlib>=3.5", "tqdm>=4.60"]

[tool.setuptools.packages.find]
include = ["minivae*"]

[tool.setuptools.package-data]
minivae = ["data/*.gz"]
"""


def _record_expected(source, dest):
    """Run the checks on the reference code and store the expected forward values."""
    cmd = [sys.executable, "-I", "-B", str(HERE / "harness.py"), "record", "--student", str(source),
           "--reference", str(HERE / "reference.py"), "--out", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=str(dest.parent))
    if proc.returncode != 0 or not dest.is_file():
        msg = (proc.stderr.strip() or proc.stdout.strip() or f"exit code {proc.returncode}").splitlines()
        raise RuntimeError("recording the expected values failed: " + " | ".join(msg[-5:]))


def student_readme(stubbed, hide_derivations=False):
    hidden = ("\nIn this copy the derivations of the gradients are left out: the docstrings give the forward\n"
              "formulas and the shapes, and the lessons (which derive every gradient) are not included.\n"
              if hide_derivations else "")
    rows = "\n".join(f"| `{BY_ID[e].id}` | `minivae/{BY_ID[e].file}` | {BY_ID[e].title} |" for e in stubbed)
    if not rows:
        rows = "| (none) | | |"
    return f"""# minivae: your assignment

This is a complete copy of minivae, a Variational Autoencoder in NumPy whose
every gradient is derived by hand, with some pieces left for you to write.

## What to do

Each exercise is a region of code between two markers:

```python
    ### BEGIN SOLUTION dense_backward
    raise NotImplementedError("exercise dense_backward: ...")
    ### END SOLUTION
```

Replace the `raise` line with your code.  Keep the markers and do not change
anything outside them: the code around a region (the function's signature,
the `cache` it receives, the names it returns) is the interface the checks
and the rest of the library rely on.  The docstring above each region gives
the formula, the derived gradient and the shapes.
{hidden}
| exercise | file | what |
|---|---|---|
{rows}

## Set up

```bash
python -m venv .venv && . .venv/bin/activate     # optional
pip install -e .                                   # numpy, matplotlib, tqdm
```

## Check your work

```bash
python check.py                      # every exercise
python check.py dense_backward       # one exercise (several ids are fine)
```

Backward passes are checked against central finite differences (float64,
random upstream gradient); forward passes and the Adam step against recorded
reference values.  Each line shows PASS/FAIL, the worst relative error
`max|a - b| / max(|a| + |b|)`, and which gradient is wrong.  `TODO` means the
stub is still there.  When a backward check fails because your *forward*
gives wrong values, the line names that other exercise.  Locally,
`vae_backward` runs through your own ops, so do the op exercises first; the
grader uses its own ops there and grades only how you chain them.

A backward must also be fast (the grader times it on a large input: a
backward costs a small multiple of the forward pass, finite differences cost
one forward pass per input entry) and must not modify its inputs or the
upstream gradient.  Only the code between the markers is graded.

## Train with your own code

Once the backward exercises pass, train the VAE on MNIST (it ships in the
package) with your own ops:

```bash
python -m minivae train --epochs 1
```

This copy has no fused fast path, so every gradient comes from your code.
One epoch of the default model (784-400-20, batch 128, Adam) took 26 s on
a busy 2-core machine, and ended at a test -ELBO of 127.04 nats with the
reference solutions in every region; yours should land within a few tenths
of that (ten epochs reach about 102).  A NaN, a much
higher number, or a loss that does not fall means a bug the checks missed.
The rest of the library works as usual (data loading, sampling, figures).

Hand in the whole folder.
"""
