# %% [markdown]
# # Lesson 01: the plain autoencoder, and why it is not a generative model
#
# An autoencoder compresses an image $x$ (784 pixels) to a short code $c$ (here 8 numbers) and expands it back.
# This lesson builds one from minivae's dense and ReLU ops, chains its backward pass by hand, checks it against
# finite differences, trains it, and then shows what it lacks: its codes follow no known distribution, so there is
# nothing to draw a *new* code from.  That is the gap the VAE fills (lessons 04-08).
#
# Run it as a script, `python lessons/01_autoencoder.py [--out DIR] [--seed N]`, or open it as a notebook
# (jupytext or VS Code; `MINIVAE_QUICK=1` in the kernel's environment selects the tests' quick mode).
#
# ## The model and its loss
#
# Encoder and decoder, with rows of the batch as examples:
#
# $$a_1 = x W_1 + b_1,\quad h_1 = \mathrm{relu}(a_1),\quad c = h_1 W_2 + b_2 \qquad (c \in \mathbb{R}^8)$$
#
# $$a_2 = c W_3 + b_3,\quad h_2 = \mathrm{relu}(a_2),\quad \ell = h_2 W_4 + b_4
#   \qquad (\ell \in \mathbb{R}^{784}\text{, logits})$$
#
# The reconstruction is $p = \sigma(\ell)$.  We score it with the Bernoulli negative log-likelihood ("binary
# cross-entropy") from logits, per image:
#
# $$\mathrm{loss}(x) = \sum_d \big[\mathrm{softplus}(\ell_d) - x_d \ell_d\big]
#   = -\sum_d \big[x_d \log p_d + (1 - x_d) \log(1 - p_d)\big],$$
#
# whose gradient is $\partial\,\mathrm{loss} / \partial \ell = \sigma(\ell) - x$ (lesson 08 derives it).

# %%
import time

import matplotlib.pyplot as plt
import numpy as np

import minivae
from minivae.data import load_mnist
from minivae.layers import dense_backward, dense_forward, relu_backward, relu_forward, sigmoid
from minivae.lessonkit import check, lesson_args, save_figure
from minivae.likelihoods import bernoulli_nll_backward, bernoulli_nll_forward

# --quick (or MINIVAE_QUICK=1), --out DIR, --seed N; unknown arguments (a Jupyter kernel's) are ignored
args = lesson_args("lesson_output/01_autoencoder", "Lesson 01: the plain autoencoder",
                   quick_help="small subset, few steps (for tests)")
rng = np.random.default_rng(args.seed)
t0 = time.time()

# %% [markdown]
# ## 1. Data and parameters
#
# MNIST grey levels in $[0, 1]$ serve directly as Bernoulli targets, in float32 like all minivae training.
# Each layer is initialised uniformly, $W, b \sim \mathcal{U}\big(-1/\sqrt{n_\text{in}},\, 1/\sqrt{n_\text{in}}\big)$.

# %%
N_TRAIN, STEPS, BATCH = (3000, 300, 64) if args.quick else (20000, 1500, 64)
H, C = 256, 8
x_all, _ = load_mnist("train")
x_train = x_all[rng.permutation(len(x_all))[:N_TRAIN]]
x_test = load_mnist("test")[0][:500]

params = {}
for name, (n_in, n_out) in {"enc1": (784, H), "enc2": (H, C), "dec1": (C, H), "dec2": (H, 784)}.items():
    bound = 1 / np.sqrt(n_in)
    params[f"{name}.W"] = rng.uniform(-bound, bound, (n_in, n_out)).astype(np.float32)
    params[f"{name}.b"] = rng.uniform(-bound, bound, n_out).astype(np.float32)

# %% [markdown]
# ## 2. Forward and the hand-chained backward
#
# The backward pass is the chain rule run in reverse through the same ops (lessons 02-03).  With the loss averaged
# over a batch of $N$ images, and $G_y$ standing for $\partial L / \partial y$:
#
# $$G_\ell = \frac{\sigma(\ell) - x}{N}$$
#
# $$G_{h_2} = G_\ell W_4^\top,\quad G_{W_4} = h_2^\top G_\ell,\quad G_{b_4} = \textstyle\sum_n G_\ell
#   \qquad\text{(dense\_backward)}$$
#
# $$G_{a_2} = G_{h_2} \odot \mathbb{1}[a_2 > 0] \qquad\text{(relu\_backward)}$$
#
# and the same two steps again for $(W_3, b_3)$, $(W_2, b_2)$ and $(W_1, b_1)$.  Each line of
# `loss_and_grads` below is one of these steps.

