"""The command line as a newcomer meets it: runs named positionally or as ``latest``, ``sample`` never
replacing a picture it was not asked to, eval output for people (and JSON for machines), flags that cannot be
confused, every default in ``--help``, the assignments tool as a subcommand, and epoch lines that fit a terminal."""
import argparse
import json
import os
from pathlib import Path

import pytest

from minivae.cli import build_parser, main
from minivae.train.loop import EPOCH_COLUMNS, format_epoch

TINY = ["--n-train", "256", "--n-test", "64", "--epochs", "1", "--batch-size", "64", "--hidden", "16",
        "--latent", "2", "--threads", "1"]


def run_main(argv, capsys):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A folder holding two default training runs (runs/<recipe>-<stamp>); returns it and the runs' folders."""
    home = tmp_path_factory.mktemp("home")
    old = os.getcwd()
    os.chdir(home)
    try:
        assert main(["train", *TINY, "--quiet"]) == 0
        first = sorted(Path("runs").glob("default-*"))
        assert main(["train", *TINY, "--quiet", "--no-figures", "--seed", "1"]) == 0
        second = sorted(set(Path("runs").glob("default-*")) - set(first))
    finally:
        os.chdir(old)
    assert len(first) == 1 and len(second) == 1
    return home, first[0].name, second[0].name


@pytest.fixture
def home(runs, monkeypatch):
    monkeypatch.chdir(runs[0])
    return runs


def test_runs_latest_is_a_relative_link_to_the_newest_run(home):
    _, first, second = home
    link = Path("runs/latest")
    assert link.is_symlink() and os.readlink(link) == second
    assert (link / "checkpoint.npz").is_file()


def test_eval_takes_the_run_positionally_as_latest_or_as_checkpoint(home, capsys):
    _, first, second = home
    outs = []
    for argv in (["eval", f"runs/{first}"], ["eval", "latest"], ["eval", "runs/latest"], ["eval", "--checkpoint", f"runs/{second}"]):
        code, out, err = run_main(argv + ["--n", "32"], capsys)
        assert code == 0, err
        outs.append(out.splitlines()[1])
    assert outs[1] == outs[2] == outs[3] != outs[0]      # latest is the second run


def test_eval_asks_for_the_run_in_one_line(home, capsys):
    code, _, err = run_main(["eval", "--n", "32"], capsys)
    assert code == 2 and err.startswith("minivae: error: which run?") and len(err.strip().splitlines()) == 1
    code, _, err = run_main(["eval", "runs/latest", "--checkpoint", "runs/other"], capsys)
    assert code == 2 and "give the run once" in err


def test_latest_without_runs_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main(["sample", "latest"], capsys)
    assert code == 2 and "no runs/latest here" in err and "Traceback" not in err


def test_eval_prints_names_and_units_not_raw_keys(home, capsys):
    code, out, _ = run_main(["eval", "latest", "--n", "32", "--nll-k", "2"], capsys)
    assert code == 0
    for raw in ("iw_nll_sem", "au_threshold", "iw_seconds", "n_latent", "neg_elbo", "iw_k"):
        assert raw not in out
    assert "nats/image" in out and "importance-weighted with k = 2" in out and "active latent units" in out


def test_eval_json_dash_prints_only_json_on_stdout(home, capsys):
    code, out, _ = run_main(["eval", "latest", "--n", "32", "--json", "-"], capsys)
    doc = json.loads(out)
    assert code == 0 and doc["n"] == 32 and doc["iw_nll"] is None
    assert os.path.realpath(doc["checkpoint"]).startswith(os.path.realpath("runs"))
    assert not Path("-").exists()


def test_iw_k_is_an_alias_of_nll_k_and_the_help_tells_training_from_evaluation(capsys):
    p = build_parser()
    assert p.parse_args(["eval", "r", "--iw-k", "7"]).iw_k == p.parse_args(["eval", "r", "--nll-k", "7"]).iw_k == 7
    assert p.parse_args(["train", "--iw-k", "7"]).iw_k == p.parse_args(["train", "--nll-k", "7"]).iw_k == 7
    code, out, _ = run_main(["train", "--help"], capsys)
    text = " ".join(out.split())
    assert "--nll-k K, --iw-k K" in text and "evaluates only; --iwae-k trains" in text
    assert "a training objective; --nll-k only evaluates" in text
    # the old name is only an alias: help and messages name --nll-k, so the two k's are never mixed up
    assert text.count("--iw-k") == 1 and "only --epochs, --nll-k," in text


