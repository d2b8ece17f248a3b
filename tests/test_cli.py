"""The command line: an end-to-end run in a subprocess, every command, every clear-error case."""
import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import minivae
from minivae.checkpoint import load_checkpoint
from minivae.cli import build_parser, main
from minivae.data import embedded_dir

ROOT = Path(__file__).resolve().parents[1]

TINY = ["--n-train", "512", "--n-test", "256", "--epochs", "2", "--batch-size", "64", "--hidden", "32",
        "--latent", "2"]
ENV = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")


def cli(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "minivae", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=timeout)


def assert_clean_error(stderr, fragment=None):
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("minivae: error:") or "error:" in last
    if fragment:
        assert fragment in last, last


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    r = cli("train", *TINY, "--valid", "64", "--iw-k", "3", "--out", out)
    assert r.returncode == 0, r.stderr
    return out, r


def test_end_to_end_train_writes_every_artifact(run_dir):
    out, r = run_dir
    epoch_lines = [line for line in r.stdout.splitlines() if line.startswith("epoch")]
    assert len(epoch_lines) == 2
    for line in epoch_lines:
        for part in ("train ", "valid ", "test ", " = ", " + ", "lr ", "beta "):
            assert part in line
        assert len(line) <= 100
        assert line.rstrip().endswith("s")                       # the epoch's time
    assert "final test -ELBO" in r.stdout and "IW bound (k=3)" in r.stdout
    for name in ("checkpoint.npz", "history.json", "history.csv", "results.json", "settings.json"):
        assert (out / name).is_file(), name
    for name in ("reconstructions", "samples", "loss_curves", "interpolation", "neighbourhood", "manifold",
                 "latent_scatter"):
        png = out / "figures" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    hist = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in hist] == [1, 2] and "valid_neg_elbo" in hist[0]
    c = load_checkpoint(out / "checkpoint.npz")
    assert c.epoch == 2 and c.config.hidden == (32,) and c.config.z_dim == 2
    assert c.settings["n_train"] == 512 and c.settings["binarize"] == "dynamic"
    res = json.loads((out / "results.json").read_text())
    assert res["test"]["iw_k"] == 3 and res["test"]["iw_nll"] <= res["test"]["neg_elbo"] + 5


def test_eval_prints_and_writes_json(run_dir, tmp_path):
    out, _ = run_dir
    js = tmp_path / "e.json"
    r = cli("eval", "--checkpoint", out / "checkpoint.npz", "--n", "256", "--json", js)
    assert r.returncode == 0, r.stderr
    assert "test -ELBO" in r.stdout and "recon" in r.stdout and "KL" in r.stdout
    doc = json.loads(js.read_text())
    final = json.loads((out / "results.json").read_text())["test"]
    # the test set is binarized with a fixed seed and eps drawn from a fixed seed: same numbers as training's
    assert doc["neg_elbo"] == pytest.approx(final["neg_elbo"], rel=1e-6)
    assert doc["n"] == 256 and doc["epoch"] == 2


