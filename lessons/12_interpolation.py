# %% [markdown]
# # Lesson 12 — Interpolation in latent space, and sampling near a digit
#
# Encode two test digits, walk in a straight line between their latent means and decode every point; compare
# with blending the pixels.  Along the way: why the midpoints of a straight line in $z$ have an unusually small
# norm, and how to score a grey-level frame honestly (its cross-entropy is mostly its own entropy).  Then decode
# $z$ drawn near one encoded digit.
#
# **Run** `python lessons/12_interpolation.py [--out DIR] [--seed N]`, or open it as a notebook
# (jupytext); in a kernel, set `MINIVAE_QUICK=1` for the small version.

# %%
import time

import matplotlib.pyplot as plt
import numpy as np

import minivae
import minivae.data
from minivae.figures import tile
from minivae.likelihoods import bernoulli_nll_forward
from minivae.lessonkit import check, fit, lesson_args, save_figure

args = lesson_args("lesson_output/12_interpolation", "Lesson 12: interpolation in latent space",
                   quick_help="few steps on a subset (for tests)")
t0 = time.time()
rng = np.random.default_rng(args.seed)

# %% [markdown]
# ## 1. A briefly trained model
#
# A 784-H-16 VAE, trained with lesson 10's loop (`lessonkit.fit`: dynamic binarization, Adam, batch 128).

# %%
x_train, _ = minivae.data.load_mnist("train")
x_test, y_test = minivae.data.load_mnist("test")
if args.quick:
    x_train = x_train[rng.permutation(len(x_train))[:8000]]
    n_steps, hidden, n_pairs, n_ref = 250, (128,), 8, 5000
else:
    n_steps, hidden, n_pairs, n_ref = 1400, (256,), 20, 20000
cfg = minivae.VAEConfig(hidden=hidden, z_dim=16)
L = cfg.z_dim
model = minivae.VAE(cfg, rng=np.random.default_rng(args.seed))
fit(model, x_train, n_steps, rng, batch_size=128, opt=minivae.Adam(lr=1e-3))
x_test_bin = minivae.data.static_binarize(x_test[:1000], seed=1234)
print(f"trained {model} for {n_steps} steps; test -ELBO "
      f"{float(model.loss(x_test_bin, backward=False)[0]):.1f} nats")

# %% [markdown]
# ## 2. The two paths
#
# Let $a, b$ be two test digits with encoder means $\mu_a = \mu(a)$, $\mu_b = \mu(b)$, and let
# $g(z) = \mathbb{E}[x|z] = \sigma\big(f(z)\big)$ be the decoder's mean.  For $t \in [0, 1]$:
#
# $$\text{latent path:}\quad z_t = (1-t)\,\mu_a + t\,\mu_b,\qquad x^{\mathrm{lat}}_t = g(z_t)$$
# $$\text{pixel path:}\quad x^{\mathrm{pix}}_t = (1-t)\,g(\mu_a) + t\,g(\mu_b)$$
#
# Both start at $g(\mu_a)$ and end at $g(\mu_b)$, the mean reconstructions, so they differ only in between.
# The pixel path fades one digit out while the other fades in (a double exposure); the latent path moves
# through images the decoder can produce, which the training objective pushed towards the data.

# %%
prng = np.random.default_rng(args.seed + 11)
pairs = []
while len(pairs) < n_pairs:
    i, j = prng.choice(1000, 2, replace=False)
    if y_test[i] != y_test[j]:
        pairs.append((i, j))
