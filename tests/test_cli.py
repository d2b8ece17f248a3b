"""The command line: an end-to-end run in a subprocess, every command, every clear-error case."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from minivae.checkpoint import load_checkpoint
from minivae.cli import main

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
        for part in ("train -ELBO", "test -ELBO", "recon", "KL", "valid -ELBO"):
            assert part in line
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
    exe = shutil.which("minivae")
    if exe is None:
        pytest.skip("the minivae console script is not on PATH (pip install -e . installs it)")
    r = subprocess.run([exe, "--help"], capture_output=True, text=True, env=ENV, timeout=60)
    assert r.returncode == 0 and "train" in r.stdout and "manifold" in r.stdout


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
        (["train", "--threads", "3"], "invalid choice: 3"),
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
        assert len([line for line in err.splitlines() if ": error:" in line]) == 1


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
                          "--batch-size", "16", "--epochs", "200", "--hidden", "16", "--latent", "2",
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
