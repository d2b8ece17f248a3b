"""The matmul-only lower bound of one training epoch.

A training step of a fully connected VAE is matrix products plus cheaper
elementwise work.  This module lists the exact products one step needs (the
shapes and transpositions the fast path uses) and times them alone, with the
same BLAS and threads as the model, for every minibatch of an epoch.  No
implementation of the same model with the same math can do less matmul work,
so the sum is a lower bound on its epoch time on this machine.

Per step with batch N, for every dense layer y = x @ W + b with W (m, n):
    forward   x @ W              (N, m) @ (m, n)
    backward  dW = x.T @ dy      (m, N) @ (N, n)
              dx = dy @ W.T      (N, n) @ (n, m)   -- not for the input layer
The two Gaussian heads count as one (H, 2L) layer; the FLOP count is the
same as for two (H, L) layers.

The convolutional VAEs (``arch="conv"`` / ``"conv-pool"``) add, per convolution, the three products of
minivae.conv's im2col form (P = N·OH·OW output pixels, K = C·KH·KW patch length):
    conv    forward  Wm @ col  (F, K) @ (K, P);  dW = G @ col.T  (F, P) @ (P, K);  dcol = Wm.T @ G  (K, F) @ (F, P)
            (no dcol for the input layer)
    deconv  forward  Wm.T @ X  (K, C_in) @ (C_in, P);  dX = Wm @ col  (C_in, K) @ (K, P);
            dW = X @ col.T  (C_in, P) @ (P, K)        (P = N·H·W input pixels, K = C_out·KH·KW)
(``conv_step_products``).  The im2col/col2im copies, pooling and upsampling are not matrix products and are
not in the bound.
"""
from __future__ import annotations

import numpy as np


def layer_shapes(config):
    """[(m, n)] of every dense layer, heads fused, in forward order."""
    c = config
    dims = [c.x_dim, *c.hidden]
    layers = list(zip(dims[:-1], dims[1:]))
    last = dims[-1]
    layers.append((last, 2 * c.z_dim))
    ddims = [c.z_dim, *reversed(c.hidden), c.x_dim]
    layers += list(zip(ddims[:-1], ddims[1:]))
    return layers


def step_gemms(config, N):
    """The products of one step: [(kind, m, n)] with kind 'fwd', 'dW' or 'dx' for a (m, n) layer."""
    out = []
    layers = layer_shapes(config)
    for m, n in layers:
        out.append(("fwd", m, n))
    for i, (m, n) in enumerate(reversed(layers)):
        out.append(("dW", m, n))
        if i != len(layers) - 1:            # the input layer needs no dL/dx
            out.append(("dx", m, n))
    return out


