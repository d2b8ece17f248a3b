# %% [markdown]
# # Lesson 14 — The marginal likelihood $\log p(x)$ and the importance-weighted estimate
#
# The ELBO is only a lower bound on $\log p(x)$.  With $k$ importance samples from $q(z|x)$ we get tighter and
# tighter estimates (Burda et al. 2015).  On a model with a 1-D latent we can also compute $\log p(x)$ exactly by
# quadrature, and watch the estimate converge to it.
#
# **Run** `python lessons/14_marginal_likelihood.py [--out DIR] [--seed N]`, or open it as a notebook
# (jupytext); in a kernel, set `MINIVAE_QUICK=1` for the small version.

# %%
import time

import matplotlib.pyplot as plt
import numpy as np

import minivae
import minivae.data
import minivae.evaluate
from minivae.lessonkit import check, fit, lesson_args, save_figure

args = lesson_args("lesson_output/14_marginal_likelihood", "Lesson 14: the marginal likelihood",
                   quick_help="fewer k and examples (for tests)")
t0 = time.time()
rng = np.random.default_rng(args.seed)

# %% [markdown]
# ## 1. From the integral to the estimator
#
# $$p(x) = \int p(x|z)\,p(z)\,dz = \int q(z|x)\,\frac{p(x|z)\,p(z)}{q(z|x)}\,dz = \mathbb{E}_{q(z|x)}[w(z)],\qquad
#   w(z) = \frac{p(x|z)\,p(z)}{q(z|x)}.$$
#
# So with $z_1, \dots, z_k \sim q(z|x)$ independent, $\hat p_k = \frac1k\sum_i w(z_i)$ is *unbiased* for $p(x)$,
# and
#
# $$\hat{\mathcal L}_k = \log \frac1k\sum_{i=1}^k w(z_i) = \mathrm{LME}(\log w_1, \dots, \log w_k),\qquad
#   \mathrm{LME}(a) = m + \log\frac1k\sum_i e^{a_i - m},\quad m = \max_i a_i.$$
#
# The max is subtracted so that no exp underflows: $\log w$ is around $-100$ nats; $e^{-100}$ is fine in
# float64, but $e^{-800}$ is 0.  After the shift the largest term is $e^0 = 1$.

# %%
def log_mean_exp(a, axis=0):
    """Stable log(mean(exp(a))) along axis, in float64."""
    a = np.asarray(a, dtype=np.float64)
    m = a.max(axis=axis, keepdims=True)
    return np.squeeze(m + np.log(np.mean(np.exp(a - m), axis=axis, keepdims=True)), axis=axis)


a = rng.normal(-5, 2, size=(7, 3))
check(np.allclose(log_mean_exp(a), np.log(np.mean(np.exp(a), axis=0)), rtol=0, atol=1e-12),
      "log_mean_exp equals log(mean(exp(a))) where the naive formula does not underflow")
big = a - 900.0                                                  # exp(-900) underflows to 0 in float64
check(np.allclose(log_mean_exp(big), log_mean_exp(a) - 900.0, atol=1e-9),
      "log_mean_exp stays exact at -900 nats, where exp underflows")

# %% [markdown]
# **Why the ELBO is a lower bound (Jensen).**  $\log$ is concave, so $\mathbb{E}[\log Y] \le \log \mathbb{E}[Y]$:
#
# $$\mathbb{E}\big[\hat{\mathcal L}_k\big] = \mathbb{E}\big[\log \hat p_k\big] \le \log \mathbb{E}[\hat p_k] = \log p(x).$$
#
# For $k = 1$, $\mathbb{E}[\log w(z)] = \mathbb{E}_q[\log p(x|z)] - \mathrm{KL}\big(q\,\|\,p\big) = \mathrm{ELBO}$.
# The bound holds in expectation: a single estimate can exceed $\log p(x)$.
#
# **Why the bound tightens with $k$** (Burda et al. 2015, Thm 1).  The mean of $mk$ weights is the average of
# the means of $m$ sub-blocks of $k$ weights, so by the same Jensen step (the log of an average is at least the
# average of the logs)
#
# $$\mathrm{LME}(\text{block of } mk) \ge \frac1m\sum_{\text{sub-blocks}} \mathrm{LME}(\text{sub-block of } k).$$
#
# Below we draw $K$ weights per example once and cut them into nested blocks ($1 \mid 5 \mid 50 \mid 500 \mid 5000$
# in full mode): then the averaged estimates are non-decreasing in $k$ *exactly*, not just in expectation.  As
# $k \to \infty$, $\hat p_k \to p(x)$ (law of large numbers), so $\hat{\mathcal L}_k \to \log p(x)$.
#
# ## 2. A small MNIST model, trained briefly

