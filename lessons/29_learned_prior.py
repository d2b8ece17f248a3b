# %% [markdown]
# # Lesson 29 - A learned prior: a mixture of Gaussians and the VampPrior.
#
# Lesson 25 found the prior's holes: regions where $p(z) = \mathcal N(0, I)$ puts mass but the aggregate posterior
# $q(z) = \frac1N\sum_n q(z|x_n)$ does not, so samples drawn there decode to poor digits.  Instead of forcing the
# codes to fill $\mathcal N(0, I)$, the prior can be learned: a mixture of C Gaussians, or the VampPrior of Tomczak &
# Welling (2018), $p(z) = \frac1C\sum_c q(z|u_c)$, the encoder's own posterior at C learned pseudo-inputs $u_c$.  The
# KL term has no closed form any more; we derive the Monte Carlo KL's gradient through the log-sum-exp, check it, and
# compare the prior holes and the test bounds of the three priors.
#
# Run:  python lessons/29_learned_prior.py [--quick] [--out DIR] [--seed N]

# %% [markdown]
# ## 1. The mixture's log-density and its gradient
#
# $$\log p(z) = \log\sum_c e^{\ell_c},\qquad
#   \ell_c = \log\pi_c - \tfrac12\sum_j\Big[\frac{(z_j - m_{cj})^2}{e^{s_{cj}}} + s_{cj} + \log 2\pi\Big],
#   \qquad \pi = \mathrm{softmax}(a).$$
#
# The log-sum-exp's derivative is the softmax (lesson 21): $\partial\log p/\partial\ell_c = r_c$, the
# **responsibility** of component c for z.  Then, with $G = \partial L/\partial\log p$,
#
# $$\frac{\partial L}{\partial z} = -G\sum_c r_c\,\frac{z - m_c}{e^{s_c}},\quad
#   \frac{\partial L}{\partial m_c} = G\,r_c\,\frac{z - m_c}{e^{s_c}},\quad
#   \frac{\partial L}{\partial s_c} = \tfrac12\,G\,r_c\Big[\frac{(z-m_c)^2}{e^{s_c}} - 1\Big],\quad
#   \frac{\partial L}{\partial a_c} = G\,(r_c - \pi_c),$$
#
# the last from $\partial\log\pi_k/\partial a_c = [k = c] - \pi_c$.  The KL term is estimated at the sampled z,
# $\log q(z|x) - \log p(z)$, and the model's backward sends $-\beta/(SN)$ into $G$ (`minivae/priors.py`,
# `FamilyVAE(prior="mog:C" | "vamp:C")`, `--prior` on the command line).  For the VampPrior, $m_c$ and $s_c$ are the
# encoder's $(\mu, \log\sigma^2)$ at $u_c$: their gradients continue through the encoder's backward to its weights
# and to the pseudo-inputs.

# %%
import numpy as np
import matplotlib.pyplot as plt

import minivae
from minivae.data import load_mnist, static_binarize
from minivae.evaluate import iw_log_likelihood
from minivae.families import FamilyConfig, FamilyVAE
from minivae.figures import tile
from minivae.gaussian import log_standard_normal
from minivae.lessonkit import check, fit, lesson_args, save_figure
from minivae.priors import mixture_log_prob_backward, mixture_log_prob_forward
from minivae.surgery import log_aggregate_posterior

args = lesson_args("lesson_output/29_learned_prior", "Lesson 29: learned priors")
rng = np.random.default_rng(args.seed)

# %%
zc, ac, mc, sc = rng.standard_normal((6, 3)), rng.standard_normal(4), rng.standard_normal((4, 3)), \
    0.5 * rng.standard_normal((4, 3))
rep = minivae.check_op(mixture_log_prob_forward, mixture_log_prob_backward, [zc, ac, mc, sc], rng=rng, tol=1.0)
check(max(rep.values()) <= 1e-7, f"the mixture log-density's backward matches central differences (worst "
      f"{max(rep.values()):.1e})")


def without_the_softmax_term(dlp, cache):          # a planted mistake: dL/da_c = G r_c, the -pi_c forgotten
    dz, da, dm, ds = mixture_log_prob_backward(dlp, cache)
    return dz, da + dlp.sum() * cache[3], dm, ds


rep = minivae.check_op(mixture_log_prob_forward, without_the_softmax_term, [zc, ac, mc, sc], rng=rng, tol=1.0)
check(rep["x1"] > 1e-3, f"forgetting the softmax's -pi_c in dL/da fails the check (rel. error {rep['x1']:.2f})")
check(np.allclose(mixture_log_prob_forward(zc, np.zeros(1), np.zeros((1, 3)), np.zeros((1, 3)))[0],
                  log_standard_normal(zc)), "one component at (0, I) is the standard normal prior")

