# %% [markdown]
# # Lesson 25: ELBO surgery, the prior's holes, and the rate–distortion plane
#
# The KL term of the ELBO, averaged over the data, is usually read as "how much the code costs".  Hoffman & Johnson
# (2016, *ELBO surgery: yet another way to carve up the variational evidence lower bound*, NIPS workshop on
# Advances in Approximate Bayesian Inference) split it into two different things: how much the code $z$ says about
# $x$, and how badly the codes the encoder uses, taken together, fit the prior.  Alemi et al. (2018, *Fixing a
# Broken ELBO*, ICML) then drew every VAE as a point on a plane, rate against distortion, on which $\beta$ picks the
# point.  This lesson estimates both parts of the split with `minivae.surgery`, uses the first, the mutual
# information $I(x; z)$, as a measure of posterior collapse beside lesson 13's active units, shows where the prior
# has "holes" that the encoder never fills, and traces a sweep of $\beta$-VAEs on the rate–distortion plane.
#
# Run it as a script, `python lessons/25_elbo_surgery.py [--quick] [--out DIR] [--seed N]`, or open it as a
# notebook (jupytext or VS Code).  `--quick` (or `MINIVAE_QUICK=1`) is the short run the tests use.
#
# ## 1. The split
#
# Take the data to be the $N$ points $x_1, \dots, x_N$, each with probability $\frac1N$, and the encoder's joint
# $q(x_n, z) = \frac1N q(z \mid x_n)$.  Its marginal over $z$ is the **aggregate posterior**
#
# $$q(z) = \frac1N \sum_{n=1}^{N} q(z \mid x_n),$$
#
# a mixture of $N$ diagonal Gaussians.  Insert $\log q(z) - \log q(z)$ into the average KL (the **rate** $R$):
#
# $$R = \frac1N \sum_n \mathrm{KL}\big(q(z \mid x_n) \,\|\, p(z)\big)
#   = \frac1N \sum_n \mathbb{E}_{q(z \mid x_n)} \Big[ \log \frac{q(z \mid x_n)}{q(z)} + \log \frac{q(z)}{p(z)} \Big]
#   = \underbrace{I_q(x; z)}_{\text{mutual information}} + \underbrace{\mathrm{KL}\big(q(z) \,\|\, p(z)\big)}_{\text{marginal KL}} .$$
#
# The first term is the mutual information between the index $n$ and $z$ under $q$: what the code tells about which
# image it came from.  The second is how far the codes, pooled over all images, are from the prior; since the
# decoder is trained on codes from $q(z)$ and sampled with codes from $p(z)$, this is the mismatch that shows as bad
# samples.  Both are $\ge 0$.  Because $q(z) \ge \frac1N q(z \mid x_n)$ for every $n$,
#
# $$I_q(x; z) \le \log N ,$$
#
# so with $N$ images no more than $\log N$ nats of the rate can be information; the rest is marginal KL.
#
# **Estimating both.**  Draw $z_n \sim q(z \mid x_n)$ once per image ($z_n = \mu_n + \sigma_n \odot \epsilon_n$, with
# $\sigma = e^{\text{logvar}/2}$), and average
# $\log q(z_n \mid x_n) - \log q(z_n)$ for $I$ and $\log q(z_n) - \log p(z_n)$ for the marginal KL.  $\log q(z_n)$ is the
# log-mean-exp over the $N$ mixture components (`minivae.surgery.log_aggregate_posterior`).  The rate itself is
# analytic (lesson 07), so the two estimates must add up to it within their Monte Carlo error.
#
# We check the estimator on posteriors where the answer is known: $\mu_n \sim \mathcal{N}(0, (1 - s^2) I)$ and
# $\sigma_n^2 = s^2$.  Then $q(z)$ is (up to the finite sample) $\mathcal{N}(0, I) = p(z)$, so the marginal KL is about 0,
# and $I = \frac L2 \log \frac{1}{s^2}$: this is exactly the optimal linear VAE of lesson 24, whose surviving units
# have $s^2 = v / \lambda$ and carry $\frac12 \log(\lambda / v)$ nats each.

# %%
import time

import matplotlib.pyplot as plt
import numpy as np

import minivae
from minivae.data import load_mnist, static_binarize
from minivae.figures import tile
from minivae.gaussian import log_diag_normal, log_standard_normal
from minivae.lessonkit import check, fit, lesson_args, save_figure
from minivae.surgery import elbo_surgery, log_aggregate_posterior, prior_holes

