# %% [markdown]
# # Lesson 13 — $\beta$, KL annealing, posterior collapse and active units
#
# Train the same VAE with the KL term weighted by $\beta \in \{0.5, 1, 4, 25\}$ and watch $\beta$ trade
# reconstruction for KL; see which $\beta$ still give a bound on $-\log p(x)$; warm $\beta$ up from 0 to 1; count
# the latent units the encoder actually uses.
#
# **Run** `python lessons/13_beta_annealing.py [--out DIR] [--seed N]`, or open it as a notebook
# (jupytext); in a kernel, set `MINIVAE_QUICK=1` for the small version.
# **Exercise** `kl_forward`, `kl_backward`.

# %%
import time

import matplotlib.pyplot as plt
import numpy as np

import minivae
import minivae.data
import minivae.evaluate
from minivae.lessonkit import check, fit, lesson_args, save_figure

args = lesson_args("lesson_output/13_beta_annealing", "Lesson 13: beta, KL annealing and active units",
                   quick_help="few steps on a subset (for tests)")
t0 = time.time()
rng = np.random.default_rng(args.seed)

# %% [markdown]
# ## 1. The $\beta$-weighted objective, and when it is a bound
#
# $$\mathcal{J}_\beta(x) = \underbrace{\mathbb{E}_{q(z|x)}[-\log p(x|z)]}_{R\ \text{(recon)}}
#   + \beta\,\underbrace{\mathrm{KL}\big(q(z|x)\,\|\,p(z)\big)}_{K},\qquad \mathcal{J}_1 = -\mathrm{ELBO}.$$
#
# Since $K \ge 0$, for $\beta \ge 1$
#
# $$\mathcal{J}_\beta = R + \beta K \;\ge\; R + K = -\mathrm{ELBO} \;\ge\; -\log p(x):$$
#
# every $\beta \ge 1$ gives an upper bound on $-\log p(x)$, a looser one the larger $\beta$.  For $\beta < 1$,
# $\mathcal{J}_\beta = -\mathrm{ELBO} - (1 - \beta) K$ lies *below* $-\mathrm{ELBO}$ by $(1-\beta)K$, and it is no
# bound: where $q(z|x)$ equals the true posterior, $-\mathrm{ELBO} = -\log p(x)$ and $\mathcal{J}_\beta$ falls
# below $-\log p(x)$ whenever $K > 0$.
#
# **The trade-off.**  With $\beta > 1$ ($\beta$-VAE, Higgins et al. 2017) every nat of information about $x$
# carried by $z$ (the KL, the "rate") costs more, so the optimum moves to a lower KL and a worse reconstruction
# (the "distortion"); $\beta < 1$ does the opposite.  Why the trade is monotone: if models A and B minimize
# $R + \beta_A K$ and $R + \beta_B K$ with $\beta_A < \beta_B$, then
#
# $$R_A + \beta_A K_A \le R_B + \beta_A K_B \quad\text{and}\quad R_B + \beta_B K_B \le R_A + \beta_B K_A;$$
#
# adding the two gives $(\beta_B - \beta_A)(K_B - K_A) \le 0$, so $K_B \le K_A$, and then the first inequality
# gives $R_B \ge R_A$.  This is exact for exact minimizers; our briefly trained models follow it with a wide
# margin.

# %%
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


def train(cfg, x_train, n_steps, seed, beta_at):
    """The loop of lesson 10 (lessonkit.fit); beta_at(step) gives beta for that step.

    Returns the model and per-step (beta, recon, kl)."""
    model = minivae.VAE(cfg, rng=np.random.default_rng(seed))
    frng = np.random.default_rng(seed + 100)          # same data order for every beta
    hist = []
    fit(model, x_train, n_steps, frng, batch_size=128, opt=minivae.Adam(lr=1e-3), beta=beta_at,
        on_step=lambda step, beta: hist.append((beta, float(model.parts["recon"]), float(model.parts["kl"]))))
    return model, np.array(hist)


def evaluate(model, x, eps):
    """Test recon, KL (beta-free) and the variance over x of each mu_j."""
    model.loss(x, eps=eps, backward=False)
    mu = minivae.to_numpy(model.encode(x)[0]).astype(np.float64)
    return float(model.parts["recon"]), float(model.parts["kl"]), mu.var(axis=0)

# %% [markdown]
# ## 2. Sweep $\beta$: same initialization, same data order, same number of steps
#
# **Posterior collapse and active units** (Burda et al. 2015): unit $j$ is *active* when
#
# $$A_j = \mathrm{Var}_x\big(\mathbb{E}_{q(z|x)}[z_j]\big) = \mathrm{Var}_x\big(\mu_j(x)\big) > 0.01.$$
#
# An inactive unit has $\mu_j(x) \approx$ const, and in practice (to keep its KL near 0) $\sigma_j \approx 1$:
# $q(z_j|x) \approx p(z_j)$, and it carries no information about $x$.  A large $\beta$ makes more units collapse.

