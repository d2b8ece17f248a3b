"""The fastest PyTorch and JAX versions of the standard VAE step, for the GPU epoch benchmark.

The same model as torch_reference.TorchVAE (784-400-20 ReLU, Bernoulli, analytic KL, the mean over the batch
of -ELBO), the same initial values (copied from a minivae model), Adam(1e-3), and the same data-pipeline idea
as minivae's CUDA graph (minivae.fast.cuda_graph): per epoch the order, the binarization noise u and eps live on
the device in bulk, and each step reads its own rows, x_b = 1[u < x[order[s N + i]]].

* ``TorchGraph``   the whole step -- gather, forward, backward, ``Adam(capturable=True)`` -- captured once
                   with ``torch.cuda.graph`` and replayed per step; the step index is a device tensor the
                   graph advances, so one graph serves every step (as PyTorch's documentation captures a whole
                   network).  The last, short batch runs eagerly.
* ``JaxTrainer``   ``mode="jit"``: one jitted step per batch (dispatched from Python); ``mode="scan"``: the
                   epoch's full batches in one ``jit(lax.scan)``, then the short batch.  Adam written out
                   (minivae's formula: lr sqrt(1 - b2^t) / (1 - b1^t) and eps sqrt(1 - b2^t)); float32 products at
                   full precision (``jax_default_matmul_precision = "highest"``: no TF32).

Nothing here is part of minivae: PyTorch and JAX are never dependencies of the library.
"""
from __future__ import annotations

import numpy as np

from minivae.backend import to_numpy

LAYERS = {"enc": "enc.0", "mu": "enc.mu", "logvar": "enc.logvar", "dec": "dec.0", "out": "dec.out"}


def initial_params(model):
    """{name: (W (in, out), b)} as host float32 arrays, from a 784-H-L minivae model."""
    c = model.config
    if len(c.hidden) != 1 or c.activation != "relu" or c.likelihood != "bernoulli":
        raise ValueError("the references implement only the standard 784-H-L ReLU Bernoulli model")
    return {k: (to_numpy(model.params[v + ".W"]).astype(np.float32), to_numpy(model.params[v + ".b"]).astype(np.float32))
            for k, v in LAYERS.items()}


def epoch_host_order(n_all, n, seed, e):
    """The benchmark's order for epoch e (the same for every implementation)."""
    return np.random.default_rng([seed, e]).permutation(n_all)[:n]


# ----------------------------------------------------------------------------------------------- PyTorch
class TorchGraph:
    """The whole training step of TorchVAE captured in one CUDA graph (see the module docstring)."""

    def __init__(self, model, x_dev, n, N, seed, warmup=3):
        import torch
        from torch_reference import TorchVAE
        self.torch = torch
        self.net = TorchVAE.from_minivae(model, device="cuda")
        self.opt = torch.optim.Adam(self.net.parameters(), lr=1e-3, capturable=True)
        self.x, self.n, self.N, self.seed = x_dev, n, N, seed
        D, L = x_dev.shape[1], model.config.z_dim
        self.steps, self.short = n // N, n % N
        dev = x_dev.device
        self.order = torch.zeros(n, dtype=torch.long, device=dev)
        self.u = torch.zeros(n, D, device=dev)
        self.eps = torch.zeros(n, L, device=dev)
        self.ctr = torch.zeros((), dtype=torch.long, device=dev)
        self.losses = torch.zeros(max(self.steps, 1), device=dev)
        self.ar = torch.arange(N, device=dev)
        self.order.copy_(torch.as_tensor(np.arange(n) % x_dev.shape[0], device=dev))
        # warm up on a side stream (as torch.cuda.graph requires), then restore the initial state
        snap = [p.detach().clone() for p in self.net.parameters()]
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(warmup):
                self.opt.zero_grad(set_to_none=True)
                self._step()
        torch.cuda.current_stream().wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        self.opt.zero_grad(set_to_none=True)
        with torch.cuda.graph(self.graph):
            self._step()
        with torch.no_grad():
            for p, v in zip(self.net.parameters(), snap):
                p.copy_(v)
            for st in self.opt.state.values():
                for k, v in st.items():
                    if torch.is_tensor(v):
                        v.zero_()                        # m, v and the step count (a device tensor)
        self.ctr.zero_()

    def _step(self):
        rows = self.ctr * self.N + self.ar
        xb = (self.u[rows] < self.x[self.order[rows]]).float()
        loss = self.net(xb, self.eps[rows])
        loss.backward()
        self.opt.step()
        self.losses.index_copy_(0, self.ctr.view(1), loss.detach().view(1))   # (a 0-d index would sync)
        self.ctr += 1

    def epoch(self, e):
        """One epoch (data drawn on the device, graph replays, the short batch eagerly); the mean loss (device)."""
        torch = self.torch
        g = torch.Generator(device="cuda").manual_seed(self.seed * 1000 + e)
        self.order.copy_(torch.as_tensor(epoch_host_order(self.x.shape[0], self.n, self.seed, e), device="cuda"))
        torch.rand(self.u.shape, generator=g, device="cuda", out=self.u)
        torch.randn(self.eps.shape, generator=g, device="cuda", out=self.eps)
        self.ctr.zero_()
        for _ in range(self.steps):
            self.graph.replay()
        total = self.losses.sum() * self.N
        if self.short:
            lo = self.steps * self.N
            xb = (self.u[lo:] < self.x[self.order[lo:]]).float()
            for p in self.net.parameters():
                p.grad = None                              # the graph keeps its own gradient memory
            loss = self.net(xb, self.eps[lo:])
            loss.backward()
            self.opt.step()
            total = total + loss.detach() * self.short
        return total / self.n


