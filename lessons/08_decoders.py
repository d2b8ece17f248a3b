"""Lesson 08 - Decoders: what p(x|z) assumes.

Run:  python lessons/08_decoders.py [--quick] [--out DIR] [--seed N]

The decoder outputs the parameters of a distribution over x; its negative
log-likelihood is the reconstruction term of the loss.  minivae has three
(all summed over the D pixels, in nats per image):

1. Bernoulli from logits l (the "BCE" loss).  p = sigmoid(l):
       -log p(x|z) = -sum_d [x_d log p_d + (1 - x_d) log(1 - p_d)].
   With log p = -softplus(-l) and log(1 - p) = -softplus(l) (lesson 03):
       = sum_d [x_d softplus(-l_d) + (1 - x_d) softplus(l_d)]
       = sum_d [softplus(l_d) - x_d l_d]              (softplus(-l) = softplus(l) - l)
   d/dl_d = sigmoid(l_d) - x_d.
   Assumes binary pixels.  For x in {0,1} it is a probability mass, so the
   NLL is >= 0 and directly comparable between models ("nats per image" on
   binarized MNIST, the Burda et al. 2015 benchmark).  Grey-level targets are
   allowed as a training objective but then the number is not a log-prob.

2. Gaussian with fixed variance v (the "MSE" loss).  mean m:
       -log N(x; m, v I) = sum_d (x_d - m_d)^2 / (2 v) + D/2 log(2 pi v);   d/dm = (m - x) / v.
   Squared error scaled by 1/(2v): v is the weight of reconstruction against
   the KL.  Large v (e.g. 1.0 for pixels in [0, 1]) makes reconstruction
   nearly free to ignore and the VAE collapses toward the prior; the seeds'
   MSE-plus-KL code silently picks a v.  This is a *density*: its value
   depends on the units of x and can be negative, so its nats are not
   comparable with Bernoulli nats.

3. Gaussian with learned per-pixel variance: the decoder also outputs
   logvar(z):
       -log N = 1/2 sum_d [ (x_d - m_d)^2 e^{-logvar_d} + logvar_d + log 2 pi ]
       d/dm = (m - x) e^{-logvar},   d/dlogvar = 1/2 (1 - (x - m)^2 e^{-logvar}).
   The variance is fitted to the residuals.  Failure mode: on pixels that
   are (almost) always 0 - MNIST's border - the residual goes to 0, the
   optimum variance goes to 0, and the density and the NLL run off to
   -infinity without the model getting better at anything visible.

Exercise: ``bernoulli_nll_forward`` / ``bernoulli_nll_backward`` in
minivae/likelihoods.py.
"""
# %%
import time
import warnings
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

import minivae
from minivae.data import binarize, load_mnist
from minivae.likelihoods import (bernoulli_nll_backward, bernoulli_nll_forward, gaussian_learned_var_nll_backward,
                                 gaussian_learned_var_nll_forward, gaussian_nll_backward, gaussian_nll_forward)
from minivae.lessonkit import check, lesson_args


# --quick, --out DIR, --seed N (unknown arguments are ignored, so this also runs inside Jupyter)
args = lesson_args("lesson_output/08_decoders", "Lesson 08: decoders",
                   quick_help="small subset, few steps (for tests)")
out = Path(args.out)
rng = np.random.default_rng(args.seed)
t0 = time.time()

# %% [markdown]
# ## 1. The three NLLs against direct evaluation of the densities
#
# Direct = the textbook pmf/pdf, multiplied out and then logged (fine for
# small D and moderate values; that is exactly what breaks in section 3).

# %%
N, D = 3, 6
logits = rng.normal(0, 2, (N, D))
xbin = (rng.random((N, D)) < 0.5).astype(np.float64)
p = 1 / (1 + np.exp(-logits))
direct_bern = -np.log(np.prod(p ** xbin * (1 - p) ** (1 - xbin), axis=1))
check(np.allclose(bernoulli_nll_forward(logits, xbin)[0], direct_bern, rtol=1e-12, atol=1e-12),
      "bernoulli_nll_forward = -log prod p^x (1-p)^(1-x)")

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
# with a leading sample axis (S, N, D) against x (N, D)
l3 = rng.normal(0, 2, (4, N, D))
rep3 = minivae.check_op(lambda l: bernoulli_nll_forward(l, xg), bernoulli_nll_backward, [l3], ["logits"],
                        rng=rng, tol=1e-8)
