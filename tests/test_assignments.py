"""Course assignments: make a student copy from the reference and grade it."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from minivae.assignments import IDS, grade, make_starter
from minivae.assignments.exercises import select
from minivae.assignments.make import scan_regions
from minivae.assignments.markers import MarkerError, find_regions, fill_text, region_bodies, stub_text

REPO = Path(__file__).resolve().parents[1]
PKG_FILES = ("layers.py", "gaussian.py", "likelihoods.py", "conv.py", "optim.py", "model.py", "made.py", "flows.py")
N = len(IDS)


def _env():
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["MPLBACKEND"] = "Agg"
    return env


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "minivae.assignments", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd or REPO, timeout=300)


def run_isolated(code, path, timeout=120):
    """Run code in a fresh ``python -I`` with only ``path`` added in front of sys.path."""
    boot = (f"import sys; sys.path.insert(0, {str(path)!r})\n"
            # as in a student's environment: no editable install of the reference to fall back on
            "sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, '__module__', '').startswith('__editable__')]\n"
            + code)
    return subprocess.run([sys.executable, "-I", "-B", "-c", boot], capture_output=True, text=True,
                          cwd=path, timeout=timeout, env=_env())


@pytest.fixture(scope="module")
def starter(tmp_path_factory):
    """Every exercise stubbed."""
    out = tmp_path_factory.mktemp("starter") / "course"
    info = make_starter(out, manifest=out.parent / "course.manifest.json")
    assert info["stubbed"] == list(IDS)
    return out


@pytest.fixture(scope="module")
def unstubbed(tmp_path_factory):
    """``--exercises none``: the student layout with the reference code in every region."""
    out = tmp_path_factory.mktemp("unstubbed") / "course"
    r = cli("make", out, "--exercises", "none")
    assert r.returncode == 0, r.stderr
    assert "stubbed 0 exercise(s)" in r.stdout
    return out


def copy_of(src, tmp_path):
    dst = tmp_path / "student"
    shutil.copytree(src, dst)
    return dst


def edit(path, old, new):
    text = path.read_text()
    assert text.count(old) == 1, f"{old!r} not found exactly once in {path}"
    path.write_text(text.replace(old, new))


# ---------------------------------------------------------------- markers
def test_marker_parsing_and_errors():
    src = "def f(x):\n    ### BEGIN SOLUTION a\n    y = x + 1\n    ### END SOLUTION\n    return y\n"
    (r,) = find_regions(src)
    assert (r.id, r.begin, r.end, r.indent) == ("a", 1, 3, "    ")
    new, done = stub_text(src, {"a"}, {"a": "add one"})
    assert done == ["a"]
    assert "    raise NotImplementedError('exercise a: add one')\n" in new
    assert "y = x + 1" not in new and "### BEGIN SOLUTION a" in new and "return y" in new
    compile(new, "<stub>", "exec")
    assert fill_text(new, [b for _, b in region_bodies(src)]) == src
    assert stub_text(src, {"b"}, {})[0] == src
    bad = {
        "### BEGIN SOLUTION a\n### BEGIN SOLUTION b\n### END SOLUTION\n": "inside the region",
        "### BEGIN SOLUTION a\nx = 1\n": "never closed",
        "### END SOLUTION\n": "without a BEGIN",
        "### BEGIN SOLUTION\n### END SOLUTION\n": "needs an exercise id",
    }
    for text, msg in bad.items():
        with pytest.raises(MarkerError, match=msg):
            find_regions(text)


def test_exercise_table_matches_the_markers():
    found = scan_regions(REPO / "minivae")
    assert set(found) == set(IDS)
    assert len(found["vae_backward"]) == 3
    assert all(len(found[e]) == 1 for e in IDS if e != "vae_backward")
    assert select("none") == () and select("all") == IDS
    assert select("kl_forward,dense_backward") == ("dense_backward", "kl_forward")
    with pytest.raises(ValueError, match="unknown exercise 'nope'"):
        select("nope,kl_forward")


# ------------------------------------------------------------------- make
def test_starter_is_the_reference_with_stubbed_regions(starter):
    assert not (starter / "minivae" / "assignments").exists()
    for name in ("check.py", "check_expected.npz", "README.md", "pyproject.toml"):
        assert (starter / name).is_file(), name
    # the manifest stays with the instructor, beside the copy, not in it
    assert not list(starter.rglob("*manifest*"))
    if (REPO / "lessons").is_dir():
        assert sorted(p.name for p in (starter / "lessons").glob("*.py")) == \
            sorted(p.name for p in (REPO / "lessons").glob("*.py"))
    stub_counts = {}
    for name in PKG_FILES:
        ref = (REPO / "minivae" / name).read_text()
        stu = (starter / "minivae" / name).read_text()
        compile(stu, name, "exec")
        for rid, body in region_bodies(stu):
            assert body.strip().startswith("raise NotImplementedError('exercise " + rid + ": "), body
            stub_counts[rid] = stub_counts.get(rid, 0) + 1
        # everything outside the regions (docstrings with the math included) is unchanged
        assert fill_text(stu, [b for _, b in region_bodies(ref)]) == ref
    assert stub_counts == {e: (3 if e == "vae_backward" else 1) for e in IDS}
    assert "dL/dW = x.T @ G" in (starter / "minivae" / "layers.py").read_text()
    assert "x.T @ dy" not in (starter / "minivae" / "layers.py").read_text()


def test_grade_jobs_has_an_upper_bound_of_cpus_and_memory(tmp_path, monkeypatch):
    """Each check may map 4 GiB (4 processes x 1 GiB): --jobs above min(CPUs, memory / 4 GiB) is refused with
    one line naming the bound, before anything is graded."""
    from minivae.assignments import grading
    assert grading.CHECK_BYTES == 4 << 30
    bound, _ = grading.max_jobs()
    for jobs in (bound + 1, 10 ** 6):
        r = cli("grade", tmp_path / "missing", "--exercises", "all", "--jobs", jobs)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith(f"error: --jobs {jobs} ")
        assert f"at most {bound} (" in r.stderr and "CPU" in r.stderr and "4 GiB" in r.stderr
    with pytest.raises(ValueError, match=f"at most {bound} "):
        grading.grade_batch([tmp_path / "missing"], ["kl_forward"], jobs=bound + 1, progress=False)
    for cpus, gib, want in [(16, 8.5, 2), (2, 64, 2), (8, 3, 1), (1, 1000, 1), (4, None, 4)]:
        monkeypatch.setattr(grading, "_cpus", lambda: cpus)
        monkeypatch.setattr(grading, "_memory_bytes", lambda: None if gib is None else int(gib * (1 << 30)))
        assert grading.max_jobs()[0] == want, (cpus, gib)
        assert grading.check_jobs(want) == want
        with pytest.raises(ValueError, match=f"--jobs {want + 1} is more than .* at most {want} "):
            grading.check_jobs(want + 1)


def test_make_stubs_only_the_chosen_exercises(tmp_path):
    info = make_starter(tmp_path / "c", ["kl_backward", "adam_step"])
    assert info["stubbed"] == ["kl_backward", "adam_step"]
    assert "NotImplementedError" in (tmp_path / "c" / "minivae" / "optim.py").read_text()
    assert "NotImplementedError('exercise" not in (tmp_path / "c" / "minivae" / "layers.py").read_text()


def test_cli_errors_are_one_line(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("1")
    for args, msg in [(("make", tmp_path / "full"), "not an empty folder"),
                      (("make", tmp_path / "new", "--exercises", "dense,kl_forward"), "unknown exercise 'dense'"),
                      (("grade", tmp_path / "missing", "--exercises", "all"), "is not a directory"),
                      (("grade", tmp_path / "full", "--exercises", "all"), "has no minivae/__init__.py")]:
        r = cli(*args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert r.stderr.startswith("error: ") and msg in r.stderr and "Traceback" not in r.stderr


# ------------------------------------------------------------------ grade
def test_grading_the_reference_scores_100(tmp_path):
    report_file = tmp_path / "r" / "report.json"
    r = cli("grade", REPO, "--exercises", "all", "--json", report_file)
    assert r.returncode == 0, r.stderr
    assert f"score: 100/100 ({N} of {N} exercises passed)" in r.stdout
    report = json.loads(report_file.read_text())
    assert report["score"] == 100
    assert [e["id"] for e in report["exercises"]] == list(IDS)
    for e in report["exercises"]:
        assert e["status"] == "pass" and e["passed"], e
        assert e["worst_rel_error"] is not None and e["worst_rel_error"] < 1e-6, e


def test_grading_the_untouched_starter_scores_0(starter):
    report = grade(starter)
    assert report["score"] == 0 and report["passed"] == 0 and report["total"] == len(IDS)
    for e in report["exercises"]:
        assert e["status"] == "not_implemented", e
        assert e["message"].startswith(f"NotImplementedError: exercise {e['id']}: "), e


def test_planted_bugs_fail_exactly_the_planted_exercises(unstubbed, tmp_path):
    d = copy_of(unstubbed, tmp_path)
    # sigma = exp(logvar): the classic VAE bug
    edit(d / "minivae" / "gaussian.py", "sigma = xp.exp(0.5 * logvar)", "sigma = xp.exp(logvar)")
    # dW missing its transpose: (D_out, D_in) instead of (D_in, D_out)
    edit(d / "minivae" / "layers.py", "dW = x.T @ dy", "dW = dy.T @ x")
    json_file = tmp_path / "report.json"
    r = cli("grade", d, "--exercises", "all", "--json", json_file)
    assert r.returncode == 0, r.stderr
    report = json.loads(json_file.read_text())
    failed = {e["id"]: e for e in report["exercises"] if not e["passed"]}
    assert set(failed) == {"dense_backward", "reparameterize_forward"}
    assert failed["dense_backward"]["gradient"] == "dW"
    assert "dW has shape (5, 3), expected (3, 5)" in failed["dense_backward"]["message"]
    assert failed["dense_backward"]["worst_rel_error"] is None      # no error is defined for a wrong shape
    assert failed["reparameterize_forward"]["gradient"] == "z"
    assert failed["reparameterize_forward"]["status"] == "fail"
    assert failed["reparameterize_forward"]["worst_rel_error"] > 1e-2
    assert report["score"] == pytest.approx(100 * (N - 2) / N, abs=0.01)
    assert "not passed: dense_backward, reparameterize_forward" in r.stdout
    assert "wrong: dW" in r.stdout and "wrong: z" in r.stdout


def test_vae_backward_check_names_the_wrong_parameter(unstubbed, tmp_path):
    d = copy_of(unstubbed, tmp_path)
    # forget that h feeds both heads in the encoder
    edit(d / "minivae" / "model.py", "        dh += dh_lv                                    # h feeds both heads",
         "        pass                                    # h feeds both heads")
    (res,) = grade(d, ["vae_backward"])["exercises"]
    assert res["status"] == "fail"
    # the encoder's hidden layers are wrong, heads and decoder are right; the worst one is named
    assert res["gradient"] in ("enc.0.W", "enc.0.b", "enc.1.W", "enc.1.b")
    assert "4 wrong gradient(s)" in res["message"]
    assert f"enc.0.W, enc.0.b, enc.1.W, enc.1.b; worst: {res['gradient']} is wrong: rel error" in res["message"]
    # the header's worst rel error is the one the message quotes
    assert f"rel error {res['worst_rel_error']:.2e}" in res["message"]


def test_hang_crash_wrong_shape_and_bad_import_are_reported(unstubbed, tmp_path):
    d = copy_of(unstubbed, tmp_path)
    layers = d / "minivae" / "layers.py"
    edit(layers, "    dx = dy * (x > 0)          # dL/dx = dL/dy * 1[x > 0]\n",
         "    import time\n    while True:\n        time.sleep(0.05)\n")
    edit(layers, "dx = dy * (1 - y * y)", "dx = (dy * (1 - y * y)).sum(axis=0)")
    edit(layers, "dx = dy * y * (1 - y)", "dx = dy * y * (1 - y) * undefined_name")
    report = grade(d, ["relu_backward", "tanh_backward", "sigmoid_backward", "kl_forward"], timeout=4)
    by = {e["id"]: e for e in report["exercises"]}
    assert by["relu_backward"]["status"] == "timeout" and "4 s" in by["relu_backward"]["message"]
    assert by["tanh_backward"]["status"] == "fail" and by["tanh_backward"]["gradient"] == "dx"
    assert "has shape (6,), expected (4, 6)" in by["tanh_backward"]["message"]
    assert by["sigmoid_backward"]["status"] == "error"
    msg = by["sigmoid_backward"]["message"]
    assert "NameError" in msg and "minivae/layers.py:" in msg
    assert by["kl_forward"]["status"] == "pass"      # grading went on after the failures
    assert report["score"] == 25

    # a broken file outside the regions is left out of the graded copy (and reported) ...
    (d / "minivae" / "optim.py").write_text("def broken(:\n")
    report = grade(d, ["kl_forward"])
    (res,) = report["exercises"]
    assert res["status"] == "pass" and any("minivae/optim.py" in n for n in report["notes"]), report
    # ... a broken region body is reported with its file and line
    edit(d / "minivae" / "gaussian.py", "    var = xp.exp(logvar)                                   # sigma^2",
         "    var = xp.exp(logvar                                    # sigma^2")
    report = grade(d, ["kl_forward"])
    (res,) = report["exercises"]
    assert res["status"] == "error" and "SyntaxError" in res["message"], res
    assert "minivae/gaussian.py" in res["message"]


# --------------------------------------------------------- student side
def test_local_checks_in_the_student_copy(starter, unstubbed):
    r = subprocess.run([sys.executable, "-B", "check.py"], cwd=unstubbed, capture_output=True, text=True,
                       env=_env(), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{N} of {N} passed" in r.stdout
    r = subprocess.run([sys.executable, "-B", "check.py", "dense_backward"], cwd=starter, capture_output=True,
                       text=True, env=_env(), timeout=300)
    assert r.returncode == 1 and "TODO" in r.stdout and "exercise dense_backward" in r.stdout


def test_local_forward_check_catches_the_sigma_bug(unstubbed, tmp_path):
    d = copy_of(unstubbed, tmp_path)
    edit(d / "minivae" / "gaussian.py", "sigma = xp.exp(0.5 * logvar)", "sigma = xp.exp(logvar)")
    r = subprocess.run([sys.executable, "-B", "check.py", "reparameterize_forward", "kl_forward"], cwd=d,
                       capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 1 and "1 of 2 passed" in r.stdout and "wrong: z" in r.stdout


TRAIN = """
import numpy as np, minivae
from minivae.data import load_mnist, minibatches
assert minivae.__file__.startswith(sys.path[0]), minivae.__file__
x, y = load_mnist("test")
assert x.shape == (10000, 784) and y.shape == (10000,) and 0 <= x.min() and x.max() <= 1
x = x[:512]
model = minivae.VAE(minivae.VAEConfig(hidden=(64,), z_dim=8), rng=np.random.default_rng(0))
opt = minivae.Adagrad(lr=0.02)
rng = np.random.default_rng(1)
first = float(model.loss(x, eps=np.zeros((1, 512, 8)), backward=False)[0])
for epoch in range(3):
    for idx in minibatches(len(x), 64, rng):
        loss, grads = model.loss(x[idx])
        opt.step(model.params, grads)
