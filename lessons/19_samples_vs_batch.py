# %% [markdown]
# # Lesson 19 - L samples of z per datapoint vs the batch size N, at a fixed budget L·N.
#
# The derivation's estimator averages L samples of z for each of N datapoints; Kingma & Welling (2014) use L = 1
# with N = 100.  Here we measure the variance of the minibatch gradient of the negative ELBO, split it into the part
# that comes from drawing the minibatch and the part that comes from drawing eps (law of total variance), and work
# out when more samples per datapoint pay off.
#
# Run:  python lessons/19_samples_vs_batch.py [--out DIR] [--seed N]

# %% [markdown]
# ## 1. The estimator and its two sources of noise
#
# For a dataset $\{x_i\}$, the gradient we want is $G = \mathbb E_{x}\big[\bar g(x)\big]$ with
# $\bar g(x) = \nabla_\theta \big(\mathbb E_{\varepsilon}[-\log p(x|z)] + \mathrm{KL}(q(z|x)\|p(z))\big)$.
# The minibatch estimator draws N datapoints $x_1..x_N$ (here: uniformly, with replacement) and L noise vectors
# $\varepsilon_{nl}$ per datapoint, $z_{nl} = \mu(x_n) + \sigma(x_n)\,\varepsilon_{nl}$:
#
# $$\hat g = \frac1N \sum_{n=1}^N \frac1L \sum_{l=1}^L h(x_n, \varepsilon_{nl}),\qquad
#   h(x, \varepsilon) = \nabla_\theta\big(-\log p(x|z(\varepsilon)) + \mathrm{KL}(q(z|x)\|p(z))\big).$$
#
# It is unbiased.  Its variance (we use the trace of the covariance, $\mathrm{Var}[\hat g] = \mathbb E\|\hat g - G\|^2$)
# splits by the **law of total variance**, conditioning on the minibatch B:
#
# $$\mathrm{Var}[\hat g] = \underbrace{\mathrm{Var}_B\big(\mathbb E[\hat g\,|\,B]\big)}_{\text{data}}
#   + \underbrace{\mathbb E_B\big[\mathrm{Var}(\hat g\,|\,B)\big]}_{\text{eps}}
#   = \frac{V_d}{N} + \frac{V_\varepsilon}{N L},$$
#
# with $V_d = \mathrm{Var}_x(\bar g(x))$, the spread of the exact per-example gradients over the data, and
# $V_\varepsilon = \mathbb E_x\big[\mathrm{Var}_\varepsilon h(x, \varepsilon)\big]$, the reparameterization noise of one
# sample.  (The N datapoints are independent, so their variances add and the mean divides by N; for one datapoint
# the L samples are independent given x, so that part divides by L once more.)
#
# **At a fixed budget $L N = S$** of decoder evaluations, $N = S / L$ and
#
# $$\mathrm{Var}[\hat g] = \frac{L\,V_d + V_\varepsilon}{S}.$$
#
# It *grows* with L: spending samples on more z per datapoint instead of more datapoints never lowers the variance,
# and costs little only when $V_\varepsilon \gg L V_d$.  Where more samples can pay off is compute: the encoder runs
# once per datapoint, the decoder once per sample, so a step costs $N(c_e + L c_d)$.  At equal cost the
# variance is proportional to $(V_d + V_\varepsilon / L)(c_e + L c_d)$, minimized at
#
# $$L^* = \sqrt{\frac{V_\varepsilon\, c_e}{V_d\, c_d}}.$$
#
# That is over real L.  L counts samples, so compare whole numbers: with $r = V_\varepsilon c_e / (V_d c_d)$,
# $(V_d + V_\varepsilon/L)(c_e + L c_d)$ falls from L to L + 1 exactly when
#
# $$V_\varepsilon c_e > L(L+1)\, V_d c_d, \qquad\text{i.e. } r > L(L+1).$$
#
# So L = 2 beats L = 1 only when $V_\varepsilon c_e > 2 V_d c_d$ (not at $r > 1$, where $L^* > 1$ already), and the
# best whole L is the smallest one with $L(L+1) \ge r$.

# %%
import numpy as np
import matplotlib.pyplot as plt

import minivae
from minivae.data import load_mnist, static_binarize
from minivae.lessonkit import check, fit, lesson_args, save_figure

args = lesson_args("lesson_output/19_samples_vs_batch", "Lesson 19: L samples vs batch size")
rng = np.random.default_rng(args.seed)

