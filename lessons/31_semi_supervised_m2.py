# %% [markdown]
# # Lesson 31 - Discrete latents: semi-supervised M2.
#
# Kingma, Rezende, Mohamed & Welling (2014) gave the VAE a discrete latent y, the digit's class, observed for a few
# digits and unobserved for the rest: one model is then a generator of digits and a classifier q(y|x) trained on
# both.  We write its two bounds, derive their backward passes by hand (`minivae/m2.py`, `train --labels N`),
# check them against central differences, compare two estimators of the gradient through a *sampled* y (the
# Gumbel-softmax relaxation and the score function) by their variance, and train it on 100 labelled digits.
#
# Run:  python lessons/31_semi_supervised_m2.py [--quick] [--out DIR] [--seed N]

# %% [markdown]
# ## 1. Two bounds
#
# $p(y) = 1/K$, $p(z) = \mathcal N(0, I)$, $p(x|y, z)$ Bernoulli; $q(y|x) = \mathrm{softmax}(a(x))$,
# $q(z|x, y) = \mathcal N(\mu(x, y), e^{l(x, y)})$.  For a labelled digit,
#
# $$\mathcal L(x, y) = \mathbb E_{q(z|x,y)}[-\log p(x|y, z)] + \mathrm{KL}(q(z|x,y)\,\|\,p(z)) + \log K
#   \;\ge\; -\log p(x, y),$$
#
# and for an unlabelled one y is summed out under q (K terms, no sampling):
#
# $$\mathcal U(x) = \sum_y q(y|x)\,\big(\mathcal L(x, y) + \log q(y|x)\big) \;\ge\; -\log p(x).$$
#
# The objective per data point adds the classifier's cross-entropy on the labelled digits with weight
# $\alpha$ (the paper's $\alpha = 0.1 N$ on a sum over N digits is $\alpha = 0.1$ per data point).
#
# ## 2. The backward of the enumeration
#
# With $G = \partial J/\partial\mathcal U$ and $\log q$ from a log-softmax:
#
# $$\frac{\partial J}{\partial\mathcal L_k} = G\,q_k,\qquad
#   \frac{\partial J}{\partial\log q_k} = G\,q_k(\mathcal L_k + \log q_k + 1),\qquad
#   \frac{\partial J}{\partial a_j} = g_j - q_j\textstyle\sum_k g_k .$$
#
# Each class's bound is back-propagated with weight $q_k$; the label reaches each network's first layer as
# $h W + \mathrm{onehot}(y) V + b$, so $\partial V = Y^\top G$ and the K classes share one $h W$.

# %%
import numpy as np
import matplotlib.pyplot as plt

import minivae
from minivae.data import binarize, load_mnist, minibatches, static_binarize
from minivae.evaluate import iw_log_likelihood
from minivae.figures import tile
from minivae.lessonkit import check, lesson_args, save_figure
from minivae.m2 import M2Config, M2VAE, choose_labelled, gumbel_noise, pick_nll_backward, pick_nll_forward

args = lesson_args("lesson_output/31_semi_supervised_m2", "Lesson 31: semi-supervised M2")
rng = np.random.default_rng(args.seed)

# %%
tiny = M2VAE(M2Config(x_dim=7, hidden=(6,), z_dim=3, classes=4, activation="tanh", dtype="float64"), rng=0)
xt = (rng.random((5, 7)) < 0.5).astype(np.float64)
for y, what in ((np.array([0, 3, 1, 2, 2]), "labelled digits"), (None, "unlabelled digits (U enumerates y)"),
                (np.array([1, -1, -1, 3, -1]), "a mixed batch")):
    rep = minivae.check_model(tiny, xt, n_samples=2, loss_kwargs={"y": y, "alpha": 0.5}, rng=rng, tol=1.0)
    check(max(rep.values()) <= 1e-7, f"{what}: every parameter's gradient matches central differences "
          f"({len(rep)} arrays, worst {max(rep.values()):.1e})")

