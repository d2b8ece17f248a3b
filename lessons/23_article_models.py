# %% [markdown]
# # Lesson 23: the articles' own models, and what their loss scalings mean in nats
#
# Two of the Chinese-language articles that minivae grew from train a VAE on MNIST with a squared-error loss:
#
# * **the PyTorch overview** (a long overview signed 禅与计算机程序设计艺术) trains a PyTorch MLP VAE, 784-400-2 with
#   ReLU and a sigmoid output.  Its first training loop uses `F.binary_cross_entropy(..., size_average=False)` + KL
#   (a Bernoulli decoder, lesson 08); its 0/1 section uses `F.mse_loss(recon, img, reduction='sum')` + KL, and
#   divides the total by the number of training images;
# * **the Keras article** (a TensorFlow/Keras dense VAE with a β weight) builds an encoder 128-64-32-2 and a decoder
#   32-64-128-784, both ReLU, and computes
#   `reduce_mean(square(inputs - x_reconstructed)) - 0.5 * 128 * reduce_sum(1 + z_log_var - square(z_mean) - exp(z_log_var))`.
#
# A squared error is the negative log-likelihood of a Gaussian decoder only up to a scale and a constant, and the
# scale is the decoder's variance.  This lesson derives the variance each loss implies, shows that the *reduction*
# (a sum or a mean over the pixels) is a hidden $\beta$ on the KL, trains small versions of both models with minivae,
# and shows what the hidden $\beta$ does: at the Keras article's scaling, every latent unit collapses.
#
# Run it as a script, `python lessons/23_article_models.py [--out DIR] [--seed N]`, or open it as a
# notebook (jupytext or VS Code; `MINIVAE_QUICK=1` in the kernel's environment selects the tests' quick mode).
#
# ## 1. The summed squared error is a Gaussian with variance ½
#
# A Gaussian decoder $p(x \mid z) = \mathcal{N}\big(x;\, m(z),\, v I_D\big)$ with a fixed variance $v$ has
#
# $$-\log p(x \mid z) = \frac{1}{2v} \sum_{d=1}^{D} \big(x_d - m_d(z)\big)^2 + \frac{D}{2} \log(2\pi v)
#   = \frac{\mathrm{SSE}}{2v} + \frac{D}{2}\log(2\pi v).$$
#
# With $v = \tfrac12$ the factor $\tfrac{1}{2v}$ is 1, so
#
# $$\mathrm{SSE} + \mathrm{KL} = -\mathrm{ELBO}_{v = 1/2} - \frac{D}{2}\log \pi ,$$
#
# with $\frac{D}{2}\log\pi = 392 \log \pi \approx 448.7$ nats for $D = 784$: the PyTorch overview's summed MSE + KL is
# the negative ELBO of a Gaussian decoder with $v = \tfrac12$ (standard deviation $0.71$, on pixels in $[0, 1]$), up
# to a constant that has no gradient.  In minivae that is `likelihood="gaussian", obs_var=0.5`.  (Its decoder ends in
# a sigmoid, minivae's Gaussian mean is linear; the correspondence of the losses does not depend on that.)
#
# We check the identity on a random model and a batch of grey MNIST digits, in float64, with the loss written the
# way the article writes it and the same draw $\epsilon$ on both sides (each side is then a one-sample estimate).

# %%
import time

import matplotlib.pyplot as plt
import numpy as np

import minivae
from minivae.data import load_mnist
from minivae.evaluate import active_units, kl_per_dim, negative_elbo
from minivae.figures import tile
from minivae.gradcheck import rel_error
from minivae.lessonkit import check, fit, lesson_args, save_figure

# --quick (or MINIVAE_QUICK=1), --out DIR, --seed N; unknown arguments (a Jupyter kernel's) are ignored
args = lesson_args("lesson_output/23_article_models", "Lesson 23: the articles' own models",
                   quick_help="fewer training steps and images (for tests)")
rng = np.random.default_rng(args.seed)
t0 = time.time()
D = 784

x_train = load_mnist("train")[0]
x_test = load_mnist("test")[0][:1000]


def gaussian_vae(hidden, obs_var, dtype="float32", seed=0):
    """A 784-hidden-2 VAE with a fixed-variance Gaussian decoder."""
    cfg = minivae.VAEConfig(x_dim=D, hidden=hidden, z_dim=2, likelihood="gaussian", obs_var=obs_var, dtype=dtype)
    return minivae.VAE(cfg, rng=seed)


