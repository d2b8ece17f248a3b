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
import re
import secrets
import shutil
import signal
import stat
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

from . import checks
from .exercises import BY_ID, IDS
from .harness import format_line  # one report line, the same in the grader and the student's check.py
from .markers import MarkerError, find_regions, region_bodies, split_lines
from .sandbox import LIMITS, Child, ChildError, Sandbox, SandboxError, become_subreaper, kill_all
from .make import grader_hashes, make_starter

HERE = Path(__file__).resolve().parent
PACKAGE = HERE.parent                          # the installed reference package (solutions included)
SOURCE_ROOT = PACKAGE.parent
DEFAULT_TIMEOUT = 60.0
MAX_TIMEOUT = 86400.0            # one day: a finite deadline for every check (and the child's CPU-time limit)
MAX_ZIP_BYTES = 64 << 20         # a submission, uncompressed
MAX_FILES = 10000                # files in a submission
MAX_SOURCE_BYTES = 1 << 20       # one source file of the submission


# What one check may map at most: each of its RLIMIT_NPROC processes holds RLIMIT_AS (minivae.assignments.sandbox).
CHECK_BYTES = LIMITS["RLIMIT_AS"] * LIMITS["RLIMIT_NPROC"]


def _cpus():
    try:
        return len(os.sched_getaffinity(0))          # the CPUs this process may run on
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _memory_bytes():
    """The memory this process may use in all: the physical memory, or a smaller cgroup (v2) limit; None unknown."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        total = None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            total = int(limit) if total is None else min(total, int(limit))
    except OSError:
        pass
    return total


def max_jobs():
    """``(bound, why)``: the most submissions ``grade --jobs`` grades at once on this machine, and the reason.

    Each job runs one sandboxed check at a time.  A check is CPU-bound and its cost check times the student's
    code, so more jobs than CPUs grade no faster and slow honest code toward its time limit; and a check may map
    up to CHECK_BYTES (4 GiB), so more jobs than the memory holds at that much each can exhaust it.  The bound is
    the smaller of the two (at least 1)."""
    cpus, mem = _cpus(), _memory_bytes()
    by_mem = mem // CHECK_BYTES if mem is not None else cpus
    bound = max(1, min(cpus, by_mem))
    gib = CHECK_BYTES / (1 << 30)
    mem_text = (f"{mem / (1 << 30):.1f} GiB of memory holds {by_mem} check{'s' if by_mem != 1 else ''} at the "
                f"{gib:g} GiB each may map" if mem is not None else "memory unknown")
    return bound, f"{cpus} CPU{'s' if cpus != 1 else ''}; {mem_text}"


def check_jobs(jobs):
    """ValueError (one line) unless 1 <= jobs <= :func:`max_jobs`."""
    if int(jobs) < 1:
        raise ValueError(f"--jobs must be at least 1, got {jobs}")
    bound, why = max_jobs()
    if int(jobs) > bound:
        raise ValueError(f"--jobs {jobs} is more than this machine can grade at once: at most {bound} ({why})")
    return int(jobs)


# ------------------------------------------------------------------ integrity
class IntegrityError(RuntimeError):
    """The grader's own files changed: nothing more is graded."""


