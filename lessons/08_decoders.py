# %% [markdown]
# # Lesson 08: decoders, and what $p(x \mid z)$ assumes
#
# The decoder outputs the parameters of a distribution over $x$; its negative log-likelihood is the reconstruction
# term of the loss.  minivae has three, all summed over the $D$ pixels, in nats per image: Bernoulli from logits
# ("BCE"), Gaussian with a fixed variance $v$ ("MSE") and Gaussian with a learned per-pixel variance.  This lesson
# derives each, checks each against the textbook density and by finite differences, shows why the Bernoulli NLL must
# be computed from logits, and trains small VAEs with each to see what they assume: what the fixed variance does to
# the KL, and how a learned variance collapses on MNIST's black border.
#
# Run it as a script, `python lessons/08_decoders.py [--out DIR] [--seed N]`, or open it as a notebook
# (jupytext or VS Code; `MINIVAE_QUICK=1` in the kernel's environment selects the tests' quick mode).
#
# Exercise: `bernoulli_nll_forward` / `bernoulli_nll_backward` in `minivae/likelihoods.py`.

# %%
import time
import warnings

import matplotlib.pyplot as plt
import numpy as np

import minivae
from minivae.data import binarize, load_mnist
from minivae.evaluate import active_units
from minivae.lessonkit import check, lesson_args, save_figure
from minivae.likelihoods import (bernoulli_nll_backward, bernoulli_nll_forward, gaussian_learned_var_nll_backward,
                                 gaussian_learned_var_nll_forward, gaussian_nll_backward, gaussian_nll_forward)

# --quick (or MINIVAE_QUICK=1), --out DIR, --seed N; unknown arguments (a Jupyter kernel's) are ignored
args = lesson_args("lesson_output/08_decoders", "Lesson 08: decoders",
                   quick_help="small subset, few steps (for tests)")
rng = np.random.default_rng(args.seed)
t0 = time.time()

# %% [markdown]
# ## 1. The three NLLs, derived, and checked against direct evaluation of the densities
#
# "Direct" is the textbook pmf or pdf, multiplied out and then logged: fine for small $D$ and moderate values, and
# exactly what breaks in section 3.
#
# ### Bernoulli from logits $\ell$ (the "BCE" loss)
#
# With $p = \sigma(\ell)$, $\log p = -\mathrm{softplus}(-\ell)$ and $\log(1 - p) = -\mathrm{softplus}(\ell)$
# (lesson 03), and $\mathrm{softplus}(-\ell) = \mathrm{softplus}(\ell) - \ell$:
#
# $$-\log p(x \mid z) = -\sum_d \big[x_d \log p_d + (1 - x_d) \log(1 - p_d)\big]
#   = \sum_d \big[x_d\, \mathrm{softplus}(-\ell_d) + (1 - x_d)\, \mathrm{softplus}(\ell_d)\big]
#   = \sum_d \big[\mathrm{softplus}(\ell_d) - x_d \ell_d\big],$$
#
# $$\frac{\partial}{\partial \ell_d} = \sigma(\ell_d) - x_d .$$
#
# It assumes binary pixels.  For $x \in \{0, 1\}$ it is a probability mass, so the NLL is $\ge 0$ and directly
# comparable between models ("nats per image" on binarized MNIST, the Burda et al. 2015 benchmark).  Grey-level
# targets are allowed as a training objective, but then the number is not a log-probability.

# %%
N, D = 3, 6
logits = rng.normal(0, 2, (N, D))
xbin = (rng.random((N, D)) < 0.5).astype(np.float64)
p = 1 / (1 + np.exp(-logits))
direct_bern = -np.log(np.prod(p ** xbin * (1 - p) ** (1 - xbin), axis=1))
check(np.allclose(bernoulli_nll_forward(logits, xbin)[0], direct_bern, rtol=1e-12, atol=1e-12),
      "bernoulli_nll_forward = -log prod p^x (1-p)^(1-x)")

