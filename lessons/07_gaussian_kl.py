# %% [markdown]
# # Lesson 07: the analytic Gaussian KL and its gradient
#
# The regulariser of the VAE objective is $\mathrm{KL}\big(q(z \mid x) \,\|\, p(z)\big)$ with
# $q = \mathcal{N}(\mu, \mathrm{diag}\, \sigma^2)$ and $p = \mathcal{N}(0, I)$.  For this pair the expectation has a
# closed form (Kingma & Welling 2014, "Auto-Encoding Variational Bayes", Appendix B), so no sampling is needed for
# this term.  This lesson derives it, checks it against Monte Carlo, and gradient-checks its backward.
#
# Run it as a script, `python lessons/07_gaussian_kl.py [--out DIR] [--seed N]`, or open it as a notebook
# (jupytext or VS Code; `MINIVAE_QUICK=1` in the kernel's environment selects the tests' quick mode).
#
# Exercise: `kl_forward` and `kl_backward` in `minivae/gaussian.py`.
#
# ## The derivation, one latent dimension
#
# The dimensions are independent under both $q$ and $p$, so the log densities, and hence the KL, add over dimensions.
# For one dimension,
#
# $$\mathrm{KL}(q \,\|\, p) = \mathbb{E}_q\big[\log q(z) - \log p(z)\big],$$
#
# $$\log q(z) = -\tfrac12 \log 2\pi - \tfrac12 \log \sigma^2 - \frac{(z - \mu)^2}{2 \sigma^2}, \qquad
#   \log p(z) = -\tfrac12 \log 2\pi - \frac{z^2}{2}.$$
#
# Take expectations under $z \sim q$, using $\mathbb{E}_q[(z - \mu)^2] = \sigma^2$ and
# $\mathbb{E}_q[z^2] = \mathrm{Var} + \text{mean}^2 = \sigma^2 + \mu^2$:
#
# $$\mathbb{E}_q[\log q] = -\tfrac12 \log 2\pi - \tfrac12 \log \sigma^2 - \tfrac12, \qquad
#   \mathbb{E}_q[\log p] = -\tfrac12 \log 2\pi - \tfrac12 (\sigma^2 + \mu^2),$$
#
# $$\mathrm{KL} = \mathbb{E}_q[\log q] - \mathbb{E}_q[\log p]
#   = -\tfrac12 \log \sigma^2 - \tfrac12 + \tfrac12 (\sigma^2 + \mu^2)
#   = -\tfrac12 \big(1 + \log \sigma^2 - \mu^2 - \sigma^2\big).$$
#
# Summing over the $L$ dimensions, with $\text{logvar} = \log \sigma^2$:
#
# $$\mathrm{KL} = -\frac12 \sum_{j=1}^L \big(1 + \text{logvar}_j - \mu_j^2 - e^{\text{logvar}_j}\big)
#   \;\ge 0, \quad = 0 \iff \mu = 0,\ \text{logvar} = 0.$$
#
# Its gradient (what `kl_backward` returns, times the upstream gradient):
#
# $$\frac{\partial\, \mathrm{KL}}{\partial \mu_j} = \mu_j, \qquad
#   \frac{\partial\, \mathrm{KL}}{\partial\, \text{logvar}_j} = \tfrac12 \big(e^{\text{logvar}_j} - 1\big).$$
#
# Kingma & Welling write the ELBO term with the opposite sign,
# $-\mathrm{KL} = \tfrac12 \sum_j (1 + \log \sigma_j^2 - \mu_j^2 - \sigma_j^2)$; the VAE *loss* adds $+\mathrm{KL}$.

# %%
import time

import matplotlib.pyplot as plt
import numpy as np

import minivae
from minivae.gaussian import kl_backward, kl_forward, kl_per_dim, log_diag_normal, log_standard_normal
from minivae.lessonkit import check, lesson_args, save_figure

# --quick (or MINIVAE_QUICK=1), --out DIR, --seed N; unknown arguments (a Jupyter kernel's) are ignored
args = lesson_args("lesson_output/07_gaussian_kl", "Lesson 07: the analytic Gaussian KL",
                   quick_help="fewer Monte-Carlo samples (for tests)")
rng = np.random.default_rng(args.seed)
t0 = time.time()

# %% [markdown]
# ## 1. The closed form, by hand and with minivae

# %%
N, L = 5, 4
mu = rng.standard_normal((N, L))
logvar = rng.uniform(-2.0, 1.0, (N, L))
kl, cache = kl_forward(mu, logvar)
kl_hand = -0.5 * np.sum(1 + logvar - mu ** 2 - np.exp(logvar), axis=1)
print("  KL per example:", np.round(kl, 4))
check(np.allclose(kl, kl_hand, rtol=1e-12) and np.allclose(kl_per_dim(mu, logvar).sum(1), kl),
      "kl_forward equals -1/2 sum(1 + logvar - mu^2 - exp(logvar)) (and kl_per_dim sums to it)")