class Integrity:
    """The grader's own files, hashed when the run began; :meth:`verify` before each submission."""

    def __init__(self, manifest=None):
        self.baseline = grader_hashes(PACKAGE)
        if manifest is not None:
            want = manifest.get("grader", {})
            self._compare(want, "the grader that made the starter (manifest)")

    def _compare(self, want, what):
        now = grader_hashes(PACKAGE)
        changed = sorted(k for k in set(want) | set(now) if want.get(k) != now.get(k))
        if changed:
            raise IntegrityError(f"the grader's own files differ from {what}: {', '.join(changed[:5])}"
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
    s_lines = split_lines(submitted_text, True)
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
            sub_numbers.extend([r.begin + 2] * len(split_lines(p_bodies[r_i][1])))
            n = r.end
        sub_numbers.extend(range(n + 1, len(s_lines) + 1))
        rb = split_lines("".join(rebuilt))
        pr = split_lines(pristine_text)
        changed = []
        for j1 in _changed_lines(pr, rb):
            j = min(j1, len(sub_numbers) - 1) if sub_numbers else 0
            changed.append(sub_numbers[j] if sub_numbers else 1)
        lines = ", ".join(f"{rel}:{k}" for k in sorted(set(changed))[:10])
        notes.append(f"edits outside the exercise regions were ignored: {lines}")
    out_lines = split_lines(pristine_text, True)
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
    text_lines = split_lines(text)
    for p_r, r in zip(p_regions, find_regions(text, rel)):
        owner = _enclosing(p_funcs, p_r.begin + 1)
        if owner is None:
            continue
        a, b = funcs[owner]
        for k in range(r.begin + 1, r.end):
            line = text_lines[k]
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
            if s_path.stat().st_size > MAX_SOURCE_BYTES:
                raise ValueError(f"larger than {MAX_SOURCE_BYTES >> 20} MiB")
            s_text = s_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError, ValueError) as e:
            notes.append(f"minivae/{rel}: unreadable ({type(e).__name__}: {e}); the starter's version was used "
                         "(its exercises count as not done)")
            continue
        if s_text == p_text:
            continue
        if not find_regions(p_text):
            first = next((i + 1 for i, (a, b) in enumerate(zip(split_lines(p_text) + [None] * 10 ** 6,
                                                                   split_lines(s_text))) if a != b), 1)
            notes.append(f"edits outside the exercise regions were ignored: minivae/{rel}:{first}")
            continue
        try:
            text, file_notes = merge_file(p_text, s_text, set(graded), f"minivae/{rel}")
        except (RecursionError, MemoryError, ValueError, SyntaxError) as e:   # e.g. a 200,000-term expression
            text, file_notes = p_text, [f"minivae/{rel}: cannot be read as Python ({type(e).__name__}); this file's "
                                        "exercises were graded as not done"]
        notes.extend(file_notes)
        (Path(dest) / "minivae" / rel).write_text(text, encoding="utf-8")
    return notes


# --------------------------------------------------------------- one student
class Interrupted(Exception):
    """Grading stopped (Ctrl-C, or the grader's files changed) before this student was done."""


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff\ud800-\udfff]")


def clean(text, limit=2000):
    """Text safe to print to a terminal and to store, on one line: tabs and newlines become spaces (a message
    cannot print lines of its own, e.g. a fake PASS or score), other control and direction characters '?', and
    so do lone surrogates (a file name in bytes that are not UTF-8, or a student's message): a strict UTF-8
    terminal cannot print them, which once stopped the report before the score."""
    return _CONTROL.sub("?", str(text).replace("\n", " ").replace("\t", " "))[:limit]


def _clean_tree(value):
    if isinstance(value, str):
        return clean(value, 4000)
    if isinstance(value, list):
        return [_clean_tree(v) for v in value]
    if isinstance(value, dict):
        return {clean(k, 200): _clean_tree(v) for k, v in value.items()}
    return value


