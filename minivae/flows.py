"""Normalising flows in q(z|x): the planar flow and one inverse autoregressive flow step, as op pairs.

A flow pushes the Gaussian sample z0 = mu + sigma * eps through invertible maps f_1, ..., f_T; by the change of
variables the density of z_T = f_T(...f_1(z0)) is

    log q(z_T|x) = log q0(z0|x) - sum_t log |det df_t/dz_{t-1}|,

so every op here returns, beside its output, the log-determinant of its Jacobian, one number per row, and its
backward takes the upstream gradient of both: ``(dout, dlogdet)``.  The model (:mod:`minivae.families`)
sends dL/dlogdet = -dL/dlog q into each step.

Shapes: ``M`` rows (samples times examples), ``L`` latent.

Planar flow (Rezende & Mohamed 2015, section 4.1)
-------------------------------------------------
    f(z) = z + u tanh(w . z + b),          u, w (L,), b (1,)

Its Jacobian is I + u psi^T with psi = (1 - tanh^2(a)) w, a = w . z + b, and by the matrix determinant lemma

    det = 1 + u . psi = 1 + (1 - h^2) (w . u),        h = tanh(a).

f is invertible when w . u >= -1 (Appendix A of the paper); the free parameter u is mapped to one that
satisfies it by :func:`planar_uhat_forward`.

Inverse autoregressive flow step (Kingma, Salimans, Jozefowicz, Chen, Sutskever & Welling 2016)
-----------------------------------------------------------------------------------------------
A MADE (:mod:`minivae.made`, one tanh hidden layer) reads z and gives two outputs m, s (L,) each, output j
depending on z_1..z_{j-1} only.  With sigma = sigmoid(s) (the numerically stable form of their eq. 14):

    z' = sigma * z + (1 - sigma) * m.

dz'_j / dz_i is 0 for i > j (m_j, s_j do not see z_i for i >= j) and sigma_j for i = j: the Jacobian is
triangular and

    log |det| = sum_j log sigma_j = -sum_j softplus(-s_j).

This step has no context input h (the paper's IAF also reads a context vector from the encoder): its
parameters are global, shared by every x.
"""
from __future__ import annotations

from .backend import get_array_module
from .layers import sigmoid, softplus
from .made import masked_dense_backward, masked_dense_forward


# ----------------------------------------------------------------------------
# planar flow
# ----------------------------------------------------------------------------
def planar_uhat_forward(u, w):
    """The invertible planar flow's u (Rezende & Mohamed 2015, Appendix A):

        u_hat = u + (m(a) - a) w / |w|^2,      a = w . u,   m(a) = -1 + softplus(a),

    so that w . u_hat = m(a) > -1 whatever u is.  Shapes: u, w (L,) -> u_hat (L,).
    """
    xp = get_array_module(u, w)
    a = xp.dot(w, u)
    s = xp.dot(w, w)                       # |w|^2
    c = (softplus(a) - 1.0 - a) / s        # (m(a) - a) / |w|^2
    return u + c * w, (u, w, a, s, c)


def planar_uhat_backward(duhat, cache):
    """Gradients of u_hat = u + c w with c = (m(a) - a) / s, a = w . u, s = |w|^2.

    Derivation (dc/du, dc/dw, then dL/du and dL/dw from g = dL/du_hat):
        m'(a) = sigmoid(a)
        dc/du = (sigmoid(a) - 1) w / s
        dc/dw = (sigmoid(a) - 1) u / s - 2 c w / s
        dL/du = g + (g . w) dc/du
        dL/dw = c g + (g . w) dc/dw
    (end of derivation)

    Returns ``(du, dw)``, each (L,).
    """
    u, w, a, s, c = cache
    xp = get_array_module(duhat)
    gw = xp.dot(duhat, w)                                   # g . w, the gradient's part along w
    k = (sigmoid(a) - 1.0) / s                              # m'(a) - 1 over |w|^2
    du = duhat + gw * k * w                                 # direct + through c's a = w . u
    dw = c * duhat + gw * (k * u - (2.0 * c / s) * w)       # c g + through c's a and |w|^2
    return du, dw


def planar_forward(z, u, w, b):
    """One planar step f(z) = z + u tanh(w . z + b) and log |det df/dz| = log |1 + (1 - h^2)(w . u)|.

    Shapes: z (M, L), u and w (L,), b (1,) -> (f (M, L), logdet (M,)), cache.
    Pass u_hat (:func:`planar_uhat_forward`) as u for an invertible step.
    """
    xp = get_array_module(z, u, w, b)
    a = z @ w + b[0]                       # (M,)
    h = xp.tanh(a)
    f = z + h[:, None] * u
    dh = 1.0 - h * h                       # tanh'(a)
    wu = xp.dot(w, u)
    det = 1.0 + dh * wu                    # matrix determinant lemma: det(I + u psi^T) = 1 + u . psi
    logdet = xp.log(xp.abs(det))
    return f, logdet, (z, u, w, h, dh, wu, det)