check(np.all(kl > 0) and kl_forward(np.zeros((1, L)), np.zeros((1, L)))[0][0] == 0.0,
      "KL > 0 for these q, and exactly 0 when q = p (mu = 0, logvar = 0)")

# %% [markdown]
# ## 2. Against Monte Carlo: $\mathrm{KL} = \mathbb{E}_q[\log q(z) - \log p(z)]$
#
# Draw $z_s = \mu + e^{\text{logvar}/2} \epsilon_s$, average $\log q(z_s) - \log p(z_s)$ over $S$ samples, and compare
# with the closed form using the Monte-Carlo standard error $\mathrm{sd} / \sqrt{S}$.

# %%
S = 20_000 if args.quick else 400_000
eps = rng.standard_normal((S, N, L))
z = minivae.reparameterize(mu, logvar, eps)                       # (S, N, L)
terms = log_diag_normal(z, mu, logvar) - log_standard_normal(z)   # (S, N)
kl_mc = terms.mean(axis=0)
se = terms.std(axis=0, ddof=1) / np.sqrt(S)
zscores = (kl_mc - kl) / se
print(f"  S = {S} samples per example")
for n in range(N):
    print(f"  example {n}: analytic {kl[n]:.5f}   MC {kl_mc[n]:.5f} +- {se[n]:.5f}   (z = {zscores[n]:+.2f})")
check(np.all(np.abs(zscores) < 4.5), "Monte-Carlo KL agrees with the closed form within 4.5 standard errors")
check(np.all(se < 0.02 * kl + 0.02), "the MC standard error is small (< 2% of KL + 0.02), so the test has teeth")

# %% [markdown]
# ## 3. Gradient check of `kl_backward` (random upstream gradient, float64)
#
# With an upstream gradient $g_n = \partial \mathcal{L} / \partial\, \mathrm{KL}_n$ per example, the backward returns
# $d\mu_{nj} = g_n \mu_{nj}$ and $d\,\text{logvar}_{nj} = g_n \cdot \tfrac12 (e^{\text{logvar}_{nj}} - 1)$.

# %%
rep = minivae.check_op(kl_forward, kl_backward, [mu.copy(), logvar.copy()], names=["mu", "logvar"],
                       rng=rng, tol=1e-8)
print("  rel errors:", {k: f"{v:.1e}" for k, v in rep.items()})
check(max(rep.values()) < 1e-8, "kl_backward passes check_op: dmu = mu, dlogvar = (exp(logvar) - 1)/2")
dkl = rng.standard_normal(N)
dmu, dlv = kl_backward(dkl, cache)
check(np.allclose(dmu, dkl[:, None] * mu) and np.allclose(dlv, dkl[:, None] * 0.5 * (np.exp(logvar) - 1)),
      "kl_backward equals the derived formulas times the upstream gradient")

# %% [markdown]
# ## 4. Picture: the KL of one dimension as a function of $(\mu, \text{logvar})$
#
# The minimum is 0 at $(0, 0)$.  Along $\mu$ the KL is the parabola $\mu^2 / 2$; along logvar it is
# $\tfrac12 (e^{\text{logvar}} - 1 - \text{logvar})$, which grows exponentially for wide $q$ and only linearly for
# narrow $q$: the prior pulls $\sigma$ toward 1.

# %%
m = np.linspace(-3, 3, 121 if args.quick else 301)
lv = np.linspace(-4, 2, 121 if args.quick else 301)
M, LV = np.meshgrid(m, lv)
K = kl_per_dim(M.reshape(-1, 1), LV.reshape(-1, 1)).reshape(M.shape)
fig, axes = plt.subplots(1, 2, figsize=(11, 4))
cs = axes[0].contourf(M, LV, K, levels=30, cmap="viridis")
fig.colorbar(cs, ax=axes[0])
axes[0].plot(0, 0, "r*", ms=10)
axes[0].set_xlabel("mu")
axes[0].set_ylabel("logvar = log sigma^2")
axes[0].set_title("KL(N(mu, sigma^2) || N(0,1))")
axes[1].errorbar(kl, kl_mc, yerr=3 * se, fmt="o", label="MC (+-3 s.e.) vs analytic")
lim = [0, kl.max() * 1.1]
axes[1].plot(lim, lim, "k--", lw=1, label="y = x")
axes[1].set_xlabel("analytic KL (nats)")
axes[1].set_ylabel("Monte-Carlo KL (nats)")
axes[1].legend()
axes[1].set_title(f"closed form vs {S} samples")
fig.tight_layout()
save_figure(fig, args.out, "gaussian_kl.png")
check(K.min() >= 0 and abs(K[np.unravel_index(K.argmin(), K.shape)]) < 1e-3,
      "on the grid the per-dimension KL is >= 0 with its minimum ~0 at (0, 0)")
print(f"done in {time.time() - t0:.1f} s")
