"""The standard minivae model written in plain PyTorch, for the epoch benchmark.

784-400-20 ReLU encoder, 20-400-784 ReLU decoder with a Bernoulli output
(logits), analytic KL, Adam.  The loss is exactly minivae's:

    loss = 1/N sum_n [ sum_d BCEWithLogits(l_nd, x_nd) + KL(q(z|x_n) || N(0, I)) ]

Initialisation: ``nn.Linear``'s default, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for
W and b, which is minivae's scheme; :meth:`TorchVAE.from_minivae` copies a
minivae model's values so both start from the same numbers.  Data order,
binarization and eps come from the benchmark (the same NumPy arrays for both).

Nothing here is part of minivae: PyTorch is never a dependency of the library.
Run ``python benchmarks/torch_reference.py`` to train one epoch and print the loss.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class TorchVAE(nn.Module):
    def __init__(self, x_dim=784, hidden=400, z_dim=20):
        super().__init__()
        self.enc = nn.Linear(x_dim, hidden)
        self.mu = nn.Linear(hidden, z_dim)
        self.logvar = nn.Linear(hidden, z_dim)
        self.dec = nn.Linear(z_dim, hidden)
        self.out = nn.Linear(hidden, x_dim)

    def forward(self, x, eps):
        h = F.relu(self.enc(x))
        mu, logvar = self.mu(h), self.logvar(h)
        z = mu + torch.exp(0.5 * logvar) * eps
        logits = self.out(F.relu(self.dec(z)))
        recon = F.binary_cross_entropy_with_logits(logits, x, reduction="sum") / x.shape[0]
        kl = 0.5 * (mu * mu + logvar.exp() - 1.0 - logvar).sum() / x.shape[0]
        return recon + kl

    @classmethod
    def from_minivae(cls, model, device="cpu"):
        """A TorchVAE with the same weights as a 784-H-L minivae VAE (W transposed: torch stores (out, in))."""
        from minivae.backend import to_numpy
        c = model.config
        if len(c.hidden) != 1 or c.activation != "relu" or c.likelihood != "bernoulli":
            raise ValueError("the torch reference implements only the standard 784-H-L ReLU Bernoulli model")
        net = cls(c.x_dim, c.hidden[0], c.z_dim)
        names = {"enc": "enc.0", "mu": "enc.mu", "logvar": "enc.logvar", "dec": "dec.0", "out": "dec.out"}
        with torch.no_grad():
            for tname, mname in names.items():
                layer = getattr(net, tname)
                layer.weight.copy_(torch.from_numpy(to_numpy(model.params[mname + ".W"]).T.copy()))
                layer.bias.copy_(torch.from_numpy(to_numpy(model.params[mname + ".b"]).copy()))
        return net.to(device)


class TorchTrainer:
    """Model + Adam(lr) + one training step; the running loss stays on the device (no sync per step)."""

    def __init__(self, net, lr=1e-3):
        self.net = net
        self.opt = torch.optim.Adam(net.parameters(), lr=lr)

    def step(self, x, eps):
        loss = self.net(x, eps)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.detach()


def main():
    import numpy as np

    import minivae
    from minivae.data import load_mnist

    torch.set_num_threads(2)
    x_all, _ = load_mnist("train")
    model = minivae.VAE(minivae.VAEConfig(), rng=0)
    tr = TorchTrainer(TorchVAE.from_minivae(model))
    rng = np.random.default_rng(0)
    order = rng.permutation(len(x_all))
    total = 0.0
    for i in range(0, len(order), 128):
        xb = x_all[order[i:i + 128]]
        xb = (rng.random(xb.shape, dtype=np.float32) < xb).astype(np.float32)
        eps = rng.standard_normal((len(xb), 20), dtype=np.float32)
        total += float(tr.step(torch.from_numpy(xb), torch.from_numpy(eps))) * len(xb)
    print(f"one epoch of the torch reference: mean loss {total / len(order):.2f} nats")


if __name__ == "__main__":
    main()