# %%
xb = x_test[:16].astype(np.float64)
m_half = gaussian_vae((400,), 0.5, "float64")
eps = rng.standard_normal((1, 16, 2))
loss, _ = m_half.loss(xb, eps=eps, backward=False)                       # mean -ELBO (v = 1/2) per image
mu, logvar = m_half.encode(xb)
recon = m_half.decode(mu + np.exp(0.5 * logvar) * eps[0])
mse_sum = ((recon - xb) ** 2).sum()                                         # F.mse_loss(..., reduction='sum')
kl_sum = -0.5 * (1 + logvar - mu ** 2 - np.exp(logvar)).sum()            # the article's KL line
article = mse_sum + kl_sum
const = 16 * D / 2 * np.log(np.pi)
print(f"  16 images: SSE + KL = {article:.6f};  16 * (-ELBO at v = 1/2) = {16 * loss:.6f};  "
      f"difference {16 * loss - article:.6f} = 16 * 392 log(pi) = {const:.6f}")
check(abs(16 * loss - article - const) < 1e-8, "summed MSE + KL = -ELBO of the v = 1/2 Gaussian decoder - (D/2) log pi")

# %% [markdown]
# ## 2. Reductions: what a mean does depends on what it averages over
#
# Three reductions appear in the articles, and they mean different things.
#
# **A mean over the batch, or over the data set** (the PyTorch overview divides its summed loss by the number of
# training images) multiplies the whole loss by a constant $c$.  The optimum is the same, and Adam's step
# $\Delta\theta = -\eta\, \hat m / (\sqrt{\hat v} + \epsilon)$ is invariant to the scale of the gradient, except where
# the scaled gradient comes near $\epsilon = 10^{-8}$, so it changes almost nothing.
#
# **A mean over the pixels of the reconstruction term only** (PyTorch's default `reduction='mean'`, Keras's
# `reduce_mean`) divides the SSE by $D$ but not the KL:
#
# $$\frac{\mathrm{SSE}}{D} + \mathrm{KL} = \frac1D \big(\mathrm{SSE} + D \cdot \mathrm{KL}\big)
#   = \frac{\mathrm{SSE}}{2 \cdot 392} + \mathrm{KL}.$$
#
# Read from the left it is the $v = \tfrac12$ objective with $\beta = D = 784$ on the KL; read from the right it is the
# true ELBO ($\beta = 1$) of a Gaussian decoder with $v = D/2 = 392$, a standard deviation of 19.8 on pixels in
# $[0, 1]$: a decoder that explains almost nothing, so the KL term dominates.
#
# **The Keras article** computes the per-pixel mean squared error plus $128 \cdot \mathrm{KL}$ (its
# $-0.5 \cdot 128 \cdot \sum (1 + \text{logvar} - \mu^2 - e^{\text{logvar}})$ is $128$ times the KL of lesson 07):
#
# $$\frac{\mathrm{SSE}}{D} + 128 \cdot \mathrm{KL} = \frac1D\big(\mathrm{SSE} + 100352 \cdot \mathrm{KL}\big)
#   = 128 \left(\frac{\mathrm{SSE}}{2 \cdot 50176} + \mathrm{KL}\right):$$
#
# a hidden $\beta = 128 \cdot 784 = 100352$ at $v = \tfrac12$, or $v = 50176$ (a standard deviation of 224) at
# $\beta = 1$.
#
# In nats: a reduction of the SSE by $\Delta$ is worth $\Delta / (2v)$ nats of log-likelihood.  At $v = \tfrac12$ it is
# worth $\Delta$ nats; at $v = 392$, $\Delta / 784$.  A latent unit pays for itself when the reconstruction it buys is
# worth more than its KL.  We check the two readings on gradients: the gradient of the $v = 392$, $\beta = 1$ loss
# equals the gradient of the $v = \tfrac12$, $\beta = 784$ loss divided by 784 (same weights, same $\epsilon$), and the
# same for the Keras scaling.

# %%
m392 = gaussian_vae((400,), 392.0, "float64")
m50176 = gaussian_vae((400,), 50176.0, "float64")
for m in (m392, m50176):
    m.flat[:] = m_half.flat
_, g_half_784 = m_half.loss(xb, eps=eps, beta=784.0)
_, g_392 = m392.loss(xb, eps=eps)
err = rel_error(g_half_784.flat / 784, g_392.flat)
check(err < 1e-12, f"grad(SSE/D + KL) = grad(v = 392, beta = 1) = grad(v = 1/2, beta = 784) / 784 (rel. error {err:.0e})")
_, g_keras = m_half.loss(xb, eps=eps, beta=100352.0)
_, g_50176 = m50176.loss(xb, eps=eps)
err = rel_error(g_keras.flat / 784, 128 * g_50176.flat)
check(err < 1e-12, f"the Keras loss SSE/D + 128 KL has the gradient of 128 x (v = 50176, beta = 1) "
                   f"(rel. error {err:.0e})")