for prior in ("mog:3", "vamp:2"):
    tiny = FamilyVAE(FamilyConfig(x_dim=7, hidden=(5,), z_dim=3, activation="tanh", dtype="float64", prior=prior),
                     rng=0)
    xt = (rng.random((4, 7)) < 0.5).astype(np.float64)
    rep = minivae.check_model(tiny, xt, n_samples=2, rng=rng, tol=1.0)
    check(max(rep.values()) <= 1e-7, f"the whole VAE with prior {prior} matches central differences (worst "
          f"{max(rep.values()):.1e}; the VampPrior's path through the encoder included)")

# %% [markdown]
# ## 2. Three priors, the same VAE
#
# 784-200-2 Bernoulli VAEs (a 2-D z, so the densities can be drawn), Adam 2e-3, batches of 100, the same steps, data
# order and initial encoder and decoder: $\mathcal N(0, I)$, a mixture of 10 Gaussians, and a VampPrior with 50
# pseudo-inputs.  Holes (lesson 25's measure, `minivae.surgery`): draws $z \sim p(z)$ where the aggregate posterior
# of 500 test digits is below a tenth of the prior, $q(z)/p(z) < 0.1$, and $\mathrm{KL}(p\,\|\,q)$.

# %%
N_TRAIN, STEPS, IW_K = (5000, 500, 20) if args.quick else (10000, 1500, 100)
x_train = static_binarize(load_mnist("train")[0][:N_TRAIN], seed=1)
x_test = static_binarize(load_mnist("test")[0][:500], seed=2)
PRIORS = {"N(0, I)": None, "mixture of 10": "mog:10", "VampPrior, 50": "vamp:50"}
res = {}
for name, prior in PRIORS.items():
    m = FamilyVAE(FamilyConfig(hidden=(200,), z_dim=2, prior=prior), rng=args.seed + 1)
    fit(m, x_train, STEPS, np.random.default_rng(args.seed + 2), batch_size=100, binarize=False,
        opt=minivae.Adam(lr=2e-3))
    mu, lv = m.encode(x_test)
    z = m.sample_prior(2000, rng=3)
    d = np.asarray(m.log_prior(z), np.float64) - log_aggregate_posterior(z, mu, lv)   # log p(z) - log q(z)
    res[name] = dict(model=m, mu=mu, lv=lv, holes=float(np.mean(d > np.log(10))), kl_pq=float(d.mean()),
                     iw=float(-iw_log_likelihood(m, x_test, IW_K, np.random.default_rng(4)).mean()))
    print(f"  {name:14s} holes {res[name]['holes']:.3f}  KL(p || q) {res[name]['kl_pq']:.2f}  "
          f"IW-NLL (k={IW_K}) {res[name]['iw']:.2f}")

std, vamp = res["N(0, I)"], res["VampPrior, 50"]
check(vamp["holes"] < 0.7 * std["holes"], f"the VampPrior leaves fewer holes: {vamp['holes']:.1%} of its draws "
      f"against {std['holes']:.1%} for N(0, I)")
mog = res["mixture of 10"]
check(mog["holes"] < std["holes"], f"the mixture of 10 leaves fewer holes than N(0, I) too ({mog['holes']:.1%})")
print("  KL(p || q) is an average of log p/q over the prior's draws, dominated by the few that land far out in the\n"
      "  tails, where q is tiny: it moves a lot from seed to seed, so the hole fraction is the measure checked here.")

# %% [markdown]
# ## 3. The densities and the samples
#
# Left to right for each prior: the aggregate posterior of the test digits, the prior, and samples drawn from the
# prior.  The VampPrior's components sit where the encoder puts digits, so its draws land where the decoder was
# trained.

# %%
g = np.linspace(-4, 4, 81)
grid = np.stack(np.meshgrid(g, g), axis=-1).reshape(-1, 2)
fig, axes = plt.subplots(3, 3, figsize=(9, 9))
for row, (name, r) in zip(axes, res.items()):
    m = r["model"]
    lq = log_aggregate_posterior(grid, r["mu"], r["lv"]).reshape(81, 81)
    lp = np.asarray(m.log_prior(grid.astype(np.float32)), np.float64).reshape(81, 81)
    for ax, img, title in ((row[0], lq, "aggregate posterior q(z)"), (row[1], lp, f"prior: {name}")):
        ax.imshow(np.maximum(img, img.max() - 12), origin="lower", extent=(-4, 4, -4, 4), cmap="viridis")
        ax.set_title(title, fontsize=9)
    row[2].imshow(tile(np.asarray(m.sample(36, rng=5)), nrow=6), cmap="gray")
    row[2].set_title(f"samples, holes {r['holes']:.0%}", fontsize=9)
    row[2].axis("off")
save_figure(fig, args.out, "priors.png")
