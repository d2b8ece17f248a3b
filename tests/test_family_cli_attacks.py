"""Defects found by attacking the newest command-line features (M2, two stochastic layers, the model families)
as a careless user would, each reproduced here: every one of these failed before its fix."""
from pathlib import Path

import numpy as np
import pytest

from minivae import figures
from minivae.checkpoint import load_checkpoint
from minivae.cli import main
from minivae.backend import to_numpy
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


@pytest.mark.parametrize("flags,remedies", [(["--flow", "iaf:2"], "try KL warm-up)"),
                                            (["--prior", "mog:2"], "try KL warm-up)"),
                                            (["--labels", "20"], "their VAE)"),
                                            (["--stochastic-layers", "2"], "their VAE)"),
                                            (["--decoder", "made"], "try KL warm-up or free bits)")])
def test_eval_kl_per_dimension_adds_up_and_collapse_advice_is_offered(flags, remedies, tmp_path, capsys):
    # eval printed an analytic KL(q(z_j|x) || N(0, 1)) per dimension that, with a flow, a learned prior or M2,
    # did not add up to the model's KL printed above it (iaf: 0.15 against 3.41 nats); and its collapse warning
    # advised free bits or warm-up to models that train refuses them for
    from minivae.evaluate import collapse_remedies, collapse_warning, report
    from minivae.train.settings import TrainSettings
    out = tmp_path / "run"
    assert main(["train", *TINY, "--latent", "4", "--no-figures", *flags, "--out", str(out)]) == 0
    model = load_checkpoint(out).build_model("numpy")
    x = (np.random.default_rng(0).random((40, 784)) < 0.3).astype(np.float32)
    rep = report(model, x, np.random.default_rng(1))
    if rep["kl_per_dim"] is not None:
        assert np.isclose(sum(rep["kl_per_dim"]), rep["kl"], rtol=1e-5, atol=1e-6)
    else:
        assert "does not split" in rep["kl_note"]
    warning = collapse_warning(0, 4, collapse_remedies(model))     # what eval and train print on a collapse
    assert warning.endswith(remedies)
    for remedy, flag in (("KL warm-up", ["--warmup", "1"]), ("free bits", ["--free-bits", "0.5"])):
        kw = {"flow": None, "prior": None, "labels": None, "stochastic_layers": 1, "decoder": "factorised"}
        for f, v in zip(flags[::2], flags[1::2]):
            kw[f[2:].replace("-", "_")] = int(v) if v.isdigit() else v
        s = TrainSettings(**kw, **({"warmup": 1} if remedy == "KL warm-up" else {"free_bits": 0.5}))
        try:
            s.validate()
            offered = True
        except ValueError:
            offered = False
        assert offered == (remedy in warning), (flags, remedy)
    capsys.readouterr()
    assert main(["eval", str(out), "--n", "40"]) == 0
    text = capsys.readouterr().out
    per_dim = "KL per latent dimension (nats)" in text or "KL term per latent unit" in text
    assert per_dim != ("note: no KL per" in text)


@pytest.mark.parametrize("fields", [dict(stochastic_layers=2), dict(prior="mog:3"), dict(prior="vamp:4"),
                                    dict(decoder="made"), dict(flow="planar:2"), dict(labels=20)])
def test_samples_come_from_the_models_own_prior(fields):
    # the sample command and samples.png decoded z ~ N(0, I) whatever the model: two stochastic layers' z1 skipped
    # p(z1|z2), a mixture or VampPrior was ignored, and the MADE decoder drew its pixels from its own generator
    # instead of the sample seed
    from minivae.model import build_model
    from minivae.train.settings import TrainSettings
    config = TrainSettings(hidden=(8,), latent=3, dtype="float64", **fields).model_config(12, n_classes=4)
    model = build_model(config, rng=0)
    got = np.concatenate(list(figures.sample_chunks(model, 7, np.random.default_rng(5), chunk=7)))
    assert np.array_equal(got, to_numpy(model.sample(7, np.random.default_rng(5))))
    assert got.shape == (7, 12) and np.isfinite(got).all()
    if fields.get("prior") or fields.get("stochastic_layers"):      # the picture's title names the prior drawn
        assert "z ~ N(0, I)" not in figures.sample_title(model)


def test_no_manifold_of_two_stochastic_layers(tmp_path, capsys):
    # --stochastic-layers 2 --latent 1 --latent2 1 has z_dim = 2: manifold drew a grid over [z1, z2] whose rows
    # were all the same picture (the decoder reads z1 alone), in the run's figures and from the manifold command;
    # with another size it said "train with --latent 2", which for two layers still gives z_dim = 3
    out = tmp_path / "run"
    assert main(["train", *TINY, "--latent", "1", "--stochastic-layers", "2", "--latent2", "1", "--out", str(out)]) == 0
    assert (out / "figures" / "samples.png").exists() and not (out / "figures" / "manifold.png").exists()
    assert "decoder reads z1 alone" in _error(["manifold", str(out), "--grid", "3"], capsys)


