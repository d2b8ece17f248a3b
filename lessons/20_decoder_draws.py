# %% [markdown]
# # Lesson 20 - Drawing from the decoder: x ~ p(x|z), not just its mean, and a floor on the learned variance.
#
# Almost every VAE picture shows E[x|z], the decoder's mean.  The model is a distribution, though: here we draw
# x ~ p(x|z) for the Bernoulli decoder and for the Gaussian decoder with a learned per-pixel variance, watch that
# variance collapse on MNIST's always-black border (lesson 08), and stop the collapse with a floor on the
# log-variance, VAEConfig(dec_logvar_min=m), whose gradient is derived by hand.
#
# Run:  python lessons/20_decoder_draws.py [--out DIR] [--seed N]

# %% [markdown]
# ## 1. A draw from p(x|z) is not the mean
#
# Given z, the decoder outputs the parameters of $p(x|z) = \prod_d p(x_d|z)$, independent pixels:
#
# * **Bernoulli**: logits $l_d$, $p_d = \sigma(l_d)$.  A draw is $x_d = \mathbb 1[u_d < p_d]$, $u_d \sim U(0, 1)$:
#   a binary image.  $\mathbb E[x_d|z] = p_d$, $\mathrm{Var}[x_d|z] = p_d(1-p_d)$.
# * **Gaussian, learned variance**: mean $m_d$ and log-variance $v_d$.  A draw is
#   $x_d = m_d + e^{v_d/2}\,\varepsilon_d$, $\varepsilon_d \sim N(0, 1)$ (the same reparameterization as z).
#   $\mathbb E[x_d|z] = m_d$, $\mathrm{Var}[x_d|z] = e^{v_d}$.
#
# The mean of a Bernoulli decoder is a grey-level image that no Bernoulli draw can be; the draw is the model's
# actual sample.  We check both recipes against their definitions first (means and variances over many draws).

# %%
import numpy as np
import matplotlib.pyplot as plt

import minivae
from minivae.data import load_mnist
from minivae.evaluate import iw_log_likelihood
from minivae.figures import tile
from minivae.gaussian import LOG_2PI
from minivae.layers import sigmoid
from minivae.lessonkit import check, fit, lesson_args, save_figure
from minivae.likelihoods import logvar_floor_backward, logvar_floor_forward

args = lesson_args("lesson_output/20_decoder_draws", "Lesson 20: drawing from the decoder")
rng = np.random.default_rng(args.seed)


def draw_bernoulli(logits, rng):
    """x_d = 1[u_d < sigmoid(l_d)], u ~ U(0, 1): one binary image per row."""
    p = sigmoid(np.asarray(logits, dtype=np.float64))
    return (rng.uniform(size=p.shape) < p).astype(np.float32)


def draw_gaussian(mean, logvar, rng):
    """x_d = m_d + exp(v_d / 2) eps_d, eps ~ N(0, 1)."""
    mean, logvar = np.asarray(mean, np.float64), np.asarray(logvar, np.float64)
    return mean + np.exp(0.5 * logvar) * rng.standard_normal(mean.shape)


l_demo = rng.normal(0, 2, size=(1, 50))
draws = draw_bernoulli(np.repeat(l_demo, 4000, 0), rng)                 # 4000 draws of 50 pixels
p_demo = 1 / (1 + np.exp(-l_demo[0]))
se = np.sqrt(p_demo * (1 - p_demo) / 4000) + 1e-12
check(set(np.unique(draws)) <= {0.0, 1.0} and np.all(np.abs(draws.mean(0) - p_demo) < 5 * se + 1e-9),
      "Bernoulli draws are binary and their mean is sigmoid(logit) within 5 standard errors")
m_demo, v_demo = rng.normal(0.5, 0.2, size=(1, 50)), rng.uniform(-6, 0, size=(1, 50))
g = draw_gaussian(np.repeat(m_demo, 4000, 0), np.repeat(v_demo, 4000, 0), rng)
ratio = g.var(0) / np.exp(v_demo[0])
check(np.all(np.abs(ratio - 1) < 0.12), "Gaussian draws have variance exp(logvar) within 12% (4000 draws per pixel)")