# %%
def encode(x):
    a1, c1 = dense_forward(x, params["enc1.W"], params["enc1.b"])
    h1, c2 = relu_forward(a1)
    code, c3 = dense_forward(h1, params["enc2.W"], params["enc2.b"])
    return code, (c1, c2, c3)


def decode_logits(code):
    a2, c4 = dense_forward(code, params["dec1.W"], params["dec1.b"])
    h2, c5 = relu_forward(a2)
    logits, c6 = dense_forward(h2, params["dec2.W"], params["dec2.b"])
    return logits, (c4, c5, c6)


def loss_and_grads(x, backward=True):
    """Mean BCE (nats per image) and the hand-chained gradients."""
    code, (c1, c2, c3) = encode(x)
    logits, (c4, c5, c6) = decode_logits(code)
    nll, c_nll = bernoulli_nll_forward(logits, x)
    loss = nll.mean()
    if not backward:
        return loss, None
    g = {}
    dlogits = bernoulli_nll_backward(np.full(len(x), 1 / len(x), np.float32), c_nll)   # (sigmoid(l) - x) / N
    dh2, g["dec2.W"], g["dec2.b"] = dense_backward(dlogits, c6)
    dcode, g["dec1.W"], g["dec1.b"] = dense_backward(relu_backward(dh2, c5), c4)
    dh1, g["enc2.W"], g["enc2.b"] = dense_backward(dcode, c3)
    _, g["enc1.W"], g["enc1.b"] = dense_backward(relu_backward(dh1, c2), c1)
    return loss, g


# %% [markdown]
# ## 3. Gradient check of the hand-chained backward (float64)
#
# Before training, confirm the chain above on a float64 copy of the parameters and 5 images.  $L$ is the mean BCE, a
# scalar.  Checking every entry would take about 800k loss evaluations, so we check 12 random entries of every
# parameter with central differences,
#
# $$\frac{\partial L}{\partial \theta_i} \approx \frac{L(\theta + h e_i) - L(\theta - h e_i)}{2h}, \qquad h = 10^{-5},$$
#
# as `minivae.check_model(max_entries=...)` does.

# %%
saved = {k: v.copy() for k, v in params.items()}
params = {k: v.astype(np.float64) for k, v in params.items()}
xb64 = x_train[:5].astype(np.float64)
_, g64 = loss_and_grads(xb64)
worst = 0.0
for k, p in params.items():
    flat = p.reshape(-1)
    idx = rng.choice(flat.size, size=min(12, flat.size), replace=False)
    num = np.empty(len(idx))
    for j, i in enumerate(idx):
        old = flat[i]
        flat[i] = old + 1e-5
        fp = loss_and_grads(xb64, backward=False)[0]
        flat[i] = old - 1e-5
        fm = loss_and_grads(xb64, backward=False)[0]
        flat[i] = old
        num[j] = (fp - fm) / 2e-5
    worst = max(worst, minivae.rel_error(g64[k].reshape(-1)[idx], num))
params = saved
check(worst < 1e-6, f"the hand-chained autoencoder backward matches finite differences (rel error {worst:.1e})")

# %% [markdown]
# ## 4. Train with minivae's Adam

# %%
opt = minivae.Adam(lr=1e-3)
init_loss = float(loss_and_grads(x_test, backward=False)[0])
history = []
for step in range(STEPS):
    xb = x_train[rng.integers(0, N_TRAIN, BATCH)]
    loss, grads = loss_and_grads(xb)
    opt.step(params, grads)
    history.append(float(loss))
final_loss = float(loss_and_grads(x_test, backward=False)[0])
print(f"  test BCE: {init_loss:.1f} nats/image at init -> {final_loss:.1f} after {STEPS} steps")
check(final_loss < 0.4 * init_loss, "training cuts the test reconstruction loss to < 40% of its initial value")