# %% [markdown]
# ## 3. A sampled y: Gumbel-softmax against the score function
#
# Summing over K classes costs K decoder passes.  With one draw of y per digit instead, the gradient of
# $\mathcal U = \mathbb E_{q(y|x)}[f(y)]$, $f(y) = \mathcal L(x, y) + \log q(y|x)$, with respect to the logits a
# has two estimators:
#
# * the score function (REINFORCE; Williams 1992): $y \sim q$, $\hat g = f(y)\,(\mathrm{onehot}(y) - q)$,
#   unbiased because $\mathbb E_q[\nabla\log q(y)] = 0$;
# * the Gumbel-softmax relaxation (Jang et al. 2017; Maddison et al. 2017): $\tilde y = \mathrm{softmax}((a + g)/\tau)$,
#   $g$ Gumbel noise, fed to the networks in place of the one-hot, and differentiated through:
#   $\partial a_j = \tilde y_j(G_j - \sum_k G_k\tilde y_k)/\tau$.  Low variance, but biased (the networks never see
#   a relaxed label in the true objective).
#
# Same model, same batch, same z noise, many draws of y: each estimator's mean and total variance over the
# classifier's parameters, against the exact (enumerated) gradient.

# %%
N_TRAIN, STEPS, H, DRAWS = (3000, 300, 64, 200) if args.quick else (8000, 800, 128, 500)
x_all, y_all = load_mnist("train")
x_train, y_train = x_all[:N_TRAIN], y_all[:N_TRAIN]
x_test = static_binarize(load_mnist("test")[0][:1000], seed=2)
y_test = load_mnist("test")[1][:1000]
labelled = choose_labelled(y_train, 100, 10, args.seed)                 # 10 of each digit
y_partial = np.full(N_TRAIN, -1)
y_partial[labelled] = y_train[labelled]


def train_m2(alpha, seed):
    m = M2VAE(M2Config(hidden=(H,), z_dim=16), rng=seed)
    opt, r, step = minivae.Adam(lr=1e-3), np.random.default_rng(seed), 0
    while step < STEPS:
        for idx in minibatches(N_TRAIN, 100, r):
            _, g = m.loss(binarize(x_train[idx], r), y=y_partial[idx], alpha=alpha,
                          x_cls=binarize(x_train[labelled], r), y_cls=y_train[labelled])
            opt.step(m.params, g)
            step += 1
            if step == STEPS:
                break
    return m


m2 = train_m2(10.0, args.seed + 1)
xb = x_test[:50]
eps = np.random.default_rng(5).standard_normal((1, 50, 16)).astype(np.float32)
cls = [k for k in m2.params if k.startswith("cls.")]


def flat(grads):
    return np.concatenate([np.asarray(grads[k], dtype=np.float64).ravel() for k in cls])


exact = flat(m2.unlabelled_estimate(xb, eps, "enumerate")[1])
q = np.exp(np.asarray(m2.classifier_forward(m2.as_input(xb))[0], dtype=np.float64))
draws = np.random.default_rng(6)
est = {"reinforce": [], "gumbel tau=0.5": [], "gumbel tau=1": []}
for _ in range(DRAWS):
    ys = np.array([draws.choice(10, p=row / row.sum()) for row in q])
    est["reinforce"].append(flat(m2.unlabelled_estimate(xb, eps, "reinforce", noise=ys)[1]))
    for tau in (0.5, 1.0):
        g = gumbel_noise(draws, (50, 10), np.float32)
        est[f"gumbel tau={tau:g}"].append(flat(m2.unlabelled_estimate(xb, eps, "gumbel", noise=g, tau=tau)[1]))
stats = {}
for name, e in est.items():
    e = np.array(e)
    var = e.var(axis=0, ddof=1).sum()                                   # total variance of one draw's estimate
    bias2 = ((e.mean(axis=0) - exact) ** 2).sum()                       # squared distance of the mean from exact
    stats[name] = (var, bias2)
    print(f"  {name:15s} total variance {var:10.4g}   |mean - exact|^2 {bias2:10.4g}   (|exact|^2 "
          f"{(exact ** 2).sum():.4g}, variance / draws {var / DRAWS:.4g})")