# %% [markdown]
# ## 2. Why the learned variance collapses, and a floor that stops it
#
# Per pixel, $-\log N(x_d; m_d, e^{v_d}) = \tfrac12\big[(x_d - m_d)^2 e^{-v_d} + v_d + \log 2\pi\big]$.
# MNIST's outer frame is 0 in (almost) every image.  The decoder learns $m_d = 0$ there, the residual vanishes and
# the pixel's NLL is $\tfrac12(v_d + \log 2\pi) \to -\infty$ as $v_d \to -\infty$: a constant pixel has no finite
# maximum-likelihood variance, its density grows without bound, and gradient descent keeps pushing $v_d$ down
# ($\partial\,\mathrm{nll}/\partial v_d = \tfrac12(1 - r_d^2 e^{-v_d}) = \tfrac12$ for $r_d = 0$, forever).
#
# **The floor** (`VAEConfig(dec_logvar_min=m)`, in `minivae/likelihoods.py`): the likelihood uses
#
# $$v' = m + \mathrm{softplus}(v - m) = m + \log(1 + e^{v - m}) > m,\qquad
#   \frac{\partial v'}{\partial v} = \sigma(v - m) \in (0, 1).$$
#
# So $\sigma' = e^{v'/2} > e^{m/2}$: every pixel's density is at most $1/\sqrt{2\pi e^m}$, its NLL at least
# $\tfrac12(m + \log 2\pi)$.  Far above the floor $v' \approx v$, off by $\log(1 + e^{-(v-m)})$ in log-variance
# (0.13 at $v - m = 2$, a factor $e^{0.13} = 1.14$ on the variance; 0.007 at $v - m = 5$).  Far below, $v' \approx m$.
#
# Why smooth, rather than a hard clamp $\max(v, m)$?  The clamp bounds the density too, but it has a kink at $v = m$,
# where a finite-difference check means nothing; the softplus floor is smooth everywhere, and its gradient
# $\sigma(v - m)$ falls off gradually instead of jumping from 1 to 0.  What the smooth floor does *not* buy is a live
# gradient far below the floor: $\sigma(v - m) \approx e^{v - m}$, about $2\cdot 10^{-9}$ at 20 below, as useless
# for a step as the clamp's exact 0.  And a clamped pixel is not dead forever either: its raw log-variance
# $v_d = w_d^\top h + b_d$ is computed from hidden features $h$ that every other pixel trains, so it can cross back
# above $m$ without receiving any gradient of its own.  Backward, by the chain rule,
# $\partial L/\partial v = \partial L/\partial v' \cdot \sigma(v - m)$.
#
# We pick $m = \log 0.05^2 \approx -6$, an sd of 0.05 (about 13 of 255 grey levels): far above the 8-bit
# quantization scale, below the sd the decoder learns inside the digits.  Check the op pair in float64 against
# central finite differences with a random upstream gradient, then the whole model with the floor on.

# %%
M_FLOOR = 2 * np.log(0.05)
v = M_FLOOR + rng.uniform(-8, 8, size=(6, 9))
rep = minivae.check_op(lambda lv: logvar_floor_forward(lv, M_FLOOR), logvar_floor_backward, [v], ["logvar"], rng)
print(f"  floor op: rel error {rep['logvar']:.2e}")
check(rep["logvar"] < 1e-7, "the floor's backward sigmoid(v - m) matches finite differences (float64, random dout)")
vf = logvar_floor_forward(np.array([-1e4, M_FLOOR, 1e4]), M_FLOOR)[0]
check(vf[0] == M_FLOOR and abs(vf[1] - (M_FLOOR + np.log(2))) < 1e-12 and vf[2] == 1e4,
      "floor(v) = m far below, m + log 2 at v = m, v far above (no overflow at |v - m| = 1e4)")
g_far = float(logvar_floor_backward(np.ones(1), logvar_floor_forward(np.array([M_FLOOR - 20.0]), M_FLOOR)[1])[0])
print(f"  the floor's gradient 20 below m: {g_far:.2e} (e^-20 = {np.exp(-20):.2e})")
check(0 < g_far < 1e-8, "20 below the floor the softplus's gradient is < 1e-8: as useless for a step as the clamp's 0")

# A hard clamp max(v, m) on two pixels that share one hidden feature h (v_d = w_d h + b_d).  Pixel 0 starts below the
# floor, so its own w_0, b_0 get exactly zero gradient; pixel 1 has a large residual and pushes h up by gradient
# descent on its NLL 1/2 (r^2 e^-v + v).  Pixel 0's log-variance rises with h and crosses back above m.
w_c, b_c, h_c, r1 = np.array([1.0, 1.0]), np.array([M_FLOOR - 1.0, 0.0]), 0.0, 3.0
v0_start = w_c[0] * h_c + b_c[0]
for _ in range(200):
    v_c = w_c * h_c + b_c
    dv = np.array([0.0, 0.5 * (1 - r1 ** 2 * np.exp(-v_c[1]))])            # clamped pixel 0: d max(v, m)/dv = 0
    h_c -= 0.5 * float(dv @ w_c)                                           # only pixel 1 moves the shared h
