"""The grader's own implementations, independent of the student's package.

This file is standalone (NumPy only, no ``minivae`` import): the grader
loads it by path inside the isolated subprocess that runs a student's code,
so nothing here can be changed by editing the student copy.  It is not copied
into the student package.

It serves three purposes:

* forward values that the forward exercises are compared against
  (reparameterization, KL, Bernoulli NLL, Adam);
* forward functions whose finite differences are the truth for the backward
  exercises, and the caches (in the layout the engine's unchanged code
  fixes) handed to a student's backward;
* reference ops patched into the student's model for the ``vae_backward``
  check, so that a bug in one op exercise does not also fail the VAE.

Everything is written in float64 in the plainest form.
"""
import numpy as np


def softplus(x):
    return np.maximum(x, 0) + np.log1p(np.exp(-np.abs(x)))


def sigmoid(x):
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0, e) / (1.0 + e)


# ---------------------------------------------------------------- dense
def dense_forward(x, W, b):
    return x @ W + b, (x, W)


def dense_backward(dy, cache):
    x, W = cache
    return dy @ W.T, x.T @ dy, dy.sum(axis=0)


# ---------------------------------------------------------- activations
def relu_forward(x):
    return np.maximum(x, 0), x


def relu_backward(dy, x):
    return dy * (x > 0)


def tanh_forward(x):
    y = np.tanh(x)
    return y, y


def tanh_backward(dy, y):
    return dy * (1 - y * y)


def sigmoid_forward(x):
    y = sigmoid(x)
    return y, y


def sigmoid_backward(dy, y):
    return dy * y * (1 - y)


ACTIVATIONS = {"relu": (relu_forward, relu_backward), "tanh": (tanh_forward, tanh_backward),
               "sigmoid": (sigmoid_forward, sigmoid_backward)}


# ------------------------------------------------------------ gaussian
def reparameterize_forward(mu, logvar, eps):
    sigma = np.exp(0.5 * logvar)
    return mu + sigma * eps, (sigma, eps)


def reparameterize_backward(dz, cache):
    sigma, eps = cache
    dmu, dlogvar = dz, dz * eps * sigma * 0.5
    if dz.ndim == 3:
        dmu, dlogvar = dmu.sum(axis=0), dlogvar.sum(axis=0)
    return dmu, dlogvar


def kl_forward(mu, logvar):
    var = np.exp(logvar)
    return 0.5 * np.sum(mu ** 2 + var - 1.0 - logvar, axis=1), (mu, var)


def kl_backward(dkl, cache):
    mu, var = cache
    return dkl[:, None] * mu, dkl[:, None] * 0.5 * (var - 1.0)


# ---------------------------------------------------------- likelihood
def bernoulli_nll_forward(logits, x):
    return np.sum(softplus(logits) - x * logits, axis=-1), (logits, x)


def bernoulli_nll_backward(dnll, cache):
    logits, x = cache
    return dnll[..., None] * (sigmoid(logits) - x)


# ----------------------------------------------------------------- adam
def adam_run(params, grads_seq, lr, betas, eps):
    """Textbook Adam (Kingma & Ba 2015, Algorithm 1) for a list of arrays.

    Returns the list, one entry per step, of ``(params, m, v)`` lists.
    """
    b1, b2 = betas
    p = [a.copy() for a in params]
    m = [np.zeros_like(a) for a in params]
    v = [np.zeros_like(a) for a in params]
    history = []
    for t, grads in enumerate(grads_seq, start=1):
        for i, g in enumerate(grads):
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            m_hat = m[i] / (1 - b1 ** t)
            v_hat = v[i] / (1 - b2 ** t)
            p[i] = p[i] - lr * m_hat / (np.sqrt(v_hat) + eps)
        history.append(([a.copy() for a in p], [a.copy() for a in m], [a.copy() for a in v]))
    return history


# the names patched into the student's minivae.model for the vae_backward check
MODEL_OPS = ("dense_forward", "dense_backward", "reparameterize_forward", "reparameterize_backward",
             "kl_forward", "kl_backward", "bernoulli_nll_forward", "bernoulli_nll_backward")
