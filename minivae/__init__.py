"""minivae: a Variational Autoencoder in NumPy with every gradient derived by hand.

Quick tour::

    import numpy as np, minivae
    model = minivae.VAE(minivae.VAEConfig(hidden=(400,), z_dim=20), rng=np.random.default_rng(0))
    opt = minivae.Adam(lr=1e-3)
    loss, grads = model.loss(x_batch)         # mean negative ELBO, nats per example
    opt.step(model.params, grads)
"""
import os as _os
import sys as _sys

# OpenBLAS's idle worker threads busy-wait about 2^28 cycles (~0.1 s) after every matrix product, so on a
# machine with few cores they keep a core from the elementwise work and the fused kernels that follow.  A
# short wait (2^12 cycles) is asked for here, before NumPy loads OpenBLAS, unless the variable is set
# already or NumPy is loaded (then it is too late, and nothing is changed).  benchmarks/epoch.py does the same.
if "numpy" not in _sys.modules:
    _os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "12")

from .backend import (BackendError, cupy_available, get_array_module, get_backend, set_backend, to_numpy,
                      use_backend)
from .config import VAEConfig
from .gaussian import kl_backward, kl_forward, reparameterize, reparameterize_backward, reparameterize_forward
from .gradcheck import GradientCheckError, check_model, check_op, numerical_gradient, rel_error
from .model import VAE
from . import families  # noqa: E402,F401  (registers the model kind "family": MADE decoder, flows; minivae.model)
from . import twolayer  # noqa: E402,F401  (registers the model kind "two_layer": z1 and z2)
from . import m2  # noqa: E402,F401  (registers the model kind "m2": semi-supervised, discrete y)
from .optim import SGD, Adagrad, Adam, clip_grad_norm, make_optimizer

try:                     # the fast path (minivae/fast/, absent from a course assignment's copy)
    from .fast.conv_copies import install as _install_fast_copies
except ImportError:
    pass
else:
    _install_fast_copies()     # with numba: the conv ops' copies as fused kernels (the same bits)

__version__ = "0.1.0"

__all__ = [
    "BackendError", "cupy_available", "get_array_module", "get_backend", "set_backend", "to_numpy", "use_backend",
    "VAEConfig", "VAE", "SGD", "Adagrad", "Adam", "clip_grad_norm", "make_optimizer",
    "reparameterize", "reparameterize_forward", "reparameterize_backward", "kl_forward", "kl_backward",
    "GradientCheckError", "check_model", "check_op", "numerical_gradient", "rel_error",
]