v0_end = w_c[0] * h_c + b_c[0]
print(f"  clamped pixel: raw log-variance {v0_start:.2f} -> {v0_end:.2f} (floor m = {M_FLOOR:.2f}), its own "
      "weights untouched")
check(v0_start < M_FLOOR < v0_end, "a hard-clamped pixel with zero gradient of its own climbs back above the floor "
      "through the hidden feature the other pixels train")
small = minivae.VAE(minivae.VAEConfig(x_dim=6, hidden=(5,), z_dim=3, activation="tanh",
                                      likelihood="gaussian_learned_var", dtype="float64", dec_logvar_min=-1.0), rng=0)
small.params["dec.out_logvar.b"] = np.array([-5.0, -2.0, -1.0, 0.0, 1.0, 3.0])    # both sides of the floor
rep = minivae.check_model(small, rng.standard_normal((4, 6)), n_samples=2, rng=rng)
print(f"  whole model with the floor: worst rel error {max(rep.values()):.2e} over {len(rep)} parameters")
check(max(rep.values()) < 1e-7, "whole-model gradient check with the floor on passes (every parameter, float64)")

# %% [markdown]
# ## 3. Three small VAEs
#
# 784-200-8, ReLU, Adam with step 2e-3 (twice the usual, so that the collapse shows within a few hundred steps),
# batches of 100 (`lessonkit.fit`): a Bernoulli decoder on dynamically binarized
# digits, and two learned-variance Gaussians on the grey levels, without and with the floor.  Every 50 steps we
# record the mean log-variance the likelihood uses on the border frame (the outer 3 pixels) of 100 test digits.

# %%
N_TRAIN, STEPS = (3000, 500) if args.quick else (12000, 1200)
LR = 2e-3
x_all = load_mnist("train")[0]
x_train = x_all[rng.permutation(len(x_all))[:N_TRAIN]]
x_test = load_mnist("test")[0][:500]
frame = np.ones((28, 28), bool)
frame[3:-3, 3:-3] = False
frame = frame.ravel()
centre = np.zeros((28, 28), bool)
centre[10:18, 10:18] = True
centre = centre.ravel()
print(f"  border frame: {frame.sum()} pixels, max grey level there in the training set "
      f"{x_train[:, frame].max():.3f}; mean in the test set {x_test[:, frame].mean():.2e}")

models, curves = {}, {}
for name, kw in [("bernoulli", dict(likelihood="bernoulli")),
                 ("learned var", dict(likelihood="gaussian_learned_var")),
                 ("learned var + floor", dict(likelihood="gaussian_learned_var", dec_logvar_min=M_FLOOR))]:
    model = minivae.VAE(minivae.VAEConfig(hidden=(200,), z_dim=8, **kw), rng=args.seed + 1)
    curve = []
    if name != "bernoulli":
        def record(step, beta, model=model, curve=curve):
            if step % 50 == 0:
                lv = np.asarray(model.decode_logvar(model.encode(x_test[:100])[0]), np.float64)
                curve.append((step, lv[:, frame].mean()))
    else:
        record = None
    fit(model, x_train, STEPS, np.random.default_rng(args.seed + 2), batch_size=100, opt=minivae.Adam(lr=LR),
        binarize=(name == "bernoulli"), on_step=record)
    models[name], curves[name] = model, np.array(curve)
    print(f"  trained {name}: {STEPS} steps")

# %% [markdown]
# ## 4. The collapse, and the floor holding
#
# Without the floor the border's log-variance falls far below anything the data justify (lesson 08 saw the same):
# the sd there ends up well below the floor's 0.05, while inside the digits it stays large.  (It does not fall
# monotonically: the few training digits that touch the border push it back up now and then.)  With the floor the
# border settles just above $m$.

# %%
sd = {}
for name in ("learned var", "learned var + floor"):
    mdl = models[name]
    lv = np.asarray(mdl.decode_logvar(mdl.encode(x_test)[0]), np.float64)
    sd[name] = np.exp(0.5 * lv).mean(0)
    print(f"  {name:20s} sd: border {sd[name][frame].mean():.4f}, centre {sd[name][centre].mean():.4f}; "
          f"border logvar: lowest {curves[name][:, 1].min():.2f}, final {curves[name][-1, 1]:.2f}")
