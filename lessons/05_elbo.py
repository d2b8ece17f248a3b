# %% [markdown]
# # Lesson 05: the ELBO, numerically
#
# The identity $\log p(x) = \mathrm{ELBO}(q) + \mathrm{KL}\big(q \,\|\, p(z \mid x)\big)$, derived in four lines and
# then verified term by term on a toy model whose every expectation can be computed by quadrature; the Monte-Carlo
# ELBO a VAE trains on estimates the same number; and moving $q$ toward the posterior shrinks the gap, but not to 0.
#
# Run it as a script, `python lessons/05_elbo.py [--out DIR] [--seed N]`, or open it as a notebook (jupytext
# or VS Code; `MINIVAE_QUICK=1` in the kernel's environment selects the tests' quick mode).
#
# ## The derivation
#
# For any density $q(z)$ (in a VAE, $q(z \mid x)$ from the encoder) and the true posterior
# $p(z \mid x) = p(x \mid z)\, p(z) / p(x)$:
#
# $$\begin{aligned}
# \mathrm{KL}\big(q \,\|\, p(z \mid x)\big)
#   &= \mathbb{E}_q\big[\log q(z) - \log p(z \mid x)\big] \\
#   &= \mathbb{E}_q\big[\log q(z) - \log p(x \mid z) - \log p(z) + \log p(x)\big] && \text{(Bayes)} \\
#   &= \log p(x) - \mathbb{E}_q\big[\log p(x \mid z)\big] + \mathbb{E}_q\big[\log q(z) - \log p(z)\big] \\
#   &= \log p(x) - \Big(\mathbb{E}_q\big[\log p(x \mid z)\big] - \mathrm{KL}\big(q \,\|\, p(z)\big)\Big).
# \end{aligned}$$
#
# The bracket is the evidence lower bound,
#
# $$\mathrm{ELBO}(q) = \mathbb{E}_q\big[\log p(x \mid z)\big] - \mathrm{KL}\big(q \,\|\, p(z)\big),$$
#
# so, rearranged,
#
# $$\log p(x) = \mathrm{ELBO}(q) + \mathrm{KL}\big(q \,\|\, p(z \mid x)\big). \tag{*}$$
#
# Because a KL divergence is $\ge 0$ (and $= 0$ only for $q = p(z \mid x)$), the ELBO is a lower bound on
# $\log p(x)$, and the gap is exactly the KL to the true posterior.  Maximising the ELBO over $q$ therefore pulls $q$
# toward $p(z \mid x)$; maximising it over the decoder raises $\log p(x)$ (or shrinks the gap).  Note that $(*)$ is
# an identity, not an inequality chain that happens to be tight: it holds for every $q$.
#
# **A correction.**  A Chinese-language tutorial that builds a dense VAE in Keras/TensorFlow, with a $\beta$ weight,
# writes the objective to be minimised as
#
# $$\mathbb{E}\big[\mathrm{KL}(q(z \mid x) \,\|\, p(z))\big]
#   - \beta\, \mathbb{E}\big[\mathrm{KL}(q(x \mid z) \,\|\, p_\text{data}(x))\big]
#   + \mathbb{E}\big[\log p(x \mid z)\big].$$
#
# That is not the ELBO: it has no such second term, and minimising $+\log p(x \mid z)$ makes reconstructions worse
# (lesson 13 has the rest).  The correct per-example loss is
#
# $$-\mathbb{E}_{q(z|x)}\big[\log p(x \mid z)\big] + \mathrm{KL}\big(q(z \mid x) \,\|\, p(z)\big) = -\mathrm{ELBO}.$$
#
# We verify $(*)$ on a toy model built like lesson 04's (a 2-D latent and a fixed random tanh decoder, here with
# $x \in \mathbb{R}^8$, $\sigma_x = 0.3$ and its own weights), computing every expectation by quadrature on one grid,
# and the $\mathrm{KL}(q \,\|\, p(z))$ term in closed form with `minivae.kl_forward` (lesson 07).

# %%
import time

import matplotlib.pyplot as plt
import numpy as np

import minivae
from minivae.gaussian import kl_forward, log_diag_normal, log_standard_normal
from minivae.lessonkit import check, lesson_args, save_figure
from minivae.likelihoods import gaussian_nll_forward

# --quick (or MINIVAE_QUICK=1), --out DIR, --seed N; unknown arguments (a Jupyter kernel's) are ignored
args = lesson_args("lesson_output/05_elbo", "Lesson 05: the ELBO, numerically",
                   quick_help="coarser grid, fewer samples (for tests)",
                   seed_help="seed of the Monte-Carlo part (the toy model is fixed)")
rng = np.random.default_rng(args.seed)
t0 = time.time()

# %% [markdown]
# ## 1. The model, one data point, and a grid
#
# $p(z) = \mathcal{N}(0, I_2)$, $p(x \mid z) = \mathcal{N}\big(f(z), 0.3^2 I_8\big)$, with
# $f(z) = \tanh(z W_1 + b_1)\, W_2$ a fixed random network.  On a grid over $[-7, 7]^2$ (the prior's tails beyond
# carry less than $10^{-11}$) we tabulate $\log p(x \mid z)$, $\log p(x, z)$, then $\log p(x)$ by a log-sum-exp
# quadrature and the posterior $\log p(z \mid x) = \log p(x, z) - \log p(x)$.

