# %% [markdown]
# # Lesson 10 — Training a VAE on MNIST
#
# A 784-400-20 VAE with ReLU units and a Bernoulli decoder from logits, trained with Adam (learning rate
# $10^{-3}$) on minibatches of 128: the recipe of the PyTorch examples' VAE, plus dynamic binarization.  It is
# *not* Kingma & Welling's (2014) original setup, which used 500 tanh hidden units, Adagrad and minibatches of
# 100.  The training loop is written out here in a few lines; later lessons call it as `minivae.lessonkit.fit`.
# You will see the loss curves, reconstructions and samples from the prior.
#
# **Run** `python lessons/10_training_mnist.py [--out DIR] [--seed N]`, or open it as a notebook
# (jupytext); the lesson trains 2 epochs on the 60k training images;
# `--quick` (or `MINIVAE_QUICK=1` in a kernel), the tests' mode, trains 120 steps on a 6k subset.  **Exercise** `adam_step`.

# %%
import time

import matplotlib.pyplot as plt
import numpy as np

import minivae
import minivae.data
from minivae.figures import tile
from minivae.lessonkit import check, lesson_args, save_figure

args = lesson_args("lesson_output/10_training_mnist", "Lesson 10: training a VAE on MNIST",
                   quick_help="few steps on a subset (for tests)")
t0 = time.time()
rng = np.random.default_rng(args.seed)

# %% [markdown]
# ## 1. The objective
#
# For one image $x$, with $q(z|x) = \mathcal N\big(\mu(x), \mathrm{diag}\,\sigma^2(x)\big)$ and
# $p(z) = \mathcal N(0, I)$,
#
# $$\log p(x) = \log \int p(x|z)\,p(z)\,dz = \log \mathbb{E}_{q}\Big[\frac{p(x|z)\,p(z)}{q(z|x)}\Big]
#   \ge \mathbb{E}_q\Big[\log\frac{p(x|z)\,p(z)}{q(z|x)}\Big]   \quad\text{(Jensen)}$$
# $$= \mathbb{E}_q[\log p(x|z)] - \mathrm{KL}\big(q(z|x)\,\|\,p(z)\big) =: \mathrm{ELBO}(x).$$
#
# We minimize the mean negative ELBO over a minibatch, in nats per image:
#
# $$\mathcal{J} = \underbrace{\frac1N\sum_n -\log p(x_n|z_n)}_{\text{recon}} +
#                 \underbrace{\frac1N\sum_n \mathrm{KL}_n}_{\text{KL}},\qquad z_n = \mu_n + \sigma_n\odot\varepsilon_n.$$
#
# With a Bernoulli decoder of logits $o = f(z)$: $-\log p(x|z) = \sum_d \big[\mathrm{softplus}(o_d) - x_d o_d\big]$.
#
# **Dynamic binarization.**  MNIST pixels are grey levels in $[0, 1]$.  Each time a minibatch is drawn, every
# pixel is resampled as $x_d \sim \mathrm{Bernoulli}(\text{pixel}_d)$, so the model sees binary data and cannot
# overfit one fixed binarization.  The test set is binarized once, with a fixed seed.

# %%
x_train, _ = minivae.data.load_mnist("train")
x_test, _ = minivae.data.load_mnist("test")
if args.quick:
    x_train = x_train[rng.permutation(len(x_train))[:6000]]
    x_test = x_test[:500]
    n_steps, eval_every = 120, 40
else:
    n_steps, eval_every = 2 * int(np.ceil(len(x_train) / 128)), 94   # 2 epochs
x_test_bin = minivae.data.static_binarize(x_test, seed=1234)        # fixed, once
x_eval = x_test_bin[:2000]                                          # tracked during training
print(f"{len(x_train)} training images, {len(x_test_bin)} test images, {n_steps} steps")

# %% [markdown]
# ## 2. The model, and what an untrained model scores
#
# A freshly initialised model has logits near 0, i.e. $p = \tfrac12$ per pixel, so its reconstruction term is
# about $784 \log 2 \approx 543$ nats, and its KL is small: the initial test $-$ELBO is about 545 nats.  The test
# $-$ELBO below uses a fixed $\varepsilon$, so numbers at different steps are comparable.

# %%
def test_neg_elbo(model, x_test, seed=123, batch=1000):
    """Mean -ELBO and its parts (recon, KL) over a fixed test set, with a fixed eps."""
    erng = np.random.default_rng(seed)
    tot = np.zeros(3)
    for i in range(0, len(x_test), batch):
        xb = x_test[i:i + batch]
        model.loss(xb, eps=erng.standard_normal((1, len(xb), model.config.z_dim)), backward=False)
        tot += len(xb) * np.array([float(model.parts[k]) for k in ("loss", "recon", "kl")])
    return tot / len(x_test)


cfg = minivae.VAEConfig(x_dim=784, hidden=(400,), z_dim=20, activation="relu", likelihood="bernoulli")
model = minivae.VAE(cfg, rng=np.random.default_rng(args.seed))
opt = minivae.Adam(lr=1e-3)
print(model)
init = test_neg_elbo(model, x_test_bin)
print(f"initial test -ELBO {init[0]:.1f} nats  (784 log 2 = {784 * np.log(2):.1f})")