# %%
def train(cfg, x_train, n_steps, seed):
    model = minivae.VAE(cfg, rng=np.random.default_rng(seed))
    fit(model, x_train, n_steps, np.random.default_rng(seed + 100), batch_size=128, opt=minivae.Adam(lr=1e-3))
    return model


x_train, _ = minivae.data.load_mnist("train")
x_test, _ = minivae.data.load_mnist("test")
if args.quick:
    x_train = x_train[rng.permutation(len(x_train))[:6000]]
    n_steps, hidden, n_ex, ks = 150, (64,), 20, (1, 10, 100, 1000)
else:
    n_steps, hidden, n_ex, ks = 800, (200,), 50, (1, 5, 50, 500, 5000)
cfg = minivae.VAEConfig(hidden=hidden, z_dim=10)
model = train(cfg, x_train, n_steps, args.seed)
x = minivae.data.static_binarize(x_test[:n_ex], seed=1234)
print(f"trained {model} for {n_steps} steps")

# %% [markdown]
# ## 3. The ELBO, and the nested IW estimates
#
# The ELBO with the analytic KL (`model.loss`), averaged over many draws of $\varepsilon$, is the reference for
# $k = 1$.  Then a pool of $K$ log-weights per example, cut into the nested blocks.

# %%
S = 200
eps = np.random.default_rng(args.seed + 1).standard_normal((S, n_ex, cfg.z_dim))
per_draw = []
for s in range(S):
    model.loss(x, eps=eps[s:s + 1], backward=False)
    per_draw.append(-float(model.parts["loss"]))
elbo, elbo_se = float(np.mean(per_draw)), float(np.std(per_draw) / np.sqrt(S))


def log_weights_pool(model, x, k, prng, chunk=250):
    """(k, N) float64 log-weights log p(x|z) + log p(z) - log q(z|x), z ~ q(z|x)."""
    out = []
    for s in range(0, k, chunk):
        e = prng.standard_normal((min(chunk, k - s), len(x), model.config.z_dim))
        out.append(minivae.to_numpy(model.log_weights(x, e)).astype(np.float64))
    return np.concatenate(out)


