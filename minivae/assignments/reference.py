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


# ---------------------------------------------------------------- conv
# Written independently of minivae.conv (sliding windows and einsum), with the caches in the
# layout minivae.conv's unchanged code fixes: conv2d (col, W, x_shape, stride, padding) with
# col (C*KH*KW, OH*OW*N) in (c, i, j) x (oh, ow, n) order (the batch last); conv_transpose2d (X, W,
# x_shape, stride, padding) with X (C_in, H*W*N); maxpool2d (arg, x_shape, size) with arg the row-major
# offset of each window's first maximum; upsample (x_shape, scale).
def _windows(x, KH, KW, s, p):
    xpad = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    win = np.lib.stride_tricks.sliding_window_view(xpad, (KH, KW), axis=(2, 3))
    return win[:, :, ::s, ::s]                                  # (N, C, OH, OW, KH, KW)


def conv2d_forward(x, W, b, stride=1, padding=0):
    N, C, H, Wd = x.shape
    F, _, KH, KW = W.shape
    win = _windows(x, KH, KW, stride, padding)
    OH, OW = win.shape[2], win.shape[3]
    y = np.tensordot(win, W, axes=([1, 4, 5], [1, 2, 3])).transpose(0, 3, 1, 2) + b[None, :, None, None]
    col = win.transpose(1, 4, 5, 2, 3, 0).reshape(C * KH * KW, OH * OW * N)
    return y, (col, W, (N, C, H, Wd), stride, padding)


def _scatter(patches, x_shape, s, p):
    """patches (N, C, OH, OW, KH, KW) added back into an (N, C, H, W) image."""
    N, C, H, Wd = x_shape
    _, _, OH, OW, KH, KW = patches.shape
    out = np.zeros((N, C, H + 2 * p + s * OH + KH, Wd + 2 * p + s * OW + KW))
    for i in range(KH):
        for j in range(KW):
            out[:, :, i:i + s * OH:s, j:j + s * OW:s] += patches[..., i, j]
    return out[:, :, p:p + H, p:p + Wd]


def conv2d_backward(dy, cache):
    col, W, x_shape, s, p = cache
    N, C, H, Wd = x_shape
    F, _, KH, KW = W.shape
    OH, OW = dy.shape[2], dy.shape[3]
    win = col.reshape(C, KH, KW, OH, OW, N).transpose(5, 0, 3, 4, 1, 2)
    dW = np.tensordot(dy, win, axes=([0, 2, 3], [0, 2, 3]))                   # (F, C, KH, KW)
    dx = _scatter(np.tensordot(dy, W, axes=([1], [0])).transpose(0, 3, 1, 2, 4, 5), x_shape, s, p)
    return dx, dW, dy.sum(axis=(0, 2, 3))


def conv_transpose2d_forward(x, W, b, stride=1, padding=0):
    N, Cin, H, Wd = x.shape
    _, Cout, KH, KW = W.shape
    OH, OW = (H - 1) * stride - 2 * padding + KH, (Wd - 1) * stride - 2 * padding + KW
    y = _scatter(np.tensordot(x, W, axes=([1], [0])).transpose(0, 3, 1, 2, 4, 5), (N, Cout, OH, OW), stride, padding)
    y = y + b[None, :, None, None]
    X = x.transpose(1, 2, 3, 0).reshape(Cin, H * Wd * N)
    return y, (X, W, (N, Cin, H, Wd), stride, padding)


def conv_transpose2d_backward(dy, cache):
    X, W, x_shape, s, p = cache
    N, Cin, H, Wd = x_shape
    _, Cout, KH, KW = W.shape
    win = _windows(dy, KH, KW, s, p)[:, :, :H, :Wd]            # (N, C_out, H, W, KH, KW)
    x = X.reshape(Cin, H, Wd, N).transpose(3, 0, 1, 2)
    dx = np.tensordot(win, W, axes=([1, 4, 5], [1, 2, 3])).transpose(0, 3, 1, 2)
    dW = np.tensordot(x, win, axes=([0, 2, 3], [0, 2, 3]))
    return dx, dW, dy.sum(axis=(0, 2, 3))