# --quick (or MINIVAE_QUICK=1), --out DIR, --seed N; unknown arguments (a Jupyter kernel's) are ignored
args = lesson_args("lesson_output/25_elbo_surgery", "Lesson 25: ELBO surgery and the rate-distortion plane",
                   quick_help="smaller models, fewer steps and betas (the test mode)")
rng = np.random.default_rng(args.seed)
t0 = time.time()


def surgery_by_hand(mu, logvar, eps):
    """Per-point estimates (N,) of the two parts of the rate, with one draw z_n = mu_n + sigma_n eps_n each."""
    z = mu + np.exp(0.5 * logvar) * eps                                   # z_n ~ q(z | x_n), sigma = e^(logvar/2)
    log_q_cond = log_diag_normal(z, mu, logvar)                           # log q(z_n | x_n)
    log_q_agg = log_aggregate_posterior(z, mu, logvar)                    # log q(z_n) = log mean_m q(z_n | x_m)
    return log_q_cond - log_q_agg, log_q_agg - log_standard_normal(z)     # I_n, marginal KL_n


N_TOY, L_TOY, S2 = 2000, 2, 0.25
mu_t = rng.standard_normal((N_TOY, L_TOY)) * np.sqrt(1 - S2)
lv_t = np.full((N_TOY, L_TOY), np.log(S2))
rate_n = 0.5 * (mu_t ** 2 + np.exp(lv_t) - 1 - lv_t).sum(1)                # KL(q(z|x_n) || N(0, I)), lesson 07
i_n, mkl_n = np.zeros(N_TOY), np.zeros(N_TOY)
for _ in range(8):                                                          # 8 draws per point, averaged
    a, b = surgery_by_hand(mu_t, lv_t, rng.standard_normal(mu_t.shape))
    i_n, mkl_n = i_n + a / 8, mkl_n + b / 8
se = (i_n + mkl_n).std(ddof=1) / np.sqrt(N_TOY)
i_exact = 0.5 * L_TOY * np.log(1 / S2)
print(f"  rate {rate_n.mean():.4f} = I {i_n.mean():.4f} + marginal KL {mkl_n.mean():.4f} "
      f"(sum {i_n.mean() + mkl_n.mean():.4f} +- {se:.4f});  L/2 log(1/s^2) = {i_exact:.4f};  log N = {np.log(N_TOY):.2f}")
check(abs(rate_n.mean() - i_n.mean() - mkl_n.mean()) < 4 * se + 1e-3,
      "I + marginal KL = the analytic rate (within 4 standard errors)")
check(abs(i_n.mean() - i_exact) < 0.1 and abs(mkl_n.mean()) < 0.05,
      f"q(z) = p(z) here: marginal KL {mkl_n.mean():.3f} < 0.05, I = L/2 log(1/s^2) = {i_exact:.3f} within 0.1 nats")
ref = elbo_surgery(mu_t, lv_t, np.random.default_rng(1))
mine = surgery_by_hand(mu_t, lv_t, np.random.default_rng(1).standard_normal(mu_t.shape))
check(abs(ref["mutual_info"] - mine[0].mean()) < 1e-10 and abs(ref["marginal_kl"] - mine[1].mean()) < 1e-10,
      "minivae.surgery.elbo_surgery computes the same estimate from the same draws")

# %% [markdown]
# **Rate is not information, and active units are not information either.**  Two constructed encoders, on the same
# $N$ points, show what each statistic sees:
#
# * *constant posteriors*: $\mu_n = 0$ and $\sigma = 0.5$ for every image.  No $z$ says anything about $x$: $I = 0$,
#   exactly.  But the rate is $\frac12 (\sigma^2 - 1 - \log \sigma^2) = 0.32$ nats per unit, all of it marginal KL.  This
#   is how free bits (lesson 21) can hold $\lambda$ nats per unit with no information: a constant $\sigma < 1$;
# * *small but sharp means*: $\mu_n$ with $\mathrm{Var}_x\, \mu_n = 0.005$ and $\sigma = 0.01$.  Lesson 13's count
#   calls the unit inactive ($\mathrm{Var}_x\, \mu < 0.01$), yet the means spread over 7 of the codes' own standard
#   deviations, and $I \approx \frac12 \log(1 + 0.005 / 0.0001) = \frac12 \log 51 \approx 2$ nats (the Gaussian
#   channel's formula; the means here are Gaussian).
#
# Active units measure how far the means move on the prior's scale; $I(x; z)$ measures, in nats, how much the codes
# distinguish the images.  A collapsed unit has both near 0; only $I$ says how much is left.

