"""minivae: a Variational Autoencoder in NumPy with every gradient derived by hand.

Quick tour::

    import numpy as np, minivae
    model = minivae.VAE(minivae.VAEConfig(hidden=(400,), z_dim=20), rng=np.random.default_rng(0))
    opt = minivae.Adam(lr=1e-3)
    loss, grads = model.loss(x_batch)         # mean negative ELBO, nats per example
    opt.step(model.params, grads)
"""
from .backend import (BackendError, cupy_available, get_array_module, get_backend, set_backend, to_numpy,
                      use_backend)
from .config import VAEConfig
from .gaussian import kl_backward, kl_forward, reparameterize, reparameterize_backward, reparameterize_forward
from .gradcheck import GradientCheckError, check_model, check_op, numerical_gradient, rel_error
from .model import VAE
from .optim import SGD, Adagrad, Adam, clip_grad_norm, make_optimizer

__version__ = "0.1.0"

__all__ = [
    "BackendError", "cupy_available", "get_array_module", "get_backend", "set_backend", "to_numpy", "use_backend",
    "VAEConfig", "VAE", "SGD", "Adagrad", "Adam", "clip_grad_norm", "make_optimizer",
    "reparameterize", "reparameterize_forward", "reparameterize_backward", "kl_forward", "kl_backward",
    "GradientCheckError", "check_model", "check_op", "numerical_gradient", "rel_error",
]
