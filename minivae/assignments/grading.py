"""Grade submissions: the parent judges, children only run student code.

For each submission the grader

1. checks that its own files are unchanged (hashes taken when the run began,
   and those in the instructor's manifest when one is given) and refuses
   otherwise;
2. builds the graded copy: the pristine starter (made afresh from this
   installation), with the bodies of the submission's ``### BEGIN/END
   SOLUTION`` regions of the graded exercises put in.  Every other edit is
   reported as ``file:line`` and left out; a region body that reaches outside
   its function is refused;
3. runs each exercise's check (:mod:`.checks`) against a fresh child
   (:mod:`.sandbox`) that works in a throwaway copy of the graded copy, and
   kills it, and everything it started, afterwards;
4. writes the report (atomically, once every child is dead).

Score: every exercise weighs the same, ``score = 100 * passed / total``.
"""
from __future__ import annotations

import ast
import concurrent.futures
import csv
import difflib
import hashlib
import io
import json
import os
import secrets
import shutil
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

from . import checks
from .exercises import BY_ID, IDS
from .harness import format_line  # one report line, the same in the grader and the student's check.py
from .markers import MarkerError, find_regions, region_bodies
from .sandbox import Child, ChildError, Zygote, become_subreaper, namespaces_available

HERE = Path(__file__).resolve().parent
PACKAGE = HERE.parent                          # the installed reference package (solutions included)
SOURCE_ROOT = PACKAGE.parent
DEFAULT_TIMEOUT = 60.0
MAX_ZIP_BYTES = 64 << 20


# ------------------------------------------------------------------ integrity
def grader_hashes():
    """sha256 of every file of the grader and of the reference package it imports."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        out[path.relative_to(PACKAGE).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


class Integrity:
    """The grader's own files, hashed when the run began; :meth:`verify` before each submission."""

    def __init__(self, manifest=None):
        self.baseline = grader_hashes()
        if manifest is not None:
            want = manifest.get("grader", {})
            self._compare(want, "the grader that made the starter (manifest)")

    def _compare(self, want, what):
        now = grader_hashes()
        changed = sorted(k for k in set(want) | set(now) if want.get(k) != now.get(k))
        if changed:
            raise RuntimeError(f"the grader's own files differ from {what}: {', '.join(changed[:5])}"
                               f"{' ...' if len(changed) > 5 else ''}; reinstall the grader before grading")

    def verify(self):
        self._compare(self.baseline, "those at the start of this run (changed during grading)")


# ------------------------------------------------------------------ manifest
def read_manifest(path):
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the manifest {path}: {e}") from None
    if not isinstance(data, dict) or "exercises" not in data or "files" not in data:
        raise ValueError(f"{path} is not a minivae assignment manifest")
    return data


# ----------------------------------------------------------- graded copies
def _functions(tree):
    """{qualified name: (first line, last line)} of the module's functions and methods (not nested ones)."""
    out = {}

    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                walk(child, prefix + child.name + ".")
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out[prefix + child.name] = (child.lineno, child.end_lineno)
    walk(tree, "")
    return out


def _enclosing(funcs, line):
    """The innermost function whose lines include ``line`` (1-based)."""
    best = None
    for name, (a, b) in funcs.items():
        if a <= line <= b and (best is None or a >= funcs[best][0]):
            best = name
    return best