POOL = 2000                                          # the "dataset": a fixed, statically binarized set of digits
x_pool = static_binarize(load_mnist("train")[0][rng.permutation(60000)[:POOL]], seed=args.seed)
cfg = minivae.VAEConfig(hidden=(200,), z_dim=20)
STEPS = 150 if args.quick else 1500
P, R = (24, 12) if args.quick else (60, 24)          # examples and eps draws for the decomposition
REPEATS = 20 if args.quick else 60                   # minibatch gradients per (L, N) for the direct measurement
CONFIGS = [(1, 100), (2, 50), (5, 20), (10, 10)] if not args.quick else [(1, 100), (5, 20), (10, 10)]

# %% [markdown]
# ## 2. Measuring $V_d$ and $V_\varepsilon$ from per-example gradients
#
# For P datapoints and R eps draws each we compute single-sample gradients $h(x_p, \varepsilon_r)$ (`model.loss` on
# one row, one sample).  Per datapoint: the mean $\hat{\bar g}(x_p)$ and the unbiased variance
# $\hat v(x_p) = \frac{1}{R-1}\sum_r \|h - \hat{\bar g}\|^2$.  Then $\hat V_\varepsilon = \mathrm{mean}_p\,\hat v(x_p)$,
# and since the spread of the *estimated* means contains $V_\varepsilon / R$ of eps noise,
# $\hat V_d = \widehat{\mathrm{Var}}_p\big(\hat{\bar g}(x_p)\big) - \hat V_\varepsilon / R$.
# We also split every variance into the encoder's and the decoder's parameters (the trace is a sum over
# parameters): eps enters the encoder's gradient through $\partial z/\partial\sigma = \varepsilon$.

# %%
def decompose(model, rng):
    """(V_d, V_eps), each a dict {"all", "encoder", "decoder"} of traces of covariance."""
    enc = slice(0, model.layout["dec.0.W"][0])          # the encoder's parameters come first in the flat buffer
    dec = slice(model.layout["dec.0.W"][0], model.size)
    idx = rng.choice(POOL, P, replace=False)
    means, within = [], []
    for i in idx:
        h = np.empty((R, model.size))
        for r in range(R):
            eps = rng.standard_normal((1, 1, cfg.z_dim), dtype=np.float32)
            h[r] = model.loss(x_pool[i:i + 1], eps=eps)[1].flat
        means.append(h.mean(0))
        within.append(h.var(0, ddof=1))                 # per coordinate
    means, within = np.array(means), np.array(within)
    out_d, out_e = {}, {}
    for name, s in (("all", slice(None)), ("encoder", enc), ("decoder", dec)):
        v_e = within[:, s].sum(1).mean()
        v_d = means[:, s].var(0, ddof=1).sum() - v_e / R
        out_d[name], out_e[name] = v_d, v_e
    return out_d, out_e


def minibatch_variance(model, L, N, rng):
    """Directly: trace of the covariance of REPEATS minibatch gradients (fresh minibatch and eps each time).

    Returns (estimate, its standard error): the estimate is the mean of the REPEATS squared distances
    |g_r - mean g|^2 (times R/(R-1)), so its standard error is their standard deviation / sqrt(REPEATS).
    """
    g = np.empty((REPEATS, model.size))
    for r in range(REPEATS):
        xb = x_pool[rng.integers(0, POOL, N)]
        eps = rng.standard_normal((L, N, cfg.z_dim), dtype=np.float32)
        g[r] = model.loss(xb, eps=eps, n_samples=L)[1].flat
    sq = ((g - g.mean(0)) ** 2).sum(1) * REPEATS / (REPEATS - 1)
    return sq.mean(), sq.std(ddof=1) / np.sqrt(REPEATS)


# %% [markdown]
# ## 3. Two models: at initialization and trained
#
# The same 784-200-20 Bernoulli VAE, once untrained (q(z|x) close to the prior: $\sigma \approx 1$, the largest
# posterior variance it will ever have) and once after training with `lessonkit.fit` (Adam 1e-3, batches of 100).

# %%
models = {"untrained": minivae.VAE(cfg, rng=args.seed + 1)}
trained = minivae.VAE(cfg, rng=args.seed + 1)
fit(trained, x_pool, STEPS, np.random.default_rng(args.seed + 2), batch_size=100, binarize=False)
models["trained"] = trained
stats = {}
for name, model in models.items():
    mu, logvar = model.encode(x_pool[:500])
    neg_elbo = float(model.loss(x_pool[:500], backward=False)[0])
    v_d, v_e = decompose(model, np.random.default_rng(args.seed + 3))
    stats[name] = dict(v_d=v_d, v_e=v_e, sigma=float(np.exp(0.5 * np.asarray(logvar)).mean()), neg_elbo=neg_elbo)
    print(f"  {name:9s}: -ELBO {neg_elbo:6.1f} nats, mean posterior sd {stats[name]['sigma']:.3f}")
    for part in ("all", "encoder", "decoder"):
        print(f"     {part:8s} V_d {v_d[part]:10.4g}   V_eps {v_e[part]:10.4g}   V_eps / V_d {v_e[part] / v_d[part]:7.3f}")

