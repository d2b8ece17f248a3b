"""Lesson 09 - The whole VAE backward, assembled from the pieces.

Earlier lessons derived each op pair (dense, activation, reparameterization,
Bernoulli NLL, analytic KL) on its own.  Here we chain them by hand for a VAE
with one hidden layer, run the backward pass in reverse order, and check that
the hand-assembled gradients are *the same numbers* that ``model.loss`` returns
(same eps), and then that the whole model passes a finite-difference gradient
check with two hidden layers, several samples of z and beta != 1.

Run:  python lessons/09_vae_backward.py [--quick] [--out DIR] [--seed N]
Exercise: ``vae_backward`` (the backward in minivae/model.py).
"""
# %% [markdown]
# ## 1. The forward graph and the loss
#
# For a minibatch x (N, D), S samples of eps (S, N, L), one hidden layer of width H:
#
# $$a = x W_1 + b_1,\quad h = \mathrm{relu}(a)$$
# $$\mu = h W_\mu + b_\mu,\quad \ell = h W_\ell + b_\ell \quad(\ell = \log\sigma^2)$$
# $$z_{sn} = \mu_n + e^{\ell_n/2} \odot \varepsilon_{sn}$$
# $$g_{sn} = \mathrm{relu}(z_{sn} V_1 + c_1),\quad o_{sn} = g_{sn} V_o + c_o \quad(\text{logits})$$
# $$r_{sn} = \sum_d \mathrm{softplus}(o_{snd}) - x_{nd}\, o_{snd} \quad(= -\log p(x_n|z_{sn}))$$
# $$k_n = \tfrac12 \sum_j (\mu_{nj}^2 + e^{\ell_{nj}} - 1 - \ell_{nj}) \quad(= \mathrm{KL}(q(z|x_n)\,\|\,p(z)))$$
# $$\mathcal{J} = \frac{1}{SN}\sum_{s,n} r_{sn} + \frac{\beta}{N}\sum_n k_n$$
#
# ## 2. The backward, in reverse order (chain rule, one node at a time)
#
# * $\partial\mathcal{J}/\partial r_{sn} = 1/(SN)$ and $\partial\mathcal{J}/\partial k_n = \beta/N$.
# * Bernoulli NLL: $\partial r/\partial o = \sigma(o) - x$, so $\bar o = \frac{1}{SN}(\sigma(o) - x)$.
# * Output dense: $\bar V_o = g^\top \bar o$, $\bar c_o = \sum \bar o$, $\bar g = \bar o V_o^\top$
#   (the S samples are stacked as S*N rows, so the sums over rows also sum over samples).
# * ReLU: $\bar a' = \bar g \odot [z V_1 + c_1 > 0]$; dense: $\bar V_1 = z^\top \bar a'$, ..., $\bar z = \bar a' V_1^\top$.
# * Reparameterization: $\bar\mu = \sum_s \bar z_s$, $\bar\ell = \sum_s \bar z_s \odot \varepsilon_s \odot \tfrac12 e^{\ell/2}$.
# * KL adds: $\bar\mu \mathrel{+}= \frac{\beta}{N}\mu$, $\bar\ell \mathrel{+}= \frac{\beta}{N}\tfrac12(e^{\ell} - 1)$.
# * The two heads share h, so their contributions ADD: $\bar h = \bar\mu W_\mu^\top + \bar\ell W_\ell^\top$.
# * ReLU and the first dense give $\bar W_1 = x^\top(\bar h \odot [a > 0])$, $\bar b_1$.
#
# Forgetting the sum over samples in the reparameterization, or the "+=" where h
# feeds two heads, are the classic bugs; the checks below catch both.

# %%
import os
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import minivae  # noqa: E402
import minivae.data  # noqa: E402
from minivae.gaussian import kl_backward, kl_forward, reparameterize_backward, reparameterize_forward  # noqa: E402
from minivae.layers import dense_backward, dense_forward, relu_backward, relu_forward  # noqa: E402
from minivae.likelihoods import bernoulli_nll_backward, bernoulli_nll_forward  # noqa: E402
from minivae.lessonkit import check, lesson_args  # noqa: E402


# %% [markdown]
# ## 3. The forward and backward by hand, op pair by op pair