free, floored = sd["learned var"], sd["learned var + floor"]
c_free, c_floor = curves["learned var"], curves["learned var + floor"]
check(free[frame].mean() < 0.5 * free[centre].mean(),
      "without the floor, the learned sd on the border is < half of the centre's")
check(free[frame].mean() < 0.8 * np.exp(M_FLOOR / 2),
      f"without the floor, the border sd ({free[frame].mean():.3f}) falls below 0.8x the floor's sd "
      f"exp(m/2) = {np.exp(M_FLOOR / 2):.3f}")
check(c_free[-1, 1] < M_FLOOR - 0.5,
      f"without the floor, the border log-variance ends more than 0.5 below m ({c_free[-1, 1]:.2f} vs m = {M_FLOOR:.2f})")
check(np.all(floored > np.exp(M_FLOOR / 2)) and floored[frame].mean() < 1.5 * np.exp(M_FLOOR / 2),
      "with the floor, every pixel's sd is > exp(m/2), and the border's settles within 1.5x of it")

fig, ax = plt.subplots(1, 3, figsize=(12, 3.4))
for name in ("learned var", "learned var + floor"):
    ax[0].plot(curves[name][:, 0], curves[name][:, 1], label=name)
ax[0].axhline(M_FLOOR, color="k", ls=":", label="floor m")
ax[0].set_xlabel("step")
ax[0].set_ylabel("mean border log-variance")
ax[0].legend()
for a, name in zip(ax[1:], ("learned var", "learned var + floor")):
    im = a.imshow(sd[name].reshape(28, 28), cmap="magma", vmin=0, vmax=max(free.max(), floored.max()))
    a.set_title(f"mean sd per pixel, {'floor m' if 'floor' in name else 'no floor'}")
    a.axis("off")
fig.colorbar(im, ax=ax[2])
save_figure(fig, args.out, "border_collapse.png")

# %% [markdown]
# ## 5. NLL with and without the floor
#
# Per example, $-\log p(x|z)$ is a sum over pixels, so we can split it into the border frame and the rest.  On the
# test set the unfloored model has the lower NLL, and the border is where its advantage comes from: each border pixel
# pays $\tfrac12(v_d + \log 2\pi)$, very negative for a collapsed $v_d$.  (Gaussian NLLs are densities, negative and
# comparable only between Gaussian models on the same data; lesson 08.)
#
# That "better" density is a bet that the border is *exactly* black.  Move the digits by 3 pixels, so that strokes
# reach the frame: a residual of 0.5 on a pixel with sd 0.01 costs $0.5^2 / (2 \cdot 10^{-4}) = 1250$ nats.  We
# evaluate both Gaussian models on shifted test digits with the importance-weighted estimate of lesson 14
# (`minivae.evaluate.iw_log_likelihood`, k samples).

# %%
def split_nll(model, x, rng):
    """-log p(x|z) at one z ~ q(z|x) per example, split into (border, interior) sums; (N,) each."""
    mu, logvar = model.encode(x)
    z = mu + np.exp(0.5 * logvar) * rng.standard_normal(mu.shape).astype(np.float32)
    m, v = np.asarray(model.decode(z), np.float64), np.asarray(model.decode_logvar(z), np.float64)
    per_pixel = 0.5 * ((x - m) ** 2 * np.exp(-v) + v + LOG_2PI)
    return per_pixel[:, frame].sum(1), per_pixel[:, ~frame].sum(1)


K_IW = 20 if args.quick else 100
shifted = np.roll(x_test.reshape(-1, 28, 28), 3, axis=2).reshape(-1, 784)          # 3 pixels to the right
touch = shifted[:, frame].max(1) > 0.3                                            # strokes reach the frame
results = {}
for name in ("learned var", "learned var + floor"):
    mdl = models[name]
    b, i = split_nll(mdl, x_test, np.random.default_rng(5))
    nll = -iw_log_likelihood(mdl, x_test, K_IW, np.random.default_rng(6))
    nll_shift = -iw_log_likelihood(mdl, shifted[touch], K_IW, np.random.default_rng(7))
    results[name] = dict(border=b.mean(), interior=i.mean(), nll=nll.mean(), nll_shift=nll_shift.mean())
    print(f"  {name:20s} test IW-NLL(k={K_IW}) {nll.mean():9.1f} nats (recon: border {b.mean():8.1f} + interior "
          f"{i.mean():8.1f});  shifted digits touching the border ({touch.sum()}): {nll_shift.mean():12.1f}")