# %%
L, H, D, SIGMA_X = 2, 16, 8, 0.3
mrng = np.random.default_rng(2)
W1 = mrng.standard_normal((L, H)) * 0.8
b1 = mrng.standard_normal(H) * 0.5
W2 = mrng.standard_normal((H, D)) / np.sqrt(H)
z_true = mrng.standard_normal(L) * 0.8


def decoder(z):
    return np.tanh(z @ W1 + b1) @ W2


x = decoder(z_true) + SIGMA_X * mrng.standard_normal(D)


def log_lik(z):
    return -gaussian_nll_forward(decoder(z), x, SIGMA_X ** 2)[0]


# %%
n_grid = 401 if args.quick else 801
g = np.linspace(-7, 7, n_grid)
dA = (g[1] - g[0]) ** 2
Z = np.stack(np.meshgrid(g, g, indexing="ij"), -1)            # (n, n, 2)
ll = log_lik(Z)                                                # log p(x|z) on the grid
lj = ll + log_standard_normal(Z)                               # log p(x, z)
mx = lj.max()
log_px = mx + np.log(np.exp(lj - mx).sum() * dA)               # log p(x) by quadrature
log_post = lj - log_px                                         # log p(z|x) on the grid
post_mass = np.exp(log_post) * dA
check(abs(post_mass.sum() - 1) < 1e-12, "the grid posterior p(z|x) = p(x,z)/p(x) sums to 1")
post_mean = (post_mass[..., None] * Z).sum((0, 1))
post_var = (post_mass[..., None] * (Z - post_mean) ** 2).sum((0, 1))
print(f"  log p(x) = {log_px:.8f};  posterior mean {np.round(post_mean, 3)}, sd {np.round(np.sqrt(post_var), 3)}")

# %% [markdown]
# ## 2. Each term of $(*)$ for one $q$
#
# With $q = \mathcal{N}(\mu, \mathrm{diag}\, e^{\text{logvar}})$ and $q_k = q(z_k)\, \Delta A$ its mass in grid cell
# $k$:
#
# $$\mathbb{E}_q\big[\log p(x \mid z)\big] \approx \sum_k q_k \log p(x \mid z_k) \qquad \text{(quadrature)}$$
#
# $$\mathrm{KL}\big(q \,\|\, p(z)\big) = \texttt{kl\_forward}(\mu, \text{logvar}) \qquad \text{(closed form)}$$
#
# $$\mathrm{KL}\big(q \,\|\, p(z \mid x)\big) \approx \sum_k q_k \big[\log q(z_k) - \log p(z_k \mid x)\big]
#   \qquad \text{(quadrature)}$$
#
# Both sides of $(*)$ come from the same grid, so the identity holds to round-off: a run gives a residual of about
# $4 \times 10^{-14}$ for the $q$ below, and about $2 \times 10^{-11}$ for $q$ = prior in section 4, whose tails reach
# past the grid's edge at $\pm 7$ (the closed-form KL sees them, the grid does not).  The checks assert $< 10^{-10}$.
# The closed-form KL is compared with its own grid value only to $10^{-8}$.

# %%
def terms(mu, logvar):
    """ELBO pieces of q = N(mu, diag exp(logvar)) by quadrature on the grid."""
    log_q = log_diag_normal(Z, mu, logvar)
    q_mass = np.exp(log_q) * dA
    e_loglik = (q_mass * ll).sum()
    kl_prior = kl_forward(mu[None], logvar[None])[0][0]
    kl_prior_grid = (q_mass * (log_q - log_standard_normal(Z))).sum()
    kl_post = (q_mass * (log_q - log_post)).sum()
    return dict(mass=q_mass.sum(), e_loglik=e_loglik, kl_prior=kl_prior, kl_prior_grid=kl_prior_grid,
                elbo=e_loglik - kl_prior, kl_post=kl_post)


# %%
mu_a, lv_a = np.array([0.3, -0.5]), np.array([-1.0, -0.6])
T = terms(mu_a, lv_a)
print(f"  q = N({mu_a}, diag exp({lv_a}))")
print(f"    E_q log p(x|z) = {T['e_loglik']:.8f}    KL(q||p(z)) = {T['kl_prior']:.8f} (grid {T['kl_prior_grid']:.8f})")
print(f"    ELBO = {T['elbo']:.8f}   KL(q||p(z|x)) = {T['kl_post']:.8f}")
print(f"    ELBO + KL = {T['elbo'] + T['kl_post']:.10f}   log p(x) = {log_px:.10f}")
check(abs(T["mass"] - 1) < 1e-9 and abs(T["kl_prior"] - T["kl_prior_grid"]) < 1e-8,
      "the grid integrates q to 1 and reproduces the closed-form KL(q||p(z)) to 1e-8")