# %%
def hand_forward_backward(p, x, eps, beta):
    """Return (loss, grads) for a 1-hidden-layer ReLU/Bernoulli VAE, chained by hand."""
    S, N, L = eps.shape
    D = x.shape[1]
    # ---- forward (keep every cache)
    a, c1 = dense_forward(x, p["enc.0.W"], p["enc.0.b"])
    h, c1r = relu_forward(a)
    mu, cmu = dense_forward(h, p["enc.mu.W"], p["enc.mu.b"])
    logvar, clv = dense_forward(h, p["enc.logvar.W"], p["enc.logvar.b"])
    z, crep = reparameterize_forward(mu, logvar, eps)                       # (S, N, L)
    a2, c2 = dense_forward(z.reshape(S * N, L), p["dec.0.W"], p["dec.0.b"])
    g, c2r = relu_forward(a2)
    logits, co = dense_forward(g, p["dec.out.W"], p["dec.out.b"])
    rec, crec = bernoulli_nll_forward(logits.reshape(S, N, D), x)           # (S, N)
    kl, ckl = kl_forward(mu, logvar)                                        # (N,)
    loss = rec.mean() + beta * kl.mean()

    # ---- backward, in reverse
    G = {}
    drec = np.full((S, N), 1.0 / (S * N), dtype=x.dtype)
    dlogits = bernoulli_nll_backward(drec, crec).reshape(S * N, D)
    dg, G["dec.out.W"], G["dec.out.b"] = dense_backward(dlogits, co)
    da2 = relu_backward(dg, c2r)
    dz, G["dec.0.W"], G["dec.0.b"] = dense_backward(da2, c2)
    dmu, dlogvar = reparameterize_backward(dz.reshape(S, N, L), crep)      # sums over S inside
    dmu_kl, dlv_kl = kl_backward(np.full((N,), beta / N, dtype=x.dtype), ckl)
    dmu = dmu + dmu_kl
    dlogvar = dlogvar + dlv_kl
    dh, G["enc.mu.W"], G["enc.mu.b"] = dense_backward(dmu, cmu)
    dh_lv, G["enc.logvar.W"], G["enc.logvar.b"] = dense_backward(dlogvar, clv)
    dh = dh + dh_lv                                                          # h feeds both heads
    da = relu_backward(dh, c1r)
    _, G["enc.0.W"], G["enc.0.b"] = dense_backward(da, c1)
    return loss, G