# %% [markdown]
# ### Gaussian with a fixed variance $v$ (the "MSE" loss)
#
# With mean $m$:
#
# $$-\log \mathcal{N}(x; m, v I) = \sum_d \frac{(x_d - m_d)^2}{2v} + \frac{D}{2} \log(2\pi v), \qquad
#   \frac{\partial}{\partial m} = \frac{m - x}{v}.$$
#
# This is squared error scaled by $1 / 2v$: $v$ weighs reconstruction against the KL (section 5 measures what that
# does).  It is a *density*: its value depends on the units of $x$ and can be negative, so its nats are not
# comparable with Bernoulli nats.
#
# ### Gaussian with a learned per-pixel variance
#
# The decoder also outputs $\text{logvar}(z)$:
#
# $$-\log \mathcal{N} = \frac12 \sum_d \Big[(x_d - m_d)^2 e^{-\text{logvar}_d} + \text{logvar}_d + \log 2\pi\Big],$$
#
# $$\frac{\partial}{\partial m} = (m - x)\, e^{-\text{logvar}}, \qquad
#   \frac{\partial}{\partial\, \text{logvar}} = \frac12 \Big(1 - (x - m)^2 e^{-\text{logvar}}\Big).$$
#
# The variance is fitted to the residuals: setting the second derivative to zero gives
# $e^{\text{logvar}} = (x - m)^2$.  The failure mode: on pixels that are (almost) always 0, MNIST's border, the
# residual goes to 0, the optimal variance goes to 0, and the density and the NLL run off to $-\infty$ without the
# model getting better at anything visible (section 6).

# %%
xg, mean = rng.random((N, D)), rng.random((N, D))
v = 0.05
pdf = np.exp(-(xg - mean) ** 2 / (2 * v)) / np.sqrt(2 * np.pi * v)
check(np.allclose(gaussian_nll_forward(mean, xg, v)[0], -np.log(np.prod(pdf, axis=1)), rtol=1e-12),
      "gaussian_nll_forward = -log prod N(x; m, v)")
lv = rng.normal(-2, 1, (N, D))
pdf_l = np.exp(-(xg - mean) ** 2 / (2 * np.exp(lv))) / np.sqrt(2 * np.pi * np.exp(lv))
check(np.allclose(gaussian_learned_var_nll_forward(mean, lv, xg)[0], -np.log(np.prod(pdf_l, axis=1)), rtol=1e-12),
      "gaussian_learned_var_nll_forward = -log prod N(x; m, exp(logvar))")
check(np.any(gaussian_learned_var_nll_forward(mean, lv - 3, mean)[0] < 0),
      "a Gaussian NLL can be negative (densities exceed 1 when the variance is small) - a Bernoulli pmf cannot")

# %% [markdown]
# ## 2. Gradient checks (float64, random upstream gradient)
#
# Each backward is checked with `check_op`, and the Bernoulli one also with a leading sample axis, logits of shape
# $(S, N, D)$ against $x$ of shape $(N, D)$, as the VAE uses it with several samples $z$ per image.

# %%
reps = {
    "bernoulli": minivae.check_op(lambda l: bernoulli_nll_forward(l, xg), bernoulli_nll_backward,
                                  [logits.copy()], ["logits"], rng=rng, tol=1e-8),
    "gaussian": minivae.check_op(lambda m: gaussian_nll_forward(m, xg, v), gaussian_nll_backward,
                                 [mean.copy()], ["mean"], rng=rng, tol=1e-8),
    "gaussian_learned_var": minivae.check_op(lambda m, s: gaussian_learned_var_nll_forward(m, s, xg),
                                             gaussian_learned_var_nll_backward, [mean.copy(), lv.copy()],
                                             ["mean", "logvar"], rng=rng, tol=1e-8),
}
for k, r in reps.items():
    print(f"  {k:22s}", {n: f"{e:.1e}" for n, e in r.items()})