@pytest.mark.parametrize("flow", ["iaf:2", "planar:2"])
def test_figures_of_a_flow_decode_where_the_decoder_reads(flow, monkeypatch, tmp_path):
    # reconstructions, interpolation and neighbourhood decoded q(z|x)'s base mean mu0(x) (and draws of the base
    # Gaussian), skipping the flow: points the decoder never reads (after 3 epochs of iaf:2, |f(mu0) - mu0| was as
    # large as |mu0| and the reconstruction error 240 nats instead of 208)
    from minivae.families import FamilyConfig, FamilyVAE
    m = FamilyVAE(FamilyConfig(x_dim=9, hidden=(6,), z_dim=3, flow=flow, dtype="float64"), rng=0)
    rng = np.random.default_rng(1)
    for k in m.params:
        if k.startswith("flow."):
            m.params[k] = m.params[k] + 0.7 * rng.standard_normal(m.params[k].shape)
    x = (rng.random((2, 9)) < 0.5).astype(np.float64)
    mu = m.encode(x)[0]
    fz = m._flow_forward(mu)[0]
    assert np.abs(fz - mu).max() > 1e-3
    assert np.allclose(m.reconstruct(x), m.decode(fz)) and not np.allclose(m.reconstruct(x), m.decode(mu))
    shown = {}
    monkeypatch.setattr(figures, "image_grid", lambda rows, *a, **k: shown.setdefault("rows", rows))
    figures.interpolation(m, x[[0]], x[[1]], tmp_path / "i.png", steps=3)
    assert np.allclose(shown["rows"][1], m.decode(fz[[0]])[0]) and np.allclose(shown["rows"][3], m.decode(fz[[1]])[0])


def test_resume_through_runs_latest_keeps_the_link(tmp_path, monkeypatch, capsys):
    # train --resume --out runs/latest pointed runs/latest at itself (latest -> latest) and failed with
    # "[Errno 17] File exists: 'runs/latest'"; every later 'latest' then failed too
    import os
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert main(["train", *TINY, "--no-figures", "--labels", "20"]) == 0
    run = os.readlink("runs/latest")
    assert main(["train", "--resume", "--out", "runs/latest", "--epochs", "2", "--quiet", "--no-figures"]) == 0
    assert os.readlink("runs/latest") == run
    assert load_checkpoint(Path("runs") / run).epoch == 2
    capsys.readouterr()
    assert main(["eval", "latest", "--n", "20"]) == 0 and "(epoch 2," in capsys.readouterr().out


def test_resume_m2_with_its_default_alpha_spelled_out(tmp_path, capsys):
    # --labels 20 trains with alpha = labels / 10 = 2; resuming with --alpha 2 was refused as a different run,
    # "alpha=None (this run: 2.0)"
    out = tmp_path / "run"
    assert main(["train", *TINY, "--no-figures", "--labels", "20", "--out", str(out)]) == 0
    err = _error(["train", "--resume", "--out", str(out), "--epochs", "2", "--alpha", "3"], capsys)
    assert "alpha=2.0 (this run: 3.0)" in err
    assert main(["train", "--resume", "--out", str(out), "--epochs", "2", "--alpha", "2", "--quiet"]) == 0
    assert load_checkpoint(out).epoch == 2


def test_a_reader_that_goes_away_stops_the_command_quietly(m2_run):
    # eval | head: eval printed "minivae: error: [Errno 32] Broken pipe" (and Python an "Exception ignored" line)
    # when the reader closed the pipe; now it stops as cat or grep do: nothing on stderr, exit 128 + SIGPIPE
    import signal
    import subprocess
    import sys
    p = subprocess.Popen([sys.executable, "-m", "minivae", "eval", str(m2_run), "--iw-k", "0"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()                       # before eval's first line: its first write meets a closed pipe
    err = p.stderr.read().decode()
    assert p.wait(timeout=300) == 128 + signal.SIGPIPE, err
    assert err == ""


@pytest.mark.parametrize("field, value, says", [("iwae_grad", "bogus", "iwae_grad must be one of"),
                                                ("decoder", "bogus", "decoder"),
                                                ("alpha", 2.0, "it needs --labels N")])
def test_an_invalid_hand_edited_setting_names_the_checkpoint(field, value, says, tmp_path, capsys):
    # a hand-edited settings field that has the right type but an impossible value was refused on resume and by
    # eval with the bare reason ("iwae_grad must be one of ..."), naming neither the file nor the field's place
    import json
    out = tmp_path / "run"
    assert main(["train", *TINY, "--no-figures", "--out", str(out)]) == 0
    ckpt = out / "checkpoint.npz"
    with np.load(ckpt) as z:
        arrays = {k: z[k] for k in z.files}
    settings = json.loads(str(arrays["settings"]))
    settings[field] = value
    arrays["settings"] = np.array(json.dumps(settings))
    np.savez(ckpt, **arrays)
    for argv in (["train", "--resume", "--out", str(out), "--epochs", "2", "--quiet"], ["eval", str(out)]):
        err = _error(argv, capsys)
        assert str(ckpt) in err and "invalid field settings" in err and says in err, err