resid = abs(T["elbo"] + T["kl_post"] - log_px)
check(resid < 1e-10, f"log p(x) = ELBO + KL(q||p(z|x)) holds to {resid:.1e} (< 1e-10)")
check(T["elbo"] < log_px and T["kl_post"] > 0, "ELBO < log p(x): the gap KL(q||p(z|x)) is positive")

# %% [markdown]
# ## 3. The Monte-Carlo ELBO a VAE uses is an unbiased estimate of the same number
#
# Training replaces the quadrature by samples $z_s = \mu + \sigma \odot \epsilon_s$ (lesson 06):
#
# $$\widehat{\mathrm{ELBO}} = \frac1S \sum_{s=1}^S \log p(x \mid z_s) - \mathrm{KL}\big(q \,\|\, p(z)\big),$$
#
# and with many samples it matches the quadrature value within its standard error.

# %%
S = 20_000 if args.quick else 200_000
zs = minivae.reparameterize(mu_a[None], lv_a[None], rng.standard_normal((S, 1, L)))[:, 0]
mc_terms = log_lik(zs) - T["kl_prior"]
mc, se = mc_terms.mean(), mc_terms.std(ddof=1) / np.sqrt(S)
print(f"  MC ELBO ({S} samples) = {mc:.5f} +- {se:.5f}   quadrature {T['elbo']:.5f}")
check(abs(mc - T["elbo"]) < 4.5 * se, "the Monte-Carlo ELBO agrees with the quadrature ELBO within 4.5 s.e.")

# %% [markdown]
# ## 4. Moving $q$ toward the posterior closes the gap
#
# Interpolate $q_t$ from the prior ($t = 0$: $\mu = 0$, logvar $= 0$) to the diagonal Gaussian with the posterior's
# mean $\mu^*$ and marginal variances $\sigma^{*2}$ ($t = 1$):
#
# $$\mu_t = t\, \mu^*, \qquad \text{logvar}_t = t \log \sigma^{*2}.$$
#
# The identity holds at every $t$; the gap shrinks as $q_t$ approaches $p(z \mid x)$.  It does not reach 0:
# $p(z \mid x)$ is neither Gaussian nor axis-aligned, so no diagonal Gaussian equals it (the "approximation gap" of
# variational inference).

# %%
ts = np.linspace(0, 1, 11 if args.quick else 21)
mu_star, lv_star = post_mean, np.log(post_var)
path = [terms(t * mu_star, t * lv_star) for t in ts]
elbos = np.array([p["elbo"] for p in path])
gaps = np.array([p["kl_post"] for p in path])
resids = np.abs(elbos + gaps - log_px)
print("   t     ELBO        KL(q||p(z|x))   ELBO+KL - log p(x)")
for t, e, k, r in zip(ts[::2], elbos[::2], gaps[::2], resids[::2]):
    print(f"  {t:.1f}  {e:11.5f}   {k:11.5f}      {r:.1e}")
check(resids.max() < 1e-10, f"the identity holds for every q along the path (max residual {resids.max():.1e} < 1e-10)")
check(np.all(np.diff(gaps) < 0), "the gap KL(q||p(z|x)) decreases monotonically as q moves toward the posterior")
check(gaps[-1] < 0.05 * gaps[0], "at the posterior's moments the gap is < 5% of the gap at q = prior")

# %% [markdown]
# ## 5. Pictures: the posterior with the path of $q_t$, and the ELBO against $\log p(x)$

# %%
fig, axes = plt.subplots(1, 2, figsize=(12, 5))
ax = axes[0]
ax.contourf(Z[..., 0], Z[..., 1], np.exp(log_post), levels=20, cmap="Blues")
th = np.linspace(0, 2 * np.pi, 200)
for t in (0.0, 0.5, 0.8, 1.0):
    m, s = t * mu_star, np.exp(0.5 * t * lv_star)
    for k in (1, 2):
        ax.plot(m[0] + k * s[0] * np.cos(th), m[1] + k * s[1] * np.sin(th), color=plt.get_cmap("plasma")(0.85 * t),
                lw=1.2, label=f"q_t, t={t:.1f}" if k == 1 else None)
ax.set_xlim(-2.5, 2.5)
ax.set_ylim(-2.5, 2.5)
ax.set_aspect("equal")
ax.legend(fontsize=8)
ax.set_title("true posterior p(z|x) (blue) and q_t (1 and 2 sd)")
ax = axes[1]
ax.plot(ts, elbos, "o-", label="ELBO(q_t)")
ax.axhline(log_px, color="k", ls="--", label="log p(x) (quadrature)")
ax.fill_between(ts, elbos, log_px, alpha=0.2, label="gap = KL(q_t || p(z|x))")
ax.set_xlabel("t  (q_0 = prior, q_1 = posterior moments)")
ax.set_ylabel("nats")
ax.legend()
ax.set_title("log p(x) = ELBO + KL(q || p(z|x))")
fig.tight_layout()
save_figure(fig, args.out, "elbo_gap.png")
print(f"done in {time.time() - t0:.1f} s")
