"""Lesson 13 - beta, KL annealing, posterior collapse and active units.

Train the same VAE with the KL term weighted by beta (0.5, 1, 4, 25) and watch
beta trade reconstruction for KL; warm beta up from 0 to 1; count the latent
units the encoder actually uses.

Run:  python lessons/13_beta_annealing.py [--quick] [--out DIR] [--seed N]
"""
# %% [markdown]
# ## 1. The beta-weighted objective
#
# $$\mathcal{J}_\beta(x) = \mathbb{E}_{q(z|x)}[-\log p(x|z)] + \beta\,\mathrm{KL}(q(z|x)\,\|\,p(z)),\qquad
#   \mathcal{J}_1 = -\mathrm{ELBO}.$$
#
# Only beta = 1 is a bound on $-\log p(x)$.  With beta > 1 (beta-VAE, Higgins et al. 2017) every nat of information
# about x carried by z (the KL, the "rate") costs more, so the optimum moves to a lower KL and a worse
# reconstruction (the "distortion"); beta < 1 does the opposite.  Why the trade is monotone: if models A and B
# minimize $R + \beta_A K$ and $R + \beta_B K$ with $\beta_A < \beta_B$, then
# $R_A + \beta_A K_A \le R_B + \beta_A K_B$ and $R_B + \beta_B K_B \le R_A + \beta_B K_A$; adding gives
# $(\beta_B - \beta_A)(K_B - K_A) \le 0$, so $K_B \le K_A$ and then $R_B \ge R_A$.  (Exact for exact minimizers;
# our briefly trained models follow it with a wide margin.)
#
# **KL warm-up** (Bowman et al. 2016; Sonderby et al. 2016): use $\beta_t = \min(1, t / T)$.  Early on the KL
# costs nothing, so the encoder learns to put information in z before the KL pressure arrives; after T steps the
# objective is the true negative ELBO again.
#
# **Posterior collapse / active units** (Burda et al. 2015): unit j is *active* when
# $A_j = \mathrm{Cov}_x\big(\mathbb{E}_{q(z|x)}[z_j]\big) = \mathrm{Var}_x(\mu_j(x)) > 0.01$.
# An inactive unit has $\mu_j(x) \approx$ const and (to keep its KL near 0) $\sigma_j \approx 1$: $q(z_j|x) \approx p(z_j)$,
# it carries no information about x.  A large beta makes more units collapse.
#
# **Where seed 004 goes wrong.**  Its objective (section 3.2) is
# $\mathbb{E}[\mathrm{KL}(q(z|x)\|p(z))] - \beta\,\mathbb{E}[\mathrm{KL}(q(x|z)\|p_{data}(x))] + \mathbb{E}[\log p(x|z)]$, to be *minimized*,
# with beta "controlling the contribution of the data entropy".  That is not the VAE objective: (1) the sign of the
# reconstruction term is wrong (minimizing $+\log p(x|z)$ makes reconstructions worse); (2) there is no
# "KL(q(x|z) || p_data(x))" term in the ELBO; (3) beta, where used (beta-VAE), multiplies the KL between q(z|x) and
# the prior, not a data-entropy term.  Its code also decodes the mean without sampling z, derives logvar from the
# mean, and weights the KL by 128 against a per-pixel-averaged squared error (an implicit beta, unstated).

# %%
import os
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import minivae  # noqa: E402
import minivae.data  # noqa: E402
from minivae.lessonkit import check, fit, lesson_args  # noqa: E402


def train(cfg, x_train, n_steps, seed, beta_at):
    """The loop of lesson 10 (lessonkit.fit); beta_at(step) gives beta for that step.

    Returns the model and per-step (beta, recon, kl)."""
    model = minivae.VAE(cfg, rng=np.random.default_rng(seed))
    rng = np.random.default_rng(seed + 100)          # same data order for every beta
    hist = []
    fit(model, x_train, n_steps, rng, batch_size=128, opt=minivae.Adam(lr=1e-3), beta=beta_at,
        on_step=lambda step, beta: hist.append((beta, float(model.parts["recon"]), float(model.parts["kl"]))))
    return model, np.array(hist)


def evaluate(model, x, eps):
    """Test recon, KL (beta-free) and the variance over x of each mu_j."""
    model.loss(x, eps=eps, backward=False)
    mu = minivae.to_numpy(model.encode(x)[0]).astype(np.float64)
    return float(model.parts["recon"]), float(model.parts["kl"]), mu.var(axis=0)