# %% [markdown]
# Where the eps-noise sits changes with training.  Untrained, q(z|x) is almost the prior, so the decoder sees nearly
# random z and its gradient is dominated by eps; the encoder's gradient is small.  Trained, the posteriors are
# narrow, the decoder's gradient varies mostly with x (its $V_\varepsilon/V_d$ drops far below 1), and the
# eps-noise sits in the encoder, whose gradient reaches its parameters only through
# $z = \mu + \sigma\varepsilon$.

# %% [markdown]
# ## 4. The prediction against a direct measurement
#
# For each (L, N) with L·N = 100 we draw REPEATS fresh minibatches and eps and measure the variance of $\hat g$
# directly, then compare it with $(L V_d + V_\varepsilon)/100$ from the decomposition.  Two independent estimates of
# the same number: they agree up to their sampling noise.  Each direct estimate is the mean of REPEATS squared
# distances $\|\hat g_r - \bar g\|^2$, so its standard error is their standard deviation over $\sqrt{\mathrm{REPEATS}}$
# (printed as $\pm$); the decomposition has its own noise from P datapoints and R draws.

# %%
S = 100
table, direct_ses = {}, {}
for name, model in models.items():
    v_d, v_e = stats[name]["v_d"]["all"], stats[name]["v_e"]["all"]
    for L, N in CONFIGS:
        direct, direct_se = minibatch_variance(model, L, N, np.random.default_rng(args.seed + 10 * L))
        predicted = (L * v_d + v_e) / S
        table[name, L] = (direct, predicted)
        direct_ses[name, L] = direct_se
        print(f"  {name:9s} L={L:2d} N={N:3d}: Var[g] direct {direct:10.4g} +- {direct_se:8.3g}  predicted {predicted:10.4g}  "
              f"ratio {direct / predicted:5.2f}   data part {100 * L * v_d / (L * v_d + v_e):5.1f}%")
tol = 0.6 if args.quick else 0.35
check(all(abs(d / p - 1) < tol for d, p in table.values()),
      f"the direct minibatch variance matches (L V_d + V_eps) / (L N) within {int(100 * tol)}% for every (L, N)")
L_max = CONFIGS[-1][0]
for name in models:
    d = [table[name, L][0] for L, _ in CONFIGS]
    print(f"  {name:9s}: measured variance from L = 1 to L = {L_max}: x{d[-1] / d[0]:.2f} "
          f"(+- {direct_ses[name, L_max] / d[0]:.2f} from the L = {L_max} estimate's standard error)")
check(all(table[name, L_max][0] - table[name, 1][0]
          > 3 * np.hypot(direct_ses[name, L_max], direct_ses[name, 1]) for name in models),
      f"at a fixed budget L N = 100 the *measured* variance is larger at L = {L_max} than at L = 1 (Kingma & Welling's "
      "choice), by more than 3 standard errors of the difference, for both models")

# %% [markdown]
# ## 5. When do more samples per datapoint pay off?
#
# At a fixed L·N they never lower the variance; the price of L samples is a factor
# $(L V_d + V_\varepsilon)/(V_d + V_\varepsilon)$, small only when eps-noise dominates.  Per unit of *compute* the
# encoder pass is shared by the L samples.  For the dense 784-200-20 VAE the multiply-adds per row are
# $c_e = 784\cdot200 + 200\cdot40$ for the encoder and $c_d = 20\cdot200 + 200\cdot784$ for the decoder (the same
# factor ~3 for forward + backward on both sides), so $L^* = \sqrt{V_\varepsilon c_e / (V_d c_d)}$.

