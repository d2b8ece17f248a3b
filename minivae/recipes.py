"""Named training recipes: architecture, optimizer, schedule and data settings.

``python -m minivae train --recipe NAME`` starts from one of these; explicit
flags override its fields.

* ``default``: the standard small recipe (784-400-20 ReLU, Bernoulli,
  dynamic binarization, Adam 1e-3, batch 128, 10 epochs).
* ``conv``: the convolutional VAE (``arch="conv"``: two strided convolutions
  32, 64 and a dense 256 in the encoder, mirrored with transposed
  convolutions in the decoder; L = 20, ReLU, Bernoulli), dynamic
  binarization, Adam 1e-3, batch 128, 10 epochs.
* ``burda2015``: Burda, Grosse & Salakhutdinov (2015), Table 1, one
  stochastic layer: 784-200-200-50 tanh, Bernoulli, dynamic binarization,
  Adam(0.9, 0.999, eps=1e-4), batch 20, 3^i passes at lr 1e-3 * 10^(-i/7) for
  i = 0..7 (3280 passes in all), output bias at the logit of the mean
  training pixel.
* ``conditional``: the conditional VAE of p(x|y) that ``train --conditional`` uses: the ``default`` networks
  and optimizer; the decoder reads [z, vec(z ⊗ y), y] (a per-class linear map of z, ``label_decoder="outer"``),
  the encoder [x, y] and its two heads [h, vec(h ⊗ y)] (a per-class map to the posterior,
  ``label_encoder="outer"``); and a KL weight that starts at 8 and anneals linearly per step to 1 over the first
  6 of the 10 epochs (``beta_start=8, warmup=6``), so that the decoder learns to read the class from y before z
  can carry it.  Measured against the other choices in ``docs/results.md``.
* ``burda2015-short``: the same model, optimizer and eight learning rates on a
  compressed schedule: stages of 1, 2, 3, 6, 12, 24, 48, 96 passes (192 in
  all, against 3280), about half an hour on 2 CPU cores.
"""
from __future__ import annotations


def burda_stages(i_max=7):
    """[(passes, lr)] of the Burda et al. schedule: 3^i passes at 1e-3 * 10^(-i/7)."""
    return [(3 ** i, 1e-3 * 10 ** (-i / 7)) for i in range(i_max + 1)]


SHORT_PASSES = (1, 2, 3, 6, 12, 24, 48, 96)

RECIPES = {
    "default": dict(
        hidden=(400,), latent=20, activation="relu", likelihood="bernoulli", binarize="dynamic",
        optimizer="adam", lr=1e-3, adam_eps=1e-8, batch_size=128, epochs=10, schedule=None,
        init_output_bias=False,
    ),
    "conv": dict(
        arch="conv", hidden=(256,), latent=20, activation="relu", likelihood="bernoulli", binarize="dynamic",
        optimizer="adam", lr=1e-3, adam_eps=1e-8, batch_size=128, epochs=10, schedule=None,
        init_output_bias=False,
    ),
    "conditional": dict(
        hidden=(400,), latent=20, activation="relu", likelihood="bernoulli", binarize="dynamic",
        optimizer="adam", lr=1e-3, adam_eps=1e-8, batch_size=128, epochs=10, schedule=None,
        init_output_bias=False, conditional=True, label_decoder="outer", label_encoder="outer", beta_start=8.0,
        warmup=6,
    ),
    "burda2015": dict(
        hidden=(200, 200), latent=50, activation="tanh", likelihood="bernoulli", binarize="dynamic",
        optimizer="adam", lr=1e-3, adam_eps=1e-4, batch_size=20, epochs=sum(p for p, _ in burda_stages()),
        schedule=burda_stages(), init_output_bias=True,
    ),
    "burda2015-short": dict(
        hidden=(200, 200), latent=50, activation="tanh", likelihood="bernoulli", binarize="dynamic",
        optimizer="adam", lr=1e-3, adam_eps=1e-4, batch_size=20, epochs=192,
        schedule=[(p, lr) for p, (_, lr) in zip(SHORT_PASSES, burda_stages())],
        init_output_bias=True,
    ),
}


def get_recipe(name):
    """A copy of recipe ``name``'s settings."""
    try:
        return dict(RECIPES[name])
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}: choose one of {', '.join(RECIPES)}") from None


def lr_at_epoch(schedule, epoch, base_lr):
    """Learning rate for 0-based ``epoch`` under a [(passes, lr)] schedule (None: constant)."""
    if not schedule:
        return base_lr
    done = 0
    for passes, lr in schedule:
        done += passes
        if epoch < done:
            return lr
    return schedule[-1][1]


def output_bias_init(x_train, eps=1e-6):
    """logit of the mean training pixel, per pixel: log(p / (1 - p)), p clipped to (eps, 1-eps)."""
    import numpy as np
    p = np.clip(np.asarray(x_train, dtype=np.float64).mean(axis=0), eps, 1 - eps)
    return np.log(p) - np.log1p(-p)