check(max(max(r.values()) for r in reps.values()) < 1e-8, "all three likelihood backwards pass check_op")
l3 = rng.normal(0, 2, (4, N, D))
rep3 = minivae.check_op(lambda l: bernoulli_nll_forward(l, xg), bernoulli_nll_backward, [l3], ["logits"],
                        rng=rng, tol=1e-8)
check(rep3["logits"] < 1e-8, "bernoulli backward also passes with a leading sample axis (S, N, D)")

# %% [markdown]
# ## 3. Stability at logits $= \pm 10^4$
#
# The naive route, sigmoid then log, overflows and underflows: $\sigma(-10^4)$ rounds to 0 and $\log 0 = -\infty$
# ($x \log p$ with $x = 0$ then gives `nan`).  The logits form $\mathrm{softplus}(\ell) - x \ell$ is exact: for
# $\ell = 10^4$, $x = 1$ the NLL is $\mathrm{softplus}(10^4) - 10^4 = \log(1 + e^{-10^4}) = 0$; for $x = 0$ it is
# $10^4$.

# %%
big = np.array([[1e4, -1e4, 1e4, -1e4]])
xt = np.array([[1.0, 0.0, 0.0, 1.0]])
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    pn = 1 / (1 + np.exp(-big))
    naive = -(xt * np.log(pn) + (1 - xt) * np.log(1 - pn))
with warnings.catch_warnings():
    warnings.simplefilter("error")                     # the real thing must not even warn
    stable = np.array([bernoulli_nll_forward(big[:, [j]], xt[:, [j]])[0][0] for j in range(4)])
    grad = bernoulli_nll_backward(np.ones(1), bernoulli_nll_forward(big, xt)[1])
print(f"  logits {big[0]}, x {xt[0]}")
print(f"  naive  NLL per pixel: {naive[0]}")
print(f"  minivae NLL per pixel: {stable}   gradient {grad[0]}")
check(not np.all(np.isfinite(naive)), "the naive sigmoid-then-log NLL is not finite at logits +-1e4")
check(np.array_equal(stable, [0.0, 0.0, 1e4, 1e4]) and np.array_equal(grad[0], [0.0, 0.0, 1.0, -1.0]),
      "bernoulli_nll from logits is exact at +-1e4 (0 or 1e4 nats) with gradient sigmoid(l) - x in {0, +-1}")

# %% [markdown]
# ## 4. Four small VAEs, one per decoder
#
# Same architecture (784-200-8), Adam with learning rate $10^{-3}$, batches of 100.  The Bernoulli model trains on a
# fresh binarization of each batch, $x \sim \mathrm{Bernoulli}(\text{grey level})$; the Gaussians train on the grey
# levels.  Two fixed variances: $v = 0.05$ (sd 0.22, about the spread of a stroke pixel) and $v = 1.0$, minivae's
# default `obs_var` (section 5).

# %%
N_TRAIN, STEPS = (2000, 250) if args.quick else (12000, 1200)
x_all = load_mnist("train")[0]
x_train = x_all[rng.permutation(len(x_all))[:N_TRAIN]]
x_eval = load_mnist("test")[0][:500]
models = {"bernoulli": ("bernoulli", 0.05), "gaussian": ("gaussian", 0.05),
          "gaussian_learned_var": ("gaussian_learned_var", 0.05), "gaussian, v = 1.0": ("gaussian", 1.0)}