keras_loss = ((recon - xb) ** 2).mean(1) - 0.5 * 128 * (1 + logvar - mu ** 2 - np.exp(logvar)).sum(1)
kl_n = -0.5 * (1 + logvar - mu ** 2 - np.exp(logvar)).sum(1)
sse_n = ((recon - xb) ** 2).sum(1)
check(np.allclose(keras_loss, (sse_n + 100352 * kl_n) / D, rtol=1e-12),
      "the Keras article's loss line = (SSE + 100352 KL) / 784, per example")
_, g = m_half.loss(xb, eps=eps)                                              # mean over the 16 images
steps = []
for c in (16.0, 16 / 60000):               # the summed loss, and the PyTorch overview's division by 60000 images
    opt, p = minivae.Adam(lr=1e-3), {"w": np.zeros_like(g.flat)}
    opt.step(p, {"w": c * g.flat})
    steps.append(p["w"].copy())
big = np.abs(16 / 60000 * g.flat) > 100 * 1e-8                             # scaled gradient >> Adam's epsilon 1e-8
same = np.abs(steps[1] - steps[0]) <= 0.01 * np.abs(steps[0])
print(f"  first Adam step, summed loss vs loss / 60000: within 1% for {same.mean():.1%} of the {same.size} parameters; "
      f"{big.mean():.1%} have a scaled gradient > 100 x Adam's epsilon")
check(same[big].all() and np.all(np.abs(steps[1]) <= np.abs(steps[0]) + 1e-15),
      "dividing the whole loss by the data set size leaves Adam's step unchanged (within 1%) wherever the scaled "
      "gradient is > 100 x Adam's epsilon; below that, epsilon shortens the step")

# %% [markdown]
# ## 3. Four small models
#
# All four have a 2-D latent, as in both articles, a Gaussian decoder with $v = \tfrac12$ and a $\beta$ on the KL,
# trained on grey (not binarized) MNIST with `lessonkit.fit` (Adam $10^{-3}$, batches of 128; the Keras-style
# nets, a third of the size, get four times the steps).  Which scaling each
# reproduces:
#
# | model | layers | loss of the article | $\beta$ at $v = \tfrac12$ | equivalent $v$ at $\beta = 1$ |
# |---|---|---|---|---|
# | A | 784-400-2 | PyTorch overview, 0/1 section: summed MSE + KL | 1 | ½ |
# | B | 784-400-2 | the same, with PyTorch's default `reduction='mean'` | 784 | 392 |
# | C | 784-128-64-32-2 | Keras article: per-pixel mean MSE + 128·KL | 100352 | 50176 |
# | D | 784-128-64-32-2 | Keras architecture, summed MSE + KL | 1 | ½ |
#
# What we do *not* copy from the Keras article: its single scalar logvar per example, its decoding of $z = \mu$
# without sampling, and its `compile(loss='mse')` with `fit(x, x)`, which trains something else entirely
# (lessons/MISTAKES.md, entries 6 and 13).  Every model here minimises its own objective with a diagonal $q$.
#
# Each model is scored with the same yardstick: the test $-\mathrm{ELBO}$ of the $v = \tfrac12$ Gaussian ($\beta = 1$),
# in nats per image (a density, so only differences between models mean something, lesson 08).  We also count the
# active units (lesson 13: $\mathrm{Var}_x\, \mu_j(x) > 0.01$) and the KL per unit.

# %%
N_TRAIN, STEPS = (5000, 250) if args.quick else (20000, 800)
MODELS = {"A": ((400,), 1.0), "B": ((400,), 784.0), "C": ((128, 64, 32), 100352.0), "D": ((128, 64, 32), 1.0)}
res, models = {}, {}
for name, (hidden, beta) in MODELS.items():
    m = gaussian_vae(hidden, 0.5, seed=args.seed)
    steps = STEPS if hidden == (400,) else 4 * STEPS                    # the small Keras-style nets: 4x the steps
    fit(m, x_train[:N_TRAIN], steps, np.random.default_rng(args.seed + 1), beta=beta, binarize=False)
    r = negative_elbo(m, x_test, np.random.default_rng(args.seed + 2))
    r["au"] = active_units(m, x_test)
    r["kl_dim"] = kl_per_dim(m, x_test)
    r["sse"] = float(((m.reconstruct(x_test) - x_test) ** 2).sum(1).mean())
    r["sample_sd"] = float(m.sample(200, rng=args.seed + 3).std(0).mean())
    res[name], models[name] = r, m
