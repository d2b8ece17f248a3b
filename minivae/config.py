"""The model's configuration: one dataclass, serialisable to JSON."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from .layers import ACTIVATIONS
from .likelihoods import LIKELIHOODS


@dataclass
class VAEConfig:
    """Architecture of a fully connected VAE.

    x_dim       D, the data dimension (784 for MNIST)
    hidden      widths of the hidden layers, any depth: (400,), (200, 200), (128, 64, 32).
                The decoder mirrors the encoder (reversed widths).
    z_dim       L, the latent dimension
    activation  hidden nonlinearity: relu, leaky_relu, tanh, sigmoid, softplus
    likelihood  p(x|z): "bernoulli" (logits, BCE), "gaussian" (fixed variance
                ``obs_var``, the MSE form) or "gaussian_learned_var"
    dtype       "float32" (default, for training) or "float64" (gradient checks)
    obs_var     the fixed variance of the "gaussian" likelihood
    """

    x_dim: int = 784
    hidden: tuple = (400,)
    z_dim: int = 20
    activation: str = "relu"
    likelihood: str = "bernoulli"
    dtype: str = "float32"
    obs_var: float = 1.0

    def __post_init__(self):
        if isinstance(self.hidden, int):
            self.hidden = (self.hidden,)
        self.hidden = tuple(int(h) for h in self.hidden)
        self.x_dim, self.z_dim = int(self.x_dim), int(self.z_dim)
        if self.x_dim < 1 or self.z_dim < 1 or any(h < 1 for h in self.hidden):
            raise ValueError(f"layer sizes must be positive: x_dim={self.x_dim}, hidden={self.hidden}, z_dim={self.z_dim}")
        if self.activation not in ACTIVATIONS or self.activation == "identity":
            raise ValueError(f"unknown activation {self.activation!r}: choose one of relu, leaky_relu, tanh, sigmoid, softplus")
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"unknown likelihood {self.likelihood!r}: choose one of {', '.join(LIKELIHOODS)}")
        if str(self.dtype) not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")
        self.dtype = str(self.dtype)
        self.obs_var = float(self.obs_var)
        if not self.obs_var > 0:
            raise ValueError(f"obs_var must be positive, got {self.obs_var}")

    def to_dict(self):
        d = dataclasses.asdict(self)
        d["hidden"] = list(self.hidden)
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