def test_sample_interpolate_manifold(run_dir, tmp_path, capsys):
    out, _ = run_dir
    ck = str(out / "checkpoint.npz")
    assert main(["sample", "--checkpoint", ck, "--out", str(tmp_path)]) == 0
    assert main(["interpolate", "--checkpoint", ck, "--out", str(tmp_path), "--a", "3", "--b", "7"]) == 0
    assert main(["manifold", "--checkpoint", str(out), "--out", str(tmp_path), "--grid", "5"]) == 0
    for name in ("samples", "interpolation", "manifold", "latent_scatter"):
        assert (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert "wrote" in capsys.readouterr().out


def test_resume_from_the_command_line(run_dir, tmp_path):
    out, _ = run_dir
    run = tmp_path / "copy"
    shutil.copytree(out, run)
    assert main(["train", "--out", str(run), "--resume", "--epochs", "3", "--no-figures", "--quiet"]) == 0
    hist = json.loads((run / "history.json").read_text())
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    assert load_checkpoint(run).epoch == 3


@pytest.mark.parametrize("command", ["train", "eval", "sample", "interpolate", "manifold", "download"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert "usage: minivae " + command in capsys.readouterr().out


def test_console_script():
    """The ``minivae`` script declared in pyproject.toml, called through its entry point (always runs),
    and through the installed script too when it is on PATH."""
    target = re.search(r'^minivae\s*=\s*"([\w.]+):(\w+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert target, "pyproject.toml declares no minivae console script"
    module, func = target.groups()
    code = f"import sys; from {module} import {func}; sys.exit({func}())"
    runs = [[sys.executable, "-c", code, "--help"]]
    if shutil.which("minivae"):
        runs.append([shutil.which("minivae"), "--help"])
    for argv in runs:
        r = subprocess.run(argv, capture_output=True, text=True, env=ENV, timeout=60)
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("usage: minivae") and "train" in r.stdout and "manifold" in r.stdout


def write_npz_data(folder, value=None, dim=784):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        x = rng.random((16, dim))
        if value is not None:
            x[2, 3] = value
        np.savez(folder / f"{split}.npz", x=x, y=np.zeros(16, dtype=np.int64))
    return folder


def error_cases(tmp_path, run):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file at all")
    small = write_npz_data(tmp_path / "small", dim=100)
    return [
        (["train", "--no-such-flag"], "unrecognized arguments"),
        (["train", "--hidden", "abc"], "expected widths"),
        (["train", "--threads", "0"], "expected a positive integer, got '0'"),
        (["eval", "--checkpoint", str(run), "--threads", "two"], "expected a positive integer, got 'two'"),
        (["eval", "--checkpoint", str(tmp_path / "missing.npz")], "checkpoint not found"),
        (["eval", "--checkpoint", str(garbage)], "not a checkpoint (not a .npz file)"),
        (["eval", "--checkpoint", str(run), "--data-dir", str(small)], "was trained on other data"),
        (["train", *TINY, "--out", str(run), "--resume", "--hidden", "64"], "different settings"),
        (["train", *TINY, "--out", str(run)], "already holds a run"),
        (["train", "--resume"], "--resume needs --out"),
        (["train", *TINY, "--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o1")],
         "data directory not found"),
        (["train", *TINY, "--data-dir", str(write_npz_data(tmp_path / "big", 3.0)), "--out", str(tmp_path / "o2")],
         "outside [0, 1]"),
        (["train", *TINY, "--data-dir", str(write_npz_data(tmp_path / "nan", np.nan)), "--binarize", "none",
          "--likelihood", "gaussian", "--out", str(tmp_path / "o3")], "NaN"),
        (["manifold", "--checkpoint", str(tmp_path / "z20")], "2-D latent"),
        (["train", *TINY, "--likelihood", "gaussian", "--out", str(tmp_path / "o4")], "Bernoulli"),
    ]


def test_threads_takes_any_count_for_train_eval_and_sample(run_dir, tmp_path, capsys, monkeypatch):
    """--threads N, any N >= 1 (here more than this machine's cores), on train, eval and sample alike: each
    command runs inside minivae.fast.threads.using(N), which sets BLAS (threadpoolctl) and numba's threads."""
    from minivae.fast import threads
    out, _ = run_dir
    seen = []
    real = threads.using

    def spy(n=None):
        seen.append(n)
        return real(n)
    monkeypatch.setattr(threads, "using", spy)
    assert run_main(["train", *SMALL, "--threads", "8", "--out", tmp_path / "t8"], capsys)[0] == 0
    assert 8 in seen and json.loads((tmp_path / "t8" / "settings.json").read_text())["threads"] == 8
    seen.clear()
    assert run_main(["eval", "--checkpoint", out, "--n", "50", "--threads", "3"], capsys)[0] == 0
    assert seen == [3]
    seen.clear()
    assert run_main(["sample", "--checkpoint", out, "--n", "4", "--out", tmp_path / "s", "--threads", "5"],
                    capsys)[0] == 0
    assert seen == [5]
    assert "--threads" in run_main(["eval", "--help"], capsys)[1]


def test_clear_errors_in_process(run_dir, tmp_path, capsys):
    out, _ = run_dir
    run = tmp_path / "run"
    shutil.copytree(out, run)
    assert main(["train", "--n-train", "64", "--n-test", "32", "--epochs", "1", "--hidden", "8", "--no-figures",
                 "--quiet", "--out", str(tmp_path / "z20")]) == 0
    capsys.readouterr()
    for argv, fragment in error_cases(tmp_path, run):
        try:
            code = main(argv)
        except SystemExit as exc:                  # argparse's own errors
            code = exc.code
        err = capsys.readouterr().err
        assert code == 2, (argv, err)
        assert_clean_error(err, fragment)
        assert len(err.strip().splitlines()) == 1, f"{argv}: not one line:\n{err}"


def test_clear_errors_in_a_subprocess(tmp_path):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"\x00" * 10)
    for args, fragment in ((["train", "--bogus"], "unrecognized arguments"),
                           (["eval", "--checkpoint", garbage], "not a checkpoint (not a .npz file)"),
                           (["train", "--backend", "cupy", "--n-train", "64", "--out", tmp_path / "gpu"], None)):
        r = cli(*args)
        if r.returncode == 0:                       # only the cupy case can succeed (on a GPU machine)
            continue
        assert r.returncode == 2, r.stderr
        assert_clean_error(r.stderr, fragment)


def test_ctrl_c_keeps_the_last_checkpoint(tmp_path):
    out = tmp_path / "long"
    p = subprocess.Popen([sys.executable, "-m", "minivae", "train", "--n-train", "4096", "--n-test", "64",
                          "--batch-size", "16", "--epochs", "5000", "--hidden", "16", "--latent", "2",
                          "--no-figures", "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=ENV)
    try:
        deadline = time.time() + 120
        while not (out / "checkpoint.npz").exists():
            assert p.poll() is None and time.time() < deadline, "no checkpoint was written"
            time.sleep(0.1)
        time.sleep(0.3)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("minivae: interrupted at epoch") and "checkpoint kept at" in last
    c = load_checkpoint(out / "checkpoint.npz")
    assert c.epoch >= 1 and len(c.history) == c.epoch
    assert [f for f in os.listdir(out) if f.endswith(".tmp")] == []


# ---------------------------------------------------------------------------------------------------------
# exit codes, versions, help, logs, backend (issues 14, 17, 19)
SMALL = ["--n-train", "64", "--n-test", "32", "--epochs", "1", "--batch-size", "32", "--hidden", "8",
         "--no-figures", "--quiet"]


def run_main(argv, capsys):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:                      # argparse: --help, --version, bad flags
        code = exc.code
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def one_error_line(err, fragment):
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("minivae: error:"), err
    assert fragment in lines[0], lines[0]


def test_version_has_one_source(capsys):
    text = (ROOT / "pyproject.toml").read_text()
    static = re.search(r'^version\s*=\s*"([^"]+)"', text, re.M)
    if static:                                     # a literal version must equal the package's
        assert static.group(1) == minivae.__version__
    else:                                          # or it is read from minivae.__version__
        assert re.search(r'^version\s*=\s*\{\s*attr\s*=\s*"minivae.__version__"', text, re.M)
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", minivae.__version__)
    code, out, _ = run_main(["--version"], capsys)
    assert code == 0 and out.strip() == f"minivae {minivae.__version__}"
    r = cli("--version", timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == f"minivae {minivae.__version__}"


def test_every_option_and_subcommand_has_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    summaries = {a.dest: a.help for a in sub._choices_actions}
    for name, p in [("minivae", parser)] + list(sub.choices.items()):
        if name != "minivae":
            assert summaries.get(name), f"{name} has no summary in the command list"
            assert p.description, f"{name} has no description"
        for action in p._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            what = f"{name} {'/'.join(action.option_strings) or action.dest}"
            assert action.help and action.help != argparse.SUPPRESS, f"{what} has no help"


def test_recipe_help_lists_the_recipes(capsys):
    from minivae.recipes import RECIPES
    code, out, _ = run_main(["train", "--help"], capsys)
    assert code == 0 and "(default: default)" not in out
    text = " ".join(out.split())
    start = text.rindex("--recipe RECIPE")              # the option list (the first is the usage line)
    for name in RECIPES:
        assert name in text[start:start + 400], name


def test_exit_codes(tmp_path, capsys, monkeypatch):
    import minivae.train as tr
    assert run_main(["train", *SMALL, "--out", tmp_path / "ok"], capsys)[0] == 0
    code, _, err = run_main(["train", *SMALL, "--out", tmp_path / "ok"], capsys)   # already holds a run
    assert code == 2
    one_error_line(err, "already holds a run")
    assert run_main(["train", "--bogus"], capsys)[0] == 2

    def interrupted(*a, **k):
        raise tr.TrainingInterrupted("interrupted at epoch 1, step 1; no checkpoint was written yet")
    monkeypatch.setattr(tr, "train", interrupted)
    code, _, err = run_main(["train", *SMALL, "--out", tmp_path / "int"], capsys)
    assert code == 130 and err.strip() == "minivae: interrupted at epoch 1, step 1; no checkpoint was written yet"

    def terminated(*a, **k):
        raise tr.TrainingInterrupted("terminated (SIGTERM) at epoch 1, step 1; no checkpoint was written yet",
                                     signal.SIGTERM)
    monkeypatch.setattr(tr, "train", terminated)
    assert run_main(["train", *SMALL, "--out", tmp_path / "term"], capsys)[0] == 143


def test_a_diverged_run_exits_1(tmp_path, capsys):
    # obs_var 1e-12: a finite loss of about 1e12 nats per image, far above the 1e6 limit
    code, _, err = run_main(["train", *SMALL, "--likelihood", "gaussian", "--binarize", "none", "--obs-var",
                             "1e-12", "--out", tmp_path / "div"], capsys)
    assert code == 1, err
    one_error_line(err, "above 1e+06 nats per example")
    assert "no checkpoint was written yet" in err


@pytest.mark.parametrize("flags, fragment", [
    (["--adam-eps", "-1"], "adam_eps must be positive"),
    (["--momentum", "1.5", "--optimizer", "sgd"], "momentum must be in [0, 1)"),
    (["--weight-decay", "-1"], "weight_decay must be >= 0"),
    (["--lr", "nan"], "lr must be a finite number"),
    (["--clip-norm", "inf"], "clip_norm must be a finite number"),
    (["--hidden", "1e8"], "needs about"),
    (["--hidden", "100000000"], "needs about"),
    (["--latent", "1e8"], "needs about"),
])
def test_bad_settings_are_refused_before_anything_runs(flags, fragment, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(minivae.VAE, "__init__", lambda *a, **k: pytest.fail("a model was built"))
    code, _, err = run_main(["train", *SMALL, *flags, "--out", tmp_path / "o"], capsys)
    assert code == 2
    one_error_line(err, fragment)
    assert not (tmp_path / "o").exists()


def test_quiet_keeps_the_header_and_piped_logs_have_no_bar(tmp_path, capsys):
    for quiet in (True, False):
        out = tmp_path / f"q{quiet}"
        argv = ["train", *SMALL, "--epochs", "2", "--out", out]
        if not quiet:
            argv.remove("--quiet")
        code, stdout, err = run_main(argv, capsys)
        assert code == 0
        header = [line for line in stdout.splitlines() if line.startswith("training ")]
        assert len(header) == 1, stdout
        assert "VAE(784-8-20" in header[0] and "the embedded MNIST" in header[0] and str(out) in header[0]
        assert len([line for line in stdout.splitlines() if line.startswith("epoch")]) == 2
        assert "\r" not in err and "it/s" not in err           # stderr is not a terminal: no bar


def test_eval_prints_iw_k_only_when_asked(run_dir, capsys):
    out, _ = run_dir
    code, stdout, _ = run_main(["eval", "--checkpoint", out, "--n", "64"], capsys)
    assert code == 0 and "importance-weighted" not in stdout and "NLL" not in stdout
    code, stdout, _ = run_main(["eval", "--checkpoint", out, "--n", "64", "--iw-k", "2"], capsys)
    assert code == 0 and "importance-weighted with k = 2:" in stdout and "iw_nll" not in stdout


def test_eval_of_a_few_images_does_not_warn_of_collapse(run_dir, capsys):
    out, _ = run_dir
    code, stdout, _ = run_main(["eval", "--checkpoint", out, "--n", "1"], capsys)
    assert code == 0 and "posterior collapse" not in stdout
    assert "active units not counted: they need at least 20 examples, got 1" in stdout


def test_eval_refuses_a_non_finite_checkpoint_and_json_is_strict(run_dir, tmp_path, capsys):
    out, _ = run_dir
    with np.load(out / "checkpoint.npz") as z:
        arrays = {k: z[k] for k in z.files}
    good = tmp_path / "good.json"
    assert run_main(["eval", "--checkpoint", out, "--n", "64", "--json", good], capsys)[0] == 0
    json.loads(good.read_text(), parse_constant=lambda c: pytest.fail(f"bare {c} in the JSON"))
    arrays["param/dec.out.b"] = arrays["param/dec.out.b"].copy()
    arrays["param/dec.out.b"][5] = np.nan
    bad = tmp_path / "nan.npz"
    np.savez(bad, **arrays)
    code, stdout, err = run_main(["eval", "--checkpoint", bad, "--json", tmp_path / "e.json"], capsys)
    assert code == 2 and "test -ELBO" not in stdout
    one_error_line(err, "holds NaN or inf")
    assert str(bad) in err and not (tmp_path / "e.json").exists()


def test_random_bytes_are_not_a_checkpoint(tmp_path, capsys):
    p = tmp_path / "random.npz"
    p.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    code, _, err = run_main(["eval", "--checkpoint", p], capsys)
    assert code == 2
    one_error_line(err, f"{p}: not a checkpoint (not a .npz file)")


def test_corrupt_checkpoint_history_on_resume_is_one_line(run_dir, tmp_path, capsys):
    out, _ = run_dir
    run = tmp_path / "run"
    shutil.copytree(out, run)
    with np.load(run / "checkpoint.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["history"] = np.array('{"epoch": 2}')
    np.savez(run / "checkpoint.npz", **arrays)
    code, _, err = run_main(["train", "--out", run, "--resume", "--epochs", "3", "--no-figures"], capsys)
    assert code == 2
    one_error_line(err, "corrupt field history: expected a list")
    assert str(run / "checkpoint.npz") in err


def test_results_folder_needs_force(tmp_path, capsys):
    out = tmp_path / "r"
    out.mkdir()
    (out / "results.json").write_text('{"keep": 1}')
    code, _, err = run_main(["train", *SMALL, "--out", out], capsys)
    assert code == 2
    one_error_line(err, "is not empty (it holds results.json)")
    assert json.loads((out / "results.json").read_text()) == {"keep": 1}
    assert run_main(["train", *SMALL, "--out", out, "--force"], capsys)[0] == 0
    assert "test" in json.loads((out / "results.json").read_text())


def test_default_folders_are_unique(tmp_path, capsys, monkeypatch):
    import minivae.train.run_folder as tr
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tr.time, "time", lambda: 1_767_000_000.5)      # both runs start in the same microsecond
    for _ in range(2):
        assert run_main(["train", *SMALL], capsys)[0] == 0
    runs = sorted((tmp_path / "runs").iterdir())          # the two runs, and runs/latest pointing at one
    assert len(runs) == 3 and all((r / "checkpoint.npz").exists() for r in runs)
    code, _, _ = run_main(["train", *SMALL, "--data-dir", tmp_path / "nowhere"], capsys)
    assert code == 2 and sorted((tmp_path / "runs").iterdir()) == runs      # a failed run leaves no folder


def test_train_with_one_test_image_writes_results_and_figures(tmp_path, capsys):
    argv = ["train", *SMALL, "--n-test", "1", "--latent", "2", "--out", tmp_path / "one"]
    argv.remove("--no-figures")
    code, _, err = run_main(argv, capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "one" / "results.json").read_text())["test"]["n"] == 1
    assert (tmp_path / "one" / "figures" / "interpolation.png").exists()


def test_big_requests_are_refused_or_chunked(run_dir, tmp_path, capsys):
    out, _ = run_dir
    code, _, err = run_main(["manifold", "--checkpoint", out, "--grid", "300", "--out", tmp_path], capsys)
    assert code == 2
    one_error_line(err, "--grid is at most 100")
    code, _, err = run_main(["interpolate", "--checkpoint", out, "--steps", "100000", "--out", tmp_path], capsys)
    assert code == 2
    one_error_line(err, "--steps is at most 100")
    code, stdout, _ = run_main(["sample", "--checkpoint", out, "--n", "2000", "--out", tmp_path], capsys)
    assert code == 0 and "samples.npz" in stdout
    with np.load(tmp_path / "samples.npz") as z:
        assert z["x"].shape == (2000, 784)


def test_sample_100000_stays_under_1_gb(run_dir, tmp_path):
    out, _ = run_dir
    code = ("import resource, sys; from minivae.cli import main; "
            f"rc = main(['sample', '--checkpoint', {str(out)!r}, '--n', '100000', '--out', {str(tmp_path)!r}]); "
            "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr
    rss_kb = int(r.stdout.split("MAXRSS_KB")[1].split()[0])
    assert rss_kb < 1024 * 1024, f"peak RSS {rss_kb / 1024:.0f} MB"
    with np.load(tmp_path / "samples.npz", mmap_mode=None) as z:
        x = z["x"]
        assert x.shape == (100000, 784) and np.isfinite(x[-10:]).all()


@pytest.mark.skipif(minivae.cupy_available(), reason="a usable GPU is here: MINIVAE_BACKEND=cupy would just work")
def test_minivae_backend_is_honoured_and_the_flag_wins(run_dir, tmp_path, capsys, monkeypatch):
    out, _ = run_dir
    monkeypatch.setenv("MINIVAE_BACKEND", "cupy")
    code, _, err = run_main(["train", *SMALL, "--out", tmp_path / "gpu"], capsys)
    assert code == 2
    one_error_line(err, "backend 'cupy' was requested")
    assert not (tmp_path / "gpu" / "checkpoint.npz").exists()
    code, _, err = run_main(["eval", "--checkpoint", out, "--n", "32"], capsys)
    assert code == 2
    one_error_line(err, "backend 'cupy' was requested")
    assert run_main(["eval", "--checkpoint", out, "--n", "32", "--backend", "numpy"], capsys)[0] == 0
    assert run_main(["train", *SMALL, "--backend", "numpy", "--out", tmp_path / "cpu"], capsys)[0] == 0
    assert load_checkpoint(tmp_path / "cpu").settings["backend"] == "numpy"


# ---------------------------------------------------------------------------------------------------------
# data provenance
def test_data_provenance_is_recorded_and_checked(tmp_path, capsys, monkeypatch):
    import hashlib
    dir_a = write_npz_data(tmp_path / "A")
    copy = tmp_path / "copy_of_A"
    shutil.copytree(dir_a, copy)
    monkeypatch.setenv("MINIVAE_DATA", str(dir_a))
    run = tmp_path / "run"
    assert run_main(["train", "--epochs", "1", "--batch-size", "8", "--hidden", "8", "--no-figures", "--quiet",
                     "--out", run], capsys)[0] == 0
    rec = json.loads((run / "settings.json").read_text())["data"]
    assert rec["path"] == str(dir_a.resolve())
    assert rec["files"] == {n: [len((dir_a / n).read_bytes()), hashlib.sha256((dir_a / n).read_bytes()).hexdigest()]
                            for n in ("train.npz", "test.npz")}
    final = json.loads((run / "results.json").read_text())["test"]
    monkeypatch.delenv("MINIVAE_DATA")                         # a fresh shell: the run still reads A
    js = tmp_path / "e.json"
    assert run_main(["eval", "--checkpoint", run, "--json", js], capsys)[0] == 0
    doc = json.loads(js.read_text())
    assert doc["n"] == 16 and doc["neg_elbo"] == pytest.approx(final["neg_elbo"], rel=1e-6)
    assert run_main(["train", "--out", run, "--resume", "--epochs", "2", "--no-figures", "--quiet"], capsys)[0] == 0
    assert load_checkpoint(run).history[-1]["epoch"] == 2
    write_npz_data(dir_a, value=0.5)                           # the data changed under the run
    for argv in (["eval", "--checkpoint", run],
                 ["train", "--out", run, "--resume", "--epochs", "3", "--no-figures", "--quiet"]):
        code, _, err = run_main(argv, capsys)
        assert code == 2
        one_error_line(err, "which is missing or has changed")
    assert load_checkpoint(run).epoch == 2
    assert run_main(["eval", "--checkpoint", run, "--data-dir", copy], capsys)[0] == 0    # same files elsewhere
    code, _, err = run_main(["eval", "--checkpoint", run, "--data-dir", dir_a], capsys)
    assert code == 2
    one_error_line(err, "was trained on other data than")


def test_the_embedded_folder_is_the_same_data(run_dir, tmp_path, capsys):
    out, _ = run_dir
    run = tmp_path / "run"
    shutil.copytree(out, run)
    assert run_main(["eval", "--checkpoint", run, "--n", "64", "--data-dir", embedded_dir()], capsys)[0] == 0
    code, _, err = run_main(["train", "--out", run, "--resume", "--epochs", "3", "--no-figures", "--quiet",
                             "--data-dir", embedded_dir()], capsys)
    assert code == 0, err
    assert load_checkpoint(run).epoch == 3


# ---------------------------------------------------------------------------------------------------------
# a running run: its lock, SIGTERM, and the temporary files a SIGKILL leaves
def test_sigterm_and_the_lock_of_a_running_run(tmp_path, capsys):
    out = tmp_path / "long"
    p = subprocess.Popen([sys.executable, "-m", "minivae", "train", "--n-train", "4096", "--n-test", "64",
                          "--batch-size", "16", "--epochs", "5000", "--hidden", "16", "--latent", "2",
                          "--no-figures", "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=ENV)
    try:
        deadline = time.time() + 120
        while not (out / "checkpoint.npz").exists():
            assert p.poll() is None and time.time() < deadline, "no checkpoint was written"
            time.sleep(0.1)
        for argv in (["train", "--out", out, "--resume", "--epochs", "5001", "--no-figures"],
                     ["train", *SMALL, "--out", out, "--force"]):
            code, _, err = run_main(argv, capsys)
            assert code == 2
            one_error_line(err, f"{out} is in use by another minivae run (PID {p.pid})")
        time.sleep(0.3)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 143, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("minivae: terminated (SIGTERM) at epoch"), last
    c = load_checkpoint(out)
    assert f"checkpoint kept at {out / 'checkpoint.npz'} (epoch {c.epoch})" in last
    assert [f for f in os.listdir(out) if f.endswith(".tmp")] == []
    assert [h["epoch"] for h in json.loads((out / "history.json").read_text())] == list(range(1, c.epoch + 1))
    stale = out / f".checkpoint.npz.{p.pid}.s1gk1ll_.tmp"  # what a SIGKILL during a save leaves
    stale.write_bytes(b"\0" * 1000)
    code, stdout, err = run_main(["train", "--out", out, "--resume", "--epochs", c.epoch + 1, "--no-figures",
                                  "--quiet"], capsys)
    assert code == 0, err
    assert f"removed 1 temporary file(s) left in {out} by an interrupted write: {stale.name}" in stdout
    assert not stale.exists() and load_checkpoint(out).epoch == c.epoch + 1
