"""Lesson 06 - The reparameterization trick.

Run:  python lessons/06_reparameterization.py [--quick] [--out DIR] [--seed N]

Training a VAE needs the gradient of an expectation whose *distribution*
depends on the parameters:

    g = d/dphi E_{z ~ q_phi}[f(z)],        q_phi = N(mu, diag exp(logvar)),  phi = (mu, logvar).

Two unbiased Monte-Carlo estimators:

(a) Score function / REINFORCE (Williams 1992).  Differentiate the density:

        d/dphi \int q_phi(z) f(z) dz = \int q_phi(z) [d/dphi log q_phi(z)] f(z) dz
                                     = E_q[ f(z) d/dphi log q_phi(z) ],

    using dq = q dlog q.  For the diagonal Gaussian, per dimension,
        log q = -1/2 (z - mu)^2 exp(-logvar) - 1/2 logvar - 1/2 log 2pi
        d log q / d mu     = (z - mu) / sigma^2
        d log q / d logvar = 1/2 ((z - mu)^2 / sigma^2 - 1).
    It needs only values of f, never its derivative, but f(z) multiplies a
    zero-mean noisy term: the variance is large.

(b) Reparameterization (Kingma & Welling 2014, sec. 2.4).  Write the sample as a
    deterministic, differentiable function of parameter-free noise:

        z = mu + sigma * eps,   eps ~ N(0, I),   sigma = exp(logvar / 2),

    so E_q[f(z)] = E_eps[f(mu + sigma eps)] and the derivative moves inside:

        d/dmu     = E_eps[ f'(z) ]
        d/dlogvar = E_eps[ f'(z) * eps * sigma / 2 ]          (dsigma/dlogvar = sigma / 2)

    which is exactly ``reparameterize_backward`` applied to dz = f'(z).

Test function with a closed-form answer:  f(z) = sum_j z_j^2.  Then
E_q f = sum_j (mu_j^2 + sigma_j^2) = sum_j (mu_j^2 + exp(logvar_j)), so the exact
gradients are  d/dmu_j = 2 mu_j  and  d/dlogvar_j = exp(logvar_j).

Why sigma = exp(logvar / 2): logvar is log sigma^2, so sigma = sqrt(exp(logvar)).
Using exp(logvar) as the standard deviation is a classic bug: the sampled
variance becomes exp(2 logvar) (section 3 shows it).

Exercise: ``reparameterize_forward`` and ``reparameterize_backward`` in
minivae/gaussian.py.
"""
# %%
import time
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

import minivae
from minivae.gaussian import reparameterize_backward, reparameterize_forward
from minivae.lessonkit import check, lesson_args


# --quick, --out DIR, --seed N (unknown arguments are ignored, so this also runs inside Jupyter)
args = lesson_args("lesson_output/06_reparameterization", "Lesson 06: the reparameterization trick",
                   quick_help="fewer samples (for tests)")
out = Path(args.out)
rng = np.random.default_rng(args.seed)
t0 = time.time()

# %% [markdown]
# ## 1. Both estimators, per sample, for f(z) = sum z^2

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
# per-sample reparameterization gradients: apply the backward to one sample at a time
# (for a (S, N, L) eps the backward sums over S, which is what training uses; here we
# want each sample's estimate to measure the variance, so we use the 2-D form per row)
rep_mu, rep_lv = reparameterize_backward(dfdz[:, 0, :], (cache[0], eps[:, 0, :]))   # (S, L) each
# score-function per-sample gradients
sigma2 = np.exp(logvar)
score_mu = f * (z[:, 0, :] - mu) / sigma2                               # (S, L)
score_lv = f * 0.5 * ((z[:, 0, :] - mu) ** 2 / sigma2 - 1)
# the summed (S, N, L) backward / S is the averaged estimator
sum_mu, sum_lv = reparameterize_backward(dfdz / S, cache)
check(np.allclose(sum_mu[0], rep_mu.mean(0)) and np.allclose(sum_lv[0], rep_lv.mean(0)),
      "reparameterize_backward on (S,N,L) sums the per-sample gradients over S")


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
# ## 2. Gradient check of the reparameterization op (both eps layouts)

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
# ## 3. sigma = exp(logvar / 2), and the classic bug
#
# With logvar = log sigma^2, z = mu + exp(logvar/2) eps has Var z = exp(logvar).
# The bug z = mu + exp(logvar) eps has Var z = exp(2 logvar): for logvar = 1
# that is 7.39 instead of 2.72; for logvar = -2 it is 0.018 instead of 0.135.

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
# the sample variance of a Gaussian has relative s.e. sqrt(2/(S-1))
tol = 5 * np.sqrt(2 / (Ssamp - 1))
check(np.all(np.abs(v_ok / np.exp(lv_test[0]) - 1) < tol),
      "minivae.reparameterize samples have variance exp(logvar) (within 5 s.e.)")
check(np.all(np.abs(v_bug / np.exp(2 * lv_test[0]) - 1) < tol) and abs(v_bug[1] / v_ok[1] - 1) < tol,
      "the exp(logvar)-as-sigma bug gives variance exp(2 logvar) (right only at logvar = 0, which hides it)")

# %% [markdown]
# ## 4. Picture: distribution of single-sample gradient estimates, d/dmu_1

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 4))
for ax, (j, what, a, b, ex) in zip(axes, [(0, "d/dmu_1", rep_mu, score_mu, exact_mu),
                                         (0, "d/dlogvar_1", rep_lv, score_lv, exact_lv)]):
    lo, hi = np.percentile(b[:, j], [0.5, 99.5])
    bins = np.linspace(lo, hi, 120)
    ax.hist(b[:, j], bins=bins, density=True, alpha=0.6, label=f"score function (var {b[:, j].var():.1f})")
    ax.hist(a[:, j], bins=bins, density=True, alpha=0.6, label=f"reparameterization (var {a[:, j].var():.2f})")
    ax.axvline(ex[j], color="k", ls="--", label=f"exact {ex[j]:.3f}")
    ax.set_title(f"single-sample estimates of {what} E[sum z^2]")
    ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(out / "gradient_estimators.png", dpi=100)
plt.close(fig)

print(f"figures written to {out}/  ({time.time() - t0:.1f} s)")