results = {}
for name, (lik, obs_var) in models.items():
    cfg = minivae.VAEConfig(hidden=(200,), z_dim=8, likelihood=lik, obs_var=obs_var)
    model = minivae.VAE(cfg, rng=np.random.default_rng(args.seed + 1))
    opt = minivae.Adam(lr=1e-3)
    x_ev = binarize(x_eval, np.random.default_rng(0)) if lik == "bernoulli" else x_eval
    first = float(model.loss(x_ev, backward=False)[0])
    for step in range(STEPS):
        xb = x_train[rng.integers(0, N_TRAIN, 100)]
        if lik == "bernoulli":
            xb = binarize(xb, rng)
        loss, grads = model.loss(xb)
        opt.step(model.params, grads)
    last = float(model.loss(x_ev, backward=False)[0])
    parts = {k: float(v_) for k, v_ in model.parts.items()}
    results[name] = dict(model=model, first=first, last=last, parts=parts, au=active_units(model, x_eval))
    print(f"  {name:22s} -ELBO {first:9.1f} -> {last:9.1f} nats/image  (recon {parts['recon']:.1f}, "
          f"KL {parts['kl']:.1f}, active units {results[name]['au']}/8)")
check(all(r["last"] < r["first"] - 10 for r in results.values()), "each of the four VAEs lowers its -ELBO by > 10 nats")
check(results["gaussian_learned_var"]["parts"]["recon"] < results["gaussian"]["parts"]["recon"],
      "learning the variance gives a lower Gaussian NLL than fixing it at 0.05 - better density, not better images")

# %% [markdown]
# ## 5. What the fixed variance does: $v = 1.0$ shifts the model toward the prior
#
# Multiply the per-image loss by $v$: for the fixed-variance Gaussian,
#
# $$v \cdot \big(-\mathrm{ELBO}\big) = \tfrac12 \lVert x - m \rVert^2 + v\, \mathrm{KL}\big(q(z \mid x) \,\|\, p(z)\big)
#   + \text{const},$$
#
# so $v$ acts like a weight $\beta = v$ on the KL (lesson 13) for a squared-error autoencoder.  Pixels lie in
# $[0, 1]$, so with $v = 1.0$ perfect reconstruction can save at most a few dozen nats: the KL weighs much more, and
# the encoder sends far less information through $z$.  The measured effect is a *shift toward the prior*, not a
# collapse: the KL falls several-fold but the units stay active (the posterior means still move with $x$, variance
# above 0.01 across images), and the reconstructions get blurrier.  A full run of this lesson measures KL 4.8 nats
# with 8/8 active units at $v = 1.0$, against 19.3 nats and 8/8 at $v = 0.05$; the squared error of the mean
# reconstructions rises from 20.4 to 25.7.  The other side of the trade shows in the picture of section 7: since
# $q(z \mid x)$ stays closer to $p(z)$, the $v = 1.0$ model's samples from the prior are smoother and more digit-like
# than the $v = 0.05$ model's.
#
# Why minivae's default is still `obs_var = 1.0`: it is the unit-variance Gaussian, the neutral choice for data
# standardised to unit variance per dimension, and its loss is $\tfrac12 \lVert x - m \rVert^2$, the plain squared
# error with no hidden scale.  (The summed MSE that many tutorials minimise, $\lVert x - m \rVert^2$, is
# $v = \tfrac12$.)  The default likelihood is Bernoulli, so the value only matters once a user picks the Gaussian;
# for pixel intensities in $[0, 1]$, set `obs_var` to the pixels' scale (0.05 here) or learn it.

# %%
kl_v1, kl_v005 = results["gaussian, v = 1.0"]["parts"]["kl"], results["gaussian"]["parts"]["kl"]
au_v1 = results["gaussian, v = 1.0"]["au"]
print(f"  v = 1.0: KL {kl_v1:.1f} nats, {au_v1}/8 active units;  v = 0.05: KL {kl_v005:.1f} nats, "
      f"{results['gaussian']['au']}/8 active")
check(kl_v1 < 0.5 * kl_v005, "v = 1.0 sends less than half the KL of v = 0.05 through z (a shift toward the prior)")
check(kl_v1 > 1.0 and au_v1 >= 4, "but it is not a collapse: KL > 1 nat and at least 4 of 8 units stay active")
sq_v1, sq_v005 = (float(((np.asarray(results[k]["model"].reconstruct(x_eval)) - x_eval) ** 2).sum(1).mean())
                  for k in ("gaussian, v = 1.0", "gaussian"))
