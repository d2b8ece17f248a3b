"""Lesson 11 - A 2-D latent space.

With z_dim = 2 the whole latent space fits in one picture: we decode a grid of
z values (the "manifold of digits", Kingma & Welling 2014, Fig. 4), scatter the
encoder means coloured by label, use the means as features for a small
classifier and for k-means, and compare samples for latent sizes 2/5/10/20.

Run:  python lessons/11_latent_2d.py [--quick] [--out DIR] [--seed N]
"""
# %% [markdown]
# ## 1. Why a grid through the inverse normal CDF
#
# The prior is $p(z) = N(0, I)$.  A uniform grid in z would spend most cells in the tails where the prior has
# almost no mass.  Instead take equally spaced probabilities $u \in (0, 1)$ and map them through the inverse CDF
# $z = \Phi^{-1}(u)$: each cell of the grid then holds the same prior mass.
#
# $$\Phi(z) = \tfrac12\big(1 + \mathrm{erf}(z/\sqrt2)\big),\qquad \Phi^{-1}(u) = \text{the } z \text{ with } \Phi(z) = u.$$
#
# $\Phi$ is strictly increasing, so $\Phi^{-1}$ can be found by **bisection**: keep an interval $[lo, hi]$ with
# $\Phi(lo) < u < \Phi(hi)$ and halve it; 80 halvings of $[-40, 40]$ are far below double precision.
#
# ## 2. Latent means as features
#
# The encoder mean $\mu(x) \in \mathbb{R}^2$ is a 2-number summary of a 784-pixel image, learned without labels.
# We fit softmax regression $p(y=c|f) = \mathrm{softmax}(fW + b)_c$ by gradient descent on the cross-entropy
# $-\frac1N\sum_n \log p(y_n|f_n)$, whose gradient is $\frac1N F^\top(P - Y)$ (P the probabilities, Y one-hot),
# and run k-means (Lloyd's algorithm: assign each point to its nearest centre, move each centre to the mean of its
# points) with purity $= \frac1N\sum_{\text{clusters}} \max_c |\{n \in \text{cluster}: y_n = c\}|$.
#
# Note on the seeds: seed 002 says the encoder outputs "a zero-mean noise distribution q(z|x)", that zero mean
# makes z "uniformly distributed", and that p(z) is obtained by clipping the hidden activations.  All three are
# wrong: q(z|x) = N(mu(x), diag sigma^2(x)) has a mean that *depends on x* (the scatter below shows the means of
# different digits in different places; only the prior p(z) = N(0, I) is zero-mean, and it is fixed, not computed
# from the encoder); a zero mean says nothing about uniformity; and the same seed calls p(x|z) a "posterior", but
# it is the likelihood (the posterior is p(z|x), which q(z|x) approximates).

# %%
import math
import os
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import minivae  # noqa: E402
import minivae.data  # noqa: E402
from minivae.figures import tile  # noqa: E402
from minivae.lessonkit import check, fit, lesson_args  # noqa: E402


# %% the inverse normal CDF by bisection
def normal_cdf(z):
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def normal_ppf(u, iters=80):
    """Phi^{-1}(u) for 0 < u < 1 by bisection on Phi (monotone)."""
    if not 0.0 < u < 1.0:
        raise ValueError(f"u must be in (0, 1), got {u}")
    lo, hi = -40.0, 40.0
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if normal_cdf(mid) < u:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


# %% training (lessonkit.fit: the loop of lesson 10)
def train(cfg, x_train, n_steps, seed, snapshot_at=None):
    model = minivae.VAE(cfg, rng=np.random.default_rng(seed))
    snap = []                                             # the parameters after `snapshot_at` steps

    def keep(step, beta):
        if step == snapshot_at:
            snap.append(model.flat.copy())

    fit(model, x_train, n_steps, np.random.default_rng(seed + 100), batch_size=128, on_step=keep)
    return model, (snap[0] if snap else None)


def neg_elbo(model, x, seed=5):
    eps = np.random.default_rng(seed).standard_normal((1, len(x), model.config.z_dim))
    return float(model.loss(x, eps=eps, backward=False)[0])


# %% classifiers and k-means written with numpy
def softmax_regression(f_tr, y_tr, f_te, n_classes, iters, lr=0.5):
    """Full-batch gradient descent on the mean cross-entropy; returns test predictions."""
    m, s = f_tr.mean(0), f_tr.std(0) + 1e-6                   # standardize with training statistics
    A, B = (f_tr - m) / s, (f_te - m) / s
    W = np.zeros((A.shape[1], n_classes))
    b = np.zeros(n_classes)
    Y = np.eye(n_classes)[y_tr]
    for _ in range(iters):
        logits = A @ W + b
        logits -= logits.max(1, keepdims=True)
        P = np.exp(logits)
        P /= P.sum(1, keepdims=True)
        G = (P - Y) / len(A)                                   # d(mean CE)/d logits
        W -= lr * (A.T @ G)
        b -= lr * G.sum(0)
    return np.argmax(B @ W + b, axis=1)


