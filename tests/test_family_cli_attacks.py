"""Defects found by attacking the newest command-line features (M2, two stochastic layers, the model families)
as a careless user would, each reproduced here: every one of these failed before its fix."""
from pathlib import Path

import numpy as np
import pytest

from minivae import figures
from minivae.checkpoint import load_checkpoint
from minivae.cli import main
from minivae.m2 import M2Config, M2VAE

TINY = ["--n-train", "200", "--n-test", "50", "--hidden", "16", "--latent", "2", "--epochs", "1",
        "--batch-size", "50", "--quiet"]


@pytest.fixture(scope="module")
def m2_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("m2") / "run"
    assert main(["train", *TINY, "--labels", "20", "--out", str(out)]) == 0
    return out


def _error(argv, capsys):
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("minivae: error:") and "\n" not in err and "Traceback" not in err
    return err


def test_m2_samples_draw_their_class_from_the_prior():
    # sample_chunks (the sample command, the run's samples.png) decoded every M2 sample as class 0: p(x|y=0, z)
    m = M2VAE(M2Config(x_dim=6, hidden=(5,), z_dim=2, classes=4, dtype="float64"), rng=0)
    got = np.concatenate(list(figures.sample_chunks(m, 40, np.random.default_rng(3))))
    want = m.sample(40, np.random.default_rng(3))        # y ~ p(y), then z ~ N(0, I)
    assert np.array_equal(got, want)
    zero = m.decode(np.random.default_rng(3).standard_normal((40, 2)), 0)
    assert not np.allclose(got, zero)
    one = np.concatenate(list(figures.sample_chunks(m, 5, np.random.default_rng(4), y=1)))
    assert np.array_equal(one, m.decode(np.random.default_rng(4).standard_normal((5, 2)), 1))


def test_m2_sample_label_manifold_label_and_interpolation_use_the_class(m2_run, capsys):
    # --label was refused for M2 ("unconditional (train with --conditional)") though its decoder reads the class
    assert main(["sample", str(m2_run), "--label", "3"]) == 0
    assert (m2_run / "figures" / "samples_label3.png").exists()
    assert "--label 0..9 (got 10)" in _error(["sample", str(m2_run), "--label", "10"], capsys)
    assert main(["manifold", str(m2_run), "--label", "4", "--grid", "3"]) == 0
    # interpolate decoded every frame as class 0 whatever the two digits were: now, as a conditional model, it
    # takes two digits of one label (test images 0 and 1 are a 7 and a 2) and decodes with that label
    assert "two digits of one label" in _error(["interpolate", str(m2_run), "--a", "0", "--b", "1"], capsys)
    assert main(["interpolate", str(m2_run), "--a", "0"]) == 0
    # the run's own figures: the class grid (one row per class), as for a conditional model
    assert (m2_run / "figures" / "class_grid.png").exists()


def test_m2_figures_decode_with_the_digits_label(m2_run, tmp_path):
    ckpt = load_checkpoint(m2_run)
    model = ckpt.build_model("numpy")
    assert figures.label_classes(model) == 10
    grid = figures.class_grid_images(model, np.random.default_rng(0), n_cols=2)
    assert grid.shape == (20, 784) and not np.allclose(grid[:2], grid[2:4])