def planar_backward(df, dlogdet, cache):
    """Gradients of a planar step, through both outputs f (M, L) and logdet (M,).

    With a = w . z + b, h = tanh(a), h' = 1 - h^2, det = 1 + h' (w . u), upstream F = dL/df (M, L) and
    G = dL/dlogdet (M,):

    Derivation (dL/da first, then dL/dz, dL/du, dL/dw, dL/db):
        dh'/da         = -2 h h'
        dlogdet/da     = -2 h h' (w . u) / det
        dL/da_m        = (F_m . u) h'_m + G_m (-2 h_m h'_m (w . u) / det_m)
        dL/dz_m        = F_m + dL/da_m w                   (f = z + ...; a = w . z + b)
        dL/du          = sum_m F_m h_m + sum_m G_m h'_m / det_m w
        dL/dw          = sum_m dL/da_m z_m + sum_m G_m h'_m / det_m u
        dL/db          = sum_m dL/da_m
    (end of derivation)

    Returns ``(dz, du, dw, db)``: (M, L), (L,), (L,), (1,).
    """
    z, u, w, h, dh, wu, det = cache
    ### BEGIN SOLUTION planar_joint_backward
    r = dlogdet * dh / det                                   # (M,) G h' / det: logdet's d/d(w . u)
    da = (df @ u) * dh + r * (-2.0 * h * wu)                 # dL/da through f and through logdet
    dz = df + da[:, None] * w                                # identity path + through a = w . z + b
    du = h @ df + r.sum() * w                                # f's u h + logdet's h' w / det
    dw = da @ z + r.sum() * u                                # through a + logdet's h' u / det
    db = da.sum(keepdims=True)                               # da/db = 1
    ### END SOLUTION
    return dz, du, dw, db


def planar_joint_forward(z, u, w, b):
    """:func:`planar_forward` with its two outputs as one array [f | logdet], (M, L + 1): the form of a one-output
    op pair (the assignments tool checks ``planar_backward`` through this pair)."""
    xp = get_array_module(z)
    f, logdet, cache = planar_forward(z, u, w, b)
    return xp.concatenate([f, logdet[:, None]], axis=1), cache


def planar_joint_backward(dout, cache):
    """:func:`planar_backward` with the upstream gradient of [f | logdet] as one array dout (M, L + 1)."""
    return planar_backward(dout[:, :-1], dout[:, -1], cache)


# ----------------------------------------------------------------------------
# inverse autoregressive flow step
# ----------------------------------------------------------------------------
def iaf_forward(z, W1, b1, W2, b2, masks):
    """One IAF step on the MADE of ``masks`` (:func:`minivae.made.made_masks` with 2 output groups):

        g = tanh(z @ (M1 * W1) + b1),   [m, s] = g @ (M2 * W2) + b2,   sigma = sigmoid(s)
        z' = sigma * z + (1 - sigma) * m,      logdet = sum_j log sigma_j = -sum_j softplus(-s_j)

    Shapes: z (M, L), W1 (L, H), b1 (H,), W2 (H, 2L), b2 (2L,) -> (z' (M, L), logdet (M,)), cache.
    """
    xp = get_array_module(z)
    L = z.shape[1]
    pre, c1 = masked_dense_forward(z, W1, b1, masks[0])
    g = xp.tanh(pre)
    out, c2 = masked_dense_forward(g, W2, b2, masks[1])
    m, s = out[:, :L], out[:, L:]
    sig = sigmoid(s)
    z_new = sig * z + (1.0 - sig) * m
    logdet = -softplus(-s).sum(axis=1)                      # log sigmoid(s), stable for any s
    return z_new, logdet, (z, m, sig, g, c1, c2)


def iaf_backward(dz_new, dlogdet, cache):
    """Gradients of one IAF step through z' (M, L) and logdet (M,).

    With upstream F = dL/dz' and G = dL/dlogdet:

    Derivation (dL/dm, dL/ds, then the MADE's backward, then dL/dz):
        dL/dm      = F (1 - sigma)
        dL/dsigma  = F (z - m)
        dsigma/ds  = sigma (1 - sigma),    d log sigma / ds = 1 - sigma
        dL/ds      = F (z - m) sigma (1 - sigma) + G (1 - sigma)
        [dL/dm, dL/ds] -> masked dense (W2) -> tanh' = 1 - g^2 -> masked dense (W1) -> dL/dz through the MADE
        dL/dz      = F sigma + dL/dz through the MADE
    (end of derivation)

    Returns ``(dz, dW1, db1, dW2, db2)``.
    """
    z, m, sig, g, c1, c2 = cache
    xp = get_array_module(z)
    dm = dz_new * (1.0 - sig)                                          # z' = ... + (1 - sigma) m
    ds = dz_new * (z - m) * sig * (1.0 - sig) + dlogdet[:, None] * (1.0 - sig)   # through sigma and log sigma
    dg, dW2, db2 = masked_dense_backward(xp.concatenate([dm, ds], axis=1), c2)
    dpre = dg * (1.0 - g * g)                                          # tanh' = 1 - g^2
    dz_made, dW1, db1 = masked_dense_backward(dpre, c1)
    return dz_new * sig + dz_made, dW1, db1, dW2, db2                  # direct path sigma z + through m, s