last = float(model.loss(x, eps=np.zeros((1, 512, 8)), backward=False)[0])
print("loss", first, last)
assert np.isfinite(last) and last < first - 200, (first, last)
"""


TRAIN_LOOP = """
import importlib.util, sys, tempfile, math
assert importlib.util.find_spec("minivae.fast") is None, "the starter must not ship the fused solutions"
from minivae.train import TrainSettings, train
s = TrainSettings.from_recipe("default", n_train=256, n_test=128, epochs=2, batch_size=64, hidden=(32,), latent=2,
                              figures=False, optimizer="adagrad", lr=0.02)
h = train(s, tempfile.mkdtemp(), progress=False, log=lambda *a: None)
assert len(h) == 2 and math.isfinite(h[-1]["test_neg_elbo"]) and h[-1]["train_loss"] < h[0]["train_loss"], h
print("trained", h[-1]["test_neg_elbo"])
"""


def test_starter_training_loop_runs_the_students_code(tmp_path):
    out = tmp_path / "partial"
    make_starter(out, ["adam_step", "tanh_backward", "sigmoid_backward"])
    assert not (out / "minivae" / "fast").exists() and not (out / "minivae" / "assignments").exists()
    r = run_isolated(TRAIN_LOOP, out)
    assert r.returncode == 0, r.stdout + r.stderr


def test_starter_data_loading_and_training_run(starter, tmp_path):
    # a starter whose exercises are not on the training path (Adam, tanh, sigmoid) trains with Adagrad + ReLU
    out = tmp_path / "partial"
    make_starter(out, ["adam_step", "tanh_backward", "sigmoid_backward"])
    r = run_isolated(TRAIN, out)
    assert r.returncode == 0, r.stdout + r.stderr
    # the fully stubbed starter loads data, and training stops at the first exercise with its name
    r = run_isolated(TRAIN, starter)
    assert r.returncode != 0
    assert "NotImplementedError: exercise reparameterize_forward" in r.stderr, r.stderr


def test_local_backward_check_names_a_wrong_forward(unstubbed, tmp_path):
    # a wrong kl_forward makes the local kl_backward check fail, and the report names kl_forward as the cause;
    # the grader, with its own forward, passes kl_backward
    d = copy_of(unstubbed, tmp_path)
    edit(d / "minivae" / "gaussian.py", "kl = 0.5 * (mu * mu + var - 1.0 - logvar).sum(axis=1)",
         "kl = 0.5 * (mu * mu + var - 1.0 + logvar).sum(axis=1)")
    r = subprocess.run([sys.executable, "-B", "check.py", "kl_backward"], cwd=d, capture_output=True, text=True,
                       env=_env(), timeout=300)
    assert r.returncode == 1 and "wrong: kl_forward" in r.stdout, r.stdout
    assert "make exercise kl_forward pass first" in r.stdout
    report = grade(d, ["kl_forward", "kl_backward"])
    assert [e["passed"] for e in report["exercises"]] == [False, True]