check(rep3["logits"] < 1e-8, "bernoulli backward also passes with a leading sample axis (S, N, D)")

# %% [markdown]
# ## 3. Stability at logits = +-1e4
#
# The naive route sigmoid -> log overflows/underflows: sigmoid(-1e4) rounds
# to 0 and log(0) = -inf (x * log p with x = 0 then gives nan).  The logits
# form softplus(l) - x l is exact: for l = 1e4, x = 1 the NLL is
# softplus(1e4) - 1e4 = log(1 + e^{-1e4}) = 0; for x = 0 it is 1e4.

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
# ## 4. Three small VAEs, one per likelihood
#
# Same architecture (784-200-8), Adam lr 1e-3, batches of 100.  Bernoulli
# trains on a fresh binarization of each batch (x ~ Bernoulli(grey level));
# the Gaussians on the grey levels.  Fixed variance v = 0.05 (sd 0.22).

# %%
N_TRAIN, STEPS = (2000, 250) if args.quick else (12000, 1200)
x_all = load_mnist("train")[0]
x_train = x_all[rng.permutation(len(x_all))[:N_TRAIN]]
x_eval = load_mnist("test")[0][:500]
results = {}
for lik in ["bernoulli", "gaussian", "gaussian_learned_var"]:
    cfg = minivae.VAEConfig(hidden=(200,), z_dim=8, likelihood=lik, obs_var=0.05)
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
    results[lik] = dict(model=model, first=first, last=last, parts=parts, x_ev=x_ev)
    print(f"  {lik:22s} -ELBO {first:9.1f} -> {last:9.1f} nats/image  (recon {parts['recon']:.1f}, "
          f"KL {parts['kl']:.1f})")
check(all(r["last"] < r["first"] - 10 for r in results.values()), "each of the three VAEs lowers its -ELBO by > 10 nats")
check(results["gaussian_learned_var"]["parts"]["recon"] < results["gaussian"]["parts"]["recon"],
      "learning the variance gives a lower Gaussian NLL than fixing it at 0.05 - better density, not better images")

# %% [markdown]
# ## 5. The learned variance shrinks on the constant background
#
# Compare the predicted sd on border pixels (the outer 3-pixel frame, which
# is 0 in virtually all of MNIST) with the centre 8x8 block.

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
# A lower NLL is not better images.  Where the learned variance is large (the
# strokes in the centre), a poor mean costs little, so the learned-variance
# model has little incentive to get the digits right: compare the squared
# error of the mean reconstructions.

# %%
sq_err = {lik: float(((np.asarray(res["model"].reconstruct(x_eval)) - x_eval) ** 2).sum(1).mean())
          for lik, res in results.items()}
print("  squared error of mean reconstructions (grey-level test digits):",
      {k: round(e, 1) for k, e in sq_err.items()})
check(sq_err["gaussian_learned_var"] > sq_err["gaussian"],
      "yet the learned-variance VAE reconstructs worse (higher squared error) than the fixed-variance one")

# %% [markdown]
# ## 6. Pictures: samples from p(z) and reconstructions, per likelihood
#
# Shown are E[x|z] (probabilities or means), not draws from p(x|z): a
# Bernoulli draw is salt-and-pepper, a Gaussian draw adds per-pixel noise.

# %%
fig, axes = plt.subplots(7, 1, figsize=(10, 10.5))
r = 0
for lik, res in results.items():
    m = res["model"]
    samples = np.clip(np.asarray(m.sample(12, rng=np.random.default_rng(7))), 0, 1)
    recon = np.clip(np.asarray(m.reconstruct(x_eval[:12])), 0, 1)
    for imgs, what in [(samples, "samples, z ~ N(0, I)"), (recon, "reconstructions of test digits")]:
        axes[r].imshow(np.hstack([im.reshape(28, 28) for im in imgs]), cmap="gray", vmin=0, vmax=1)
        axes[r].set_title(f"{lik}: {what}", fontsize=9)
        axes[r].axis("off")
        r += 1
axes[6].imshow(sd_map, cmap="magma")
axes[6].set_title(f"gaussian_learned_var: mean predicted sd per pixel (border {sd_border:.3f}, "
                  f"centre {sd_centre:.3f}; bright = large)", fontsize=9)
axes[6].axis("off")
fig.tight_layout()
fig.savefig(out / "decoders.png", dpi=100)
plt.close(fig)

print(f"figures written to {out}/  ({time.time() - t0:.1f} s)")