def input_seed(seed, name):
    """The seed of one student's check inputs: the batch's secret seed and the student's name."""
    digest = hashlib.sha256(f"{int(seed)}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _readable(folder):
    """Make the graded copy readable by the sandbox's user (it lives in the run's private 0700 folder)."""
    for dirpath, dirs, files in os.walk(folder):
        os.chmod(dirpath, 0o755)
        for f in files:
            os.chmod(os.path.join(dirpath, f), 0o644)


class Run:
    """One grading run: a private folder, the pristine starter, the seed, the sandbox, the integrity baseline.

    ``exercises``: the ids to grade; with a ``manifest``, the manifest's exercises (``exercises`` may only
    narrow them).  ``sandbox=False`` runs student code without isolation (``--no-sandbox``).
    """

    def __init__(self, exercises=None, seed=None, timeout=DEFAULT_TIMEOUT, manifest=None, sandbox=True):
        self.manifest = read_manifest(manifest) if manifest else None
        if self.manifest is not None:
            assigned = tuple(e for e in IDS if e in self.manifest["exercises"])
            if exercises is None:
                exercises = assigned
            else:
                extra = [e for e in exercises if e not in assigned]
                if extra:
                    raise ValueError(f"{', '.join(extra)} not assigned: the manifest lists "
                                     f"{', '.join(assigned) or 'no exercise'}")
        self.ids = IDS if exercises is None else tuple(exercises)
        unknown = [e for e in self.ids if e not in BY_ID]
        if unknown:
            raise ValueError(f"unknown exercise {', '.join(unknown)}")
        if not self.ids:
            raise ValueError("no exercises to grade")
        missing = [e for e in self.ids if not checks.has_check(e)]
        if missing:
            raise ValueError(f"the grader has no check for exercise {', '.join(missing)}")
        if not 0 < timeout <= MAX_TIMEOUT:      # inf once graded every student 0 ("cannot convert float infinity")
            raise ValueError(f"timeout must be positive and at most {MAX_TIMEOUT:g} s (a check that runs longer "
                             f"counts as hanging), got {timeout}")
        self.integrity = Integrity(self.manifest)
        self.seed = int(secrets.randbits(63)) if seed is None else int(seed)
        self.timeout = float(timeout)
        self.stop = threading.Event()
        become_subreaper()
        self._n = 0
        self._lock = threading.Lock()
        self.root = Path(tempfile.mkdtemp(prefix="minivae-grade-"))
        try:                    # leave no folder behind when the set-up fails
            os.chmod(self.root, 0o700)
            self.sandbox = Sandbox("find" if sandbox is True else sandbox) if sandbox else Sandbox(None)
            stub = tuple(self.manifest["exercises"]) if self.manifest else IDS
            self.pristine = self.root / "pristine"
            make_starter(self.pristine, stub, record_expected=False, lessons=False,
                         hide_derivations=bool(self.manifest and self.manifest.get("hide_derivations")))
            if self.manifest:
                self._check_pristine()
            probe = self.root / "probe"
            probe.mkdir()
            shutil.copy2(HERE / "runner.py", probe / "runner.py")
            _readable(probe)
            self.sandbox.probe(probe)
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
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _slot(self):
        with self._lock:
            self._n += 1
            return self.root / f"s{self._n}"

    def grade(self, submission, name=None, progress=None, notes=()):
        """Grade one submission folder; return its report dict."""
        submission = check_student_dir(submission)
        name = name or submission.name
        self.integrity.verify()
        slot = self._slot()
        slot.mkdir()
        try:
            return self._grade(submission, name, slot, progress, list(notes))
        finally:
            shutil.rmtree(slot, ignore_errors=True)

    def _grade(self, submission, name, slot, progress, notes):
        t0 = time.perf_counter()
        check_submission_files(submission)
        graded = slot / "graded"
        notes += build_graded_copy(submission, self.pristine, self.ids, graded)
        shutil.copy2(HERE / "runner.py", graded / "runner.py")
        _readable(graded)
        seed = input_seed(self.seed, name)
        results = []
        for ex in self.ids:
            if self.stop.is_set():
                raise Interrupted("grading was stopped")
            t1 = time.perf_counter()
            r = self._check(ex, graded, slot, seed)
            if self.stop.is_set():          # its child was killed by the stop, not by the student's code
                raise Interrupted("grading was stopped")
            r = dict({"id": ex, "title": BY_ID[ex].title}, **r, seconds=round(time.perf_counter() - t1, 3))
            r = _clean_tree(r)
            results.append(r)
            if progress is not None:
                progress(r)
        passed = sum(1 for r in results if r["passed"])
        total = len(results)
        return _clean_tree({
            "student": name,
            "dir": str(submission),
            "graded": True,
            "score": round(100.0 * passed / total, 2) if total else 0.0,
            "passed": passed,
            "total": total,
            "exercises": results,
            "notes": notes,
            "seed": self.seed,
            "input_seed": seed,
            "timeout_s": self.timeout,
            "seconds": round(time.perf_counter() - t0, 3),
            "tolerances": {"gradient": checks.GRAD_TOL, "value": checks.VALUE_TOL,
                           "finite_difference_h": checks.H, "cost_factor": checks.COST_FACTOR},
            "sandbox": dict(self.sandbox.info),
        })

    def _check(self, ex, graded, slot, seed):
        """One exercise's check in a fresh child (a fresh sandbox); the child is dead when this returns."""
        src = graded
        if not self.sandbox.enabled:          # no sandbox: a throwaway copy on disk for each check
            src = slot / f"w-{ex}"
            shutil.copytree(graded, src)
        child, grace = None, 0.0
        try:
            child = Child(self.sandbox, src, slot / f"out-{ex}.txt", cpu_seconds=self.timeout + 5)
            child.hello()
            r = checks.run_check(ex, child, seed, self.timeout)
            grace = 0.5 if r["status"] in ("pass", "fail", "not_implemented") else 0.0
            return r
        except Exception as e:        # noqa: BLE001 -- the child broke the protocol, or could not start
            return {"status": "error", "passed": False, "worst_rel_error": None, "gradient": None,
                    "message": str(e)[:500] or type(e).__name__, "checked": 0}
        finally:
            if child is not None:
                child.close(grace)
            if src is not graded:
                shutil.rmtree(src, ignore_errors=True)


def check_student_dir(student_dir):
    d = Path(student_dir)
    if not d.is_dir():
        raise ValueError(f"{d} is not a directory")
    if not (d / "minivae" / "__init__.py").is_file():
        raise ValueError(f"{d} has no minivae/__init__.py: give the folder that holds the student's minivae package")
    return d.resolve()


def check_submission_files(folder):
    """Refuse a submission whose minivae/ holds links, devices, or too many or too large files."""
    root = Path(folder) / "minivae"
    if root.is_symlink():
        raise ValueError("the submission's minivae/ is a symbolic link")
    count, total = 0, 0
    for dirpath, dirs, files in os.walk(root, followlinks=False):
        for n in dirs + files:
            p = Path(dirpath) / n
            st = p.lstat()
            rel = p.relative_to(folder).as_posix()
            if stat.S_ISLNK(st.st_mode):
                raise ValueError(f"the submission holds a symbolic link ({rel}); links are not graded")
            if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
                raise ValueError(f"the submission holds a special file ({rel})")
            count += 1
            total += st.st_size
        if count > MAX_FILES or total > MAX_ZIP_BYTES:
            raise ValueError(f"the submission's minivae/ holds more than {MAX_FILES} files or "
                             f"{MAX_ZIP_BYTES >> 20} MiB")


def grade(student_dir, exercises=None, timeout=DEFAULT_TIMEOUT, seed=None, progress=None, manifest=None,
          sandbox=True, name=None):
    """Grade one submission folder; return the report dict (see :func:`format_report`)."""
    student_dir = check_student_dir(student_dir)
    with Run(exercises, seed=seed, timeout=timeout, manifest=manifest, sandbox=sandbox) as run:
        return run.grade(student_dir, name=name, progress=progress)


def grade_one(student_dir, exercise_id, timeout=DEFAULT_TIMEOUT, seed=None):
    return grade(student_dir, [exercise_id], timeout=timeout, seed=seed)["exercises"][0]


# ------------------------------------------------------------------ batches
def _safe_extract(zip_path, dest):
    """Extract a submission .zip (no absolute paths, no '..', no links, bounded size); return the folder."""
    try:
        zf = zipfile.ZipFile(zip_path)
    except Exception as e:          # noqa: BLE001 -- any unreadable archive
        raise ValueError(f"not a readable .zip ({type(e).__name__}: {e})") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > MAX_FILES:
            raise ValueError(f"more than {MAX_FILES} files")
        total = 0
        for info in infos:
            name = info.filename
            parts = name.replace("\\", "/").split("/")
            kind = (info.external_attr >> 16) & 0o170000
            if name.startswith(("/", "\\")) or ".." in parts or ":" in parts[0] or _CONTROL.search(name) \
                    or kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                raise ValueError(f"unsafe member {clean(name, 100)!r} (absolute, '..', a link or a special file)")
            total += info.file_size
            if total > MAX_ZIP_BYTES:
                raise ValueError(f"more than {MAX_ZIP_BYTES >> 20} MiB uncompressed")
        try:
            zf.extractall(dest)
        except Exception as e:      # noqa: BLE001 -- a bad CRC, a truncated member, ...
            raise ValueError(f"cannot be extracted ({type(e).__name__}: {clean(e, 200)})") from None
    found = [p.parent.parent for p in Path(dest).rglob("minivae/__init__.py")
             if "__MACOSX" not in p.parts]
    if not found:
        raise ValueError("has no minivae/__init__.py")
    return min(found, key=lambda p: len(p.parts))


_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


def safe_name(raw):
    """``(name, note)``: the raw name when it is safe (letters, digits, ``_ . -``, no ``..``, not led by a
    sign), else a stable id made from it and a note saying why."""
    if _SAFE_NAME.fullmatch(raw) and ".." not in raw:
        return raw, None
    sid = "student-" + hashlib.sha256(raw.encode("utf-8", "surrogateescape")).hexdigest()[:10]
    return sid, (f"the submission name {clean(ascii(raw), 120)} was refused (only letters, digits and _ . - are "
                 f"allowed, not '..' or a leading = + - @); graded as {sid}")


def _is_zip_name(p):
    """Whether ``p`` is named like a zip archive (``.zip``, in any case: ``alice.ZIP`` too)."""
    return p.suffix.lower() == ".zip"


def _holds_submissions(p):
    """Whether folder ``p`` holds other submissions beside a ``minivae/``: then it is a folder of submissions
    with one stray bare package in it (graded as the student "minivae", with a note), not one student."""
    for q in p.iterdir():
        if q.name.startswith(".") or q.name == "minivae" or q.is_symlink():
            continue
        if (_is_zip_name(q) and q.is_file()) or (q.is_dir() and (q / "minivae").is_dir()):
            return True
    return False


def expand_submissions(paths):
    """[(student name, folder or .zip, notes)] from folders, .zip files, or folders of them.

    Names are checked (see :func:`safe_name`); a submission that is a symbolic link inside a folder of
    submissions is listed with the note that it is not graded."""
    out = []
    for p in map(Path, paths):
        if p.is_file() and _is_zip_name(p):
            out.append((p.stem, p))
        elif p.is_dir() and (p / "minivae" / "__init__.py").is_file() and not _holds_submissions(p):
            out.append((p.resolve().name, p))
        elif p.is_dir():
            # every entry gets a row but hidden ones (.DS_Store; a .zip is never hidden: "...zip" is a student):
            # a folder or .zip (any case) is a submission; anything else (a .tar.gz, a loose .py) is a mistake
            # that gets a "not graded" row, never silently no row
            subs = sorted(q for q in p.iterdir() if not q.name.startswith(".") or _is_zip_name(q))
            if not any(q.is_dir() or q.is_symlink() or _is_zip_name(q) for q in subs):
                raise ValueError(f"{p} has no minivae/__init__.py and no submissions (folders or .zip files) inside")
            out.extend((q.stem if _is_zip_name(q) else q.name, q) for q in subs)
        elif not p.exists():
            raise ValueError(f"{p} is not a directory")
        else:
            raise ValueError(f"{p} is neither a folder nor a .zip file")
    items, seen = [], {}
    for raw, path in out:
        name, note = safe_name(raw)
        notes = [note] if note else []
        if name in seen:              # alice/ and alice.zip: both graded, the second under another name
            k = 2
            while f"{name}-{k}" in seen:
                k += 1
            notes.append(f"another submission ({clean(seen[name], 200)}) has the name {name}; graded as "
                         f"{name}-{k}")
            name = f"{name}-{k}"
        seen[name] = path
        items.append((name, path, notes))
    return items


def write_atomic(path, text):
    """``text`` (UTF-8) to ``path`` through the package's one atomic writer (:func:`minivae.atomic.atomic_write`:
    fsync'ed, renamed into place, its temporary file removed on any failure)."""
    from ..atomic import atomic_write
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


SECRET_KEYS = ("seed", "input_seed")
SEED_FILE = "secret-seed.txt"        # in the --out folder, readable by its owner only: never hand it out


def public(report):
    """The report a student may see: without the batch's secret seed and her input seed (either lets her
    compute every check input in advance of a regrade).  The seed is kept for the instructor in SEED_FILE."""
    return {k: v for k, v in report.items() if k not in SECRET_KEYS}


def write_seed(out_dir, seed):
    """Record the batch's secret seed where only the instructor reads it (mode 0600), for --seed regrades."""
    path = Path(out_dir) / SEED_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"{int(seed)}\n")
    os.chmod(path, 0o600)
    return path


