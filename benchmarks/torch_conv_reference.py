"""The conv VAE recipe (``python -m minivae train --recipe conv``) trained in plain PyTorch, as a reference.

The same architecture, layer by layer and with the same weight layouts as minivae's ``arch="conv"`` (or
``--arch conv-pool``):

    encoder  conv 1->32 k4 s2 p1, ReLU, conv 32->64 k4 s2 p1, ReLU, flatten (C, H, W), dense 3136->256, ReLU,
             heads mu, logvar 256->20
    decoder  dense 20->256, ReLU, dense 256->3136, ReLU, reshape 64x7x7, transposed conv 64->32 k4 s2 p1, ReLU,
             transposed conv 32->1 k4 s2 p1 -> Bernoulli logits

and the same recipe: PyTorch's default init (U(±1/sqrt(fan_in)) for W and b, which minivae copies, fan_in
counted as PyTorch counts it), dynamic binarization (a fresh Bernoulli draw of every training minibatch),
Adam(lr 1e-3, betas (0.9, 0.999), eps 1e-8), batch 128, 10 epochs, the loss

    loss = 1/N sum_n [ sum_d BCEWithLogits(l_nd, x_nd) + KL(q(z|x_n) || N(0, I)) ].

Evaluation is minivae's: the test set binarized once with the fixed seed minivae's ``eval`` uses
(``minivae.data.static_binarize(x, seed=12345)``), eps drawn from ``np.random.default_rng(12345)`` in the same
order (batches of 100 examples, one eps each for the -ELBO, then ``k`` per example for the IW bound), so the two
test numbers differ only through the trained weights.  Training randomness (init, shuffling, binarization,
eps) is PyTorch's / NumPy's own, seeded by ``--seed``; the two runs are independent draws of the same recipe.

Nothing here is part of minivae: PyTorch is never a dependency of the library or its tests.

    python benchmarks/torch_conv_reference.py [--arch conv|conv-pool] [--epochs 10] [--iw-k 1000] [--json F]
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

TEST_SEED = 12345       # minivae.train.TEST_SEED


class TorchConvVAE(nn.Module):
    def __init__(self, arch="conv", z_dim=20, hidden=256, image=(1, 28, 28)):
        super().__init__()
        C, H, W = image
        self.arch, self.feat = arch, (64, H // 4, W // 4)
        n_feat = 64 * (H // 4) * (W // 4)
        if arch == "conv":
            self.enc_conv = nn.ModuleList([nn.Conv2d(C, 32, 4, 2, 1), nn.Conv2d(32, 64, 4, 2, 1)])
            self.dec_conv = nn.ModuleList([nn.ConvTranspose2d(64, 32, 4, 2, 1), nn.ConvTranspose2d(32, C, 4, 2, 1)])
        else:
            self.enc_conv = nn.ModuleList([nn.Conv2d(C, 32, 3, 1, 1), nn.Conv2d(32, 64, 3, 1, 1)])
            self.dec_conv = nn.ModuleList([nn.Conv2d(64, 32, 3, 1, 1), nn.Conv2d(32, C, 3, 1, 1)])
        self.enc = nn.Linear(n_feat, hidden)
        self.mu, self.logvar = nn.Linear(hidden, z_dim), nn.Linear(hidden, z_dim)
        self.dec0, self.dec1 = nn.Linear(z_dim, hidden), nn.Linear(hidden, n_feat)
        self.image = image

    @classmethod
    def from_minivae(cls, model):
        """A TorchConvVAE holding a minivae conv model's values (dense W transposed: torch stores (out, in))."""
        from minivae.backend import to_numpy
        c = model.config
        net = cls(c.arch, c.z_dim, c.hidden[0], c.image_shape)
        kind = "deconv" if c.arch == "conv" else "conv"
        names = {"enc_conv.0": "enc.conv.0", "enc_conv.1": "enc.conv.1", "enc": "enc.0", "mu": "enc.mu",
                 "logvar": "enc.logvar", "dec0": "dec.0", "dec1": "dec.1", "dec_conv.0": f"dec.{kind}.0",
                 "dec_conv.1": f"dec.{kind}.1"}
        with torch.no_grad():
            for tname, mname in names.items():
                layer = net.get_submodule(tname)
                W = to_numpy(model.params[mname + ".W"])
                layer.weight.copy_(torch.from_numpy((W.T if W.ndim == 2 else W).copy()))
                layer.bias.copy_(torch.from_numpy(to_numpy(model.params[mname + ".b"]).copy()))
        return net

    def encode(self, x):
        h = x.reshape(len(x), *self.image)
        for conv in self.enc_conv:
            h = F.relu(conv(h))
            if self.arch == "conv-pool":
                h = F.max_pool2d(h, 2)
        h = F.relu(self.enc(h.flatten(1)))
        return self.mu(h), self.logvar(h)

    def decode(self, z):
        g = F.relu(self.dec1(F.relu(self.dec0(z)))).reshape(len(z), *self.feat)
        if self.arch == "conv":
            g = self.dec_conv[1](F.relu(self.dec_conv[0](g)))
        else:
            g = F.interpolate(g, scale_factor=2, mode="nearest")
            g = F.interpolate(F.relu(self.dec_conv[0](g)), scale_factor=2, mode="nearest")
            g = self.dec_conv[1](g)
        return g.flatten(1)                                              # logits (M, D), (C, H, W) order

    def parts(self, x, eps):
        """Per-example reconstruction -log p(x|z) and analytic KL, (N,) each."""
        mu, logvar = self.encode(x)
        z = mu + torch.exp(0.5 * logvar) * eps
        rec = F.binary_cross_entropy_with_logits(self.decode(z), x, reduction="none").sum(1)
        kl = 0.5 * (mu * mu + logvar.exp() - 1.0 - logvar).sum(1)
        return rec, kl

    def log_weights(self, x, eps):
        """log p(x|z) + log p(z) - log q(z|x) for eps (S, N, L) -> (S, N)."""
        S, N, L = eps.shape
        mu, logvar = self.encode(x)
        z = mu + torch.exp(0.5 * logvar) * eps                             # (S, N, L)
        logits = self.decode(z.reshape(S * N, L)).reshape(S, N, -1)
        log_px = -F.binary_cross_entropy_with_logits(logits, x.expand(S, N, -1), reduction="none").sum(-1)
        log_pz = -0.5 * (z * z + math.log(2 * math.pi)).sum(-1)
        log_qz = -0.5 * (eps * eps + logvar + math.log(2 * math.pi)).sum(-1)
        return log_px + log_pz - log_qz