def kmeans(f, k, rng, iters=50):
    centres = f[rng.choice(len(f), k, replace=False)]
    for _ in range(iters):
        d = ((f[:, None, :] - centres[None]) ** 2).sum(-1)
        assign = d.argmin(1)
        new = np.array([f[assign == j].mean(0) if np.any(assign == j) else centres[j] for j in range(k)])
        if np.allclose(new, centres):
            break
        centres = new
    return assign


def purity(assign, y):
    return sum(np.bincount(y[assign == j]).max() for j in np.unique(assign)) / len(y)


def main(argv=None):
    args = lesson_args("lesson_output/11_latent_2d", __doc__.splitlines()[0], argv,
                       quick_help="few steps on a subset (for tests)")
    t0 = time.time()
    rng = np.random.default_rng(args.seed)
    paths = []

    # %% 3. numerical check of the inverse CDF
    for u, ref in [(0.975, 1.959963984540054), (0.5, 0.0), (0.01, -2.3263478740408408)]:
        assert abs(normal_ppf(u) - ref) < 1e-9, (u, normal_ppf(u), ref)
    us = np.linspace(0.001, 0.999, 101)
    roundtrip = max(abs(normal_cdf(normal_ppf(u)) - u) for u in us)
    check(roundtrip < 1e-12, f"Phi(Phi^-1(u)) = u to {roundtrip:.0e}, and Phi^-1(0.975) = 1.95996")

    # %% data
    x_train, y_train = minivae.data.load_mnist("train")
    x_test, y_test = minivae.data.load_mnist("test")
    if args.quick:
        sub = rng.permutation(len(x_train))[:8000]
        x_train, y_train = x_train[sub], y_train[sub]
        n_main, n_sweep, hidden, n_feat, lr_iters = 300, 80, (128,), 1500, 150
    else:
        n_main, n_sweep, hidden, n_feat, lr_iters = 1400, 350, (256,), 3000, 300
    x_test_bin = minivae.data.static_binarize(x_test[:2000], seed=1234)
    y_te = y_test[:2000]
    x_feat_bin = minivae.data.static_binarize(x_train[:n_feat], seed=4321)
    y_tr = y_train[:n_feat]

    # %% train the 2-D model (keep a snapshot for the latent-size comparison)
    cfg2 = minivae.VAEConfig(hidden=hidden, z_dim=2)
    t = time.time()
    model, snap2 = train(cfg2, x_train, n_main, args.seed, snapshot_at=n_sweep)
    print(f"trained 784-{hidden[0]}-2 for {n_main} steps in {time.time() - t:.1f} s; "
          f"test -ELBO {neg_elbo(model, x_test_bin):.1f} nats")

    # %% the manifold of digits
    n = 15 if args.quick else 20
    zs = [normal_ppf(u) for u in np.linspace(0.5 / n, 1 - 0.5 / n, n)]
    Z = np.array([[zx, zy] for zy in zs[::-1] for zx in zs])    # rows: z2 from top (high) to bottom
    manifold = minivae.to_numpy(model.decode(Z))
    fig, ax = plt.subplots(figsize=(7, 7))
    ax.imshow(tile(manifold, n), cmap="gray_r")
    ax.set_title(f"decoded grid z = Phi^-1(u), u in ({0.5 / n:.3f}, {1 - 0.5 / n:.3f})")
    ax.axis("off")
    paths.append(os.path.join(args.out, "manifold.png"))
    fig.savefig(paths[-1], dpi=100, bbox_inches="tight")
    plt.close(fig)
    spread = float(manifold.std(axis=0).mean())
    check(spread > 0.05, f"the decoded grid is not one repeated image (mean pixel std {spread:.3f})")

    # %% scatter of latent means
    mu_te = minivae.to_numpy(model.encode(x_test_bin)[0]).astype(np.float64)
    mu_tr = minivae.to_numpy(model.encode(x_feat_bin)[0]).astype(np.float64)
    class_means = np.array([mu_te[y_te == c].mean(0) for c in range(10)])
    sep = float(np.linalg.norm(class_means - class_means.mean(0), axis=1).mean())
    check(sep > 0.3, f"q(z|x) is not zero-mean: the mean of mu(x) differs by digit (average distance of the "
          f"class centres from their centre {sep:.2f} > 0.3; seed 002 is wrong)")
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    sc = ax.scatter(mu_te[:, 0], mu_te[:, 1], c=y_te, cmap="tab10", s=4)
    fig.colorbar(sc, ax=ax, ticks=range(10), label="digit")
    ax.set_xlabel("mu_1(x)")
    ax.set_ylabel("mu_2(x)")
    ax.set_title("encoder means of 2000 test digits")
    paths.append(os.path.join(args.out, "latent_means.png"))
    fig.savefig(paths[-1], dpi=100, bbox_inches="tight")
    plt.close(fig)

    # %% classifiers: latent means vs raw pixels
    sel_tr, sel_te = np.isin(y_tr, (0, 1)), np.isin(y_te, (0, 1))
    acc01 = np.mean(softmax_regression(mu_tr[sel_tr], y_tr[sel_tr], mu_te[sel_te], 2, lr_iters) == y_te[sel_te])
    acc10 = np.mean(softmax_regression(mu_tr, y_tr, mu_te, 10, lr_iters) == y_te)
    acc10_px = np.mean(softmax_regression(x_feat_bin.astype(np.float64), y_tr, x_test_bin.astype(np.float64),
                                          10, lr_iters, lr=0.1) == y_te)
    acc01_px = np.mean(softmax_regression(x_feat_bin[sel_tr].astype(np.float64), y_tr[sel_tr],
                                          x_test_bin[sel_te].astype(np.float64), 2, lr_iters, lr=0.1)
                       == y_te[sel_te])
    assign = kmeans(mu_te, 10, np.random.default_rng(args.seed))
    pur = purity(assign, y_te)
    pur_rand = purity(np.random.default_rng(1).integers(0, 10, len(y_te)), y_te)
    print(f"{'features':<22}{'0 vs 1':>8}{'10 digits':>11}")
    print(f"{'2-D latent means':<22}{acc01:>8.3f}{acc10:>11.3f}")
    print(f"{'784 raw pixels':<22}{acc01_px:>8.3f}{acc10_px:>11.3f}")
    print(f"k-means (k=10) on 2-D means: purity {pur:.3f} (random assignment: {pur_rand:.3f})")
    check(acc01 > 0.95, f"0 vs 1 from the 2-D latent means: accuracy {acc01:.3f} > 0.95")
    check(acc10 > 0.3, f"10 digits from 2 numbers per image: accuracy {acc10:.3f} > 0.3 (chance 0.1)")
    check(acc10_px > acc10, f"784 raw pixels still classify better ({acc10_px:.3f} > {acc10:.3f}): "
          "2 unsupervised numbers lose information")
    check(pur > pur_rand + 0.1, f"k-means clusters of latent means follow the digit labels "
          f"(purity {pur:.3f} vs {pur_rand:.3f} for random clusters)")

    # %% latent size 2 / 5 / 10 / 20 (same number of steps each)
    sizes = (2, 5, 10, 20)
    results = {}
    fig, axes = plt.subplots(1, 4, figsize=(14, 4))
    for ax, L in zip(axes, sizes):
        if L == 2:
            m = minivae.VAE(cfg2, rng=np.random.default_rng(args.seed))
            m.flat[...] = snap2
        else:
            m, _ = train(minivae.VAEConfig(hidden=hidden, z_dim=L), x_train, n_sweep, args.seed)
        results[L] = neg_elbo(m, x_test_bin)
        ax.imshow(tile(minivae.to_numpy(m.sample(64, rng=np.random.default_rng(args.seed + 3))), 8),
                  cmap="gray_r")
        ax.set_title(f"z_dim = {L}: test -ELBO {results[L]:.1f}", fontsize=10)
        ax.axis("off")
    fig.suptitle(f"samples from the prior after {n_sweep} steps each")
    paths.append(os.path.join(args.out, "latent_sizes.png"))
    fig.savefig(paths[-1], dpi=90, bbox_inches="tight")
    plt.close(fig)
    for L in sizes:
        print(f"z_dim {L:>2}: test -ELBO {results[L]:.1f} nats after {n_sweep} steps")
    # Not asserted: after a few hundred steps the ranking by -ELBO can go either way (more latent dimensions
    # cost more KL before the decoder learns to use them); with long training Kingma & Welling (2014, Fig. 2)
    # find the bound improves with latent size.  What is robust is visible in the picture: 2-D samples are
    # blurry "average" digits, larger latents give more varied and sharper strokes.

    for p_ in paths:
        print(f"wrote {p_}")
    print(f"lesson 11 done in {time.time() - t0:.1f} s; figures in {args.out}")


if __name__ == "__main__":
    main()
