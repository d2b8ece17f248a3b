"""The training step's elementwise work on CuPy: each chain one fused CUDA kernel, nothing synchronises.

The same methods as :class:`~minivae.fast.ops_numpy.NumpyOps` (bias + ReLU, the latent layer, the Bernoulli
loss and gradient, Adam: one kernel each).  The loss stays on the device: the methods return device scalars,
never Python floats.  The kernels are declared as data in the registry of :mod:`minivae.fast.kernels` (which
``tests/test_nvrtc.py`` compiles with NVRTC, no GPU needed) and built on first use (CuPy is imported only then).
"""
from __future__ import annotations

import numpy as np

from ..backend import get_array_module
from . import kernels
from .ops_numpy import gaussian_ufuncs

KERNEL_SPECS = kernels.register(__name__, {
    "bias_relu": kernels.elementwise(
        "minivae_bias_relu", "T b", "T a", "a = max(a + b, (T)0)"),
    "relu_bwd": kernels.elementwise(
        "minivae_relu_bwd", "T h", "T d", "d = h > (T)0 ? d : (T)0"),
    "reparam": kernels.elementwise(
        "minivae_reparam", "T mu, T lv, T eps", "T sig, T z",
        "sig = exp((T)0.5 * lv); z = mu + sig * eps"),
    "latent_bwd": kernels.elementwise(
        "minivae_latent_bwd", "T dz, T mu, T lv, T sig, T eps, T c", "T dmu, T dlv",
        "dmu = dz + c * mu; dlv = dz * eps * ((T)0.5 * sig) + c * ((T)0.5 * (exp(lv) - (T)1))",
        scalar_args=("c",)),
    "kl_terms": kernels.reduction(
        "minivae_kl", "T mu, T lv", "T y", "mu * mu + exp(lv) - (T)1 - lv", "a + b", "y = (T)0.5 * a", "0"),
    "bernoulli": kernels.elementwise(
        "minivae_bernoulli", "T l, T x, T invn", "T d, T nll",
        """
        T e = exp(-fabs(l));
        T r = (T)1 / ((T)1 + e);
        d = ((l >= (T)0 ? r : e * r) - x) * invn;
        nll = max(l, (T)0) + log1p(e) - x * l;
        """, scalar_args=("invn",)),
    # 1 - b1 and 1 - b2 come in as arguments, computed in double on the host and then
    # rounded once, as NumPy rounds the Python float (1.0 - b2) it multiplies by; in the
    # kernel, (T)1 - b2 in float32 would give 0.00099998713 instead of 0.001f.
    "adam": kernels.elementwise(
        "minivae_adam", "T g, T b1, T c1, T b2, T c2, T lr_t, T eps_t", "T p, T m, T v",
        """
        m = b1 * m + c1 * g;
        v = b2 * v + c2 * (g * g);
        p -= lr_t * m / (sqrt(v) + eps_t);
        """, scalar_args=("b1", "c1", "b2", "c2", "lr_t", "eps_t")),
})
_BUILT = {}


def cupy_kernels():
    """``{name: kernel}`` of :data:`KERNEL_SPECS`, built (with CuPy) on the first call."""
    if not _BUILT:
        _BUILT.update(kernels.build_all(KERNEL_SPECS))
    return _BUILT


class CupyOps:
    """The step's elementwise ops as fused CuPy kernels (see the module docstring)."""

    name = "cupy"

    def __init__(self, config, dtype, kernels=None):
        self.config = config
        self.dtype = np.dtype(dtype)
        self.k = cupy_kernels() if kernels is None else kernels

    def prepare(self):
        """Before a step's launches (nothing to set on the GPU)."""

    def for_halves(self):
        raise ValueError("the split step runs on the CPU only")

    # ---------------------------------------------------------------- layers
    def bias_relu(self, a, b):
        self.k["bias_relu"](b, a)

    def relu_backward_db(self, h, d, db, B):
        self.k["relu_bwd"](h, d)
        d.sum(axis=0, out=db)

    def col_sum(self, d, db):
        d.sum(axis=0, out=db)

    # ---------------------------------------------------------------- latent layer
    def reparam(self, heads, eps, sig, z):
        L = z.shape[1]
        self.k["reparam"](heads[:, :L], heads[:, L:], eps, sig, z)

    def latent_backward(self, dz, heads, sig, eps, c, B, need_loss):
        L = dz.shape[1]
        mu, logvar = heads[:, :L], heads[:, L:]
        self.k["latent_bwd"](dz, mu, logvar, sig, eps, self.dtype.type(c), B.dheads[:, :L], B.dheads[:, L:])
        return self.k["kl_terms"](mu, logvar) if need_loss else None

    # ---------------------------------------------------------------- likelihood
    def add_output_bias(self, out, b, B):
        out += b
        return False

    def likelihood(self, out, x, B, invN, need_loss, db=None, negabs_done=False):
        """As :meth:`NumpyOps.likelihood`, the sum of -log p(x|z) a device scalar."""
        if self.config.likelihood == "gaussian":
            recon = gaussian_ufuncs(get_array_module(out), out, x, B, invN, need_loss, float(self.config.obs_var),
                                    host=False)
        else:
            self.k["bernoulli"](out, x, self.dtype.type(invN), B.dout, B.t1)
            recon = B.t1.sum() if need_loss else None
        if db is not None:
            B.dout.sum(axis=0, out=db)
        return recon

    # ---------------------------------------------------------------- Adam
    def adam(self, opt, pf, gf, m, v, consts, pending=None):
        self.k["adam"](gf, *consts, pf, m, v)