def conv_step_products(config, N):
    """The products of one step of a conv VAE: [(a, k, b, ta, tb)] for an (a, k) @ (k, b) product whose
    left operand is stored transposed, (k, a), when ``ta`` and the right one, (b, k), when ``tb`` (as
    minivae.conv computes them).  Forward products in layer order, then the backward ones in reverse."""
    from minivae.conv import conv_output_size
    from minivae.networks import build

    net = build(config)
    fwd, bwd = [], []
    shape = None                                       # (C, H, W) of the current feature map
    first = True                                       # the input layer needs no dL/dx
    layers = [*net.encoder, Layer_heads(net.enc_heads), *net.decoder, *net.dec_heads]
    for layer in layers:
        op = layer.op
        if op == "unflatten":
            shape = tuple(layer.arg)
        elif op == "maxpool":
            shape = (shape[0], shape[1] // layer.arg[0], shape[2] // layer.arg[0])
        elif op == "upsample":
            shape = (shape[0], shape[1] * layer.arg[0], shape[2] * layer.arg[0])
        elif op == "dense":
            m, n = layer.W
            fwd.append((N, m, n, False, False))                 # x @ W
            bwd.append([(m, N, n, True, False)]                 # dW = x.T @ dy
                       + ([] if first else [(N, n, m, False, True)]))   # dx = dy @ W.T
            first = False
        elif op == "conv":
            F, C, KH, KW = layer.W
            OH, OW = conv_output_size(shape[1], shape[2], KH, KW, *layer.arg)
            P, K = N * OH * OW, C * KH * KW
            fwd.append((F, K, P, False, False))                 # Wm @ col
            bwd.append([(F, P, K, False, True)]                 # dW = G @ col.T
                       + ([] if first else [(K, F, P, True, False)]))   # dcol = Wm.T @ G
            shape, first = (F, OH, OW), False
        elif op == "deconv":
            Cin, Cout, KH, KW = layer.W
            s, p = layer.arg
            P, K = N * shape[1] * shape[2], Cout * KH * KW
            fwd.append((K, Cin, P, True, False))                # Wm.T @ X
            bwd.append([(Cin, K, P, False, False),              # dX = Wm @ col
                        (Cin, P, K, False, True)])              # dW = X @ col.T
            shape = (Cout, (shape[1] - 1) * s - 2 * p + KH, (shape[2] - 1) * s - 2 * p + KW)
            first = False
    return fwd + [prod for group in reversed(bwd) for prod in group]


class Layer_heads:  # noqa: N801 -- the encoder's two Gaussian heads as one dense (H, 2L) layer
    op = "dense"

    def __init__(self, heads):
        self.W = (heads[0].W[0], sum(h.W[1] for h in heads))


def step_flops(config, N):
    """Floating point operations (2 per multiply-add) of the matrix products of one step."""
    if getattr(config, "arch", "mlp") != "mlp":
        return sum(2 * a * k * b for a, k, b, _, _ in conv_step_products(config, N))
    return sum(2 * N * m * n for _, m, n in step_gemms(config, N))


class GemmBound:
    """Times the products of an epoch: ``run(batch_sizes)`` -> seconds.

    ``xp`` is numpy or cupy; ``sync`` a callable that waits for the device.
    Operands are random and allocated once per batch size, outputs written with ``out=``.
    """

    def __init__(self, config, xp=np, dtype=np.float32, sync=None, seed=0, split=False):
        self.config, self.xp, self.dtype = config, xp, np.dtype(dtype)
        self.sync = sync or (lambda: None)
        self.rng = np.random.default_rng(seed)
        self._plans = {}
        # split=True (NumPy): like FastTrainer's split step, each batch is two halves whose products
        # run at the same time on two Python threads, with one-thread BLAS calls.  Same FLOPs.
        self.split = split
        self._pool = None
        if split:
            from concurrent.futures import ThreadPoolExecutor

            from minivae.fast.threads import blas_control_available, set_blas_threads
            if not blas_control_available():
                raise RuntimeError("split=True needs NumPy's BLAS to be OpenBLAS")
            self._set_blas_threads = set_blas_threads
            self._pool = ThreadPoolExecutor(1)

    def _arr(self, *shape):
        return self.xp.asarray(self.rng.standard_normal(shape, dtype=np.float32).astype(self.dtype))

    def plan(self, key):
        """[(A, B, out)] of one step at batch size N (cached); key N or (N, part) for split halves."""
        N = key[0] if isinstance(key, tuple) else key
        if key not in self._plans and getattr(self.config, "arch", "mlp") != "mlp":
            ops = []
            for a, k, b, ta, tb in conv_step_products(self.config, N):
                A = self._arr(k, a).T if ta else self._arr(a, k)
                B = self._arr(b, k).T if tb else self._arr(k, b)
                ops.append((A, B, self.xp.empty((a, b), self.dtype)))
            self._plans[key] = ops
        if key not in self._plans:
            ops = []
            Ws = {}
            for kind, m, n in step_gemms(self.config, N):
                W = Ws.setdefault((m, n), self._arr(m, n))
                if kind == "fwd":        # (N, m) @ (m, n)
                    ops.append((self._arr(N, m), W, self.xp.empty((N, n), self.dtype)))
                elif kind == "dW":       # (N, m).T @ (N, n)
                    ops.append((self._arr(N, m).T, self._arr(N, n), self.xp.empty((m, n), self.dtype)))
                else:                    # (N, n) @ (m, n).T
                    ops.append((self._arr(N, n), W.T, self.xp.empty((N, m), self.dtype)))
            self._plans[key] = ops
        return self._plans[key]

    def run(self, batch_sizes):
        """Run the products of one step for every batch size in the list (one epoch)."""
        mm = self.xp.matmul
        if self.split:
            self._run_split(batch_sizes)
            return
        for N in batch_sizes:
            for a, b, o in self.plan(N):
                mm(a, b, out=o)
        self.sync()

    def _run_split(self, batch_sizes):
        def half(ops):
            for a, b, o in ops:
                np.matmul(a, b, out=o)

        prev = self._set_blas_threads(1)
        try:
            for N in batch_sizes:
                h = N - N // 2
                fut = self._pool.submit(half, self.plan((N - h, 1)))
                half(self.plan((h, 0)))
                fut.result()
        finally:
            self._set_blas_threads(prev)