# %%
n_c = 1000
cases = {"constant sigma = 0.5": (np.zeros((n_c, 1)), np.full((n_c, 1), np.log(0.25))),
         "sd(mu) = 0.07, sigma = 0.01": (rng.standard_normal((n_c, 1)) * np.sqrt(0.005), np.full((n_c, 1), np.log(1e-4)))}
res_c = {}
for name, (m_c, l_c) in cases.items():
    s_c = elbo_surgery(m_c, l_c, rng, samples=4)
    res_c[name] = (s_c, int((m_c.var(0) > 0.01).sum()))
    print(f"  {name:30s}: rate {s_c['rate']:.3f}, I {s_c['mutual_info']:.3f}, marginal KL {s_c['marginal_kl']:.3f}, "
          f"active units {res_c[name][1]}/1")
s_a, au_a = res_c["constant sigma = 0.5"]
s_b, au_b = res_c["sd(mu) = 0.07, sigma = 0.01"]
check(au_a == 0 and abs(s_a["mutual_info"]) < 1e-9 and s_a["rate"] > 0.3,
      f"constant posteriors: {s_a['rate']:.3f} nats of rate, 0 nats of information, no active unit")
check(au_b == 0 and abs(s_b["mutual_info"] - 0.5 * np.log(51)) < 0.15,
      f"small sharp means: 'inactive' by the Var_x(mu) > 0.01 count, yet I = {s_b['mutual_info']:.2f} nats "
      "= 1/2 log 51 within 0.15")

# %% [markdown]
# ## 2. A sweep of $\beta$
#
# Each model is a 784-H-16 Bernoulli VAE trained with `lessonkit.fit` (lesson 10's loop) on the $\beta$-objective
#
# $$\mathcal{J}_\beta = D + \beta R, \qquad D = \frac1N \sum_n \mathbb{E}_{q(z \mid x_n)}\big[-\log p(x_n \mid z)\big]
#   \ \text{(distortion)}, \qquad R = \frac1N \sum_n \mathrm{KL}\big(q(z \mid x_n) \,\|\, p(z)\big) \ \text{(rate)},$$
#
# from the same initialization and data order, so that only $\beta$ differs.  Each is evaluated on $N = 1000$ of its
# training images (binarized once): the $\beta$-objective is a statement about the data it is minimised on.
#
# **What the plane predicts** (Alemi et al. 2018).  $-\mathrm{ELBO} = D + R$.  If run $i$ reaches the minimum of
# $D + \beta_i R$, then for any other run $j$, $D_i + \beta_i R_i \le D_j + \beta_i R_j$.  Writing this both ways for
# $\beta_i < \beta_j$ and adding gives $R_i \ge R_j$, $D_i \le D_j$, and
#
# $$\beta_i \;\le\; \frac{D_j - D_i}{R_i - R_j} \;\le\; \beta_j :$$
#
# along the sweep, one nat of rate buys between $\beta_i$ and $\beta_j$ nats of distortion.  The optimal points lie on
# a convex curve whose slope at run $i$ is $-\beta_i$, and the best $-\mathrm{ELBO}$ is the point where the slope is
# $-1$, $\beta = 1$: $\beta = 1$ beats its neighbours on $-\mathrm{ELBO} = D + R$ exactly when the slope on its left
# is below 1 and the slope on its right above 1.  Trained networks only approximate the minimum, so we check the
# slopes with a margin, within $[0.8\,\beta_i,\ 1.2\,\beta_j]$; short runs favour a small $\beta$ (the KL term slows
# learning), and in the short test mode $\beta = \tfrac12$ can come out ahead on $-\mathrm{ELBO}$ by a nat.

# %%
if args.quick:
    N_TRAIN, STEPS, HIDDEN, BETAS = 5000, 500, 64, (0.5, 2.0, 16.0)
