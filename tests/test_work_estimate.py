"""The work estimate that ``train`` and ``eval`` check before they start (minivae.limits): each model family counts
the passes it makes per example, so the estimate of M2, two stochastic layers, the MADE decoder, the flows,
IWAE K and the convolutions is a lower bound of the right size, not of a plain VAE's."""
import pytest

from minivae.config import VAEConfig
from minivae.families import FamilyConfig
from minivae.limits import example_macs, iw_macs, training_macs
from minivae.m2 import M2Config
from minivae.twolayer import TwoLayerConfig


@pytest.mark.parametrize("hidden", [(500,), (300, 100)])
def test_m2_costs_about_k_plain_vaes_of_the_same_widths(hidden):
    """An unlabelled digit enumerates the K classes: the decoder and all of the encoder but its shared x @ W run
    K times.  The decoder mirrors the encoder, so it is about half the plain VAE's work: M2 costs at least K/2
    plain VAEs, and at most K + 1 (K encoder-and-decoder passes plus a classifier no bigger than the encoder)."""
    plain, m2 = VAEConfig(hidden=hidden, z_dim=50), M2Config(hidden=hidden, z_dim=50)
    K = m2.classes
    ratio = training_macs(m2, 50_000, 1, n_labelled=100) / training_macs(plain, 50_000, 1)
    assert K / 2 <= ratio <= K + 1, ratio
    assert K / 2 <= iw_macs(m2, 10_000, 100) / iw_macs(plain, 10_000, 100) <= K + 1
    # a labelled digit costs one class: all labelled is about one plain VAE and a classifier
    assert training_macs(m2, 1000, 1, n_labelled=1000) < 2.5 * training_macs(plain, 1000, 1)


def test_train_logs_the_m2_estimate_with_the_classes_counted(tmp_path, monkeypatch):
    import minivae.limits as limits
    from minivae.cli import main
    seen = []
    monkeypatch.setattr(limits, "check_work", lambda macs, what, advice, backend="numpy": seen.append(macs))
    small = ["--n-train", "200", "--n-test", "20", "--epochs", "1", "--batch-size", "100", "--hidden", "40",
             "--latent", "4", "--quiet", "--no-figures"]
    assert main(["train", *small, "--out", str(tmp_path / "vae")]) == 0
    assert main(["train", *small, "--labels", "20", "--out", str(tmp_path / "m2")]) == 0
    assert len(seen) == 2
    assert seen[1] == training_macs(M2Config(hidden=(40,), z_dim=4), 200, 1, n_labelled=20)
    assert 5 <= seen[1] / seen[0] <= 11


def test_every_family_counts_its_passes():
    plain = VAEConfig(hidden=(200,), z_dim=20)
    enc, dec = example_macs(plain)
    assert (enc, dec) == (784 * 200 + 2 * 200 * 20, 20 * 200 + 200 * 784)      # each dense weight once
    # IWAE K: the decoder runs for each of the K draws, the encoder once
    assert training_macs(plain, 10, 1, iwae_k=5) - training_macs(plain, 10, 1) == 3 * 10 * 4 * dec
    # two stochastic layers: q(z1|x) once; q(z2|z1), p(z1|z2), p(x|z1) per draw (their weights were not counted)
    two = TwoLayerConfig(hidden=(200,), z_dim=30, z2_dim=10, hidden2=(50,))
    once, per = example_macs(two)
    assert once == 784 * 200 + 2 * 200 * 20
    assert per == 20 * 50 + 2 * 50 * 10 + 10 * 50 + 2 * 50 * 20 + 20 * 200 + 200 * 784
    assert training_macs(two, 10, 1, iwae_k=5) - training_macs(two, 10, 1) == 3 * 10 * 4 * per
    # the MADE decoder reads [x, z] and [h, x]; the flows run per draw
    made = example_macs(FamilyConfig(hidden=(200,), z_dim=20, decoder="made"))
    assert made[1] >= (784 + 20) * 200 + (200 + 784) * 784 > dec
    assert example_macs(FamilyConfig(hidden=(200,), z_dim=20, flow="iaf:2"))[1] > dec
    assert example_macs(FamilyConfig(hidden=(200,), z_dim=20, flow="planar:4"))[1] > dec
    # a convolution uses each weight at every position: 32 4x4 filters on 14x14 outputs, then 64 on 7x7
    conv = VAEConfig(arch="conv", hidden=(256,), z_dim=32, image_shape=(1, 28, 28))
    assert example_macs(conv)[0] == 32 * 16 * 14 * 14 + 64 * 32 * 16 * 7 * 7 + 3136 * 256 + 2 * 256 * 32
    pool = VAEConfig(arch="conv-pool", hidden=(256,), z_dim=32, image_shape=(1, 28, 28))
    assert example_macs(pool)[0] == 32 * 9 * 28 * 28 + 64 * 32 * 9 * 14 * 14 + 3136 * 256 + 2 * 256 * 32
    assert example_macs(pool)[1] == 32 * 256 + 256 * 3136 + 32 * 64 * 9 * 14 * 14 + 32 * 9 * 28 * 28