ts = np.linspace(0, 1, 9)
inner = (ts > 0) & (ts < 1)
lat_frames, pix_frames, lat_z = [], [], []
max_end_err = 0.0
for i, j in pairs:
    xa, xb = x_test_bin[i:i + 1], x_test_bin[j:j + 1]
    mu = minivae.to_numpy(model.encode(np.concatenate([xa, xb]))[0])
    z = (1 - ts)[:, None] * mu[0] + ts[:, None] * mu[1]              # (T, L)
    lat = minivae.to_numpy(model.decode(z))
    rec = minivae.to_numpy(model.reconstruct(np.concatenate([xa, xb])))
    pix = (1 - ts)[:, None] * rec[0] + ts[:, None] * rec[1]
    max_end_err = max(max_end_err, float(np.abs(lat[0] - rec[0]).max()), float(np.abs(lat[-1] - rec[1]).max()))
    lat_frames.append(lat)
    pix_frames.append(pix)
    lat_z.append(z)
lat_frames, pix_frames, lat_z = np.array(lat_frames), np.array(pix_frames), np.array(lat_z)   # (P, T, D|L)
check(max_end_err < 1e-5, f"the latent path starts and ends at the reconstructions g(mu_a), g(mu_b) "
      f"(max abs diff {max_end_err:.1e})")

# %%
fig, ax = plt.subplots(figsize=(9, 3.4))
i, j = pairs[0]
raw = (1 - ts)[:, None] * x_test[i] + ts[:, None] * x_test[j]
ax.imshow(tile(np.concatenate([lat_frames[0], pix_frames[0], raw]), len(ts)), cmap="gray_r")
ax.set_title("top: linear path in z, decoded;  middle: pixel blend of the two reconstructions;  "
             "bottom: pixel blend of the original digits", fontsize=8)
ax.axis("off")
save_figure(fig, args.out, "interpolation.png")

fig, ax = plt.subplots(figsize=(9, 9))
ax.imshow(tile(lat_frames[:8].reshape(-1, 784), len(ts)), cmap="gray_r")
ax.set_title("latent paths between 8 pairs of test digits")
ax.axis("off")
save_figure(fig, args.out, "interpolation_pairs.png")

# %% [markdown]
# ## 3. Where a straight line in $z$ goes: the norms along the path
#
# The prior's density $p(z) \propto e^{-|z|^2/2}$ is largest at the centre $z = 0$, so the midpoint of a
# straight line is *not* in a low-density region: its density is higher than at the endpoints.  What is unusual
# about it is its **norm**.  For $z \sim \mathcal N(0, I_L)$, $|z|^2 = \sum_j z_j^2$ has mean $L$ and
# variance $2L$, so the prior's mass lies on a thin shell $|z| \approx \sqrt L$ (here $\sqrt{16} = 4$), where
# the density is smaller but the volume much larger.  For two independent draws $z_a, z_b$,
#
# $$\mathbb{E}\,\big|\tfrac12(z_a + z_b)\big|^2 = \tfrac14\big(\mathbb{E}|z_a|^2 + \mathbb{E}|z_b|^2
#   + 2\,\mathbb{E}[z_a^\top z_b]\big) = \tfrac14(L + L + 0) = \frac L2,$$
#
# so the midpoint has norm about $\sqrt{L/2} \approx 0.71\sqrt L$, off the shell: a prior draw that small is
# rare ($P(\chi^2_{16} \le 8) \approx 5\%$).  The decoder was trained on $z$ from $q(z|x)$, whose draws fill
# the same shell, so midpoints are codes it has rarely seen.  Spherical interpolation, which keeps the norm, is
# a common alternative.  Below: norms along straight lines between prior draws, and along the lines between
# encoded means that section 2 decoded.

# %%
nrng = np.random.default_rng(args.seed + 21)
za, zb = nrng.standard_normal((2, 4000, L))
path_norm = np.array([np.linalg.norm((1 - t) * za + t * zb, axis=1) for t in ts])    # (T, 4000)
prior_norm = np.linalg.norm(nrng.standard_normal((20000, L)), axis=1)
mid = len(ts) // 2
mid_sq = float((path_norm[mid] ** 2).mean())
frac_below = float((prior_norm < np.median(path_norm[mid])).mean())
log_density_gain = 0.5 * float((za ** 2).sum(1).mean() - (path_norm[mid] ** 2).mean())
print(f"prior draws: |z| = {prior_norm.mean():.2f} +- {prior_norm.std():.2f} (sqrt L = {np.sqrt(L):.2f})")
print(f"midpoints of lines between prior draws: |z| = {path_norm[mid].mean():.2f} "
      f"(sqrt(L/2) = {np.sqrt(L / 2):.2f}); {100 * frac_below:.1f}% of prior draws are that short")
