# %% [markdown]
# # Lesson 06: the reparameterization trick
#
# Training a VAE needs the gradient of an expectation whose *distribution* depends on the parameters.  This lesson
# derives the two unbiased estimators of it, the score function and the reparameterization, compares their variance
# on a function with a closed-form answer, gradient-checks minivae's reparameterization op, and shows why
# $\sigma = \exp(\tfrac12 \text{logvar})$ and not $\exp(\text{logvar})$.
#
# Run it as a script, `python lessons/06_reparameterization.py [--out DIR] [--seed N]`, or open it as a
# notebook (jupytext or VS Code; `MINIVAE_QUICK=1` in the kernel's environment selects the tests' quick mode).
#
# Exercise: `reparameterize_forward` and `reparameterize_backward` in `minivae/gaussian.py`.
#
# ## The problem
#
# $$g = \frac{\partial}{\partial \phi}\, \mathbb{E}_{z \sim q_\phi}\big[f(z)\big], \qquad
#   q_\phi = \mathcal{N}\big(\mu, \mathrm{diag}\, e^{\text{logvar}}\big), \qquad \phi = (\mu, \text{logvar}).$$
#
# **(a) Score function / REINFORCE (Williams 1992).**  Differentiate the density, using
# $\partial_\phi q = q\, \partial_\phi \log q$:
#
# $$\frac{\partial}{\partial \phi} \int q_\phi(z) f(z)\, dz = \int q_\phi(z) \Big[\frac{\partial}{\partial \phi}
#   \log q_\phi(z)\Big] f(z)\, dz = \mathbb{E}_q\Big[f(z)\, \frac{\partial}{\partial \phi} \log q_\phi(z)\Big].$$
#
# For the diagonal Gaussian, per dimension, with $\sigma^2 = e^{\text{logvar}}$,
#
# $$\log q = -\tfrac12 (z - \mu)^2 e^{-\text{logvar}} - \tfrac12 \text{logvar} - \tfrac12 \log 2\pi,$$
#
# $$\frac{\partial \log q}{\partial \mu} = \frac{z - \mu}{\sigma^2}, \qquad
#   \frac{\partial \log q}{\partial\, \text{logvar}} = \frac12 \Big(\frac{(z - \mu)^2}{\sigma^2} - 1\Big).$$
#
# It needs only values of $f$, never its derivative, but $f(z)$ multiplies a zero-mean noisy term: the variance is
# large.
#
# **(b) Reparameterization (Kingma & Welling 2014, sec. 2.4).**  Write the sample as a deterministic, differentiable
# function of parameter-free noise:
#
# $$z = \mu + \sigma \odot \epsilon, \qquad \epsilon \sim \mathcal{N}(0, I), \qquad \sigma = e^{\text{logvar}/2},$$
#
# so $\mathbb{E}_q[f(z)] = \mathbb{E}_\epsilon[f(\mu + \sigma \odot \epsilon)]$ and the derivative moves inside.  With
# $\partial \sigma / \partial\, \text{logvar} = \sigma / 2$:
#
# $$\frac{\partial}{\partial \mu} = \mathbb{E}_\epsilon\big[f'(z)\big], \qquad
#   \frac{\partial}{\partial\, \text{logvar}}
#   = \mathbb{E}_\epsilon\Big[f'(z) \odot \epsilon \odot \frac{\sigma}{2}\Big],$$
#
# which is exactly `reparameterize_backward` applied to $dz = f'(z)$.
#
# **A test function with a closed-form answer**, $f(z) = \sum_j z_j^2$.  Then
# $\mathbb{E}_q f = \sum_j (\mu_j^2 + \sigma_j^2) = \sum_j (\mu_j^2 + e^{\text{logvar}_j})$, so the exact gradients are
#
# $$\frac{\partial\, \mathbb{E}_q f}{\partial \mu_j} = 2 \mu_j, \qquad
#   \frac{\partial\, \mathbb{E}_q f}{\partial\, \text{logvar}_j} = e^{\text{logvar}_j}.$$

# %%
import time

import matplotlib.pyplot as plt
import numpy as np

import minivae
from minivae.gaussian import reparameterize_backward, reparameterize_forward
from minivae.lessonkit import check, lesson_args, save_figure

# --quick (or MINIVAE_QUICK=1), --out DIR, --seed N; unknown arguments (a Jupyter kernel's) are ignored
args = lesson_args("lesson_output/06_reparameterization", "Lesson 06: the reparameterization trick",
                   quick_help="fewer samples (for tests)")