print(f"  squared error of the mean reconstructions: v = 1.0 {sq_v1:.1f}, v = 0.05 {sq_v005:.1f}")
check(sq_v1 > sq_v005, "with v = 1.0 the mean reconstructions are worse (higher squared error) than with v = 0.05")

# %% [markdown]
# ## 6. The learned variance shrinks on the constant background
#
# Compare the predicted sd, $e^{\text{logvar}/2}$, on border pixels (the outer 3-pixel frame, which is 0 in virtually
# all of MNIST) with the centre $8 \times 8$ block.

# %%
mg = results["gaussian_learned_var"]["model"]
mu_z = mg.encode(x_eval)[0]
_, out_lv = mg.decode_raw(mu_z)
sd_map = np.exp(0.5 * np.asarray(out_lv, dtype=np.float64)).mean(0).reshape(28, 28)
frame = np.ones((28, 28), bool)
frame[3:-3, 3:-3] = False
centre = np.zeros((28, 28), bool)
centre[10:18, 10:18] = True
sd_border, sd_centre = sd_map[frame].mean(), sd_map[centre].mean()
print(f"  learned sd: border {sd_border:.4f}, centre {sd_centre:.4f} (fixed-variance model uses {np.sqrt(0.05):.3f})")
check(sd_border < 0.5 * sd_centre,
      "the learned sd on the always-black border is < half of that in the centre (it keeps shrinking)")

# %% [markdown]
# A lower NLL is not better images.  Where the learned variance is large (the strokes in the centre), a poor mean
# costs little, so the learned-variance model has little incentive to get the digits right: compare the squared
# error $\lVert x - m \rVert^2$ of the mean reconstructions.

# %%
sq_err = {name: float(((np.asarray(res["model"].reconstruct(x_eval)) - x_eval) ** 2).sum(1).mean())
          for name, res in results.items() if name != "bernoulli"}
print("  squared error of mean reconstructions (grey-level test digits):",
      {k: round(e, 1) for k, e in sq_err.items()})
check(sq_err["gaussian_learned_var"] > sq_err["gaussian"],
      "yet the learned-variance VAE reconstructs worse (higher squared error) than the fixed-variance one")

# %% [markdown]
# ## 7. Pictures: samples from $p(z)$ and reconstructions, per decoder
#
# Shown are the means $\mathbb{E}[x \mid z]$ (probabilities or Gaussian means), not draws from $p(x \mid z)$: a
# Bernoulli draw is salt-and-pepper, a Gaussian draw adds per-pixel noise.

# %%
fig, axes = plt.subplots(2 * len(results) + 1, 1, figsize=(10, 13.5))
r = 0
for name, res in results.items():
    m = res["model"]
    samples = np.clip(np.asarray(m.sample(12, rng=np.random.default_rng(7))), 0, 1)
    recon = np.clip(np.asarray(m.reconstruct(x_eval[:12])), 0, 1)
    for imgs, what in [(samples, "samples, z ~ N(0, I)"), (recon, "reconstructions of test digits")]:
        axes[r].imshow(np.hstack([im.reshape(28, 28) for im in imgs]), cmap="gray", vmin=0, vmax=1)
        axes[r].set_title(f"{name}: {what}", fontsize=9)
        axes[r].axis("off")
        r += 1
axes[r].imshow(sd_map, cmap="magma")
axes[r].set_title(f"gaussian_learned_var: mean predicted sd per pixel (border {sd_border:.3f}, "
                  f"centre {sd_centre:.3f}; bright = large)", fontsize=9)
axes[r].axis("off")
fig.tight_layout()
save_figure(fig, args.out, "decoders.png")
print(f"done in {time.time() - t0:.1f} s")