def merge_file(pristine_text, submitted_text, graded, rel):
    """The pristine file with the submitted bodies of the ``graded`` regions; returns (text, notes)."""
    notes = []
    p_regions = find_regions(pristine_text, rel)
    p_bodies = region_bodies(pristine_text, rel)
    try:
        s_regions = find_regions(submitted_text, rel)
    except MarkerError as e:
        return pristine_text, [f"{e}; this file's exercises were graded as not done"]
    if [r.id for r in s_regions] != [r.id for r in p_regions]:
        return pristine_text, [f"{rel}: the exercise markers were changed (expected regions "
                               f"{', '.join(r.id for r in p_regions)}); this file's exercises were graded as not done"]
    s_bodies = region_bodies(submitted_text, rel)
    s_lines = submitted_text.splitlines(keepends=True)
    # the submission with the pristine region bodies back: whatever still differs is outside the regions
    rebuilt, pos = [], 0
    for r, (_, body) in zip(s_regions, p_bodies):
        rebuilt.extend(s_lines[pos:r.begin + 1])
        rebuilt.append(body)
        pos = r.end
    rebuilt.extend(s_lines[pos:])
    if "".join(rebuilt) != pristine_text:
        # line numbers in the submission: map each rebuilt line back to a submitted line where possible
        sub_numbers, n = [], 0
        for r_i, r in enumerate(s_regions):
            sub_numbers.extend(range(n + 1, r.begin + 2))
            sub_numbers.extend([r.begin + 2] * len(p_bodies[r_i][1].splitlines()))
            n = r.end
        sub_numbers.extend(range(n + 1, len(s_lines) + 1))
        rb = "".join(rebuilt).splitlines()
        pr = pristine_text.splitlines()
        changed = []
        for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, pr, rb, autojunk=False).get_opcodes():
            if tag != "equal":
                j = min(j1, len(sub_numbers) - 1) if sub_numbers else 0
                changed.append(sub_numbers[j] if sub_numbers else 1)
        lines = ", ".join(f"{rel}:{k}" for k in sorted(set(changed))[:10])
        notes.append(f"edits outside the exercise regions were ignored: {lines}")
    out_lines = pristine_text.splitlines(keepends=True)
    merged, pos = [], 0
    for r, (_, p_body), (_, s_body) in zip(p_regions, p_bodies, s_bodies):
        merged.extend(out_lines[pos:r.begin + 1])
        body = s_body if r.id in graded else p_body
        if body and not body.endswith("\n"):
            body += "\n"
        merged.append(body)
        pos = r.end
    merged.extend(out_lines[pos:])
    text = "".join(merged)
    # every line of a graded body must stay inside the function that holds the region in the starter
    try:
        tree = ast.parse(text)
    except SyntaxError as e:
        return text, notes + [f"{rel}:{e.lineno}: SyntaxError: {e.msg}"]
    p_funcs, funcs = _functions(ast.parse(pristine_text)), _functions(tree)
    if set(p_funcs) != set(funcs):
        extra = sorted(set(funcs) ^ set(p_funcs))
        return pristine_text, notes + [f"{rel}: a region body defines or removes functions ({', '.join(extra[:3])}); "
                                       "this file's exercises were graded as not done"]
    for p_r, r in zip(p_regions, find_regions(text, rel)):
        owner = _enclosing(p_funcs, p_r.begin + 1)
        if owner is None:
            continue
        a, b = funcs[owner]
        for k in range(r.begin + 1, r.end):
            line = text.splitlines()[k]
            if line.strip() and not line.strip().startswith("#") and not a <= k + 1 <= b:
                return pristine_text, notes + [f"{rel}: the body of region {r.id} reaches outside {owner}() "
                                               "(check its indentation); this file's exercises were graded as not done"]
    return text, notes


def build_graded_copy(submission, pristine, graded, dest):
    """Write the graded ``minivae/`` to ``dest``; return the notes about the submission."""
    notes = []
    src_pkg, p_pkg = Path(submission) / "minivae", Path(pristine) / "minivae"
    shutil.copytree(p_pkg, Path(dest) / "minivae")
    p_files = {p.relative_to(p_pkg).as_posix() for p in p_pkg.rglob("*") if p.is_file()}
    for path in sorted(src_pkg.rglob("*.py")):
        rel = path.relative_to(src_pkg).as_posix()
        if "__pycache__" in rel:
            continue
        if rel not in p_files:
            notes.append(f"minivae/{rel}: not part of the starter (ignored)")
    for rel in sorted(p_files):
        if not rel.endswith(".py"):
            continue
        p_text = (p_pkg / rel).read_text(encoding="utf-8")
        s_path = src_pkg / rel
        if not s_path.is_file():
            if find_regions(p_text):
                notes.append(f"minivae/{rel}: missing from the submission (its exercises count as not done)")
            continue
        try:
            s_text = s_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            notes.append(f"minivae/{rel}: unreadable ({type(e).__name__}); the starter's version was used")
            continue
        if s_text == p_text:
            continue
        if not find_regions(p_text):
            first = next((i + 1 for i, (a, b) in enumerate(zip(p_text.splitlines() + [None] * 10 ** 6,
                                                                   s_text.splitlines())) if a != b), 1)
            notes.append(f"edits outside the exercise regions were ignored: minivae/{rel}:{first}")
            continue
        text, file_notes = merge_file(p_text, s_text, set(graded), f"minivae/{rel}")
        notes.extend(file_notes)
        (Path(dest) / "minivae" / rel).write_text(text, encoding="utf-8")
    return notes