rng = np.random.default_rng(args.seed)
t0 = time.time()

# %% [markdown]
# ## 1. Both estimators, per sample, for $f(z) = \sum_j z_j^2$
#
# Per sample $s$, with $f'(z) = 2z$:
#
# - reparameterization: $\hat g_\mu = 2 z_s$, $\hat g_\text{logvar} = 2 z_s \odot \epsilon_s \odot \sigma / 2$;
# - score function: $\hat g_\mu = f(z_s)\, (z_s - \mu) / \sigma^2$,
#   $\hat g_\text{logvar} = f(z_s) \cdot \tfrac12 \big((z_s - \mu)^2 / \sigma^2 - 1\big)$.
#
# For $\epsilon$ of shape $(S, N, L)$ the backward sums over the $S$ samples, which is what training uses; here we
# want each sample's estimate, to measure the variance, so we apply the backward to the 2-D form, one row per sample.

# %%
L = 3
mu = np.array([[1.5, -0.8, 0.3]])                 # (N=1, L)
logvar = np.array([[-1.0, 0.2, -0.4]])
exact_mu, exact_lv = 2 * mu[0], np.exp(logvar[0])
S = 20_000 if args.quick else 400_000

eps = rng.standard_normal((S, 1, L))
z, cache = reparameterize_forward(mu, logvar, eps)     # (S, 1, L)
f = (z ** 2).sum(-1)                                    # (S, 1)
dfdz = 2 * z
rep_mu, rep_lv = reparameterize_backward(dfdz[:, 0, :], (cache[0], eps[:, 0, :]))   # (S, L) each: per sample
sigma2 = np.exp(logvar)
score_mu = f * (z[:, 0, :] - mu) / sigma2                               # (S, L)
score_lv = f * 0.5 * ((z[:, 0, :] - mu) ** 2 / sigma2 - 1)
sum_mu, sum_lv = reparameterize_backward(dfdz / S, cache)              # the (S, N, L) backward / S: the average
check(np.allclose(sum_mu[0], rep_mu.mean(0)) and np.allclose(sum_lv[0], rep_lv.mean(0)),
      "reparameterize_backward on (S,N,L) sums the per-sample gradients over S")


# %%
def summary(name, g, exact):
    m, se = g.mean(0), g.std(0, ddof=1) / np.sqrt(len(g))
    print(f"  {name:28s} mean {np.round(m, 4)}  s.e. {np.round(se, 4)}  exact {np.round(exact, 4)}")
    return m, se, g.var(0, ddof=1)


print(f"  S = {S} samples")
rows = {}
for name, g, ex in [("reparam   d/dmu", rep_mu, exact_mu), ("score fn  d/dmu", score_mu, exact_mu),
                    ("reparam   d/dlogvar", rep_lv, exact_lv), ("score fn  d/dlogvar", score_lv, exact_lv)]:
    rows[name] = summary(name, g, ex)
zs = [np.abs((m - ex) / se).max() for (m, se, _), ex in
      zip(rows.values(), [exact_mu, exact_mu, exact_lv, exact_lv])]
check(max(zs) < 4.5, "both estimators are unbiased: every mean is within 4.5 s.e. of the exact gradient")
ratio_mu = rows["score fn  d/dmu"][2] / rows["reparam   d/dmu"][2]
ratio_lv = rows["score fn  d/dlogvar"][2] / rows["reparam   d/dlogvar"][2]
print(f"  per-sample variance ratio score/reparam: d/dmu {np.round(ratio_mu, 1)}, d/dlogvar {np.round(ratio_lv, 1)}")
check(ratio_mu.min() > 10 and ratio_lv.min() > 10,
      "score-function variance is > 10x the reparameterization variance in every coordinate")

# %% [markdown]
# ## 2. Gradient check of the reparameterization op (both $\epsilon$ layouts)
#
# One sample per example, $\epsilon$ of shape $(N, L)$, and $S = 5$ samples per example, $(S, N, L)$, where the
# backward sums over the samples: $d\mu = \sum_s dz_s$ and
# $d\,\text{logvar} = \sum_s dz_s \odot \epsilon_s \odot \sigma / 2$.