sse_mean_image = float(((x_test - x_train[:N_TRAIN].mean(0)) ** 2).sum(1).mean())
print(f"  trained A, B for {STEPS} steps and C, D for {4 * STEPS} on {N_TRAIN} images, in {time.time() - t0:.0f} s")
print("  model  beta     -ELBO(v=1/2)  KL     units  KL per unit      SSE    sd of samples")
for name, (hidden, beta) in MODELS.items():
    r = res[name]
    print(f"  {name}  {beta:9.0f}  {r['loss']:9.2f}  {r['kl']:7.3f}  {r['au']}/2  {np.round(r['kl_dim'], 3)!s:14s}"
          f"  {r['sse']:6.2f}  {r['sample_sd']:.3f}")
print(f"  SSE of the mean training image: {sse_mean_image:.2f}")

# %% [markdown]
# ## 4. What follows
#
# At the summed scaling ($\beta = 1$, models A and D), both units are active and carry a few nats each.  At $\beta = 784$
# and $\beta = 100352$ (B and C), every unit collapses: the KL is 0, the encoder's $\mu(x)$ no longer depends on $x$,
# the decoder outputs one image for every $z$, the mean digit, and its SSE is the mean image's.  The collapse is the
# objective's choice, not a training accident: model A's code buys a reduction of the SSE of
# $\Delta = \mathrm{SSE}_\text{mean} - \mathrm{SSE}_A$ for $\mathrm{KL}_A$ nats; at $v = 392$ that reduction is worth
# only $\Delta / 784$ nats, far less than the KL it costs.  Even a perfect reconstruction would be worth only
# $\mathrm{SSE}_\text{mean} / 784 \approx 0.065$ nats per image at $v = 392$.

# %%
a, b, c, d = (res[k] for k in "ABCD")
check(a["au"] == 2 and d["au"] == 2 and min(a["kl_dim"].min(), d["kl_dim"].min()) > 0.5,
      "summed MSE + KL (A, D): both latent units active, each carrying > 0.5 nats")
check(b["au"] == 0 and c["au"] == 0 and b["kl"] < 0.01 and c["kl"] < 0.01,
      "per-pixel mean MSE (B, beta = 784) and the Keras scaling (C, beta = 100352): every unit collapsed, KL < 0.01 nats")
check(all(abs(r["sse"] - sse_mean_image) < 0.02 * sse_mean_image for r in (b, c)),
      "the collapsed models reconstruct every digit as the mean image (SSE within 2% of the mean image's)")
check(max(b["sample_sd"], c["sample_sd"]) < 0.3 * a["sample_sd"],
      "their samples barely vary (pixel sd across samples < 30% of model A's)")
delta = sse_mean_image - a["sse"]
print(f"  model A: its code reduces the SSE by {delta:.1f} for {a['kl']:.2f} nats of KL; at v = 392 the same reduction "
      f"is worth {delta / 784:.3f} nats")
check(delta > a["kl"] and delta / 784 < a["kl"],
      "A's code pays for its KL at v = 1/2 but would not at v = 392, the mean reduction's variance")
check(a["loss"] < b["loss"] - 5 and d["loss"] < c["loss"] - 5,
      "in nats of the v = 1/2 model, the collapsed models are > 5 nats worse per image")

# %% [markdown]
# ## 5. Reconstructions and samples
#
# For each model: eight test digits (top row of its panel), their reconstructions $m(\mu(x))$, and sixteen samples
# $m(z)$, $z \sim \mathcal{N}(0, I)$.  The collapsed models draw the same blurred mean digit whatever $x$ or $z$ is.

# %%
LOSS_NAME = {"A": "summed MSE + KL", "B": "mean MSE + KL", "C": "mean MSE + 128 KL", "D": "summed MSE + KL"}
fig, axes = plt.subplots(2, 4, figsize=(16, 3.4))
for col, (name, (hidden, beta)) in enumerate(MODELS.items()):
    m = models[name]
    rec = np.clip(m.reconstruct(x_test[:8]), 0, 1)
    axes[0, col].imshow(tile(np.concatenate([x_test[:8], rec]), nrow=8), cmap="gray", vmin=0, vmax=1)
    arch = "-".join(map(str, (D, *hidden, 2)))
    axes[0, col].set_title(f"{name}: {arch}, {LOSS_NAME[name]} (beta = {beta:g})\nKL {res[name]['kl']:.2f} nats, "
                           f"{res[name]['au']}/2 units active", fontsize=9)
    axes[1, col].imshow(tile(np.clip(m.sample(16, rng=args.seed + 4), 0, 1), nrow=8), cmap="gray", vmin=0, vmax=1)
    axes[1, col].set_title("samples", fontsize=9)
for ax in axes.ravel():
    ax.axis("off")
fig.tight_layout()
save_figure(fig, args.out, "article_models.png")
print(f"done in {time.time() - t0:.1f} s")
