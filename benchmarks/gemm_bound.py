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


def step_flops(config, N):
    """Floating point operations (2 per multiply-add) of the matrix products of one step."""
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

            from minivae.fast import _set_blas_threads, blas_threads_control_available
            if not blas_threads_control_available():
                raise RuntimeError("split=True needs NumPy's BLAS to be OpenBLAS")
            self._set_blas_threads = _set_blas_threads
            self._pool = ThreadPoolExecutor(1)

    def _arr(self, *shape):
        return self.xp.asarray(self.rng.standard_normal(shape, dtype=np.float32).astype(self.dtype))

    def plan(self, key):
        """[(A, B, out)] of one step at batch size N (cached); key N or (N, part) for split halves."""
        N = key[0] if isinstance(key, tuple) else key
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