DIFF_LINES = 400                 # a differing middle longer than this is not diffed line by line


def _changed_lines(old, new):
    """0-based indices in ``new`` where it starts to differ from ``old``; linear time plus a bounded diff.

    The common head and tail are skipped in one pass each; only a middle of at most DIFF_LINES lines on both
    sides goes through difflib (whose cost grows faster than linearly: 350,000 padded blank lines once held
    the grader for a minute).  A longer middle is reported by its first line."""
    n = min(len(old), len(new))
    head = 0
    while head < n and old[head] == new[head]:
        head += 1
    tail = 0
    while tail < n - head and old[len(old) - 1 - tail] == new[len(new) - 1 - tail]:
        tail += 1
    a, b = old[head:len(old) - tail], new[head:len(new) - tail]
    if not a and not b:
        return []
    if len(a) > DIFF_LINES or len(b) > DIFF_LINES:
        return [head]
    return [head + j1 for tag, _, _, j1, _ in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes()
            if tag != "equal"]


def not_graded(name, path, why, ids, seed=None, notes=(), sandbox=None):
    return _clean_tree({"student": name, "dir": str(path), "graded": False, "score": 0.0, "passed": 0,
                        "total": len(ids), "exercises": [], "notes": list(notes) + [f"not graded: {why}"],
                        "seed": seed, "sandbox": dict(sandbox or {})})