# %%
betas = (0.5, 1.0, 4.0, 25.0)
res, hists, models = {}, {}, {}
for b in betas:
    models[b], hists[b] = train(cfg, x_train, n_steps, args.seed, lambda s, b=b: b)
    res[b] = evaluate(models[b], x_test_bin, eps)
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
# Which of these objectives bound $-\log p(x)$?  For every model,
# $\mathcal{J}_\beta - (-\mathrm{ELBO}) = (\beta - 1)K$: at or above the $-$ELBO for $\beta \ge 1$, below it by $(1-\beta)K$ for $\beta < 1$.  To put
# $-\log p(x)$ itself on the same scale we estimate it by importance sampling with $k$ samples (lesson 14):
# $-\hat{\mathcal L}_k$ lies between $-\log p(x)$ and the $-$ELBO (in expectation), so a valid bound must lie
# above it.

# %%
n_iw, k_iw = (300, 50) if args.quick else (500, 200)
x_iw = x_test_bin[:n_iw]
print(f"{'beta':>6}{'recon + beta KL':>17}{'-ELBO':>9}{f'-IW (k={k_iw})':>14}")
for b in betas:
    r, k, _ = evaluate(models[b], x_iw, eps[:, :n_iw])
    nll_iw = -float(minivae.evaluate.iw_log_likelihood(models[b], x_iw, k_iw, np.random.default_rng(args.seed + 9)).mean())
    print(f"{b:>6.1f}{r + b * k:>17.2f}{r + k:>9.2f}{nll_iw:>14.2f}")
    if b >= 1:
        check(r + b * k >= r + k > nll_iw, f"beta = {b:g}: recon + beta KL ({r + b * k:.1f}) >= -ELBO ({r + k:.1f}) "
              f"> -IW estimate ({nll_iw:.1f}) >= -log p(x) (in expectation): a valid bound"
              + (", looser than the -ELBO" if b > 1 else ""))
    else:
        check(abs((r + k) - (r + b * k) - (1 - b) * k) < 1e-9 and k > 0,
              f"beta = {b:g}: recon + beta KL ({r + b * k:.1f}) is (1 - beta) KL = {(1 - b) * k:.1f} nats below the "
              f"-ELBO ({r + k:.1f}); it stays above -log p(x) only while the ELBO's own gap is larger, which "
              "nothing guarantees: no bound")

# %% [markdown]
# Read the $\beta = 0.5$ row against the IW column.  After the full training its objective lies below even the
# IW estimate, our best (upper) estimate of $-\log p(x)$.  In quick mode the ELBO's own gap,
# $-\mathrm{ELBO} - (-\hat{\mathcal L}_k)$, is still larger than $(1-\beta)K$, and the $\beta = 0.5$ objective happens
# to lie above it.  Either way nothing guarantees it stays above $-\log p(x)$, which is what "no bound" means.

# %% [markdown]
# ## 3. KL warm-up: $\beta_t = \min(1, t/T)$, against $\beta = 1$ from the start
#
# KL warm-up (Bowman et al. 2016; Sønderby et al. 2016) uses $\beta_t = \min(1, t / T)$, here with $T$ half of
# training.  Early on the KL costs almost nothing, so the encoder learns to put information in $z$ before the KL
# pressure arrives; after $T$ steps the objective is the true negative ELBO again.

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

# %% [markdown]
# ## 4. Pictures: the trade-off, the active units, the warm-up

# %%
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
save_figure(fig, args.out, "beta_tradeoff.png")

# %% [markdown]
# ## 5. A common mistake: an objective that is not the VAE's
#
# A Chinese-language article that builds a dense VAE in Keras with a $\beta$ weight (its section 3.2,
# "the objective function of the VAE") writes the objective, to be *minimized*, as
#
# $$\mathbb{E}_{p_{\text{data}}}\big[\mathrm{KL}(q(z|x)\,\|\,p(z))\big]
#   - \beta\,\mathbb{E}_{q(z|x)}\big[\mathrm{KL}(q(x|z)\,\|\,p_{\text{data}}(x))\big]
#   + \mathbb{E}_{q(z|x)}\big[\log p_\theta(x|z)\big],$$
#
# with $\beta$ "controlling the contribution of the data entropy".  That is not the VAE objective:
#
# 1. the sign of the reconstruction term is wrong: minimizing $+\log p(x|z)$ makes reconstructions *worse*;
# 2. there is no $\mathrm{KL}\big(q(x|z)\,\|\,p_{\text{data}}(x)\big)$ term in the ELBO;
# 3. $\beta$, where it is used ($\beta$-VAE, section 1), multiplies the KL between $q(z|x)$ and the prior, not a
#    data-entropy term.
#
# The correct objective is $\mathcal{J}_\beta$ above.  The same article's code also decodes the mean without
# sampling $z$, derives logvar from the mean, and weights the KL by 128 against a per-pixel mean squared error:
# an implicit $\beta$, unstated.

# %%
print(f"lesson 13 done in {time.time() - t0:.1f} s; figures in {args.out}")