def static_binarize(x, seed):
    """minivae.data.static_binarize: x ~ Bernoulli(pixel) once, from np.random.default_rng(seed)."""
    rng = np.random.default_rng(seed)
    return (rng.random(x.shape, dtype=np.float32) < x).astype(np.float32)


@torch.no_grad()
def evaluate(net, x, iw_k=0, batch=100, chunk=10):
    """Test -ELBO (and IW NLL) with minivae's eps stream; float64 log-mean-exp."""
    rng = np.random.default_rng(TEST_SEED)
    L = net.mu.out_features
    tot = {"neg_elbo": 0.0, "recon": 0.0, "kl": 0.0}
    for i in range(0, len(x), batch):
        xb = torch.from_numpy(x[i:i + batch])
        eps = torch.from_numpy(rng.standard_normal((1, len(xb), L)).astype(np.float32))[0]
        rec, kl = net.parts(xb, eps)
        tot["recon"] += float(rec.sum())
        tot["kl"] += float(kl.sum())
    out = {k: v / len(x) for k, v in tot.items()}
    out["neg_elbo"] = out["recon"] + out["kl"]
    if iw_k:
        ll = np.empty(len(x))
        t0 = time.perf_counter()
        for i in range(0, len(x), batch):
            xb = torch.from_numpy(x[i:i + batch])
            lws = []
            for done in range(0, iw_k, chunk):
                s = min(chunk, iw_k - done)
                eps = torch.from_numpy(rng.standard_normal((s, len(xb), L)).astype(np.float32))
                lws.append(net.log_weights(xb, eps).double().numpy())
            lw = np.concatenate(lws)
            m = lw.max(0)
            ll[i:i + len(xb)] = m + np.log(np.exp(lw - m).mean(0))
        out.update(iw_k=iw_k, iw_nll=float(-ll.mean()), iw_nll_sem=float(ll.std(ddof=1) / np.sqrt(len(ll))),
                   iw_seconds=time.perf_counter() - t0)
    return out


def main(argv=None):
    from minivae.data import load_mnist

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=["conv", "conv-pool"], default="conv")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--n-train", type=int, default=None, help="first N training images only (a smoke run)")
    p.add_argument("--n-test", type=int, default=None)
    p.add_argument("--iw-k", type=int, default=0, help="also the IW NLL with k samples (e.g. 1000; slow)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="write the numbers here")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    x_train, _ = load_mnist("train")
    x_test, _ = load_mnist("test")
    x_train, x_test = x_train[:args.n_train], x_test[:args.n_test]
    x_eval = static_binarize(x_test, TEST_SEED)
    net = TorchConvVAE(args.arch)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
    rng = np.random.default_rng(args.seed)
    n_params = sum(t.numel() for t in net.parameters())
    print(f"torch {torch.__version__}, {args.arch}, {n_params} parameters, {args.threads} threads")
    history, t_start = [], time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        t0 = time.perf_counter()
        order = rng.permutation(len(x_train))
        total = 0.0
        net.train()
        for i in range(0, len(order), 128):
            xb = x_train[order[i:i + 128]]
            xb = torch.from_numpy((rng.random(xb.shape, dtype=np.float32) < xb).astype(np.float32))
            eps = torch.from_numpy(rng.standard_normal((len(xb), 20), dtype=np.float32))
            rec, kl = net.parts(xb, eps)
            loss = (rec + kl).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(xb)
        net.eval()
        test = evaluate(net, x_eval)
        history.append({"epoch": epoch, "train_neg_elbo": total / len(order), "test_neg_elbo": test["neg_elbo"],
                        "seconds": time.perf_counter() - t0})
        print(f"epoch {epoch:3d}  train -ELBO {total / len(order):8.3f}  test -ELBO {test['neg_elbo']:8.3f} "
              f"(recon {test['recon']:.3f}, KL {test['kl']:.3f})  {time.perf_counter() - t0:.1f}s", flush=True)
    train_seconds = time.perf_counter() - t_start
    final = evaluate(net, x_eval, iw_k=args.iw_k)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"final test -ELBO {final['neg_elbo']:.3f} nats on {len(x_eval)} images; training {train_seconds:.0f}s; "
          f"peak RSS {peak_mb:.0f} MB")
    if args.iw_k:
        print(f"IW NLL (k={args.iw_k}) {final['iw_nll']:.3f} +- {final['iw_nll_sem']:.3f} ({final['iw_seconds']:.0f}s)")
    if args.json:
        doc = dict(final, arch=args.arch, epochs=args.epochs, seed=args.seed, threads=args.threads,
                   torch=torch.__version__, n_params=n_params, train_seconds=train_seconds, peak_rss_mb=peak_mb,
                   history=history)
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
