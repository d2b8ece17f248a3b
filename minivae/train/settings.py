"""A training run's settings: one dataclass, saved as JSON in every checkpoint, and its checks.

``TrainSettings.from_recipe(name, **overrides)`` starts from a recipe (:mod:`minivae.recipes`);
:meth:`TrainSettings.validate` refuses an impossible setting with a one-line reason before anything runs;
:func:`check_resume` compares the settings of a resumed run with its checkpoint's.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

import numpy as np

from ..checkpoint import CheckpointError
from ..config import VAEConfig
from ..data import BINARIZE
from ..likelihoods import LIKELIHOODS, get_likelihood
from ..networks import get_architecture
from ..optim import OPTIMIZERS, make_optimizer
from ..recipes import get_recipe

TEST_SEED = 12345
ALPHA_MAX = 1e6          # M2's --alpha: the largest classifier weight accepted (TrainSettings.validate)
# settings that may change when a run is resumed (everything else must match the checkpoint)
RESUME_MUTABLE = ("epochs", "iw_k", "figures", "backend", "threads")


def upgrade_saved(d):
    """A copy of saved settings (a checkpoint's, a settings.json's) in today's conventions."""
    d = dict(d)
    if d.get("labels") is None and d.get("alpha") == 0.1:
        d["alpha"] = None      # written before alpha's default became None (M2's labels / 10): not a choice
    return d


