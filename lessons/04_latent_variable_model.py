# %% [markdown]
# # Lesson 04: the latent-variable model, and why we need a recognition model
#
# The likelihood of a latent-variable model is an integral with no closed form.  On a toy model with a 2-D latent,
# where quadrature gives the exact answer, this lesson compares two Monte Carlo estimates of it: naive sampling from
# the prior, and importance sampling with a Gaussian $q(z \mid x)$, the VAE's recognition model.
#
# Run it as a script, `python lessons/04_latent_variable_model.py [--out DIR] [--seed N]`, or open it as a
# notebook (jupytext or VS Code; `MINIVAE_QUICK=1` in the kernel's environment selects the tests' quick mode).
#
# ## The model
#
# A latent-variable model generates $x$ in two steps (the Chinese-language derivation of the VAE that minivae grew
# from follows Kingma & Welling 2014 here):
#
# $$z \sim p(z) = \mathcal{N}(0, I), \qquad x \sim p(x \mid z) = \mathcal{N}\big(f(z), \sigma_x^2 I\big),$$
#
# with $f$ a neural network, the decoder.  The likelihood of one data point is the marginal
#
# $$p(x) = \int p(x \mid z)\, p(z)\, dz. \tag{1}$$
#
# It has no closed form once $f$ is nonlinear.  Three ways to compute it:
#
# **(a) Quadrature.**  With a 2-D $z$ we can sum (1) over a fine grid, $p(x) \approx \sum_k p(x \mid z_k)\, p(z_k)\,
# \Delta A$.  Exact to many digits, but the cost grows exponentially with the dimension of $z$.  Here it is only the
# ground truth.
#
# **(b) Naive Monte Carlo from the prior.**  (1) is an expectation under $p(z)$:
#
# $$p(x) = \mathbb{E}_{z \sim p(z)}\big[p(x \mid z)\big] \approx \frac1S \sum_{s=1}^S p(x \mid z_s),
#   \qquad z_s \sim p(z).$$
#
# Unbiased, but almost every $z_s$ drawn from the prior explains $x$ badly ($p(x \mid z_s) \approx 0$); the estimate
# is dominated by the rare lucky draws that land where the posterior $p(z \mid x)$ lives, so its variance is huge.
#
# **(c) Importance sampling with a recognition model $q(z \mid x)$.**  Multiply and divide by any density $q$ that is
# positive wherever $p(x \mid z) p(z)$ is:
#
# $$p(x) = \mathbb{E}_{z \sim q(z \mid x)}\!\left[\frac{p(x \mid z)\, p(z)}{q(z \mid x)}\right]
#   \approx \frac1S \sum_{s=1}^S w_s, \qquad z_s \sim q(z \mid x).$$
#
# Still unbiased; if $q$ is close to the true posterior $p(z \mid x) = p(x \mid z) p(z) / p(x)$, every weight $w_s$ is
# close to $p(x)$ and the variance is small (zero if $q = p(z \mid x)$ exactly).  Amortising $q(z \mid x)$ with an
# encoder network that outputs $(\mu, \log\sigma^2)$ for any $x$ is the VAE's recognition model; importance-weighting
# its samples is also how VAE log-likelihoods are evaluated (Burda et al. 2015, "Importance Weighted Autoencoders").
#
# **A correction.**  A short Chinese-language introduction to VAEs (by the blog author 禅与计算机程序设计艺术, "Zen and
# the Art of Computer Programming", describing a convolutional encoder and decoder) says that the encoder outputs "a
# zero-mean noise distribution $q(z \mid x)$" and that "zero mean means $z$ is uniformly distributed".  Both are
# wrong.  $q(z \mid x) = \mathcal{N}\big(\mu(x), \mathrm{diag}\, \sigma^2(x)\big)$ has an $x$-dependent mean; that is
# the point: it locates the posterior of *this* $x$, as the red cloud in the picture below does.  It is the prior
# $p(z) = \mathcal{N}(0, I)$ that has mean zero, and a Gaussian is not uniform whatever its mean.
#
# Here $q$ is the diagonal Gaussian with the true posterior's mean and marginal variances (computed on the quadrature
# grid), a stand-in for a well trained encoder.  The toy decoder $f$ is a fixed random tanh network from
# $z \in \mathbb{R}^2$ to $x \in \mathbb{R}^{16}$.

# %%
import time

import matplotlib.pyplot as plt
import numpy as np

import minivae
from minivae.gaussian import log_diag_normal, log_standard_normal
from minivae.layers import tanh_forward
from minivae.lessonkit import check, lesson_args, save_figure
from minivae.likelihoods import gaussian_nll_forward