# --------------------------------------------------------------- one student
class Run:
    """One grading run: a private folder, the pristine starter, the seed, the integrity baseline."""

    def __init__(self, exercises=None, seed=None, timeout=DEFAULT_TIMEOUT, manifest=None, namespace=True):
        self.ids = IDS if exercises is None else tuple(exercises)
        unknown = [e for e in self.ids if e not in BY_ID]
        if unknown:
            raise ValueError(f"unknown exercise {', '.join(unknown)}")
        missing = [e for e in self.ids if not checks.has_check(e)]
        if missing:
            raise ValueError(f"the grader has no check for exercise {', '.join(missing)}")
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        self.manifest = read_manifest(manifest) if manifest else None
        self.integrity = Integrity(self.manifest)
        self.seed = int(secrets.randbits(31)) if seed is None else int(seed)
        self.timeout = float(timeout)
        self.namespace = namespace and namespaces_available()      # probed once, before any thread starts
        become_subreaper()
        self._n = 0
        self._lock = threading.Lock()
        self.zygote = None
        self.root = Path(tempfile.mkdtemp(prefix="minivae-grade-"))
        try:                    # leave no folder and no fork server behind when the set-up fails
            os.chmod(self.root, 0o700)
            from .make import make_starter
            stub = tuple(self.manifest["exercises"]) if self.manifest else IDS
            self.pristine = self.root / "pristine"
            make_starter(self.pristine, stub, record_expected=False, lessons=False,
                         hide_derivations=bool(self.manifest and self.manifest.get("hide_derivations")))
            if self.manifest:
                self._check_pristine()
            self.zygote = Zygote() if sys.platform.startswith("linux") else None
        except BaseException:
            self.close()
            raise

    def _check_pristine(self):
        for rel, digest in self.manifest["files"].items():
            if not rel.startswith("minivae/"):
                continue
            path = self.pristine / rel
            if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != digest:
                raise RuntimeError(f"this installation makes a different {rel} than the starter handed out "
                                   "(the manifest's hash differs): grade with the minivae version that made it")

    def close(self):
        if self.zygote is not None:
            self.zygote.close()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _slot(self):
        with self._lock:
            self._n += 1
            return self.root / f"s{self._n}"

    def hidden_paths(self, submission):
        """Folders a child must not see: the reference package and its repository, the submissions' folders."""
        keep = [Path(sys.executable).resolve(), Path(checks.np.__file__).resolve(), self.root.resolve()]

        def ok(p):
            p = p.resolve()
            return p != Path("/") and not any(p == k or p in k.parents for k in keep)
        out = [p for p in (PACKAGE, SOURCE_ROOT if (SOURCE_ROOT / "pyproject.toml").is_file() else None) if p]
        out.append(Path(submission).resolve().parent)
        return [str(p) for p in out if ok(p)]

    def grade(self, submission, progress=None):
        """Grade one submission folder; return its report dict."""
        submission = check_student_dir(submission)
        self.integrity.verify()
        slot = self._slot()
        slot.mkdir()
        t0 = time.perf_counter()
        notes = build_graded_copy(submission, self.pristine, self.ids, slot / "graded")
        hide = self.hidden_paths(submission)
        results, isolation = [], None
        for ex in self.ids:
            work = slot / f"w-{ex}"
            work.mkdir()
            shutil.copytree(slot / "graded" / "minivae", work / "minivae")
            shutil.copy2(HERE / "runner.py", work / "runner.py")
            t1 = time.perf_counter()
            kwargs = dict(hide=hide, cover=self.root, cpu_seconds=self.timeout + 5, namespace=self.namespace)
            try:
                child = Child(work, slot / f"out-{ex}.txt", zygote=self.zygote, **kwargs)
            except (ChildError, OSError):      # no fork server: start an interpreter
                child = Child(work, slot / f"out-{ex}.txt", **kwargs)
            try:
                try:
                    child.hello()
                    r = checks.run_check(ex, child, self.seed, self.timeout)
                except Exception as e:        # noqa: BLE001 -- the child broke the protocol
                    r = {"status": "error", "passed": False, "worst_rel_error": None, "gradient": None,
                         "message": str(e)[:500], "checked": 0}
            finally:
                child.close()
            isolation = isolation or child.isolation
            r = dict({"id": ex, "title": BY_ID[ex].title}, **r, seconds=round(time.perf_counter() - t1, 3))
            results.append(r)
            shutil.rmtree(work, ignore_errors=True)
            if progress is not None:
                progress(r)
        shutil.rmtree(slot, ignore_errors=True)
        passed = sum(1 for r in results if r["passed"])
        total = len(results)
        iso = isolation or {"namespaces": False, "subreaper": False, "hidden": []}
        return {
            "dir": str(submission),
            "score": round(100.0 * passed / total, 2) if total else 0.0,
            "passed": passed,
            "total": total,
            "exercises": results,
            "notes": notes,
            "seed": self.seed,
            "timeout_s": self.timeout,
            "seconds": round(time.perf_counter() - t0, 3),
            "tolerances": {"gradient": checks.GRAD_TOL, "value": checks.VALUE_TOL,
                           "finite_difference_h": checks.H, "cost_factor": checks.COST_FACTOR},
            "isolation": {
                "grader_hidden_from_student": bool(iso.get("namespaces")),
                "namespaces": bool(iso.get("namespaces")),
                "kill_orphans_subreaper": bool(iso.get("subreaper")),
                "hidden_paths": iso.get("hidden", []),
                "not_in_force": [] if iso.get("namespaces") else
                ["the student's process could read the grader's files and write outside its working folder "
                 "(no mount/PID namespace on this machine): grade in a container or a throwaway VM"]
                + [str(n) for n in iso.get("notes", [])],
            },
        }