rf, rl = results["learned var"], results["learned var + floor"]
gap, gap_border = rl["nll"] - rf["nll"], rl["border"] - rf["border"]
print(f"  the floor costs {gap:.1f} nats of test NLL; the border's reconstruction term alone differs by {gap_border:.1f}")
check(rf["nll"] < rl["nll"], "on the test set the unfloored model has the lower (better-looking) NLL")
check(gap_border > 0.8 * gap, "the border frame accounts for > 80% of that difference")
floor_bound = 0.5 * frame.sum() * (M_FLOOR + LOG_2PI)
check(rl["border"] >= floor_bound,
      f"with the floor the border's NLL is bounded below by |frame|/2 (m + log 2 pi) = {floor_bound:.1f} nats")
check(rf["nll_shift"] > rl["nll_shift"] + 100,
      "on digits shifted into the border, the unfloored model's NLL is worse by > 100 nats")

# %% [markdown]
# ## 6. Draws from the three decoders
#
# The same 8 prior draws $z \sim N(0, I)$ per model (each model's own latent space, so the digits differ between
# models).  Rows: the mean $\mathbb E[x|z]$, then two independent draws $x \sim p(x|z)$.  The Bernoulli draws are
# binary and speckled: the decoder's grey levels become coin flips.  The Gaussian draws add independent per-pixel
# noise of sd $e^{v_d/2}$ -- strong inside the digits (where the learned sd is large), nothing visible on a collapsed
# border, faint noise of sd 0.05 on the floored border -- and they leave $[0, 1]$: a Gaussian decoder gives mass to
# impossible pixel values.  About half of the drawn pixels do: every background pixel has a mean near 0 and symmetric
# noise, so it is negative half of the time, however small its sd.

# %%
z = np.random.default_rng(11).standard_normal((8, 8)).astype(np.float32)
rows, outside = [], {}
for name, mdl in models.items():
    if name == "bernoulli":
        logits = mdl.decode_raw(z)[0]
        mean = mdl.decode(z)
        d1, d2 = draw_bernoulli(logits, np.random.default_rng(1)), draw_bernoulli(logits, np.random.default_rng(2))
    else:
        mean, lv = mdl.decode(z), mdl.decode_logvar(z)
        d1, d2 = draw_gaussian(mean, lv, np.random.default_rng(1)), draw_gaussian(mean, lv, np.random.default_rng(2))
        many = draw_gaussian(np.repeat(mean, 50, 0), np.repeat(lv, 50, 0), np.random.default_rng(3))
        outside[name] = float(((many < 0) | (many > 1)).mean())
    rows.append((name, [np.asarray(mean), d1, d2]))
    print(f"  {name:20s} draws: values in [{min(d1.min(), d2.min()):.2f}, {max(d1.max(), d2.max()):.2f}]"
          + (f", {100 * outside[name]:.1f}% of drawn pixels outside [0, 1]" if name in outside else ""))
check(all(v > 0.25 for v in outside.values()), "> 25% of the Gaussian decoders' drawn pixel values lie outside [0, 1]")

fig, axes = plt.subplots(len(rows), 1, figsize=(9, 3.2 * len(rows)))
for a, (name, imgs) in zip(axes, rows):
    a.imshow(tile(np.clip(np.concatenate(imgs), 0, 1), 8), cmap="gray", vmin=0, vmax=1)
    a.set_title(f"{name}: row 1 the mean E[x|z], rows 2-3 draws x ~ p(x|z) (shown clipped to [0, 1])")
    a.axis("off")
save_figure(fig, args.out, "decoder_draws.png")

# %% [markdown]
# ## Summary
#
# * A decoder defines a distribution; its mean is what tutorials show, its draws are what the model generates.
#   Bernoulli draws are binary; Gaussian draws add per-pixel noise and leave [0, 1].
# * A learned per-pixel variance collapses on pixels that never change: the density there grows without bound,
#   buying a lower NLL that says nothing about digits and that breaks as soon as a stroke lands on the border.
# * A floor $v' = m + \mathrm{softplus}(v - m)$, with gradient $\sigma(v - m)$, bounds the density; in minivae it is
#   `VAEConfig(dec_logvar_min=m)` or `minivae train --dec-logvar-min m`.