@dataclass
class TrainSettings:
    """Everything that defines a training run (saved as JSON in every checkpoint)."""

    recipe: str = "default"
    # model
    arch: str = "mlp"          # "mlp", "conv" or "conv-pool" (minivae.networks)
    conditional: bool = False  # a conditional VAE of p(x|y) on the dataset's labels (minivae.conditional)
    label_decoder: str = "input"  # how a conditional decoder reads y (minivae.networks.LABEL_DECODERS)
    label_encoder: str = "input"  # how a conditional encoder reads y (minivae.networks.LABEL_ENCODERS)
    hidden: tuple = (400,)
    latent: int = 20
    activation: str = "relu"
    likelihood: str = "bernoulli"
    obs_var: float = 1.0
    dec_logvar_min: float | None = None   # floor on a learned decoder log-variance (VAEConfig)
    dtype: str = "float32"
    decoder: str = "factorised"  # "made": the autoregressive decoder (minivae.families)
    flow: str | None = None      # "planar:T" or "iaf:T": a flow in q(z|x) (minivae.families)
    prior: str | None = None     # "mog:C" or "vamp:C": a learned prior p(z) (minivae.priors)
    stochastic_layers: int = 1   # 2: z1 (latent) and z2 (latent2) (minivae.twolayer)
    latent2: int | None = None   # z2's dimension with two stochastic layers (default latent // 2)
    labels: int | None = None    # M2 (minivae.m2): this many labelled training digits, the same number per class
    alpha: float | None = None   # M2: the classifier's cross-entropy weight per data point (None: labels / 10)
    # data
    binarize: str = "dynamic"
    data_dir: str | None = None
    n_train: int | None = None
    n_test: int | None = None
    valid: int = 0
    test_seed: int = TEST_SEED
    data: dict | None = None   # provenance, set by train(): {"path": resolved folder, "files": {name: [size, sha256]}}
    # optimisation
    optimizer: str = "adam"
    lr: float = 1e-3
    adam_eps: float = 1e-8
    momentum: float = 0.9
    weight_decay: float = 0.0
    clip_norm: float | None = None
    batch_size: int = 128
    epochs: int = 10
    schedule: list | None = None
    init_output_bias: bool = False
    # objective
    beta: float = 1.0
    warmup: int = 0            # epochs over which the KL weight moves linearly from beta_start to beta
    beta_start: float = 0.0    # the KL weight at step 0 when warmup > 0 (0: the classic warm-up; > beta: anneal down)
    iwae_k: int | None = None
    free_bits: float | None = None
    iwae_grad: str = "iwae"    # the encoder's IWAE gradient: "iwae", "stl" or "dreg" (minivae.iwae_grads)
    # run
    seed: int = 0
    backend: str = "numpy"
    iw_k: int = 0
    figures: bool = True
    fast: bool = True          # use minivae.fast.FastTrainer where it supports the run (same math, tested)
    threads: int | None = None # BLAS, numba's kernels and the fast step (minivae.fast.threads; None: every core,
                               # BLAS its own default); BLAS may round a product differently on another count

    @classmethod
    def from_recipe(cls, name="default", **overrides):
        """A recipe's fields (:mod:`minivae.recipes`), then ``overrides`` (None values are ignored)."""
        fields = get_recipe(name)
        fields["recipe"] = name
        arch = overrides.get("arch")
        if arch is not None and arch != fields.get("arch", "mlp") and overrides.get("hidden") is None:
            fields["hidden"] = VAEConfig(arch=arch).hidden     # another arch: its own dense widths
        fields.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(fields)

    @classmethod
    def from_dict(cls, d):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown training settings: {', '.join(sorted(unknown))}")
        return cls(**d)

    @classmethod
    def from_saved(cls, d):
        """Settings read back from a checkpoint or a run's settings.json (older files included)."""
        return cls.from_dict(upgrade_saved(d))

    def __post_init__(self):
        if isinstance(self.hidden, (int, np.integer)):
            self.hidden = (int(self.hidden),)
        self.hidden = tuple(int(h) for h in self.hidden)
        if self.schedule is not None:
            self.schedule = [[int(p), float(lr)] for p, lr in self.schedule]
        if self.data_dir is not None:
            self.data_dir = str(self.data_dir)

    def to_dict(self):
        d = dataclasses.asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    def validate(self):
        """Raise ValueError with a one-line reason for an impossible setting."""
        def need(cond, msg):
            if not cond:
                raise ValueError(msg)
        need(self.binarize in BINARIZE, f"binarize must be one of {', '.join(BINARIZE)}, got {self.binarize!r}")
        binary = [name for name, lik in LIKELIHOODS.items() if lik.unit_interval]
        need(self.binarize == "none" or get_likelihood(self.likelihood).unit_interval,
             f"binarize={self.binarize!r} only makes sense with a Bernoulli likelihood of data in [0, 1] "
             f"({', '.join(binary)}); use binarize='none'")
        need(int(self.epochs) == self.epochs and self.epochs >= 0, f"epochs must be >= 0, got {self.epochs}")
        need(int(self.batch_size) == self.batch_size and self.batch_size >= 1,
             f"batch size must be positive, got {self.batch_size}")
        for name in ("lr", "adam_eps", "momentum", "weight_decay", "beta", "beta_start", "obs_var"):
            v = getattr(self, name)
            need(isinstance(v, (int, float)) and math.isfinite(v), f"{name} must be a finite number, got {v!r}")
        for name in ("clip_norm", "free_bits", "dec_logvar_min"):
            v = getattr(self, name)
            need(v is None or (isinstance(v, (int, float)) and math.isfinite(v)),
                 f"{name} must be a finite number, got {v!r}")
        need(self.lr > 0, f"learning rate must be positive, got {self.lr}")
        need(self.adam_eps > 0, f"adam_eps must be positive, got {self.adam_eps}")
        need(0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(self.beta >= 0, f"beta must be >= 0, got {self.beta}")
        need(self.warmup >= 0, f"warmup must be >= 0 epochs, got {self.warmup}")
        need(not isinstance(self.seed, bool) and isinstance(self.seed, (int, np.integer)) and self.seed >= 0,
             f"seed (--seed) must be an integer >= 0, got {self.seed!r}")
        need(self.beta_start >= 0, f"beta_start must be >= 0, got {self.beta_start}")
        need(not self.beta_start or self.warmup, f"beta_start={self.beta_start:g} needs warmup > 0 epochs (the "
                                                 f"epochs over which the KL weight moves from beta_start to beta)")
        for name in ("label_decoder", "label_encoder"):
            need(getattr(self, name) == "input" or self.conditional,
                 f"{name}={getattr(self, name)!r} needs a conditional run (--conditional)")
        need(self.valid >= 0, f"valid must be >= 0, got {self.valid}")
        need(self.iw_k >= 0, f"iw_k must be >= 0, got {self.iw_k}")
        need(self.threads is None or (not isinstance(self.threads, bool) and isinstance(self.threads, (int, np.integer))
                                      and self.threads >= 1),
             f"threads must be a positive integer, got {self.threads!r}")
        need(self.optimizer in OPTIMIZERS,
             f"unknown optimizer {self.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
        for name in ("n_train", "n_test"):
            v = getattr(self, name)
            need(v is None or v >= 1, f"{name} must be positive, got {v}")
        need(self.clip_norm is None or self.clip_norm > 0, f"clip_norm must be positive, got {self.clip_norm}")
        need(self.iwae_k is None or self.iwae_k >= 1, f"iwae_k must be >= 1, got {self.iwae_k}")
        need(self.free_bits is None or self.free_bits >= 0, f"free_bits must be >= 0, got {self.free_bits}")
        from ..iwae_grads import IWAE_GRADS
        need(self.stochastic_layers in (1, 2), f"stochastic_layers must be 1 or 2, got {self.stochastic_layers!r}")
        need(self.latent2 is None or (self.stochastic_layers == 2 and self.latent2 >= 1),
             f"latent2 is z2's dimension (>= 1) and needs two stochastic layers, got {self.latent2!r}")
        need(self.stochastic_layers == 1 or (self.decoder == "factorised" and self.flow is None and self.prior is None
                                             and self.iwae_grad == "iwae" and not self.free_bits and self.beta == 1
                                             and not self.warmup and not self.conditional),
             "two stochastic layers train on the ELBO or the IWAE bound (--iwae-k) alone: no --decoder, --flow, "
             "--prior, --iwae-grad, --free-bits, --beta, --warmup or --conditional")
        need(self.labels is None or (not isinstance(self.labels, bool) and isinstance(self.labels, (int, np.integer))
                                     and self.labels >= 1), f"labels must be a positive integer, got {self.labels!r}")
        need(self.alpha is None or (isinstance(self.alpha, (int, float)) and not isinstance(self.alpha, bool)
                                    and math.isfinite(self.alpha) and self.alpha >= 0),
             f"alpha must be a finite number >= 0, got {self.alpha!r}")
        # an upper bound, so that a typo (1e308) is refused here and not found as a divergence: float32 Adam squares
        # the gradient, which alpha scales, and overflows near alpha = 1e19; useful weights are far below (the
        # default labels / 10 is at most 6000 on MNIST)
        need(self.alpha is None or self.alpha <= ALPHA_MAX,
             f"alpha must be at most {ALPHA_MAX:g} (the classifier's weight; the default is labels / 10), "
             f"got {self.alpha!r}")
        need(self.alpha is None or self.labels is not None, "alpha weighs M2's classifier: it needs --labels N")
        need(self.labels is None or (self.stochastic_layers == 1 and self.decoder == "factorised" and self.flow is None
                                     and self.prior is None and self.iwae_k is None and self.iwae_grad == "iwae"
                                     and not self.free_bits and self.beta == 1 and not self.warmup
                                     and not self.conditional),
             "--labels trains M2 on its own bound: no --stochastic-layers, --decoder, --flow, --prior, --iwae-k, "
             "--iwae-grad, --free-bits, --beta, --warmup or --conditional")
        need(self.labels is None or (self.arch == "mlp" and self.likelihood == "bernoulli"),
             "--labels (M2) is built on the fully connected Bernoulli VAE: arch mlp, likelihood bernoulli")
        need(self.iwae_grad in IWAE_GRADS, f"iwae_grad must be one of {', '.join(IWAE_GRADS)}, got {self.iwae_grad!r}")
        need(self.iwae_grad == "iwae" or self.iwae_k is not None,
             f"iwae_grad={self.iwae_grad!r} estimates the IWAE bound's gradient: give iwae_k (--iwae-k K)")
        need(self.iwae_grad == "iwae" or self.flow is None,
             f"iwae_grad={self.iwae_grad!r} cannot be combined with a flow (it needs log q at any z, i.e. the "
             "flow's inverse)")
        need(not (self.conditional and (self.decoder != "factorised" or self.flow is not None or self.prior or
                                        self.iwae_grad != "iwae")),
             "the decoder, flow and iwae_grad options are for the unconditional VAE, not --conditional")
        need(not ((self.flow is not None or self.prior is not None) and self.free_bits),
             "free bits floor the analytic KL per dimension, which a flow or a learned prior does not have")
        need(self.iwae_grad == "iwae" or self.prior is None,
             f"iwae_grad={self.iwae_grad!r} is implemented for the N(0, I) prior, not a learned prior")
        need(not (self.iwae_k is not None and self.free_bits),
             "free bits cannot be combined with the IWAE objective (the IWAE bound has no separate KL term)")
        # checks hidden/latent/activation/likelihood/dtype/label_decoder (a conditional run: as for 10 classes).
        # The data's width is not known yet: the memory check here counts one input value per image (a lower
        # bound, the user's data may be narrower than MNIST); the run checks again with the data's real width.
        image = get_architecture(self.arch).image
        config = self.model_config(784 if image else 1, n_classes=10 if self.conditional or self.labels else None)
        from ..limits import check_fits, training_bytes
        check_fits(training_bytes(config, self.batch_size, self.iwae_k), f"training {describe(config)}",
               "choose a smaller --batch-size, --hidden, --latent" + (" or --iwae-k" if self.iwae_k else ""))
        return self

    @property
    def m2_alpha(self):
        """M2's classifier weight: ``alpha``, or labels / 10 when none was given.

        Kingma et al. (2014) set alpha = 0.1 N on a sum over the N training digits and a mean over the labelled
        ones; per data point that is 0.1, which leaves the classifier too weak to learn from 100 labels (52.5%
        test error after 12 epochs, docs/results.md).  The default reads the paper's expectation as a sum over
        the labelled digits instead, 0.1 N_l (10 for 100 labels: 21.0% after 30 epochs), as common
        reimplementations do.
        """
        if self.labels is None:
            return 0.0
        return self.labels / 10 if self.alpha is None else self.alpha

    def model_config(self, x_dim, image_shape=None, n_classes=None):
        """The model's config for data of ``x_dim`` values per image; the conv archs record ``image_shape``,
        a conditional run its number of classes ``n_classes``."""
        image = get_architecture(self.arch).image
        if self.labels is not None:
            from ..m2 import M2Config                        # the model kind of minivae.m2
            return M2Config(x_dim=x_dim, hidden=self.hidden, z_dim=self.latent, activation=self.activation,
                            likelihood=self.likelihood, dtype=self.dtype, classes=n_classes or 10)
        if self.stochastic_layers == 2:
            from ..twolayer import TwoLayerConfig            # the model kind of minivae.twolayer
            L2 = self.latent2 if self.latent2 is not None else max(1, self.latent // 2)
            return TwoLayerConfig(x_dim=x_dim, hidden=self.hidden, z_dim=self.latent + L2, z2_dim=L2,
                                  hidden2=tuple(max(1, h // 2) for h in self.hidden), activation=self.activation,
                                  likelihood=self.likelihood, dtype=self.dtype, arch=self.arch,
                                  n_classes=n_classes if self.conditional else None)
        if self.decoder != "factorised" or self.flow is not None or self.prior is not None or \
                self.iwae_grad != "iwae":
            from ..families import FamilyConfig           # the model kind of minivae.families
            return FamilyConfig(x_dim=x_dim, hidden=self.hidden, z_dim=self.latent, activation=self.activation,
                                likelihood=self.likelihood, dtype=self.dtype, obs_var=self.obs_var, arch=self.arch,
                                dec_logvar_min=self.dec_logvar_min, image_shape=image_shape if image else None,
                                n_classes=n_classes if self.conditional else None, decoder=self.decoder,
                                flow=self.flow, prior=self.prior)
        return VAEConfig(x_dim=x_dim, hidden=self.hidden, z_dim=self.latent, activation=self.activation,
                         likelihood=self.likelihood, dtype=self.dtype, obs_var=self.obs_var, arch=self.arch,
                         dec_logvar_min=self.dec_logvar_min,
                         image_shape=image_shape if image else None,
                         n_classes=n_classes if self.conditional else None,
                         label_decoder=self.label_decoder if self.conditional else "input",
                         label_encoder=self.label_encoder if self.conditional else "input")

    def make_optimizer(self):
        kw = dict(weight_decay=self.weight_decay, clip_norm=self.clip_norm)
        if self.optimizer == "adam":
            kw["eps"] = self.adam_eps
        elif self.optimizer == "sgd":
            kw["momentum"] = self.momentum
        return make_optimizer(self.optimizer, self.lr, **kw)


def describe(config):
    """'784-400-20 VAE': the widths of a config, for messages."""
    return "-".join(str(v) for v in (config.x_dim, *config.hidden, config.z_dim)) + " VAE"


def check_resume(settings, ckpt):
    """CheckpointError (one line) naming every setting of a resumed run that differs from its checkpoint's
    (except those in RESUME_MUTABLE, and the data, which is checked by its fingerprint)."""
    # a setting the checkpoint predates counts as saved with its default value
    saved = upgrade_saved(dict(TrainSettings().to_dict(), **ckpt.settings))
    now = settings.to_dict()
    for d in (saved, now):      # M2's default alpha is labels / 10 (m2_alpha): --labels 20 --alpha 2 is that run
        if d.get("labels") is not None and d.get("alpha") is None:
            d["alpha"] = d["labels"] / 10
    # the data is checked by its fingerprint (run_data_dir), not by the folder's name
    skip = RESUME_MUTABLE + (("data_dir", "data") if saved.get("data") else ())
    diffs = [f"{k}={saved.get(k)!r} (this run: {now[k]!r})" for k in now
             if k not in skip and json.dumps(saved.get(k)) != json.dumps(now[k])]
    if diffs:
        raise CheckpointError(f"{ckpt.path}: the checkpoint was trained with different settings: " + "; ".join(diffs))