def grade_batch(paths, exercises=None, timeout=DEFAULT_TIMEOUT, seed=None, jobs=1, out_dir=None,
                manifest=None, progress=True, sandbox=True):
    """Grade many submissions with ``jobs`` in parallel; write per-student JSON and ``gradebook.csv``.

    Never stops at one student: whatever goes wrong with a submission is that student's 0 with a note.
    Ctrl-C (or a change of the grader's own files) stops the batch: the students graded so far keep their
    reports, the rest are marked "not graded", and the gradebook and reports are written all the same.
    Returns ``(reports, stopped)``, ``stopped`` None or the reason the batch stopped early.
    """
    check_jobs(jobs)
    subs = expand_submissions(paths)
    reports, stopped, ids, written = {}, None, tuple(exercises or IDS), set()
    bar = None
    run = None
    try:
        run = Run(exercises, seed=seed, timeout=timeout, manifest=manifest, sandbox=sandbox)
        ids = run.ids
        zips = run.root / "zips"

        def one(item):
            name, path, notes = item
            try:
                if path.is_symlink():
                    raise ValueError("the submission is a symbolic link; copy the folder or .zip itself in")
                folder = path
                if not path.is_dir() and not (path.is_file() and _is_zip_name(path)):
                    raise ValueError(f"{path.name}: neither a folder nor a .zip file; hand in the folder that holds "
                                     "minivae/, or a .zip of it")
                if _is_zip_name(path) and path.is_file():
                    try:
                        folder = _safe_extract(path, zips / name)
                    except ValueError as e:
                        raise ValueError(f"{path.name}: {e}") from None
                return run.grade(folder, name=name, notes=notes)
            except Interrupted as e:
                return not_graded(name, path, str(e), run.ids, run.seed, notes, run.sandbox.info)
            except IntegrityError as e:
                run.stop.set()
                return not_graded(name, path, str(e), run.ids, run.seed, notes, run.sandbox.info)
            except RecursionError:
                return not_graded(name, path, "RecursionError while reading it", run.ids, run.seed, notes,
                                  run.sandbox.info)
            except Exception as e:  # noqa: BLE001 -- any failure of one submission is that student's 0
                return not_graded(name, path, f"{type(e).__name__}: {e}", run.ids, run.seed, notes,
                                  run.sandbox.info)

        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(subs), desc="grading", unit="submission", file=sys.stderr)
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=int(jobs))
        try:
            futures = {pool.submit(one, item): item[0] for item in subs}
            for fut in concurrent.futures.as_completed(futures):
                rep = fut.result()
                reports[futures[fut]] = rep
                if out_dir is not None:
                    write_atomic(Path(out_dir) / f"{futures[fut]}.json", json.dumps(public(rep), indent=2) + "\n")
                    written.add(futures[fut])
                if bar is not None:
                    bar.update(1)
                if run.stop.is_set() and stopped is None:
                    stopped = "the grader's own files changed during grading"
        except KeyboardInterrupt as e:
            stopped = stop_reason(e)
            run.stop.set()
            kill_all()
            pool.shutdown(wait=True, cancel_futures=True)
            for fut, name in futures.items():
                if name not in reports and fut.done() and not fut.cancelled() and fut.exception() is None:
                    reports[name] = fut.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    except KeyboardInterrupt as e:
        stopped = stop_reason(e)
    finally:
        if bar is not None:
            bar.close()
        if run is None and stopped is None:         # refused to start (no sandbox, a bad manifest): no gradebook
            return_now = True
        else:
            return_now = False
        why = stopped or "grading stopped"
        for name, path, notes in subs:
            if name not in reports:
                reports[name] = not_graded(name, path, why, ids, run.seed if run else seed, notes,
                                           run.sandbox.info if run else None)
        if out_dir is not None and not return_now:
            for name, path, _ in subs:
                if name not in written:
                    write_atomic(Path(out_dir) / f"{name}.json", json.dumps(public(reports[name]), indent=2) + "\n")
            write_atomic(Path(out_dir) / "gradebook.csv", gradebook_csv(reports, ids))
            if run is not None:
                write_seed(out_dir, run.seed)
        if run is not None:
            run.close()
    return reports, stopped


