"""The model's configuration: one dataclass, serialisable to JSON.

The names it accepts for ``activation``, ``likelihood`` and ``arch`` are those registered in
:data:`minivae.layers.ACTIVATIONS`, :data:`minivae.likelihoods.LIKELIHOODS` and
:data:`minivae.networks.ARCHITECTURES`: registering one there is all it takes.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

from .layers import ACTIVATIONS
from .likelihoods import LIKELIHOODS
from .networks import ARCHITECTURES, LABEL_DECODERS, LABEL_ENCODERS

DTYPES = ("float32", "float64")


@dataclass
class VAEConfig:
    """Architecture of a VAE.

    x_dim       D, the data dimension (784 for MNIST); C·H·W of ``image_shape`` when that is given
    hidden      widths of the hidden dense layers, any depth: (400,), (200, 200), (128, 64, 32).
                The decoder mirrors the encoder (reversed widths).  Default (400,) for "mlp"; for
                the conv architectures, the dense layers after the convolutions, default (256,)
    z_dim       L, the latent dimension
    activation  hidden nonlinearity: relu, leaky_relu, tanh, sigmoid, softplus (:data:`minivae.layers.ACTIVATIONS`)
    likelihood  p(x|z): "bernoulli" (logits, BCE), "gaussian" (fixed variance
                ``obs_var``, the MSE form) or "gaussian_learned_var"
    dtype       "float32" (default, for training) or "float64" (gradient checks)
    obs_var     the fixed variance of the "gaussian" likelihood
    arch        "mlp" (fully connected), "conv" (strided convolutions / transposed convolutions) or
                "conv-pool" (convolutions with max-pooling / upsampling); see :mod:`minivae.networks`
    image_shape (C, H, W) of one image; rows are flattened in (C, H, W) order.  The conv
                architectures need it (default (1, 28, 28) when x_dim is 784 or not given) and need
                H and W divisible by 4.  Optional for "mlp" (the figures use it).
    dec_logvar_min  m, a floor on the decoder's log-variance for "gaussian_learned_var": the
                likelihood uses logvar' = m + softplus(logvar - m) > m
                (:func:`minivae.likelihoods.logvar_floor_forward`), so no pixel's variance can
                collapse below exp(m).  None (default): no floor.
    n_classes   K: a conditional VAE (Sohn, Lee & Yan 2015) of p(x|y) for labels y in 0..K-1; the one-hot
                label joins the input of the encoder's first dense layer and the decoder's input z
                (:mod:`minivae.conditional`).  None (default): the unconditional VAE of p(x)
    label_decoder  how a conditional decoder reads y (:data:`minivae.networks.LABEL_DECODERS`): "input"
                (default: [z, y] into its first dense layer), "outer" ([z, vec(z ⊗ y), y]: a per-class map
                of z) or "every" (y into every dense layer, fully connected only)
    label_encoder  how a conditional encoder reads y (:data:`minivae.networks.LABEL_ENCODERS`): "input" (default:
                [x, y] into its first dense layer) or "outer" (its heads also read [h, vec(h ⊗ y)])
    """

    x_dim: int = None
    hidden: tuple = None
    z_dim: int = 20
    activation: str = "relu"
    likelihood: str = "bernoulli"
    dtype: str = "float32"
    obs_var: float = 1.0
    arch: str = "mlp"
    image_shape: tuple = None
    dec_logvar_min: float = None
    n_classes: int = None
    label_decoder: str = "input"
    label_encoder: str = "input"

    def __post_init__(self):
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"unknown arch {self.arch!r}: choose one of {', '.join(ARCHITECTURES)}")
        arch = ARCHITECTURES[self.arch]
        if self.image_shape is None and arch.image and self.x_dim in (None, 784):
            self.image_shape = (1, 28, 28)
        if self.image_shape is not None:
            shape = tuple(self.image_shape)
            if len(shape) != 3 or any(int(s) != s or s < 1 for s in shape):
                raise ValueError(f"image_shape must be (C, H, W), three positive integers, got {self.image_shape}")
            self.image_shape = tuple(int(s) for s in shape)
            d = self.image_shape[0] * self.image_shape[1] * self.image_shape[2]
            if self.x_dim is not None and int(self.x_dim) != d:
                raise ValueError(f"x_dim {self.x_dim} does not match image_shape {self.image_shape} "
                                 f"(C·H·W = {d})")
            self.x_dim = d
        elif arch.image:
            raise ValueError(f"arch {self.arch!r} needs image_shape=(C, H, W) for x_dim {self.x_dim}")
        k = arch.image_divisor
        if arch.image and (self.image_shape[1] % k or self.image_shape[2] % k):
            raise ValueError(f"arch {self.arch!r} needs image height and width divisible by {k}, got image "
                             f"shape {self.image_shape}")
        if self.x_dim is None:
            self.x_dim = 784
        if self.hidden is None:
            self.hidden = arch.default_hidden
        if isinstance(self.hidden, int):
            self.hidden = (self.hidden,)
        self.hidden = tuple(int(h) for h in self.hidden)
        self.x_dim, self.z_dim = int(self.x_dim), int(self.z_dim)
        if self.x_dim < 1 or self.z_dim < 1 or any(h < 1 for h in self.hidden):
            raise ValueError(f"layer sizes must be positive: x_dim={self.x_dim}, hidden={self.hidden}, z_dim={self.z_dim}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}: choose one of {', '.join(ACTIVATIONS)}")
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"unknown likelihood {self.likelihood!r}: choose one of {', '.join(LIKELIHOODS)}")
        if str(self.dtype) not in DTYPES:
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")
        self.dtype = str(self.dtype)
        self.obs_var = float(self.obs_var)
        if self.n_classes is not None:
            if isinstance(self.n_classes, bool) or int(self.n_classes) != self.n_classes or self.n_classes < 1:
                raise ValueError(f"n_classes must be a positive integer (or None), got {self.n_classes!r}")
            self.n_classes = int(self.n_classes)
        if self.label_decoder not in LABEL_DECODERS:
            raise ValueError(f"unknown label_decoder {self.label_decoder!r}: choose one of {', '.join(LABEL_DECODERS)}")
        if self.label_decoder != "input" and self.n_classes is None:
            raise ValueError(f"label_decoder={self.label_decoder!r} needs a conditional model (n_classes=K)")
        if self.label_encoder not in LABEL_ENCODERS:
            raise ValueError(f"unknown label_encoder {self.label_encoder!r}: choose one of {', '.join(LABEL_ENCODERS)}")
        if self.label_encoder != "input" and self.n_classes is None:
            raise ValueError(f"label_encoder={self.label_encoder!r} needs a conditional model (n_classes=K)")
        if self.label_decoder == "every" and self.arch != "mlp":
            raise ValueError(f"label_decoder='every' needs the fully connected arch 'mlp', not {self.arch!r} "
                             f"(use 'outer' or 'input')")
        if not self.obs_var > 0:
            raise ValueError(f"obs_var must be positive, got {self.obs_var}")
        if self.dec_logvar_min is not None:
            if self.likelihood != "gaussian_learned_var":
                raise ValueError(f"dec_logvar_min floors a learned variance: it needs likelihood "
                                 f"'gaussian_learned_var', not {self.likelihood!r}")
            try:
                self.dec_logvar_min = float(self.dec_logvar_min)
            except (TypeError, ValueError):
                raise ValueError(f"dec_logvar_min must be a number, got {self.dec_logvar_min!r}") from None
            if not math.isfinite(self.dec_logvar_min):
                raise ValueError(f"dec_logvar_min must be a finite number, got {self.dec_logvar_min}")

    def to_dict(self):
        d = dataclasses.asdict(self)
        d["hidden"] = list(self.hidden)
        if self.image_shape is not None:
            d["image_shape"] = list(self.image_shape)
        for k, default in (("arch", "mlp"), ("image_shape", None), ("dec_logvar_min", None), ("n_classes", None),
                            ("label_decoder", "input"), ("label_encoder", "input")):
            if d[k] == default:        # a fully connected config serialises as before these fields existed
                del d[k]
        return d

    def to_json(self):
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown config keys: {', '.join(sorted(unknown))}")
        return cls(**d)

    @classmethod
    def from_json(cls, s):
        return cls.from_dict(json.loads(s))