def check_student_dir(student_dir):
    d = Path(student_dir)
    if not d.is_dir():
        raise ValueError(f"{d} is not a directory")
    if not (d / "minivae" / "__init__.py").is_file():
        raise ValueError(f"{d} has no minivae/__init__.py: give the folder that holds the student's minivae package")
    return d.resolve()


def grade(student_dir, exercises=None, timeout=DEFAULT_TIMEOUT, seed=None, progress=None, manifest=None):
    """Grade one submission folder; return the report dict (see :func:`format_report`)."""
    student_dir = check_student_dir(student_dir)
    with Run(exercises, seed=seed, timeout=timeout, manifest=manifest) as run:
        return run.grade(student_dir, progress=progress)


def grade_one(student_dir, exercise_id, timeout=DEFAULT_TIMEOUT, seed=None):
    return grade(student_dir, [exercise_id], timeout=timeout, seed=seed)["exercises"][0]


# ------------------------------------------------------------------ batches
def _safe_extract(zip_path, dest):
    """Extract a submission .zip (no absolute paths, no '..', no links, bounded size); return the folder."""
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"{zip_path}: not a readable .zip ({e})") from None
    with zf:
        total = 0
        for info in zf.infolist():
            name = info.filename
            parts = Path(name).parts
            if name.startswith(("/", "\\")) or ".." in parts or (info.external_attr >> 16) & 0o170000 == 0o120000:
                raise ValueError(f"{zip_path}: unsafe member {name!r}")
            total += info.file_size
            if total > MAX_ZIP_BYTES:
                raise ValueError(f"{zip_path}: more than {MAX_ZIP_BYTES >> 20} MiB uncompressed")
        zf.extractall(dest)
    found = [p.parent.parent for p in Path(dest).rglob("minivae/__init__.py")
             if "__MACOSX" not in p.parts]
    if not found:
        raise ValueError(f"{zip_path} has no minivae/__init__.py")
    return min(found, key=lambda p: len(p.parts))


