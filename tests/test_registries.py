"""Registries, not lists: an activation, a likelihood, an architecture, an optimizer or a recipe is registered
once, and the configuration's checks, the model, the fast path and the command line read the registries."""
import json

import numpy as np
import pytest

import minivae
from minivae import layers
from minivae.cli import build_parser, main
from minivae.config import VAEConfig
from minivae.gradcheck import check_model, check_op, rel_error
from minivae.layers import ACTIVATIONS, register_activation, sigmoid
from minivae.likelihoods import LIKELIHOODS
from minivae.model import LAYER_OPS, VAE
from minivae.networks import ARCHITECTURES, Layer
from minivae.optim import OPTIMIZERS
from minivae.recipes import RECIPES


# ---------------------------------------------------------------- a new activation, defined in this test only
def swish_forward(x):
    """y = x sigmoid(x)  (Swish / SiLU)."""
    s = sigmoid(x)
    return x * s, (x, s)


def swish_backward(dy, cache):
    """dy/dx = s + x s (1 - s), s = sigmoid(x)."""
    x, s = cache
    return dy * (s + x * s * (1 - s))


@pytest.fixture
def swish():
    """'swish' registered for one test, then removed: one function pair and one call, no other edit."""
    assert "swish" not in ACTIVATIONS
    register_activation("swish", swish_forward, swish_backward)
    yield "swish"
    del ACTIVATIONS["swish"]


def test_a_new_activation_gradient_checks(swish):
    rng = np.random.default_rng(0)
    fwd, bwd = layers.activation(swish)
    assert (fwd, bwd) == (swish_forward, swish_backward)
    rep = check_op(fwd, bwd, [rng.standard_normal((6, 5))], ["x"], rng)
    assert rep["x"] < 1e-7


def test_a_new_activation_trains_through_the_vae_and_its_fast_path(swish):
    from minivae.fast import FastTrainer
    rng = np.random.default_rng(1)
    cfg = VAEConfig(x_dim=7, hidden=(6, 5), z_dim=2, activation=swish, dtype="float64")
    x = (rng.random((9, 7)) < 0.4).astype(np.float64)
    rep = check_model(VAE(cfg, rng=0), x, rng=rng)              # the whole model, every parameter
    assert max(rep.values()) < 1e-6
    ref, fast = VAE(cfg, rng=0), VAE(cfg, rng=0)
    eps = rng.standard_normal((9, 2))
    tr = FastTrainer(fast, minivae.Adam(lr=1e-2))               # the fast path runs the registered op pair
    opt = minivae.Adam(lr=1e-2)
    first = float(ref.loss(x, eps)[0])
    for _ in range(20):
        opt.step(ref.params, ref.loss(x, eps)[1])
        tr.step(x, eps)
    assert float(ref.loss(x, eps, backward=False)[0]) < first
    assert rel_error(fast.flat, ref.flat) < 1e-10
    tr.close()


def test_a_new_activation_is_offered_and_checked_by_the_config_and_the_cli(swish, tmp_path, capsys):
    assert VAEConfig(activation=swish).activation == swish
    with pytest.raises(ValueError, match=r"unknown activation 'gelu'.*swish"):
        VAEConfig(activation="gelu")
    text = _help("train")
    assert "swish" in text
    code = main(["train", "--activation", swish, "--n-train", "64", "--n-test", "32", "--epochs", "1",
                 "--batch-size", "32", "--hidden", "8", "--no-figures", "--quiet", "--out", str(tmp_path / "r")])
    assert code == 0
    settings = json.loads((tmp_path / "r" / "settings.json").read_text())
    assert settings["activation"] == swish
    capsys.readouterr()


def test_without_registration_the_activation_is_refused(capsys):
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        VAEConfig(activation="swish")
    with pytest.raises(SystemExit):
        main(["train", "--activation", "swish"])
    assert "invalid choice: 'swish'" in capsys.readouterr().err


def _help(command):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices[command].format_help()


# ---------------------------------------------------------------- the CLI reads every registry
def _choices(command, dest):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return next(a for a in sub._actions if a.dest == dest).choices


@pytest.mark.parametrize("dest, registry", [("activation", ACTIVATIONS), ("likelihood", LIKELIHOODS),
                                            ("arch", ARCHITECTURES), ("optimizer", OPTIMIZERS),
                                            ("recipe", RECIPES)])
def test_the_cli_choices_are_the_registries(dest, registry):
    assert set(_choices("train", dest)) == set(registry)


def test_an_architectures_properties_replace_name_checks():
    assert not ARCHITECTURES["mlp"].image and ARCHITECTURES["conv"].image and ARCHITECTURES["conv-pool"].image
    assert VAEConfig(arch="conv").hidden == ARCHITECTURES["conv"].default_hidden == (256,)
    assert VAEConfig().hidden == ARCHITECTURES["mlp"].default_hidden == (400,)
    assert LIKELIHOODS["gaussian_learned_var"].heads == ("out", "out_logvar")
    m = VAE(VAEConfig(x_dim=6, hidden=(4,), z_dim=2, likelihood="gaussian_learned_var"), rng=0)
    assert [layer.name for layer in m.net.dec_heads] == ["dec.out", "dec.out_logvar"]


# ---------------------------------------------------------------- the layer ops: a table that refuses the unknown
def test_an_unknown_layer_op_raises_instead_of_running_another_op():
    m = VAE(VAEConfig(x_dim=6, hidden=(4,), z_dim=2), rng=0)
    h = np.zeros((3, 6), np.float32)
    with pytest.raises(ValueError, match=r"unknown layer op 'dconv'.*known: dense"):
        m._layer_forward(Layer("dconv", "enc.0", (6, 4), (2, 1)), h)
    with pytest.raises(ValueError, match="unknown layer op 'dconv'"):
        m._layer_backward(Layer("dconv", "enc.0", (6, 4), (2, 1)), h, None, m.new_grads())
    assert {"dense", "conv", "deconv", "act", "concat", "outer", "flatten", "unflatten", "maxpool", "upsample"} == set(LAYER_OPS)