# --quick (or MINIVAE_QUICK=1), --out DIR, --seed N; unknown arguments (a Jupyter kernel's) are ignored
args = lesson_args("lesson_output/04_latent_variable_model", "Lesson 04: the latent-variable model",
                   quick_help="fewer Monte-Carlo repetitions (for tests)",
                   seed_help="seed of the Monte-Carlo draws (the toy model is fixed)")
rng = np.random.default_rng(args.seed)
t0 = time.time()

# %% [markdown]
# ## 1. A small generative model and one data point
#
# $f(z) = \tanh(z W_1 + b_1)\, W_2 + b_2$ with $z \in \mathbb{R}^2$, 16 hidden units, $x \in \mathbb{R}^{16}$ and
# $\sigma_x = 0.1$.  The model is fixed (drawn from its own random generator), so the lesson's numbers are about the
# estimators, not about a lucky model.  The log-densities the estimators need are
#
# $$\log p(x \mid z) = -\sum_d \frac{(x_d - f_d(z))^2}{2\sigma_x^2} - \frac{D}{2} \log(2\pi\sigma_x^2),
#   \qquad \log p(x, z) = \log p(x \mid z) + \log p(z).$$

# %%
L, H, D, SIGMA_X = 2, 16, 16, 0.1
mrng = np.random.default_rng(1)
W1 = mrng.standard_normal((L, H)) * 0.8
b1 = mrng.standard_normal(H) * 0.5
W2 = mrng.standard_normal((H, D)) / np.sqrt(H)
b2 = np.zeros(D)
z_true = mrng.standard_normal(L) * 0.8


def decoder(z):
    """f(z) = tanh(z W1 + b1) W2 + b2, for z (..., L) -> (..., D)."""
    h, _ = tanh_forward(z @ W1 + b1)
    return h @ W2 + b2


x = decoder(z_true) + SIGMA_X * mrng.standard_normal(D)     # the observed data point


def log_lik(z):
    """log p(x|z) = -gaussian_nll(f(z), x, sigma_x^2), for z (..., L) -> (...)."""
    return -gaussian_nll_forward(decoder(z), x, SIGMA_X ** 2)[0]


def log_joint(z):
    """log p(x, z) = log p(x|z) + log p(z)."""
    return log_lik(z) + log_standard_normal(z)


# %% [markdown]
# ## 2. Ground truth by quadrature
#
# A coarse grid over $[-6, 6]^2$ finds where $p(x, z)$ lives; a fine grid of $\pm 10$ posterior standard deviations
# around it gives $\log p(x)$, summed in log space for stability:
#
# $$\log p(x) \approx m + \log \sum_k e^{\log p(x, z_k) - m}\, \Delta A, \qquad m = \max_k \log p(x, z_k).$$
#
# Refining the grid confirms the digits.  The normalised grid weights $p(x, z_k)\, \Delta A / p(x)$ are the true
# posterior $p(z \mid x)$ on the grid; its mean and marginal variances define our $q(z \mid x)$.

# %%
def quadrature(lo, hi, n):
    g0, g1 = np.linspace(lo[0], hi[0], n), np.linspace(lo[1], hi[1], n)
    dA = (g0[1] - g0[0]) * (g1[1] - g1[0])
    Z = np.stack(np.meshgrid(g0, g1, indexing="ij"), -1)
    lj = log_joint(Z)
    m = lj.max()
    log_px = m + np.log(np.exp(lj - m).sum() * dA)          # log sum exp, stable
    post = np.exp(lj - log_px) * dA                          # posterior mass per cell
    mean = (post[..., None] * Z).sum((0, 1))
    var = (post[..., None] * (Z - mean) ** 2).sum((0, 1))
    return log_px, mean, var, Z, post


# %%
_, m0, v0, _, _ = quadrature((-6, -6), (6, 6), 301)
sd0 = np.sqrt(v0)
log_px, post_mean, post_var, Zg, post_grid = quadrature(m0 - 10 * sd0, m0 + 10 * sd0, 401)
log_px_fine = quadrature(m0 - 12 * sd0, m0 + 12 * sd0, 601)[0]
px = np.exp(log_px)
print(f"  log p(x) by quadrature: {log_px:.10f}  (finer grid: {log_px_fine:.10f})")
print(f"  posterior mean {np.round(post_mean, 3)}, sd {np.round(np.sqrt(post_var), 4)}  (true z {np.round(z_true, 3)})")
check(abs(log_px - log_px_fine) < 1e-6, "quadrature log p(x) is converged (two grids agree to 1e-6)")