def nested_estimates(lw, ks):
    """Mean over blocks of the IW estimate for each k, from disjoint blocks of the (K, N) pool: (len(ks), N)."""
    est = []
    for k in ks:
        blocks = lw[: (len(lw) // k) * k].reshape(-1, k, lw.shape[1])      # (K/k, k, N)
        est.append(log_mean_exp(blocks, axis=1).mean(axis=0))               # (N,) average over blocks
    return np.array(est)


lw = log_weights_pool(model, x, ks[-1], np.random.default_rng(args.seed + 2))
est = nested_estimates(lw, ks)
mean_est = est.mean(axis=1)
se1 = float(np.sqrt(lw.var(axis=0).sum() / lw.shape[0]) / n_ex)
print(f"ELBO (analytic KL, {S} eps draws): {elbo:.3f} +- {elbo_se:.3f} nats per image")
print(f"{'k':>6}{'mean IW estimate of log p(x)':>32}")
for k, m in zip(ks, mean_est):
    print(f"{k:>6}{m:>32.3f}")
check(abs(mean_est[0] - elbo) < 4 * np.hypot(se1, elbo_se) + 1e-3,
      f"IW estimate at k=1 equals the ELBO within Monte-Carlo error ({mean_est[0]:.3f} vs {elbo:.3f}, "
      f"4 SE = {4 * np.hypot(se1, elbo_se):.3f})")
check(np.all(np.diff(est, axis=0) >= -1e-9), "per example, the nested estimates never decrease with k")
check(np.all(np.diff(mean_est) >= -1e-9), "the mean estimate is non-decreasing in k: "
      + " <= ".join(f"{m:.2f}" for m in mean_est))
check(mean_est[-1] > elbo + 0.1, f"at k={ks[-1]} the estimate is above the ELBO by "
      f"{mean_est[-1] - elbo:.2f} nats")

# the library's streaming implementation, with its own samples, agrees with the pooled estimate
lib = minivae.evaluate.iw_log_likelihood(model, x, ks[-1], np.random.default_rng(args.seed + 3))
gap = abs(float(lib.mean()) - mean_est[-1])
check(gap < 0.5, f"minivae.evaluate.iw_log_likelihood agrees at k={ks[-1]} ({lib.mean():.3f} vs "
      f"{mean_est[-1]:.3f}; different samples)")

# %% [markdown]
# ## 4. A 1-D latent: the exact $\log p(x)$ by quadrature
#
# With $L = 1$, $p(x) = \int p(x|z)\,\mathcal N(z;0,1)\,dz$ is a 1-D integral.  On a uniform grid $z_g$ with
# spacing $\Delta$, the Riemann sum $\sum_g p(x|z_g)\,\mathcal N(z_g; 0, 1)\,\Delta$ converges very fast (faster
# than any power of $\Delta$) for smooth integrands that decay at both ends.  So this model uses tanh units: a
# ReLU decoder puts kinks in $z \mapsto \log p(x|z)$, and the error would fall only like $\Delta^2$.  In log
# space,
#
# $$\log p(x) \approx \mathrm{LSE}_g\big[\log p(x|z_g) + \log \mathcal N(z_g;0,1)\big] + \log\Delta,$$
#
# and for a Bernoulli decoder with logits $o(z)$, $\log p(x|z) = \sum_d \big[x_d\, o_d - \mathrm{softplus}(o_d)\big]$:
# a matrix product between the data and the decoded grid.
#
# The images are MNIST digits average-pooled to 7x7 (49 pixels) and binarized.  Why not 784 pixels: one latent
# number cannot explain a full digit, so the true posterior $p(z|x)$ of a 784-pixel image under a 1-D model is
# very narrow and often has several modes.  A Gaussian $q(z|x)$ then misses mass, the weights are heavy-tailed,
# and the estimate converges only very slowly in $k$ (try it: it is still about 0.2 nats off at $k = 10000$).
# With 49 pixels the posterior is close to Gaussian and the convergence is clean.

# %%
def pool7(images):
    return images.reshape(-1, 7, 4, 7, 4).mean(axis=(2, 4)).reshape(-1, 49)


cfg1 = minivae.VAEConfig(x_dim=49, hidden=(32,), z_dim=1, dtype="float64", activation="tanh")
model1 = train(cfg1, pool7(x_train[:20000]), 80 if args.quick else 300, args.seed)
x1 = minivae.data.static_binarize(pool7(x_test[: (10 if args.quick else 20)]), seed=1234).astype(np.float64)


def log_joint_on(zg, xs):
    """log p(x|z_g) + log p(z_g) for every row of xs and grid point: (N, G)."""
    logits = minivae.to_numpy(model1.decode_raw(zg[:, None])[0])                     # (G, D)
    sp = np.maximum(logits, 0) + np.log1p(np.exp(-np.abs(logits)))                  # softplus, no overflow
    return xs @ logits.T - sp.sum(1)[None] - 0.5 * zg ** 2 - 0.5 * np.log(2 * np.pi)


def exact_log_px(n_grid):
    zg = np.linspace(-10.0, 10.0, n_grid)
    return log_mean_exp(log_joint_on(zg, x1), axis=1) + np.log(n_grid) + np.log(zg[1] - zg[0])


exact = exact_log_px(20001)
exact_coarse = exact_log_px(5001)
quad_err = float(np.abs(exact - exact_coarse).max())
check(quad_err < 1e-8, f"the quadrature has converged (5k vs 20k grid points differ by {quad_err:.1e} nats)")

# %% [markdown]
# Now the IW estimates on the same digits, for $k$ up to $10^5$ (cheap with 49 pixels).  A single estimate can
# overshoot $\log p(x)$ a little (the bound holds in expectation); when $q(z|x)$ is narrower than the true
# posterior the weights are heavy-tailed, and such overshoots are rare but larger.

# %%
ks1 = (1, 10, 100, 1000, 10000) if args.quick else (1, 10, 100, 1000, 10000, 100000)
lw1 = log_weights_pool(model1, x1, ks1[-1], np.random.default_rng(args.seed + 4), chunk=5000)
est1 = nested_estimates(lw1, ks1)
err1 = np.abs(est1 - exact[None]).mean(axis=1)
print(f"1-D latent, {len(x1)} test digits: exact mean log p(x) = {exact.mean():.4f}")
for k, e, m in zip(ks1, err1, est1.mean(1)):
    print(f"  k = {k:>6}: mean IW estimate {m:.4f}, mean |error| {e:.4f} nats")
check(np.all(est1.mean(1) <= exact.mean() + 0.05), "every mean IW estimate is below the exact log p(x) "
      "(up to 0.05 nats of Monte-Carlo noise)")
check(err1[-1] < 0.02 and err1[-1] < 0.25 * err1[0],
      f"the IW estimate converges to the exact log p(x): error {err1[0]:.3f} nats at k=1 -> "
      f"{err1[-1]:.4f} at k={ks1[-1]}")

# %% [markdown]
# ## 5. Pictures: the estimate against $k$, and one true posterior against its $q(z|x)$
#
# The true posterior is $p(z|x) = p(x, z) / p(x)$, evaluated on the quadrature grid; it must integrate to 1.

# %%
fig, ax = plt.subplots(1, 3, figsize=(15, 4))
ax[0].semilogx(ks, mean_est, "o-", label="mean IW estimate")
ax[0].axhline(elbo, color="C1", ls="--", label="ELBO (analytic KL)")
ax[0].set_xlabel("k")
ax[0].set_ylabel("nats per image")
ax[0].set_title(f"{cfg.z_dim}-D latent, {n_ex} test digits")
ax[0].legend()
ax[1].semilogx(ks1, est1.mean(1), "o-", label="mean IW estimate")
ax[1].axhline(exact.mean(), color="k", ls="--", label="exact (quadrature)")
ax[1].set_xlabel("k")
ax[1].set_title("1-D latent: convergence to log p(x)")
ax[1].legend()
mu1, lv1 = (float(minivae.to_numpy(v)[0, 0]) for v in model1.encode(x1[:1]))
zg = np.linspace(-10.0, 10.0, 20001)
post = np.exp(log_joint_on(zg, x1[:1])[0] - exact[0])        # p(z|x) = p(x,z) / p(x)
z_peak = zg[np.argmax(post)]
q = np.exp(-0.5 * (zg - mu1) ** 2 / np.exp(lv1)) / np.sqrt(2 * np.pi * np.exp(lv1))
ax[2].plot(zg, post, label="true posterior p(z|x)")
ax[2].plot(zg, q, "--", label="q(z|x)")
width = 6 * max(np.sqrt(np.exp(lv1)), float(np.sqrt(np.sum(post * (zg - z_peak) ** 2) * (zg[1] - zg[0]))))
ax[2].set_xlim(z_peak - width, z_peak + width)
ax[2].set_xlabel("z")
ax[2].set_title("1-D latent, one 7x7 digit")
ax[2].legend()
fig.tight_layout()
save_figure(fig, args.out, "iw_estimates.png")
area = float(post.sum() * (zg[1] - zg[0]))
check(abs(area - 1) < 1e-6, f"the posterior p(x,z)/p(x) integrates to 1 over z (area {area:.8f})")
print(f"lesson 14 done in {time.time() - t0:.1f} s; figures in {args.out}")