# %% [markdown]
# ## 3. The training loop, in full
#
# Shuffle, slice a minibatch, binarize it, loss and gradients, Adam step.  That is all.  We also record
# $|\text{recon} + \text{KL} - \text{loss}|$ at every step: with $\beta = 1$ the loss *is* the sum of the two.

# %%
hist = {"step": [], "loss": [], "recon": [], "kl": []}
test_hist = [(0, init[0])]
max_gap = 0.0
step, batch = 0, 128
t_train = time.time()
while step < n_steps:
    for idx in minivae.data.minibatches(len(x_train), batch, rng):
        xb = minivae.data.binarize(x_train[idx], rng)          # dynamic binarization
        loss, grads = model.loss(xb)
        opt.step(model.params, grads)
        step += 1
        parts = {k: float(v) for k, v in model.parts.items()}
        max_gap = max(max_gap, abs(parts["recon"] + parts["kl"] - parts["loss"]))
        hist["step"].append(step)
        for k in ("loss", "recon", "kl"):
            hist[k].append(parts[k])
        if step % eval_every == 0 or step == n_steps:
            test_hist.append((step, test_neg_elbo(model, x_eval)[0]))
            print(f"step {step:5d}  train -ELBO {parts['loss']:7.2f} (recon {parts['recon']:6.2f} + "
                  f"KL {parts['kl']:5.2f})  test -ELBO {test_hist[-1][1]:7.2f}")
        if step >= n_steps:
            break
train_time = time.time() - t_train
print(f"trained {n_steps} steps in {train_time:.1f} s ({1000 * train_time / n_steps:.1f} ms/step)")

# %% [markdown]
# ## 4. Checks
#
# (a) The loss really is recon + KL at every step ($\beta = 1$), up to float32 rounding.
# (b) The untrained model scored about $784 \log 2$ nats, and the test $-$ELBO has fallen far below it.
# (c) The encoder uses its code: the test KL is well above 0.

# %%
final = test_neg_elbo(model, x_test_bin)
print(f"final test -ELBO on {len(x_test_bin)} images: {final[0]:.2f} nats "
      f"(recon {final[1]:.2f} + KL {final[2]:.2f})")
check(max_gap < 1e-3, f"train loss = recon + KL at every step (max |gap| {max_gap:.1e} nats)")
check(abs(final[1] + final[2] - final[0]) < 1e-3, "test -ELBO = recon + KL")
check(500 < init[0] < 600, f"the untrained model scores ~784 log 2 nats ({init[0]:.1f})")
threshold = 230.0 if args.quick else 130.0
check(final[0] < threshold, f"test -ELBO fell below {threshold:.0f} nats ({final[0]:.1f})")
check(final[0] < 0.4 * init[0], f"test -ELBO is less than 40% of its initial value "
      f"({final[0]:.1f} vs {init[0]:.1f})")
check(final[2] > 1.0, f"the encoder uses its latent code: test KL {final[2]:.1f} nats > 1")

# %% [markdown]
# ## 5. Pictures: the loss curves, reconstructions, and samples from the prior
#
# The reconstruction shown is the decoder's mean $\sigma\big(f(\mu(x))\big)$.  A sample from the model is
# $z \sim \mathcal N(0, I)$, shown as $\mathbb{E}[x|z]$.

# %%
fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
k = max(1, n_steps // 100)
smooth = lambda v: np.convolve(v, np.ones(k) / k, mode="valid")  # noqa: E731
ax[0].plot(smooth(np.array(hist["loss"])), label="train -ELBO (smoothed)")
ax[0].plot(*zip(*test_hist), "o-", label="test -ELBO")
ax[0].set_ylim(min(hist["loss"]) - 10, min(300, init[0] + 10))
ax[0].set_xlabel("step")
ax[0].set_ylabel("nats per image")
ax[0].legend()
ax[1].plot(smooth(np.array(hist["recon"])), label="recon")
ax[1].plot(smooth(np.array(hist["kl"])), label="KL")
ax[1].set_yscale("log")
ax[1].set_xlabel("step")
ax[1].legend()
ax[1].set_title("the two terms (train)")
fig.tight_layout()
save_figure(fig, args.out, "loss_curves.png")

# %%
xs = x_test_bin[:16]
rec = minivae.to_numpy(model.reconstruct(xs))
fig, ax = plt.subplots(figsize=(8, 1.4))
ax.imshow(tile(np.concatenate([xs, rec]), len(xs)), cmap="gray_r")
ax.set_title("top: binarized test digits; bottom: mean reconstructions sigmoid(f(mu(x)))", fontsize=9)
ax.axis("off")
save_figure(fig, args.out, "reconstructions.png")

# %%
samples = minivae.to_numpy(model.sample(64, rng=np.random.default_rng(args.seed + 7)))
fig, ax = plt.subplots(figsize=(5, 5))
ax.imshow(tile(samples, 8), cmap="gray_r")
ax.set_title("64 samples: z ~ N(0, I), shown E[x|z]")
ax.axis("off")
save_figure(fig, args.out, "samples.png")
check(float(samples.std(axis=0).mean()) > 0.05, "samples from the prior differ from each other")
print(f"lesson 10 done in {time.time() - t0:.1f} s; figures in {args.out}")
