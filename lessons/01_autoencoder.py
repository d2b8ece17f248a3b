"""Lesson 01 - The plain autoencoder, and why it is not a generative model.

Run:  python lessons/01_autoencoder.py [--quick] [--out DIR] [--seed N]

An autoencoder compresses x (784 pixels) to a short code c (here 8 numbers)
and expands it back:

    encoder   a1 = x W1 + b1,   h1 = relu(a1),   c = h1 W2 + b2           (c in R^8)
    decoder   a2 = c W3 + b3,   h2 = relu(a2),   l = h2 W4 + b4           (l: 784 logits)

and is trained to make the reconstruction sigmoid(l) match x.  We score a
reconstruction with the Bernoulli negative log-likelihood ("binary
cross-entropy") from logits, per image

    loss(x) = sum_d [ softplus(l_d) - x_d l_d ]   = -sum_d [x_d log p_d + (1-x_d) log(1-p_d)],  p = sigmoid(l),

with gradient d loss / d l = sigmoid(l) - x (lesson 08 derives it).  The
backward pass is the chain rule run in reverse through the same ops
(lessons 02-03):

    dl  = (sigmoid(l) - x) / N                  (mean over the batch)
    dh2, dW4, db4 = dense_backward(dl)
    da2 = dh2 * 1[a2 > 0]
    dc, dW3, db3  = dense_backward(da2)
    dh1, dW2, db2 = dense_backward(dc)
    da1 = dh1 * 1[a1 > 0]
    _,  dW1, db1  = dense_backward(da1)

The problem (the seeds' motivation for the VAE): nothing says where the codes
should live.  The training codes fill some irregular, arbitrarily scaled
region of R^8; to *generate* we would need to pick a new code, and there is
no distribution to pick it from.  Codes drawn from N(0, I), or uniformly from
the box around the training codes, mostly fall where no training code was,
and the decoder has never been told what to do there.  The VAE fixes this by
making the code a random variable with a prior p(z) = N(0, I) and training the
decoder on codes drawn from q(z|x) (lessons 04-08).
"""
# %%
import time
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

import minivae
from minivae.data import load_mnist
from minivae.layers import dense_backward, dense_forward, relu_backward, relu_forward, sigmoid
from minivae.likelihoods import bernoulli_nll_backward, bernoulli_nll_forward
from minivae.lessonkit import check, lesson_args


# --quick, --out DIR, --seed N (unknown arguments are ignored, so this also runs inside Jupyter)
args = lesson_args("lesson_output/01_autoencoder", "Lesson 01: the plain autoencoder",
                   quick_help="small subset, few steps (for tests)")
out = Path(args.out)
rng = np.random.default_rng(args.seed)
t0 = time.time()

# %% [markdown]
# ## 1. Data and parameters
#
# MNIST grey levels in [0, 1] serve directly as Bernoulli targets.  float32
# like all minivae training.  Init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

# %%
N_TRAIN, STEPS, BATCH = (3000, 300, 64) if args.quick else (20000, 1500, 64)
H, C = 256, 8
x_all, _ = load_mnist("train")
x_train = x_all[rng.permutation(len(x_all))[:N_TRAIN]]
x_test = load_mnist("test")[0][:500]


def layer(n_in, n_out):
    bound = 1 / np.sqrt(n_in)
    return (rng.uniform(-bound, bound, (n_in, n_out)).astype(np.float32),
            rng.uniform(-bound, bound, n_out).astype(np.float32))


params = {}
for name, (n_in, n_out) in {"enc1": (784, H), "enc2": (H, C), "dec1": (C, H), "dec2": (H, 784)}.items():
    params[f"{name}.W"], params[f"{name}.b"] = layer(n_in, n_out)


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
    dlogits = bernoulli_nll_backward(np.full(len(x), 1 / len(x), np.float32), c_nll)
    dh2, g["dec2.W"], g["dec2.b"] = dense_backward(dlogits, c6)
    dcode, g["dec1.W"], g["dec1.b"] = dense_backward(relu_backward(dh2, c5), c4)
    dh1, g["enc2.W"], g["enc2.b"] = dense_backward(dcode, c3)
    _, g["enc1.W"], g["enc1.b"] = dense_backward(relu_backward(dh1, c2), c1)
    return loss, g


# %% [markdown]
# ## 2. Gradient check of the hand-chained backward (float64)
#
# Before training, confirm the chain above on a float64 copy and 5 images.
# L is the mean BCE, a scalar.  Checking every entry would take ~800k loss
# evaluations, so we check 12 random entries of every parameter with central
# differences (h = 1e-5), as ``minivae.check_model(max_entries=...)`` does.

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
# ## 3. Train with minivae's Adam

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
# ## 4. Where do the codes live?  Decoding random codes
#
# Three ways to pick codes for 200 "new" images:
#   - the codes of held-out test images (reconstructions, the AE's job),
#   - z ~ N(0, I)  (what a VAE will do - but nothing made these codes Gaussian),
#   - uniform in the bounding box of the training codes.
# Two measurements:
#   (i)  distance from each code to the nearest training code (latent space);
#   (ii) self-consistency: a real digit is (nearly) a fixed point of the AE,
#        x ~ dec(enc(x)).  Re-encode each decoded image and measure
#        ||dec(enc(x')) - x'||^2 / ||x'||^2.  For decodes of codes the AE was
#        trained around, the round trip is nearly exact; for codes off the
#        data, the encoder has never seen images like the decoded x'.

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
ref = code_train[:2000]


def nearest_code_distance(c):
    d2 = (c * c).sum(1)[:, None] - 2 * c @ ref.T + (ref * ref).sum(1)[None]
    return np.sqrt(np.maximum(d2.min(1), 0))


def round_trip_error(img):
    back = sigmoid(decode_logits(encode(img)[0])[0])
    return ((back - img) ** 2).sum(1) / (img * img).sum(1)


images, stats = {}, {}
for name, c in codes.items():
    images[name] = sigmoid(decode_logits(c)[0])
    stats[name] = (np.median(nearest_code_distance(c)), np.median(round_trip_error(images[name])))
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
# Reading the numbers and the picture honestly: decodes of N(0, I) codes are
# faint smudges (that region of code space is simply not where this AE put
# its digits; another seed puts them elsewhere).  Box-uniform decodes are
# often digit-like - the decoder interpolates - but many are malformed, and
# the box is an arbitrary recipe, not a model: it assigns no probability to
# anything.  A generative model needs a known distribution over codes that
# the decoder is trained on; that is the VAE's prior p(z) plus the ELBO.

# %% [markdown]
# ## 5. Picture: test images, reconstructions, and decodes of random codes

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
fig.savefig(out / "autoencoder.png", dpi=100)
plt.close(fig)

print(f"figures written to {out}/  ({time.time() - t0:.1f} s)")