check(abs(mid_sq / L - 0.5) < 0.05, f"the midpoint of two prior draws has |z|^2 ~ L/2 "
      f"({mid_sq:.2f} vs L/2 = {L / 2:.0f})")
check(frac_below < 0.1, f"a midpoint norm is rare under the prior: only {100 * frac_below:.1f}% of prior draws "
      "have a smaller norm")
check(log_density_gain > 0, f"yet the midpoint's prior log-density is higher than the endpoints' (by "
      f"{log_density_gain:.1f} nats on average): the centre is the density's maximum")

# the paths actually decoded: encoder means of test digits, and draws from q(z|x) on the shell
lat_norm = np.linalg.norm(lat_z, axis=2)                                  # (P, T)
mu_enc, lv_enc = (minivae.to_numpy(v) for v in model.encode(x_test_bin))
post_norm = np.linalg.norm(mu_enc + np.exp(0.5 * lv_enc) * nrng.standard_normal(mu_enc.shape), axis=1)
ratio = lat_norm[:, mid].mean() / lat_norm[:, [0, -1]].mean()
print(f"encoded means: |mu| = {lat_norm[:, [0, -1]].mean():.2f} at the ends, {lat_norm[:, mid].mean():.2f} at "
      f"the midpoint; draws z ~ q(z|x): |z| = {post_norm.mean():.2f} +- {post_norm.std():.2f}")
check(ratio < 0.9, f"between two encoded digits the midpoint is shorter than the ends too "
      f"(mean norm ratio {ratio:.2f})")

fig, ax = plt.subplots(1, 2, figsize=(10, 3.2))
ax[0].hist(prior_norm, bins=60, density=True, alpha=0.6, label="|z|, z ~ N(0, I)")
ax[0].hist(path_norm[mid], bins=60, density=True, alpha=0.6, label="|midpoint| of two prior draws")
ax[0].hist(post_norm, bins=60, density=True, alpha=0.6, label="|z|, z ~ q(z|x), test digits")
ax[0].axvline(np.sqrt(L), color="k", ls="--", lw=0.8)
ax[0].set_xlabel("norm")
ax[0].legend(fontsize=7)
ax[1].plot(ts, path_norm.mean(1), "o-", label="lines between prior draws")
ax[1].plot(ts, lat_norm.mean(0), "s-", label="lines between encoded means")
ax[1].axhline(np.sqrt(L), color="k", ls="--", lw=0.8, label="sqrt(L)")
ax[1].set_xlabel("t")
ax[1].set_ylabel("|z_t| (mean)")
ax[1].legend(fontsize=7)
fig.tight_layout()
save_figure(fig, args.out, "path_norms.png")

# %% [markdown]
# ## 4. Which path stays closer to the data?  Scoring a frame honestly
#
# The model's own score of an image is its $-$ELBO.  We estimate it per image as
# $-\frac1S\sum_s \log w_s$ with $\log w = \log p(x|z) + \log p(z) - \log q(z|x)$, $z \sim q(z|x)$: $\mathbb{E}_q[\log w]$
# is exactly the ELBO (the KL by Monte Carlo instead of analytically).
#
# **Grey-level frames are a trap.**  The frames are decoder means, grey levels $x_d \in [0, 1]$, and the
# Bernoulli term of a grey-level $x$ is a cross-entropy.  With $p_d = \sigma(o_d)$ and the binary entropy
# $h(u) = -u\log u - (1-u)\log(1-u)$,
#
# $$-\sum_d \big[x_d \log p_d + (1 - x_d)\log(1 - p_d)\big]
#   = \underbrace{\sum_d h(x_d)}_{H(x)} + \underbrace{\sum_d \Big[x_d \log\frac{x_d}{p_d}
#   + (1-x_d)\log\frac{1-x_d}{1-p_d}\Big]}_{\mathrm{KL}(x\,\|\,p)}.$$
#
# $H(x)$ depends on the frame alone: a blurry frame with many grey pixels has a large $H(x)$ whatever the model
# says, and for these frames it is most of the $-$ELBO.  So we compare the paths on **binarized** frames,
# $x' \sim \mathrm{Bernoulli}(x)$, which have $H(x') = 0$: each frame is a probability image, and a binary
# draw from it is an image the model can score as data.