else:
    N_TRAIN, STEPS, HIDDEN, BETAS = 20000, 600, 200, (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
Z, N_EVAL = 16, 1000
x_train = load_mnist("train")[0][:N_TRAIN]
x_eval = static_binarize(x_train[:N_EVAL], seed=2)                          # (N, D) fixed binary images
eps_eval = np.random.default_rng(5).standard_normal((1, N_EVAL, Z))          # the same eps for every model
runs = {}
for beta in BETAS:
    model = minivae.VAE(minivae.VAEConfig(x_dim=784, hidden=(HIDDEN,), z_dim=Z), rng=args.seed)
    fit(model, x_train, STEPS, np.random.default_rng(args.seed + 1), beta=beta)
    model.loss(x_eval, eps=eps_eval.astype(model.dtype), backward=False)
    mu, lv = (minivae.to_numpy(a).astype(np.float64) for a in model.encode(x_eval))
    s = elbo_surgery(mu, lv, np.random.default_rng(6), samples=4)
    i_unit = np.array([elbo_surgery(mu[:, [j]], lv[:, [j]], np.random.default_rng(7), samples=4)["mutual_info"]
                       for j in range(Z)])                                   # I(x; z_j), one unit at a time
    runs[beta] = dict(D=float(model.parts["recon"]), R=float(model.parts["kl"]), surgery=s, i_unit=i_unit,
                      var_mu=mu.var(0), holes=prior_holes(mu, lv, np.random.default_rng(8)))
print(f"  {len(BETAS)} models 784-{HIDDEN}-{Z}, {STEPS} steps each on {N_TRAIN} images, in {time.time() - t0:.0f} s")
print("   beta  distortion  rate = I + marginal KL       -ELBO  active  I per unit (largest, smallest)  holes")
for beta, r in runs.items():
    s, au = r["surgery"], int((r["var_mu"] > 0.01).sum())
    print(f"  {beta:5g}  {r['D']:9.2f}  {r['R']:6.2f} = {s['mutual_info']:5.2f} + {s['marginal_kl']:6.2f}"
          f"  {r['D'] + r['R']:9.2f}  {au:3d}/{Z}   {r['i_unit'].max():.3f}, {r['i_unit'].min():.3f}"
          f"                {r['holes']['hole_fraction']:.3f}")

# %%
B = list(BETAS)
Ds, Rs = [runs[b]["D"] for b in B], [runs[b]["R"] for b in B]
slopes = [(Ds[i + 1] - Ds[i]) / (Rs[i] - Rs[i + 1]) for i in range(len(B) - 1)]
print("  slopes (D_j - D_i) / (R_i - R_j): "
      + ", ".join(f"{s:.2f} in [{B[i]:g}, {B[i + 1]:g}]" for i, s in enumerate(slopes)))
check(all(a > c for a, c in zip(Rs, Rs[1:])) and all(a < c for a, c in zip(Ds, Ds[1:])),
      "along the sweep the rate falls and the distortion rises with beta")
check(all(0.8 * B[i] <= s <= 1.2 * B[i + 1] for i, s in enumerate(slopes)),
      "between two runs a nat of rate buys between beta_i and beta_j nats of distortion (within 20%)")
elbos = {b: runs[b]["D"] + runs[b]["R"] for b in B}
print(f"  best -ELBO of the sweep: beta = {min(elbos, key=elbos.get):g} ({min(elbos.values()):.2f} nats)")

# %% [markdown]
# ## 3. What the split says about each run
#
# * At small $\beta$ the rate is many times $\log N$; the mutual information is at its ceiling $\log N$ (every image
#   has its own code), so the rest, most of the rate, is **marginal KL**: the codes are spread in a way the prior does
#   not describe.  Hoffman & Johnson found the same on MNIST with all 60,000 images.  A ceiling also means the
#   estimate cannot rank two models that both reach it: with $N$ images, $I$ only resolves codes below $\log N$ nats.
# * As $\beta$ grows, $I(x; z)$ falls, and at the largest $\beta$ it is a few tenths of a nat: the code has almost
#   collapsed.  The active-unit count still counts units as active there (printed below), because a unit whose mean
#   moves by a tenth of the prior's standard deviation passes the $\mathrm{Var}_x\, \mu > 0.01$ test while carrying
#   about $\frac12 \log(1.01) = 0.005$ nats.  The per-unit $I(x; z_j)$ says how much each of them actually carries.

# %%
log_n = np.log(N_EVAL)
I = [runs[b]["surgery"]["mutual_info"] for b in B]
I_se = [runs[b]["surgery"]["mutual_info_sem"] for b in B]
mkl = [runs[b]["surgery"]["marginal_kl"] for b in B]
mkl_se = [runs[b]["surgery"]["marginal_kl_sem"] for b in B]
check(all(abs(runs[b]["R"] - I[i] - mkl[i]) < 4 * (I_se[i] + mkl_se[i]) + 0.01 for i, b in enumerate(B)),
      "for every run, I + marginal KL = the rate (within 4 standard errors)")
check(I[0] > 0.9 * log_n and Rs[0] > 2 * log_n and mkl[0] > Rs[0] - log_n - 4 * mkl_se[0],
      f"at beta = {B[0]:g}: I = {I[0]:.2f} is at its ceiling log N = {log_n:.2f}, the rate {Rs[0]:.1f} > 2 log N, "
      f"so the marginal KL ({mkl[0]:.1f}) is most of it")
check(all(I[i + 1] < I[i] + 3 * (I_se[i] + I_se[i + 1]) for i in range(len(B) - 1)) and I[-1] < 0.1 * I[0],
      f"I(x; z) falls with beta, to {I[-1]:.2f} nats at beta = {B[-1]:g} (< 10% of beta = {B[0]:g}'s): collapse")
au_last = int((runs[B[-1]]["var_mu"] > 0.01).sum())
inactive = np.concatenate([runs[b]["i_unit"][runs[b]["var_mu"] <= 0.01] for b in B])
print(f"  at beta = {B[-1]:g}: {au_last}/{Z} units 'active', carrying {I[-1]:.2f} nats together; "
      f"{inactive.size} units inactive across the sweep, the most informative of them {inactive.max(initial=0):.4f} nats")
check(inactive.size == 0 or inactive.max() < 0.02,
      "every unit the Var_x(mu) > 0.01 count calls inactive carries < 0.02 nats")

# %% [markdown]
# ## 4. The prior's holes
#
# The generative model samples $z \sim p(z)$; the decoder was trained on $z \sim q(z)$.  Where $p(z)$ has mass and
# $q(z)$ has little, the decoder is asked for images it never learned: these are the prior's **holes**.
# `prior_holes` draws $z$ from the prior and counts the fraction where $q(z) / p(z) < 0.1$, and estimates
# $\mathrm{KL}(p(z) \,\|\, q(z))$.  In 16 dimensions a mixture of 1000 components cannot fill the space, so there
# the fraction mostly says how concentrated the codes are (it falls with $\beta$, as the posteriors widen toward
# the prior).  In 2 dimensions we can look: two 784-H-2 models, at $\beta = 1$ and $\beta = 4$, their $\log q(z) - \log p(z)$
# on a grid, with the holes outlined, and decoded prior draws from inside and outside the holes.  The estimate must
# not depend on $N$: we compute it from 1000 and from 4000 images.

# %%
holes16 = [runs[b]["holes"]["hole_fraction"] for b in B]
check(all(a >= c for a, c in zip(holes16, holes16[1:])) and holes16[0] > holes16[-1] + 0.3,
      "16-D: the fraction of prior draws in holes falls as beta grows: " + " >= ".join(f"{h:.2f}" for h in holes16))
x_eval4 = static_binarize(x_train[:4000], seed=3)
two_d = {}
for beta in (1.0, 4.0):
    m2 = minivae.VAE(minivae.VAEConfig(x_dim=784, hidden=(HIDDEN,), z_dim=2), rng=args.seed)
    fit(m2, x_train, STEPS if args.quick else STEPS + 200, np.random.default_rng(args.seed + 1), beta=beta)
    mu2, lv2 = (minivae.to_numpy(a).astype(np.float64) for a in m2.encode(x_eval4))
    h1 = prior_holes(mu2[:1000], lv2[:1000], np.random.default_rng(9), n=4000)
    h4 = prior_holes(mu2, lv2, np.random.default_rng(9), n=4000)
    two_d[beta] = (m2, mu2, lv2, h1, h4)
    print(f"  2-D, beta = {beta:g}: holes {h1['hole_fraction']:.3f} (1000 images) / {h4['hole_fraction']:.3f} "
          f"(4000 images);  KL(p || q) {h4['kl_p_q']:.2f} +- {h4['kl_p_q_sem']:.2f} nats")
hf = {b: two_d[b][4]["hole_fraction"] for b in two_d}
check(all(abs(two_d[b][3]["hole_fraction"] - two_d[b][4]["hole_fraction"]) < 0.05 for b in two_d),
      "2-D: the hole fraction is a property of the model: 1000 and 4000 images agree within 0.05")
check(hf[1.0] > 0.1 and hf[4.0] < hf[1.0] - 0.15,
      f"2-D: at beta = 1, {hf[1.0]:.0%} of prior draws fall in holes; beta = 4 fills many of them ({hf[4.0]:.1%})")

# %% [markdown]
# Left: the rate–distortion plane.  Each run is a point; the grey lines are the contours of $-\mathrm{ELBO} = D + R$
# (slope $-1$), and the short segments through each point have slope $-\beta$, the trade that run was asked to make.
# Middle: each run's rate split into $I(x; z)$ and the marginal KL, with the ceiling $\log N$.  Right: the 2-D models'
# $\log q(z) / p(z)$ on a grid (blue: $q$ denser than the prior; red: holes), the prior's 1, 2 and 3 standard
# deviation circles, and the hole contour $q / p = 0.1$.  Below: decoded prior draws that fell outside (top) and
# inside (bottom) the holes of the $\beta = 1$ model.

# %%
fig = plt.figure(figsize=(17, 8))
ax = fig.add_subplot(2, 4, 1)
ax.plot(Rs, Ds, "ko-")
for b, r_, d_ in zip(B, Rs, Ds):
    ax.annotate(f"beta={b:g}", (r_, d_), textcoords="offset points", xytext=(5, 3), fontsize=8)
    dr = 0.08 * (max(Rs) - min(Rs))
    ax.plot([r_ - dr, r_ + dr], [d_ + b * dr, d_ - b * dr], "r-", lw=1.5)
r_grid = np.linspace(0, max(Rs) * 1.1, 2)
for c in np.linspace(min(elbos.values()), max(elbos.values()), 5):
    ax.plot(r_grid, c - r_grid, color="0.8", lw=0.8, zorder=0)
ax.set_ylim(min(Ds) - 5, max(Ds) + 5)
ax.set_xlabel("rate R (nats)")
ax.set_ylabel("distortion D (nats)")
ax.set_title("rate-distortion plane")
ax = fig.add_subplot(2, 4, 2)
pos = np.arange(len(B))
ax.bar(pos, I, label="I(x; z)")
ax.bar(pos, mkl, bottom=I, label="KL(q(z) || p(z))")
ax.axhline(log_n, color="k", ls="--", lw=1, label="log N")
ax.set_xticks(pos, [f"{b:g}" for b in B])
ax.set_xlabel("beta")
ax.set_ylabel("nats")
ax.set_title("rate = I + marginal KL")
ax.legend(fontsize=8)
g = np.linspace(-4, 4, 121)
zz = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2)
for k, beta in enumerate((1.0, 4.0)):
    m2, mu2, lv2, _, h4 = two_d[beta]
    ratio = (log_aggregate_posterior(zz, mu2, lv2) - log_standard_normal(zz)).reshape(len(g), len(g))
    ax = fig.add_subplot(2, 4, 3 + k)
    ax.imshow(np.clip(ratio, -5, 5), extent=(-4, 4, -4, 4), origin="lower", cmap="RdBu", vmin=-5, vmax=5)
    ax.contour(g, g, ratio, levels=[np.log(0.1)], colors="k", linewidths=1)
    for rad in (1, 2, 3):
        ax.add_patch(plt.Circle((0, 0), rad, fill=False, color="0.3", ls=":"))
    ax.set_title(f"2-D, beta = {beta:g}: log q(z)/p(z), holes {h4['hole_fraction']:.0%}", fontsize=9)
m2, mu2, lv2, _, _ = two_d[1.0]
zp = np.random.default_rng(10).standard_normal((2000, 2))
in_hole = (log_standard_normal(zp) - log_aggregate_posterior(zp, mu2, lv2)) > np.log(10)
pics = [minivae.to_numpy(m2.decode(zp[mask][:16].astype(m2.dtype))) for mask in (~in_hole, in_hole)]
ax = fig.add_subplot(2, 1, 2)
ax.imshow(tile(np.concatenate([p_[:16] for p_ in pics]), nrow=16), cmap="gray", vmin=0, vmax=1)
ax.set_title("beta = 1, decoded prior draws: outside the holes (top), inside the holes (bottom)")
ax.axis("off")
fig.tight_layout()
save_figure(fig, args.out, "elbo_surgery.png")
print(f"done in {time.time() - t0:.1f} s")