STOPPED = {signal.SIGINT: ("interrupted (Ctrl-C)", 130), signal.SIGTERM: ("terminated (SIGTERM)", 143)}


def stop_reason(exc):
    """Why a batch stopped, for a KeyboardInterrupt: Ctrl-C, or SIGTERM (raised as :class:`minivae.signals.Terminated`
    by the command line), so the gradebook and the exit code (130, 143) say which."""
    from ..signals import signal_of
    return STOPPED.get(signal_of(exc), STOPPED[signal.SIGINT])[0]


def stop_exit_code(stopped):
    """The exit code of a batch that stopped early: 130 (Ctrl-C), 143 (SIGTERM), 2 (the grader's files changed)."""
    return next((code for why, code in STOPPED.values() if why == stopped), 2)


def _cell(value):
    """A CSV cell that no spreadsheet reads as a formula."""
    text = clean(value, 300)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def gradebook_csv(reports, ids):
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["student", *ids, "total", "sandbox", "graded"])
    for name in sorted(reports):
        rep = reports[name]
        by = {e["id"]: e for e in rep.get("exercises", [])}
        sandbox = (rep.get("sandbox") or {}).get("sandbox", "")
        w.writerow([_cell(name), *[1 if by.get(e, {}).get("passed") else 0 for e in ids], f"{rep['score']:g}",
                    _cell(sandbox.split(" ")[0] if sandbox else ""),
                    "yes" if rep.get("graded") else _cell(rep["notes"][-1] if rep.get("notes") else "no")])
    return buf.getvalue()


# ------------------------------------------------------------------ text
def format_header(report_dir):
    return f"grading {clean(report_dir, 500)}"


def format_footer(report):
    failed = [r["id"] for r in report["exercises"] if not r["passed"]]
    lines = [f"note: {clean(n)}" for n in report.get("notes", [])]
    lines.append(f"score: {report['score']:g}/100 ({report['passed']} of {report['total']} exercises passed)")
    if failed:
        lines.append(f"not passed: {', '.join(failed)}")
    sandbox = (report.get("sandbox") or {}).get("sandbox", "")
    if sandbox.startswith("none"):
        lines.append(f"sandbox: {sandbox}")
    return "\n".join(lines)


def format_report(report):
    return "\n".join([format_header(report["dir"])] + [format_line(r) for r in report["exercises"]]
                     + [format_footer(report)])
