import numpy as np
import pytest

from minivae.recipes import RECIPES, burda_stages, get_recipe, lr_at_epoch, output_bias_init


def test_burda_schedule_is_the_papers():
    stages = burda_stages()
    assert [p for p, _ in stages] == [3 ** i for i in range(8)]
    assert sum(p for p, _ in stages) == 3280 == get_recipe("burda2015")["epochs"]
    assert np.isclose(stages[0][1], 1e-3) and np.isclose(stages[7][1], 1e-4)   # 1e-3 * 10^(-7/7)
    r = get_recipe("burda2015")
    assert r["hidden"] == (200, 200) and r["latent"] == 50 and r["activation"] == "tanh"
    assert r["batch_size"] == 20 and r["adam_eps"] == 1e-4 and r["binarize"] == "dynamic"


def test_lr_at_epoch_walks_the_stages():
    sched = burda_stages()
    assert lr_at_epoch(sched, 0, 5.0) == sched[0][1]
    assert lr_at_epoch(sched, 1, 5.0) == sched[1][1] and lr_at_epoch(sched, 3, 5.0) == sched[1][1]
    assert lr_at_epoch(sched, 4, 5.0) == sched[2][1]
    assert lr_at_epoch(sched, 10_000, 5.0) == sched[-1][1]
    assert lr_at_epoch(None, 7, 5.0) == 5.0


def test_short_recipe_uses_the_same_rates_in_fewer_passes():
    short, full = get_recipe("burda2015-short"), get_recipe("burda2015")
    assert [lr for _, lr in short["schedule"]] == [lr for _, lr in full["schedule"]]
    assert short["epochs"] == sum(p for p, _ in short["schedule"]) < full["epochs"]
    assert {k: v for k, v in short.items() if k not in ("epochs", "schedule")} == \
        {k: v for k, v in full.items() if k not in ("epochs", "schedule")}


def test_output_bias_is_the_logit_of_the_mean_pixel():
    x = np.array([[0.0, 1.0, 0.5], [0.5, 1.0, 0.5]])
    b = output_bias_init(x)
    assert np.isclose(1 / (1 + np.exp(-b[2])), 0.5) and np.isclose(1 / (1 + np.exp(-b[0])), 0.25)
    assert np.isfinite(b).all() and b[1] > 10          # clipped, not inf


def test_unknown_recipe():
    with pytest.raises(ValueError, match="unknown recipe 'nope'"):
        get_recipe("nope")
    assert set(RECIPES) == {"default", "conv", "conditional", "burda2015", "burda2015-short"}


def test_conditional_recipe_is_the_default_model_with_outer_label_layers_and_an_annealed_kl():
    r, d = get_recipe("conditional"), get_recipe("default")
    assert r["conditional"] is True and r["label_decoder"] == r["label_encoder"] == "outer"
    assert r["beta_start"] > 1 and r["warmup"] >= 1
    assert {k: v for k, v in r.items() if k in d} == d          # the same networks, optimizer and schedule


def test_conv_recipe_is_the_issues():
    r = get_recipe("conv")
    assert r["arch"] == "conv" and r["hidden"] == (256,) and r["latent"] == 20 and r["likelihood"] == "bernoulli"
    assert r["binarize"] == "dynamic" and r["optimizer"] == "adam" and r["lr"] == 1e-3
    assert r["batch_size"] == 128 and r["epochs"] == 10