def maxpool2d_forward(x, size=2):
    N, C, H, Wd = x.shape
    k = size
    OH, OW = H // k, Wd // k
    win = x[:, :, :OH * k, :OW * k].reshape(N, C, OH, k, OW, k).transpose(0, 1, 2, 4, 3, 5)
    flat = win.reshape(N, C, OH, OW, k * k)
    arg = np.argmax(flat, axis=-1).astype(np.int32)            # argmax returns the first maximum
    return flat.max(axis=-1), (arg, (N, C, H, Wd), k)


def maxpool2d_backward(dy, cache):
    arg, (N, C, H, Wd), k = cache
    OH, OW = dy.shape[2], dy.shape[3]
    onehot = (np.arange(k * k) == arg[..., None]) * dy[..., None]          # (N, C, OH, OW, k*k)
    dx = np.zeros((N, C, H, Wd))
    dx[:, :, :OH * k, :OW * k] = onehot.reshape(N, C, OH, OW, k, k).transpose(0, 1, 2, 4, 3, 5).reshape(
        N, C, OH * k, OW * k)
    return dx


def upsample_nearest2d_forward(x, scale=2):
    y = np.repeat(np.repeat(x, scale, axis=2), scale, axis=3)
    return y, (x.shape, scale)


def upsample_nearest2d_backward(dy, cache):
    (N, C, H, Wd), s = cache
    return dy.reshape(N, C, H, s, Wd, s).sum(axis=(3, 5))


# ------------------------------------------------------ masked dense (MADE)
def masked_dense_forward(x, W, b, mask):
    Wm = W * mask
    return x @ Wm + b, (x, Wm, mask)


def masked_dense_backward(dy, cache):
    x, Wm, mask = cache
    return dy @ Wm.T, (x.T @ dy) * mask, dy.sum(axis=0)


# ------------------------------------------------- planar flow step, [f | logdet] as one output
def planar_joint_forward(z, u, w, b):
    a = z @ w + b[0]
    h = np.tanh(a)
    dh = 1.0 - h * h
    wu = w @ u
    det = 1.0 + dh * wu
    f = z + h[:, None] * u
    return np.concatenate([f, np.log(np.abs(det))[:, None]], axis=1), (z, u, w, h, dh, wu, det)


def planar_joint_backward(dout, cache):
    z, u, w, h, dh, wu, det = cache
    df, dld = dout[:, :-1], dout[:, -1]
    r = dld * dh / det
    da = (df @ u) * dh - 2.0 * r * h * wu
    return df + da[:, None] * w, h @ df + r.sum() * w, da @ z + r.sum() * u, np.array([da.sum()])


# ------------------------------------------------------------- the table
# every op pair above: name -> (the minivae module that holds it, the number of gradients its backward returns).
# The grader derives from it the reference backward of each op exercise, the ops it answers for the student's
# model in the vae_backward check, and how many outputs each answer has.
OP_PAIRS = {"dense": ("layers", 3), "relu": ("layers", 1), "tanh": ("layers", 1), "sigmoid": ("layers", 1),
            "reparameterize": ("gaussian", 2), "kl": ("gaussian", 2), "bernoulli_nll": ("likelihoods", 1),
            "conv2d": ("conv", 3), "conv_transpose2d": ("conv", 3), "maxpool2d": ("conv", 1),
            "upsample_nearest2d": ("conv", 1), "masked_dense": ("made", 3),
            "planar_joint": ("flows", 4)}
# the pairs the MLP VAE of the vae_backward check calls (the grader answers them for the student's model)
VAE_PAIRS = ("dense", "relu", "tanh", "sigmoid", "reparameterize", "kl", "bernoulli_nll")