# %% [markdown]
# ## 5. Where do the codes live?  Decoding random codes
#
# Nothing in the autoencoder says where the codes should live.  The training codes fill some irregular, arbitrarily
# scaled region of $\mathbb{R}^8$; to *generate* we would need to pick a new code, and there is no distribution to
# pick it from.  Three ways to pick codes for 200 "new" images:
#
# - the codes of held-out test images (reconstructions, the autoencoder's job);
# - $c \sim \mathcal{N}(0, I)$, what a VAE will do, although nothing made these codes Gaussian;
# - uniform in the bounding box of the training codes.
#
# Two measurements:
#
# 1. the distance from each code to the nearest training code (in code space);
# 2. self-consistency.  A real digit is nearly a fixed point of the autoencoder,
#    $x \approx \mathrm{dec}(\mathrm{enc}(x))$.  Re-encode each decoded image $x'$ and measure the round-trip error
#    $\lVert \mathrm{dec}(\mathrm{enc}(x')) - x' \rVert^2 / \lVert x' \rVert^2$.  For decodes of codes the autoencoder
#    was trained around, the round trip is nearly exact; for codes off the data, the encoder has never seen images
#    like the decoded $x'$.

# %%
def nearest_code_distance(c, ref):
    d2 = (c * c).sum(1)[:, None] - 2 * c @ ref.T + (ref * ref).sum(1)[None]
    return np.sqrt(np.maximum(d2.min(1), 0))


def round_trip_error(img):
    back = sigmoid(decode_logits(encode(img)[0])[0])
    return ((back - img) ** 2).sum(1) / (img * img).sum(1)


# %%
n = 200
code_train = encode(x_train)[0]
mean_c, std_c = code_train.mean(0), code_train.std(0)
print(f"  training codes: per-dim mean {np.round(mean_c, 1)}")
print(f"                  per-dim sd   {np.round(std_c, 1)}")
codes = {
    "test-image codes": encode(x_test[:n])[0],
    "z ~ N(0, I)": rng.standard_normal((n, C)).astype(np.float32),
    "uniform in code box": rng.uniform(code_train.min(0), code_train.max(0), (n, C)).astype(np.float32),
}
images, stats = {}, {}
for name, c in codes.items():
    images[name] = sigmoid(decode_logits(c)[0])
    stats[name] = (np.median(nearest_code_distance(c, code_train[:2000])), np.median(round_trip_error(images[name])))
print("  codes                   median dist to nearest train code   median round-trip error")
for name, (dist, rt) in stats.items():
    print(f"  {name:22s}  {dist:10.2f}                          {rt:.3f}")
far_from_prior = np.abs(mean_c).max() > 1 or np.abs(np.log(std_c)).max() > np.log(2)
check(far_from_prior, "the AE's codes are not N(0,I): some dimension has |mean| > 1 or sd off by > 2x")
base_d, base_rt = stats["test-image codes"]
check(stats["uniform in code box"][0] > 2 * base_d,
      "box-uniform codes lie > 2x farther from any training code than test-image codes do")
check(stats["z ~ N(0, I)"][1] > 4 * base_rt and stats["uniform in code box"][1] > 2 * base_rt,
      "decodes of random codes are not AE fixed points: round-trip error > 4x (N(0,I)) and > 2x (box) "
      "that of reconstructions")

# %% [markdown]
# Reading the numbers and the picture below honestly: decodes of $\mathcal{N}(0, I)$ codes are faint smudges (that
# region of code space is simply not where this autoencoder put its digits; another run puts them elsewhere).
# Box-uniform decodes are often digit-like, since the decoder interpolates, but many are malformed, and the box is an
# arbitrary recipe, not a model: it assigns no probability to anything.  A generative model needs a known
# distribution over codes that the decoder is trained on.  The VAE makes the code a random variable with a prior
# $p(z) = \mathcal{N}(0, I)$ and trains the decoder on codes drawn from $q(z \mid x)$ (lessons 04-08).
#
# ## 6. Picture: test images, reconstructions, and decodes of random codes

# %%
rows = [("test images", x_test[:12]), ("reconstructions", images["test-image codes"][:12]),
        ("decode z ~ N(0, I)", images["z ~ N(0, I)"][:12]),
        ("decode box-uniform code", images["uniform in code box"][:12])]
fig, axes = plt.subplots(len(rows) + 1, 1, figsize=(10, 8.5),
                         gridspec_kw={"height_ratios": [1] * len(rows) + [1.6]})
for ax, (title, imgs) in zip(axes, rows):
    ax.imshow(np.hstack([im.reshape(28, 28) for im in imgs]), cmap="gray", vmin=0, vmax=1)
    ax.set_title(title, fontsize=10)
    ax.axis("off")
axes[-1].plot(history, lw=0.8)
axes[-1].set_xlabel("step")
axes[-1].set_ylabel("train BCE (nats/image)")
fig.tight_layout()
save_figure(fig, args.out, "autoencoder.png")
print(f"done in {time.time() - t0:.1f} s")