# %%
# the identity, for a pixel-blend frame x against the decoder's probabilities p at the latent midpoint
frame = pix_frames[0, mid]
logits = minivae.to_numpy(model.decode_raw(lat_z[0, mid][None])[0])[0].astype(np.float64)
pd = 1 / (1 + np.exp(-logits))
xf = np.clip(frame.astype(np.float64), 1e-12, 1 - 1e-12)
H = float(-(xf * np.log(xf) + (1 - xf) * np.log(1 - xf)).sum())
KLx = float((xf * np.log(xf / pd) + (1 - xf) * np.log((1 - xf) / (1 - pd))).sum())
ce = float(bernoulli_nll_forward(logits[None], frame.astype(np.float64)[None])[0][0])
check(abs(ce - (H + KLx)) < 1e-6 * ce, f"cross-entropy = H(x) + KL(x||p) for a grey frame "
      f"({ce:.3f} = {H:.3f} + {KLx:.3f} nats)")


def neg_elbo_each(model, x, n_eps=8, seed=0):
    """Per-image -ELBO estimate: -(1/S) sum_s log w_s, z ~ q(z|x)."""
    eps = np.random.default_rng(seed).standard_normal((n_eps, len(x), model.config.z_dim))
    return -minivae.to_numpy(model.log_weights(x, eps)).astype(np.float64).mean(0)


def entropy(x):
    x = np.clip(x.astype(np.float64), 1e-12, 1 - 1e-12)
    return -(x * np.log(x) + (1 - x) * np.log(1 - x)).sum(1)


n_eps, n_bin = (4, 2) if args.quick else (8, 4)
li = lat_frames[:, inner].reshape(-1, 784)
pi = pix_frames[:, inner].reshape(-1, 784)
grey = {"latent path": neg_elbo_each(model, li, n_eps), "pixel path": neg_elbo_each(model, pi, n_eps)}
ent = {"latent path": entropy(li), "pixel path": entropy(pi)}
brng = np.random.default_rng(args.seed + 13)
binar = {name: np.mean([neg_elbo_each(model, minivae.data.binarize(f, brng), n_eps, seed=r)
                        for r in range(n_bin)], axis=0) for name, f in (("latent path", li), ("pixel path", pi))}

ref = x_train[np.random.default_rng(args.seed + 5).permutation(len(x_train))[:n_ref]]
ref_sq = (ref * ref).sum(1)


def nn_dist(frames):
    d2 = (frames * frames).sum(1)[:, None] - 2 * frames @ ref.T + ref_sq[None]
    return np.sqrt(np.maximum(d2.min(1), 0))


dist = {"latent path": nn_dist(li), "pixel path": nn_dist(pi)}
print(f"{'interior frames':<16}{'-ELBO grey':>12}{'H(x)':>8}{'-ELBO binarized':>17}{'dist to nearest train':>23}")
for name in grey:
    print(f"{name:<16}{grey[name].mean():>12.1f}{ent[name].mean():>8.1f}{binar[name].mean():>17.1f}"
          f"{dist[name].mean():>23.2f}")