# %% [markdown]
# ## 3. Naive Monte Carlo versus importance sampling
#
# Each estimate uses $S$ samples; we repeat it $R$ times to see its spread.  The importance samples come from
# $q = \mathcal{N}(\mu^*, \mathrm{diag}\, \sigma^{*2})$ through the reparameterization $z = \mu^* + \sigma^* \epsilon$
# (lesson 06), and the log-weights are
#
# $$\log w = \log p(x, z) - \log q(z \mid x).$$
#
# We also count the prior draws that explain $x$ a thousand times worse than average, $p(x \mid z) < p(x) / 1000$:
# about 96% of them (full runs with `--seed` 0 to 3), asserted $> 90\%$.

# %%
R, S = (100, 100) if args.quick else (400, 200)
# (b) naive: z ~ p(z)
z_prior = rng.standard_normal((R, S, L))
naive = np.exp(log_lik(z_prior)).mean(axis=1)                    # (R,) estimates of p(x)
# (c) importance sampling: z ~ q(z|x) = N(post_mean, diag post_var), via the reparameterization
q_mu, q_logvar = post_mean[None], np.log(post_var)[None]         # (1, L)
z_q = minivae.reparameterize(q_mu, q_logvar, rng.standard_normal((R * S, 1, L))).reshape(R, S, L)
log_w = log_joint(z_q) - log_diag_normal(z_q, q_mu[0], q_logvar[0])
iw = np.exp(log_w).mean(axis=1)                                  # (R,)


def describe(name, est):
    m, se = est.mean(), est.std(ddof=1) / np.sqrt(len(est))
    print(f"  {name:22s} mean/p(x) = {m / px:.4f} +- {se / px:.4f}   sd of one estimate / p(x) = "
          f"{est.std(ddof=1) / px:.4f}")
    return m, se


m_naive, se_naive = describe("naive MC (prior)", naive)
m_iw, se_iw = describe("importance sampling", iw)
ratio = naive.var(ddof=1) / iw.var(ddof=1)
frac_useless = np.mean(log_lik(z_prior) < log_px + np.log(1e-3))
print(f"  variance ratio naive / IS = {ratio:.0f};  prior draws with p(x|z) < p(x)/1000: {100 * frac_useless:.1f}%")
check(abs(m_naive - px) < 4 * se_naive, "naive Monte Carlo is unbiased: its mean is within 4 s.e. of p(x)")
check(abs(m_iw - px) < 4 * se_iw, "importance sampling is unbiased: its mean is within 4 s.e. of p(x)")
check(ratio > 100, "importance sampling with q(z|x) has > 100x lower variance than naive Monte Carlo")
check(frac_useless > 0.9, "more than 90% of prior draws explain x a thousand times worse than average")

# %% [markdown]
# ## 4. Pictures: where the samples land, and the spread of the estimates

# %%
fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
ax = axes[0]
gb = np.linspace(-3.5, 3.5, 281)
ZB = np.stack(np.meshgrid(gb, gb, indexing="ij"), -1)
lj = log_joint(ZB)
ax.contour(ZB[..., 0], ZB[..., 1], np.exp(lj - lj.max()), levels=[0.01, 0.3], colors="b")
ax.plot(*z_prior[0, :, :].T, "k.", ms=3, label="z ~ p(z) (naive)")
ax.plot(*z_q[0, :, :].T, "r.", ms=3, label="z ~ q(z|x) (IS)")
ax.set_title("p(z|x) (blue contours) and where samples land")
ax.legend(fontsize=8, loc="lower left")
ax.set_aspect("equal")
ax = axes[1]
ax.contourf(Zg[..., 0], Zg[..., 1], post_grid, levels=15, cmap="Blues")
t = np.linspace(0, 2 * np.pi, 200)
for k in (1, 2, 3):
    ax.plot(post_mean[0] + k * np.sqrt(post_var[0]) * np.cos(t), post_mean[1] + k * np.sqrt(post_var[1]) * np.sin(t),
            "r-", lw=1)
ax.set_title("zoom: true posterior vs q(z|x) (red: 1,2,3 sd)")
half = 4 * np.sqrt(post_var).max()
ax.set_xlim(post_mean[0] - half, post_mean[0] + half)
ax.set_ylim(post_mean[1] - half, post_mean[1] + half)
ax.set_aspect("equal")
ax = axes[2]
lo = min(naive.min(), iw.min()) / px
hi = np.percentile(naive / px, 99)
bins = np.linspace(lo, hi, 60)
ax.hist(naive / px, bins=bins, alpha=0.6, label=f"naive MC, S={S}")
ax.hist(iw / px, bins=bins, alpha=0.6, label=f"importance sampling, S={S}")
ax.axvline(1.0, color="k", ls="--", label="truth (quadrature)")
ax.set_xlabel("estimate / p(x)")
ax.set_title(f"{R} repeated estimates of p(x); var ratio {ratio:.0f}x")
ax.legend(fontsize=8)
fig.tight_layout()
save_figure(fig, args.out, "naive_vs_importance.png")
print(f"done in {time.time() - t0:.1f} s")