def expand_submissions(paths):
    """[(student name, folder or .zip)] from folders, .zip files, or folders of them."""
    out = []
    for p in map(Path, paths):
        if p.is_file() and p.suffix == ".zip":
            out.append((p.stem, p))
        elif p.is_dir() and (p / "minivae" / "__init__.py").is_file():
            out.append((p.name, p))
        elif p.is_dir():
            subs = sorted(q for q in p.iterdir() if (q.is_dir() and (q / "minivae" / "__init__.py").is_file())
                          or (q.is_file() and q.suffix == ".zip"))
            if not subs:
                raise ValueError(f"{p} has no minivae/__init__.py and no submissions (folders or .zip files) inside")
            out.extend((q.stem if q.suffix == ".zip" else q.name, q) for q in subs)
        elif not p.exists():
            raise ValueError(f"{p} is not a directory")
        else:
            raise ValueError(f"{p} is neither a folder nor a .zip file")
    names = [n for n, _ in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"two submissions have the same name: {', '.join(dup)}")
    return out


def write_atomic(path, text):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=str(path.parent))
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def grade_batch(paths, exercises=None, timeout=DEFAULT_TIMEOUT, seed=None, jobs=1, out_dir=None,
                manifest=None, progress=True):
    """Grade many submissions with ``jobs`` in parallel; write per-student JSON and ``gradebook.csv``."""
    subs = expand_submissions(paths)
    if int(jobs) < 1:
        raise ValueError(f"--jobs must be at least 1, got {jobs}")
    reports = {}
    with Run(exercises, seed=seed, timeout=timeout, manifest=manifest) as run:
        zips = run.root / "zips"

        def one(item):
            name, path = item
            try:
                folder = path
                if Path(path).suffix == ".zip":
                    folder = _safe_extract(path, zips / name)
                rep = run.grade(folder)
            except (ValueError, OSError) as e:
                rep = {"dir": str(path), "score": 0.0, "passed": 0, "total": len(run.ids), "exercises": [],
                       "notes": [f"not graded: {e}"], "seed": run.seed}
            rep["student"] = name
            return name, rep

        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(subs), desc="grading", unit="submission", file=sys.stderr)
        with concurrent.futures.ThreadPoolExecutor(max_workers=int(jobs)) as pool:
            for name, rep in pool.map(one, subs):
                reports[name] = rep
                if out_dir is not None:
                    write_atomic(Path(out_dir) / f"{name}.json", json.dumps(rep, indent=2) + "\n")
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        ids = run.ids
    if out_dir is not None:
        write_atomic(Path(out_dir) / "gradebook.csv", gradebook_csv(reports, ids))
    return reports


def gradebook_csv(reports, ids):
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["student", *ids, "total"])
    for name in sorted(reports):
        rep = reports[name]
        by = {e["id"]: e for e in rep.get("exercises", [])}
        w.writerow([name, *[1 if by.get(e, {}).get("passed") else 0 for e in ids], f"{rep['score']:g}"])
    return buf.getvalue()


# ------------------------------------------------------------------ text
def format_header(report_dir):
    return f"grading {report_dir}"




def format_footer(report):
    failed = [r["id"] for r in report["exercises"] if not r["passed"]]
    lines = [f"note: {n}" for n in report.get("notes", [])]
    lines.append(f"score: {report['score']:g}/100 ({report['passed']} of {report['total']} exercises passed)")
    if failed:
        lines.append(f"not passed: {', '.join(failed)}")
    lines.append(f"seed: {report['seed']} (--seed {report['seed']} reproduces this run)")
    iso = report.get("isolation", {})
    for n in iso.get("not_in_force", []):
        lines.append(f"isolation not in force: {n}")
    return "\n".join(lines)


def format_report(report):
    return "\n".join([format_header(report["dir"])] + [format_line(r) for r in report["exercises"]]
                     + [format_footer(report)])