def main(argv=None):
    args = lesson_args("lesson_output/13_beta_annealing", __doc__.splitlines()[0], argv,
                       quick_help="few steps on a subset (for tests)")
    t0 = time.time()
    rng = np.random.default_rng(args.seed)
    paths = []

    x_train, _ = minivae.data.load_mnist("train")
    x_test, _ = minivae.data.load_mnist("test")
    if args.quick:
        x_train = x_train[rng.permutation(len(x_train))[:6000]]
        n_steps, hidden = 150, (64,)
    else:
        n_steps, hidden = 700, (200,)
    cfg = minivae.VAEConfig(hidden=hidden, z_dim=32)
    x_test_bin = minivae.data.static_binarize(x_test[:2000], seed=1234)
    eps = np.random.default_rng(7).standard_normal((1, len(x_test_bin), cfg.z_dim))   # same eps for every model

    # %% [markdown]
    # ## 2. Sweep beta (same init, same data order, same number of steps)

    # %%
    betas = (0.5, 1.0, 4.0, 25.0)
    res, hists = {}, {}
    for b in betas:
        model, hists[b] = train(cfg, x_train, n_steps, args.seed, lambda s, b=b: b)
        res[b] = evaluate(model, x_test_bin, eps)
    print(f"{'beta':>6}{'recon':>10}{'KL':>9}{'-ELBO':>9}{'beta-objective':>16}{'active units':>14}")
    au = {}
    for b in betas:
        r, k, var = res[b]
        au[b] = int((var > 0.01).sum())
        print(f"{b:>6.1f}{r:>10.2f}{k:>9.2f}{r + k:>9.2f}{r + b * k:>16.2f}{au[b]:>11d}/{cfg.z_dim}")
    kls = [res[b][1] for b in betas]
    recs = [res[b][0] for b in betas]
    check(all(a > c for a, c in zip(kls, kls[1:])), "test KL decreases as beta grows: "
          + " > ".join(f"{v:.1f}" for v in kls))
    check(all(a < c for a, c in zip(recs, recs[1:])), "test reconstruction error increases as beta grows: "
          + " < ".join(f"{v:.1f}" for v in recs))
    check(au[betas[-1]] < au[betas[0]] / 2, f"a large beta collapses most units: {au[betas[-1]]} active at "
          f"beta={betas[-1]:g} vs {au[betas[0]]} at beta={betas[0]:g} (of {cfg.z_dim})")
    check(res[1.0][0] + res[1.0][1] <= min(res[b][0] + res[b][1] for b in betas) + 2.0,
          "beta = 1, the true ELBO objective, gives (within 2 nats) the best test -ELBO of the sweep")

    # %% [markdown]
    # ## 3. KL warm-up: beta_t = min(1, t / T) with T = half of training, against beta = 1 from the start

    # %%
    T = n_steps // 2
    model_w, hist_w = train(cfg, x_train, n_steps, args.seed, lambda s: min(1.0, s / T))
    res_w = evaluate(model_w, x_test_bin, eps)
    au_w = int((res_w[2] > 0.01).sum())
    print(f"warm-up : recon {res_w[0]:.2f} KL {res_w[1]:.2f} -ELBO {res_w[0] + res_w[1]:.2f} active {au_w}")
    print(f"constant: recon {res[1.0][0]:.2f} KL {res[1.0][1]:.2f} -ELBO {res[1.0][0] + res[1.0][1]:.2f} "
          f"active {au[1.0]}")
    h1 = hists[1.0]
    window = slice(T // 4, T // 2)
    kl_w, kl_c = hist_w[window, 2].mean(), h1[window, 2].mean()
    check(kl_w > kl_c, f"while beta is small the warm-up run puts more information in z (train KL "
          f"{kl_w:.1f} > {kl_c:.1f} nats over steps {T // 4}-{T // 2})")
    check(abs(hist_w[-1, 0] - 1.0) < 1e-12, "after the warm-up the objective is the true -ELBO again (beta = 1)")

    # %% figures
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    ax[0].plot(recs, kls, "o-")
    for b, r, k in zip(betas, recs, kls):
        ax[0].annotate(f"beta={b:g}", (r, k), textcoords="offset points", xytext=(5, 5))
    ax[0].set_xlabel("reconstruction  E[-log p(x|z)]  (nats)")
    ax[0].set_ylabel("KL(q(z|x) || p(z))  (nats)")
    ax[0].set_title("beta trades reconstruction for KL (test)")
    width = 0.8 / len(betas)
    for i, b in enumerate(betas):
        ax[1].bar(np.arange(cfg.z_dim) + i * width, np.sort(res[b][2])[::-1], width, label=f"beta={b:g}")
    ax[1].axhline(0.01, color="k", ls="--", lw=0.8, label="0.01 threshold")
    ax[1].set_yscale("log")
    ax[1].set_xlabel("latent unit (sorted)")
    ax[1].set_ylabel("Var_x(mu_j(x))")
    ax[1].set_title("active units")
    ax[1].legend(fontsize=7, loc="lower left")
    k = max(1, n_steps // 50)
    sm = lambda v: np.convolve(v, np.ones(k) / k, mode="valid")  # noqa: E731
    ax[2].plot(sm(h1[:, 2]), label="KL, beta = 1 throughout")
    ax[2].plot(sm(hist_w[:, 2]), label="KL, warm-up")
    ax2 = ax[2].twinx()
    ax2.plot(hist_w[:, 0], "k:", label="beta_t (warm-up)")
    ax2.set_ylabel("beta_t")
    ax[2].set_xlabel("step")
    ax[2].set_ylabel("train KL (nats)")
    h_a, l_a = ax[2].get_legend_handles_labels()
    h_b, l_b = ax2.get_legend_handles_labels()
    ax[2].legend(h_a + h_b, l_a + l_b, loc="center right", fontsize=8)
    ax[2].set_title("KL warm-up")
    fig.tight_layout()
    paths.append(os.path.join(args.out, "beta_tradeoff.png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    for p_ in paths:
        print(f"wrote {p_}")
    print(f"lesson 13 done in {time.time() - t0:.1f} s; figures in {args.out}")


if __name__ == "__main__":
    main()