# ----------------------------------------------------------------------------------------------- JAX
class JaxTrainer:
    """TorchVAE's model and minivae's Adam in JAX; ``mode`` "jit" (a jitted step per batch) or "scan"."""

    def __init__(self, model, x_host, n, N, seed, mode="scan", lr=1e-3, b1=0.9, b2=0.999, eps=1e-8):
        import jax
        import jax.numpy as jnp
        jax.config.update("jax_default_matmul_precision", "highest")
        self.jax, self.jnp, self.mode = jax, jnp, mode
        self.params = {k: (jnp.asarray(W), jnp.asarray(b)) for k, (W, b) in initial_params(model).items()}
        self.m = jax.tree_util.tree_map(jnp.zeros_like, self.params)
        self.v = jax.tree_util.tree_map(jnp.zeros_like, self.params)
        self.t = jnp.zeros((), jnp.int32)
        self.x = jnp.asarray(x_host)
        self.n, self.N, self.seed = n, N, seed
        self.steps, self.short = n // N, n % N
        self.L = model.config.z_dim
        hyper = (lr, b1, b2, eps)

        def loss_fn(p, xb, e):
            h = jax.nn.relu(xb @ p["enc"][0] + p["enc"][1])
            mu = h @ p["mu"][0] + p["mu"][1]
            lv = h @ p["logvar"][0] + p["logvar"][1]
            z = mu + jnp.exp(0.5 * lv) * e
            lg = jax.nn.relu(z @ p["dec"][0] + p["dec"][1]) @ p["out"][0] + p["out"][1]
            rec = jnp.sum(jnp.maximum(lg, 0) - xb * lg + jnp.log1p(jnp.exp(-jnp.abs(lg))))
            kl = 0.5 * jnp.sum(mu * mu + jnp.exp(lv) - 1.0 - lv)
            return (rec + kl) / xb.shape[0]

        def adam(state, g):
            p, m, v, t = state
            lr, b1, b2, eps_ = hyper
            t = t + 1
            tf = t.astype(jnp.float32)
            bc1, bc2 = 1.0 - b1 ** tf, 1.0 - b2 ** tf
            lr_t, eps_t = lr * jnp.sqrt(bc2) / bc1, eps_ * jnp.sqrt(bc2)
            m = jax.tree_util.tree_map(lambda m_, g_: b1 * m_ + (1 - b1) * g_, m, g)
            v = jax.tree_util.tree_map(lambda v_, g_: b2 * v_ + (1 - b2) * g_ * g_, v, g)
            p = jax.tree_util.tree_map(lambda p_, m_, v_: p_ - lr_t * m_ / (jnp.sqrt(v_) + eps_t), p, m, v)
            return p, m, v, t

        def step(state, x, order, u, e_all, i, size):
            rows = i * N + jnp.arange(size)
            xb = (u[rows] < x[order[rows]]).astype(jnp.float32)
            loss, g = jax.value_and_grad(loss_fn)(state[0], xb, e_all[rows])
            return adam(state, g), loss

        def scan_epoch(state, x, order, u, e_all):
            def body(st, i):
                return step(st, x, order, u, e_all, i, N)
            return jax.lax.scan(body, state, jnp.arange(self.steps))

        self._step = jax.jit(lambda st, x, o, u, e, i: step(st, x, o, u, e, i, N), donate_argnums=(0,))
        self._scan = jax.jit(scan_epoch, donate_argnums=(0,))
        if self.short:
            def short_step(st, x, o, u, e):
                rows = self.steps * N + jnp.arange(self.short)
                xb = (u[rows] < x[o[rows]]).astype(jnp.float32)
                loss, g = jax.value_and_grad(loss_fn)(st[0], xb, e[rows])
                return adam(st, g), loss
            self._short = jax.jit(short_step, donate_argnums=(0,))

    def epoch(self, e):
        jax, jnp = self.jax, self.jnp
        key = jax.random.PRNGKey(self.seed * 1000 + e)
        ku, ke = jax.random.split(key)
        order = jnp.asarray(epoch_host_order(self.x.shape[0], self.n, self.seed, e).astype(np.int32))
        u = jax.random.uniform(ku, (self.n, self.x.shape[1]), jnp.float32)
        eps = jax.random.normal(ke, (self.n, self.L), jnp.float32)
        state = (self.params, self.m, self.v, self.t)
        if self.mode == "scan":
            state, losses = self._scan(state, self.x, order, u, eps)
            total = losses.sum() * self.N
        else:
            total = jnp.zeros((), jnp.float32)
            for i in range(self.steps):
                state, loss = self._step(state, self.x, order, u, eps, i)
                total = total + loss * self.N
        if self.short:
            state, loss = self._short(state, self.x, order, u, eps)
            total = total + loss * self.short
        self.params, self.m, self.v, self.t = state
        return total / self.n

    def block(self, value):
        return float(self.jax.block_until_ready(value))