def main(argv=None):
    args = lesson_args("lesson_output/09_vae_backward", __doc__.splitlines()[0], argv,
                       quick_help="smaller checks (for tests)")
    rng = np.random.default_rng(args.seed)
    t0 = time.time()

    # %% hand-assembled vs model.loss, float64, on real (binarized) MNIST digits
    x_all, _ = minivae.data.load_mnist("test")
    N, S, beta = (8, 3, 0.7)
    x = minivae.data.binarize(x_all[:N], rng).astype(np.float64)
    cfg = minivae.VAEConfig(x_dim=784, hidden=(64,), z_dim=5, dtype="float64")
    model = minivae.VAE(cfg, rng=np.random.default_rng(args.seed + 1))
    eps = rng.standard_normal((S, N, cfg.z_dim))
    loss_hand, g_hand = hand_forward_backward(model.params, x, eps, beta)
    loss_model, g_model = model.loss(x, eps=eps, beta=beta)
    check(abs(float(loss_hand) - float(loss_model)) < 1e-10,
          f"hand-chained loss equals model.loss ({float(loss_hand):.6f} nats, S={S}, beta={beta})")
    errs = {k: minivae.rel_error(g_hand[k], g_model[k]) for k in g_model}
    print(f"{'parameter':<14}{'shape':>12}{'rel error hand vs model':>26}")
    for k, e in errs.items():
        print(f"{k:<14}{str(tuple(model.params[k].shape)):>12}{e:>26.2e}")
    check(set(g_hand) == set(g_model), "the hand backward produces a gradient for every parameter")
    check(max(errs.values()) < 1e-12, f"hand-assembled gradients equal model.loss grads (max rel error "
          f"{max(errs.values()):.1e} < 1e-12)")

    # %% [markdown]
    # ## 4. A classic bug, and how big it looks
    # Overwrite instead of add where h feeds both heads (dh = ... instead of dh += ...):
    # the gradient of enc.0.W is then wrong by O(1), not by rounding.

    # %%
    _, g_bug = hand_forward_backward_bug(model.params, x, eps, beta)
    bug_err = minivae.rel_error(g_bug["enc.0.W"], g_model["enc.0.W"])
    print(f"bug 'h feeds two heads, but gradients overwritten': rel error in enc.0.W = {bug_err:.2f}")
    check(bug_err > 1e-3, "forgetting to add the logvar head's path gives a visibly wrong enc.0.W gradient")

    # %% [markdown]
    # ## 5. Whole-model gradient check: two hidden layers, S > 1, beta != 1, float64
    # Central differences $(\mathcal J(\theta+h e_i) - \mathcal J(\theta-h e_i))/2h$ with h = 1e-5 have
    # error O(h^2) ~ 1e-10 relative; we ask for rel error < 1e-6.

    # %%
    hidden = (16, 12) if args.quick else (32, 24)
    cfg2 = minivae.VAEConfig(x_dim=784, hidden=hidden, z_dim=4, dtype="float64", activation="tanh")
    model2 = minivae.VAE(cfg2, rng=np.random.default_rng(args.seed + 2))
    x2 = minivae.data.binarize(x_all[N:N + 5], rng).astype(np.float64)
    S2, beta2 = 4, 2.5
    eps2 = rng.standard_normal((S2, x2.shape[0], cfg2.z_dim))
    max_entries = 6 if args.quick else 25
    report = minivae.check_model(model2, x2, eps=eps2, beta=beta2, n_samples=S2, tol=1e-6,
                                 max_entries=max_entries, rng=np.random.default_rng(args.seed))
    for k, e in report.items():
        print(f"  gradcheck {k:<14} rel error {e:.2e}")
    check(max(report.values()) < 1e-6, f"finite differences agree with the backward for all "
          f"{len(report)} parameters of a 784-{'-'.join(map(str, hidden))}-4 VAE (S={S2}, beta={beta2}; "
          f"max rel error {max(report.values()):.1e})")

    # %% picture: per-parameter errors on a log scale
    fig, ax = plt.subplots(figsize=(8, 3.5))
    names = list(errs)
    ax.semilogy(range(len(names)), [max(errs[k], 1e-18) for k in names], "o", label="hand vs model.loss")
    names2 = list(report)
    ax.semilogy(range(len(names2)), [max(report[k], 1e-18) for k in names2], "s",
                label="model vs finite differences (2 layers)")
    ax.set_xticks(range(len(names2)))
    ax.set_xticklabels(names2, rotation=60, ha="right", fontsize=7)
    ax.axhline(1e-6, color="gray", ls="--", lw=0.8)
    ax.set_ylabel("relative error")
    ax.set_title("Gradient agreement (float64)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(args.out, "gradient_errors.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")
    print(f"lesson 09 done in {time.time() - t0:.1f} s; figures in {args.out}")


def hand_forward_backward_bug(p, x, eps, beta):
    """The same pass with the classic bug: dh from the logvar head overwrites the mu head's."""
    S, N, L = eps.shape
    D = x.shape[1]
    a, c1 = dense_forward(x, p["enc.0.W"], p["enc.0.b"])
    h, c1r = relu_forward(a)
    mu, cmu = dense_forward(h, p["enc.mu.W"], p["enc.mu.b"])
    logvar, clv = dense_forward(h, p["enc.logvar.W"], p["enc.logvar.b"])
    z, crep = reparameterize_forward(mu, logvar, eps)
    a2, c2 = dense_forward(z.reshape(S * N, L), p["dec.0.W"], p["dec.0.b"])
    g, c2r = relu_forward(a2)
    logits, co = dense_forward(g, p["dec.out.W"], p["dec.out.b"])
    rec, crec = bernoulli_nll_forward(logits.reshape(S, N, D), x)
    kl, ckl = kl_forward(mu, logvar)
    G = {}
    dlogits = bernoulli_nll_backward(np.full((S, N), 1.0 / (S * N)), crec).reshape(S * N, D)
    dg, _, _ = dense_backward(dlogits, co)
    dz, _, _ = dense_backward(relu_backward(dg, c2r), c2)
    dmu, dlogvar = reparameterize_backward(dz.reshape(S, N, L), crep)
    dmu_kl, dlv_kl = kl_backward(np.full((N,), beta / N), ckl)
    dh, _, _ = dense_backward(dmu + dmu_kl, cmu)
    dh, _, _ = dense_backward(dlogvar + dlv_kl, clv)        # BUG: "=" where it must be "+="
    _, G["enc.0.W"], G["enc.0.b"] = dense_backward(relu_backward(dh, c1r), c1)
    return rec.mean() + beta * kl.mean(), G


if __name__ == "__main__":
    main()