rv, rb = stats["reinforce"]
check(rb < 4 * rv / DRAWS, f"REINFORCE is unbiased: its mean over {DRAWS} draws is as close to the exact gradient as "
      f"its variance allows (|mean - exact|^2 {rb:.3g} < 4 x {rv / DRAWS:.3g})")
gv = stats["gumbel tau=0.5"][0]
check(gv * 10 < rv, f"the Gumbel-softmax gradient (tau = 0.5) has over 10x less variance than REINFORCE's "
      f"({gv:.3g} against {rv:.3g}, x{rv / gv:.0f})")
gv1, gb1 = stats["gumbel tau=1"]
check(gb1 > 10 * gv1 / DRAWS, f"... but it is biased: at tau = 1 its mean misses the exact gradient by far more than "
      f"its noise ({gb1:.3g} > 10 x {gv1 / DRAWS:.3g}; the bias shrinks, and the variance grows, as tau -> 0)")

# %% [markdown]
# ## 4. 100 labels
#
# The classifier's test error after the same number of steps: M2 (100 labelled digits and the rest unlabelled,
# $\alpha = 10$ for this short run), M2 with $\alpha = 0$ (the labels enter only through the labelled bound, which
# a uniform batch rarely draws), and the classifier alone trained on the 100 labelled digits (cross-entropy only).
# The unlabelled bound alone cannot name the classes: the labels are what tie q(y|x)'s K outputs to the digits.
# What this short run does not show: M2 beating the classifier alone.  After a few hundred steps the generative
# terms have not yet shaped q(y|x) (compare the two errors printed); the paper's 11.97% comes after far longer
# training, and `docs/results.md` has a command-line run on the full training set.

# %%
alone = M2VAE(M2Config(hidden=(H,), z_dim=16), rng=args.seed + 1)
opt, r = minivae.Adam(lr=1e-3), np.random.default_rng(args.seed + 1)
for _ in range(STEPS):
    logq, c = alone.classifier_forward(alone.as_input(binarize(x_train[labelled], r)))
    _, c_nll = pick_nll_forward(logq, y_train[labelled])
    g = alone.new_grads()
    alone.classifier_backward(pick_nll_backward(np.full(100, 0.01, dtype=np.float32), c_nll), c, g)
    opt.step(alone.params, g)
no_labels = train_m2(0.0, args.seed + 1)
err = {"M2, alpha = 10": m2.error_rate(x_test, y_test), "M2, alpha = 0": no_labels.error_rate(x_test, y_test),
       "classifier alone": alone.error_rate(x_test, y_test)}
for name, e in err.items():
    print(f"  {name:17s} test error {100 * e:.1f}%")
check(err["M2, alpha = 10"] < 0.5 and err["classifier alone"] < 0.5,
      f"with the labelled cross-entropy q(y|x) learns the digits from 100 labels (M2 {100 * err['M2, alpha = 10']:.1f}%, "
      f"the classifier alone {100 * err['classifier alone']:.1f}%; chance 90%)")
check(err["M2, alpha = 0"] > 0.6, f"without it (alpha = 0) q(y|x)'s classes are not the digits: "
      f"{100 * err['M2, alpha = 0']:.1f}% error")
lw_x = x_test[:100]
iw = float(-iw_log_likelihood(m2, lw_x, 20, np.random.default_rng(7)).mean())
u = float(m2.loss(lw_x, eps=np.random.default_rng(8).standard_normal((1, 100, 16)), backward=False)[0])
check(iw <= u, f"the y-enumerated IW bound (k = 20) is at least as tight as U: {iw:.2f} <= {u:.2f} nats")

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
names = list(stats)
axes[0].bar(names, [stats[n][0] for n in names], color=["C3", "C0", "C2"])
axes[0].set_yscale("log")
axes[0].set_title("total variance of the classifier's gradient, one draw of y", fontsize=9)
z = np.random.default_rng(9).standard_normal((8, 16))
rows = [np.asarray(m2.decode(z, np.full(8, k))) for k in range(10)]
axes[1].imshow(tile(np.concatenate(rows), nrow=10), cmap="gray")
axes[1].set_title("E[x|y, z]: rows y = 0..9, columns shared z", fontsize=9)
axes[1].axis("off")
save_figure(fig, args.out, "m2.png")