share = ent["pixel path"].mean() / grey["pixel path"].mean()
check(share > 0.5, f"the -ELBO of a grey pixel-blend frame is mostly its own entropy H(x) "
      f"({ent['pixel path'].mean():.0f} of {grey['pixel path'].mean():.0f} nats)")
check(binar["latent path"].mean() < binar["pixel path"].mean(),
      f"binarized latent-path frames score better under the model than binarized pixel blends (-ELBO "
      f"{binar['latent path'].mean():.1f} < {binar['pixel path'].mean():.1f} nats, {len(li)} frames x {n_bin} "
      "binarizations)")

fig, ax = plt.subplots(1, 2, figsize=(10, 3.2))
for name, mk in (("latent path", "o-"), ("pixel path", "s-")):
    ax[0].plot(ts[inner], binar[name].reshape(len(pairs), -1).mean(0), mk, label=name)
    ax[1].plot(ts[inner], dist[name].reshape(len(pairs), -1).mean(0), mk, label=name)
ax[0].set_xlabel("t")
ax[0].set_ylabel("-ELBO of the binarized frame (nats)")
ax[0].legend()
ax[1].set_xlabel("t")
ax[1].set_ylabel("distance to nearest training image")
ax[1].legend()
fig.suptitle(f"mean over {len(pairs)} pairs of test digits")
fig.tight_layout()
save_figure(fig, args.out, "path_scores.png")

# %% [markdown]
# The nearest-neighbour distance points the same way, but by a small margin: the decoded frames are blurry
# means, far from every binary-looking training digit, whichever path they come from.  It is printed, not
# asserted.
#
# ## 5. Sampling near a digit
#
# $z = \mu_a + s\,\sigma_a \odot \varepsilon$, $\varepsilon \sim \mathcal N(0, I)$: $s = 1$ is a draw from $q(z|a)$
# itself; a larger $s$ moves away from $a$.  The decoded images should drift away from $g(\mu_a)$ as $s$ grows,
# and draws from $q(z|a)$ should stay much closer to it than samples from the prior do.

# %%
xa = x_test_bin[pairs[0][0]:pairs[0][0] + 1]
mu_a, lv_a = (minivae.to_numpy(v)[0] for v in model.encode(xa))
g_a = minivae.to_numpy(model.decode(mu_a[None]))[0]
scales = [0.5, 1.0, 2.0, 4.0]
srng = np.random.default_rng(args.seed + 3)
rows, dists = [], []
for s in scales:
    z = mu_a + s * np.exp(0.5 * lv_a) * srng.standard_normal((32, L))
    imgs = minivae.to_numpy(model.decode(z))
    rows.append(imgs[:10])
    dists.append(float(np.linalg.norm(imgs - g_a, axis=1).mean()))
prior = minivae.to_numpy(model.sample(32, rng=srng))
d_prior = float(np.linalg.norm(prior - g_a, axis=1).mean())
rows.append(prior[:10])
fig, ax = plt.subplots(figsize=(8, 4.6))
ax.imshow(tile(np.concatenate([np.concatenate([xa, g_a[None], np.zeros((8, 784))])] + rows), 10),
          cmap="gray_r")
ax.set_title("row 1: digit, g(mu); rows 2-5: z = mu + s sigma eps, s = 0.5, 1, 2, 4; row 6: prior",
             fontsize=9)
ax.axis("off")
save_figure(fig, args.out, "near_a_digit.png")
for s, d in zip(scales, dists):
    print(f"s = {s:3.1f}: mean distance of decoded samples to g(mu_a) = {d:.2f}")
print(f"prior samples:  mean distance to g(mu_a) = {d_prior:.2f}")
check(all(a < b for a, b in zip(dists, dists[1:])), "decoded samples drift away from the digit as s grows")
check(dists[1] < d_prior, f"draws from q(z|a) decode closer to a's reconstruction than prior draws "
      f"({dists[1]:.2f} < {d_prior:.2f})")
print(f"lesson 12 done in {time.time() - t0:.1f} s; figures in {args.out}")