# %%
mu_c, lv_c = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
eps2 = rng.standard_normal((4, 3))          # one sample per example
eps3 = rng.standard_normal((5, 4, 3))       # S = 5 samples per example
rep2 = minivae.check_op(lambda m, v: reparameterize_forward(m, v, eps2), reparameterize_backward,
                        [mu_c.copy(), lv_c.copy()], names=["mu", "logvar"], rng=rng, tol=1e-8)
rep3 = minivae.check_op(lambda m, v: reparameterize_forward(m, v, eps3), reparameterize_backward,
                        [mu_c.copy(), lv_c.copy()], names=["mu", "logvar"], rng=rng, tol=1e-8)
print("  eps (N,L):", {k: f"{v:.1e}" for k, v in rep2.items()}, "  eps (S,N,L):",
      {k: f"{v:.1e}" for k, v in rep3.items()})
check(max(rep2.values()) < 1e-8 and max(rep3.values()) < 1e-8,
      "reparameterize_backward passes check_op for eps (N,L) and (S,N,L)")

# %% [markdown]
# ## 3. $\sigma = e^{\text{logvar}/2}$, and the classic bug
#
# logvar is $\log \sigma^2$, so $\sigma = \sqrt{e^{\text{logvar}}} = e^{\text{logvar}/2}$, and
# $z = \mu + e^{\text{logvar}/2} \epsilon$ has $\mathrm{Var}\, z = e^{\text{logvar}}$.  Using $e^{\text{logvar}}$ as
# the standard deviation is a classic bug: $z = \mu + e^{\text{logvar}} \epsilon$ has
# $\mathrm{Var}\, z = e^{2\,\text{logvar}}$.  For logvar $= 1$ that is $7.39$ instead of $2.72$; for logvar $= -2$ it
# is $0.018$ instead of $0.135$; only at logvar $= 0$ do the two agree, which hides the bug.  The sample variance of a
# Gaussian has relative standard error $\sqrt{2 / (S - 1)}$, which sets the tolerance.

# %%
lv_test = np.array([[-2.0, 0.0, 1.0]])
mu0 = np.zeros_like(lv_test)
Ssamp = 50_000 if args.quick else 500_000
e = rng.standard_normal((Ssamp, 1, 3))
z_ok = minivae.reparameterize(mu0, lv_test, e)[:, 0]
z_bug = (mu0 + np.exp(lv_test) * e)[:, 0]                  # the bug: exp(logvar) used as sigma
v_ok, v_bug = z_ok.var(0), z_bug.var(0)
print(f"  logvar          {lv_test[0]}")
print(f"  exp(logvar)     {np.round(np.exp(lv_test[0]), 4)}")
print(f"  var (minivae)   {np.round(v_ok, 4)}")
print(f"  var (bug)       {np.round(v_bug, 4)}   exp(2 logvar) = {np.round(np.exp(2 * lv_test[0]), 4)}")
tol = 5 * np.sqrt(2 / (Ssamp - 1))
check(np.all(np.abs(v_ok / np.exp(lv_test[0]) - 1) < tol),
      "minivae.reparameterize samples have variance exp(logvar) (within 5 s.e.)")
check(np.all(np.abs(v_bug / np.exp(2 * lv_test[0]) - 1) < tol) and abs(v_bug[1] / v_ok[1] - 1) < tol,
      "the exp(logvar)-as-sigma bug gives variance exp(2 logvar) (right only at logvar = 0, which hides it)")

# %% [markdown]
# ## 4. Picture: the distribution of single-sample gradient estimates for the first coordinate

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 4))
for ax, (what, a_, b_, ex) in zip(axes, [("d/dmu_1", rep_mu, score_mu, exact_mu),
                                         ("d/dlogvar_1", rep_lv, score_lv, exact_lv)]):
    lo, hi = np.percentile(b_[:, 0], [0.5, 99.5])
    bins = np.linspace(lo, hi, 120)
    ax.hist(b_[:, 0], bins=bins, density=True, alpha=0.6, label=f"score function (var {b_[:, 0].var():.1f})")
    ax.hist(a_[:, 0], bins=bins, density=True, alpha=0.6, label=f"reparameterization (var {a_[:, 0].var():.2f})")
    ax.axvline(ex[0], color="k", ls="--", label=f"exact {ex[0]:.3f}")
    ax.set_title(f"single-sample estimates of {what} E[sum z^2]")
    ax.legend(fontsize=8)
fig.tight_layout()
save_figure(fig, args.out, "gradient_estimators.png")
print(f"done in {time.time() - t0:.1f} s")