# %%
c_e = 784 * 200 + 200 * 2 * 20
c_d = 20 * 200 + 200 * 784
for name in models:
    v_d, v_e = stats[name]["v_d"]["all"], stats[name]["v_e"]["all"]
    stats[name]["L_star"] = np.sqrt(v_e * c_e / (v_d * c_d))
    cost_var = {L: (v_d + v_e / L) * (c_e + L * c_d) for L in (1, 2, 5, 10, 20)}
    best = min(cost_var, key=cost_var.get)
    print(f"  {name:9s}: L* = {stats[name]['L_star']:.2f}; variance x cost relative to L = 1: "
          + ", ".join(f"L={L}: {cost_var[L] / cost_var[1]:.2f}" for L in cost_var) + f"  (best of these: L = {best})")
    r = v_e * c_e / (v_d * c_d)
    best_whole = min(range(1, 101), key=lambda L: (v_d + v_e / L) * (c_e + L * c_d))
    rule = next(L for L in range(1, 101) if L * (L + 1) >= r)
    stats[name].update(r=r, best_whole=best_whole, rule=rule)
    print(f"             r = V_eps c_e / (V_d c_d) = {r:.2f}: best whole L {best_whole} (by search over 1..100); "
          f"smallest L with L(L+1) >= r: {rule}")
check(all(stats[n]["best_whole"] == stats[n]["rule"] for n in models),
      "for both models the best whole L is the smallest L with L(L+1) >= V_eps c_e / (V_d c_d)")
r_demo = 1.5                                 # V_eps c_e = 1.5 V_d c_d: L* = sqrt(1.5) = 1.22 > 1 ...
cost = {L: (1 + r_demo / L) * (1 + L) for L in (1, 2)}   # ... (V_d + V_eps/L)(c_e + L c_d) with V_d = c_e = c_d = 1
check(np.sqrt(r_demo) > 1 and cost[2] > cost[1],
      f"at V_eps c_e = 1.5 V_d c_d the real optimum is L* = {np.sqrt(r_demo):.2f} > 1, yet L = 2 costs more than "
      f"L = 1 ({cost[2]:.2f} vs {cost[1]:.2f}): two samples pay off only when V_eps c_e > 2 V_d c_d")
u, t = stats["untrained"], stats["trained"]
check(u["v_e"]["all"] / u["v_d"]["all"] > t["v_e"]["all"] / t["v_d"]["all"],
      "eps-noise is a larger share of the gradient variance before training (broad posteriors) than after")
check(t["v_e"]["encoder"] / t["v_d"]["encoder"] > 1 > t["v_e"]["decoder"] / t["v_d"]["decoder"],
      "after training, eps-noise dominates the encoder's gradient (V_eps > V_d) but not the decoder's")
check(u["L_star"] > 1 and u["L_star"] > t["L_star"],
      "L* is larger before training than after: more samples per datapoint pay off early, when eps-noise dominates")

fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))
Ls = [L for L, _ in CONFIGS]
for name, mk in (("untrained", "o"), ("trained", "s")):
    ax[0].plot(Ls, [table[name, L][0] / table[name, 1][0] for L in Ls], mk + "-", label=f"{name}: direct")
    ax[0].plot(Ls, [table[name, L][1] / table[name, 1][1] for L in Ls], mk + ":", label=f"{name}: (L V_d + V_eps)/S")
ax[0].set_xscale("log")
ax[0].set_xlabel("L samples per datapoint (N = 100 / L)")
ax[0].set_ylabel("Var[g] relative to L = 1, N = 100")
ax[0].legend(fontsize=8)
names = list(stats)
parts = ("encoder", "decoder")
w = 0.35
for k, part in enumerate(parts):
    ax[1].bar(np.arange(len(names)) + (k - 0.5) * w, [stats[n]["v_e"][part] / stats[n]["v_d"][part] for n in names],
              w, label=part)
ax[1].set_xticks(range(len(names)), names)
ax[1].set_yscale("log")
ax[1].set_ylabel("V_eps / V_d")
ax[1].axhline(1, color="k", ls=":")
ax[1].legend()
save_figure(fig, args.out, "variance_vs_L.png")

# %% [markdown]
# ## Summary
#
# * $\mathrm{Var}[\hat g] = V_d / N + V_\varepsilon / (N L)$: data noise falls only with N, eps-noise with N·L.
# * At a fixed number of samples L·N the variance is $(L V_d + V_\varepsilon)/(LN)$, lowest at L = 1: Kingma &
#   Welling's L = 1, N = 100 is the right choice when every decoder evaluation costs the same.
# * Per unit of compute, going from L to L + 1 samples pays off when $V_\varepsilon c_e > L(L+1) V_d c_d$ (two
#   samples beat one only when $V_\varepsilon c_e > 2 V_d c_d$), i.e. when the reparameterization noise dominates
#   (broad posteriors, early in training, and in the encoder's parameters); the real-valued optimum is
#   $\sqrt{V_\varepsilon c_e / (V_d c_d)}$, the best whole L the smallest with $L(L+1) \ge V_\varepsilon c_e / (V_d c_d)$.