def test_sample_writes_a_new_file_and_never_replaces_the_runs_picture(home, capsys):
    _, first, _ = home
    figures = Path("runs") / first / "figures"
    before = (figures / "samples.png").read_bytes()
    code, out, _ = run_main(["sample", f"runs/{first}", "--n", "4"], capsys)
    assert code == 0 and out.strip() == f"wrote {figures / 'samples-2.png'}"
    code, out, _ = run_main(["sample", f"runs/{first}", "--n", "4"], capsys)
    assert code == 0 and out.strip() == f"wrote {figures / 'samples-3.png'}"
    assert (figures / "samples.png").read_bytes() == before


def test_sample_draws_the_same_grid_for_a_seed_and_another_for_another_seed(home, tmp_path, capsys):
    """What the README promises: `sample RUN --seed 1` draws new samples; the same seed draws the same ones."""
    import numpy as np
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        assert run_main(["sample", "latest", "--n", "1100", "--seed", seed, "--out", tmp_path / f"{name}.npz"],
                        capsys)[0] == 0
    a, b, c = (np.load(tmp_path / f"{name}.npz")["x"] for name in "abc")
    assert np.array_equal(a, b) and not np.allclose(a, c)


def test_sample_out_is_a_file_or_a_folder_as_its_name_says(home, tmp_path, capsys):
    assert run_main(["sample", "latest", "--n", "4", "--out", tmp_path / "x.png"], capsys)[0] == 0
    assert (tmp_path / "x.png").is_file()
    assert run_main(["sample", "latest", "--n", "4", "--out", tmp_path / "pics"], capsys)[0] == 0
    assert (tmp_path / "pics" / "samples.png").is_file()
    assert run_main(["sample", "latest", "--n", "1100", "--out", tmp_path / "many.npz"], capsys)[0] == 0
    assert (tmp_path / "many.npz").is_file()
    code, _, err = run_main(["sample", "latest", "--n", "1100", "--out", tmp_path / "many.png"], capsys)
    assert code == 2 and "name a .npz file or a folder" in err and not (tmp_path / "many.png").exists()


def test_a_run_outside_runs_leaves_latest_alone(home, tmp_path, capsys):
    _, _, second = home
    assert run_main(["train", *TINY, "--quiet", "--no-figures", "--out", tmp_path / "elsewhere"], capsys)[0] == 0
    assert os.readlink("runs/latest") == second


def test_a_default_run_that_fails_at_once_puts_latest_back(home, capsys):
    _, _, second = home
    code, _, err = run_main(["train", *TINY, "--quiet", "--data-dir", "no-such-folder"], capsys)
    assert code == 2 and "Traceback" not in err
    assert os.readlink("runs/latest") == second


def test_the_assignments_tool_is_a_subcommand(capsys):
    code, out, _ = run_main(["--help"], capsys)
    assert code == 0 and "assignments" in out
    code, out, _ = run_main(["assignments", "list"], capsys)
    assert code == 0 and "dense_backward" in out
    code, out, _ = run_main(["assignments", "--help"], capsys)
    assert code == 0 and "make" in out and "grade" in out


def _valued_options(parser):
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        for action in p._actions:
            if action.option_strings and action.nargs != 0 and action.dest != "help":
                yield name, action


def test_every_option_with_a_value_shows_its_default_in_help():
    missing = [f"{name} {action.option_strings[0]}" for name, action in _valued_options(build_parser())
               if "default" not in (action.help or "") and action.option_strings[0] not in ("--checkpoint", "--url")
               and not (name == "sample" and action.dest == "label")]
    assert not missing, f"options whose --help gives no default: {missing}"


def test_epoch_lines_fit_100_columns():
    rec = dict(epoch=1, train_neg_elbo=164.569, test_neg_elbo=127.034, test_recon=106.675, test_kl=20.36,
               lr=0.001, beta=1.0, time_s=66.4)
    assert len(format_epoch(rec, 10)) <= 100
    assert len(format_epoch(dict(rec, valid_neg_elbo=130.123), 10)) <= 100
    assert len(format_epoch(dict(rec, epoch=3280, lr=0.000518, beta=0.5714), 3280)) <= 100
    assert len(EPOCH_COLUMNS) <= 100
    line = format_epoch(dict(rec, valid_neg_elbo=130.123), 10)
    assert line.startswith("epoch  1/10  train 164.569  valid 130.123  test 127.034 = 106.675 + 20.360")
