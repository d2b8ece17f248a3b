# %% [markdown]
# # Lesson 26 - A real posterior collapse: the autoregressive decoder.
#
# Lesson 13 counted inactive latent units, and lesson 23 collapsed a model by weighting the KL term wrongly.
# Here the objective is the true ELBO and nothing is mis-scaled: the decoder is simply strong enough to model the
# digits without z.  We build the masked dense layer of MADE (Germain et al. 2015) by hand, use it for an
# autoregressive decoder $p(x|z) = \prod_d p(x_d \mid x_{<d}, z)$, watch its KL and the mutual information
# $I(x; z)$ fall while the factorised decoder's rise, and compare three cures: KL warm-up, free bits and
# $\beta < 1$, each measured by $I(x; z)$ and by the test bound.
#
# Run:  python lessons/26_autoregressive_collapse.py [--quick] [--out DIR] [--seed N]

# %% [markdown]
# ## 1. Why a strong decoder ignores z
#
# The ELBO is $\log p(x) - \mathrm{KL}(q(z|x)\,\|\,p(z|x))$ (lesson 05).  If the decoder family contains a model
# with $p(x|z) = p(x)$ for every z, then at that model $p(z|x) = p(z)$, and $q(z|x) = p(z)$ makes the KL gap 0:
# the ELBO equals $\log p(x)$ without any information in z (Chen et al. 2017, "Variational Lossy Autoencoder";
# Bowman et al. 2016).  Using z costs KL nats now, for a gain the decoder can also get from $x_{<d}$.
#
# The KL term, averaged over the data, splits into two non-negative parts (Hoffman & Johnson 2016; lesson 25
# derives and checks it):
#
# $$\mathbb E_{x}\,\mathrm{KL}(q(z|x)\,\|\,p(z)) = I_q(x; z) + \mathrm{KL}(q(z)\,\|\,p(z)),\qquad
#   q(z) = \mathbb E_x\, q(z|x),$$
#
# so a KL that goes to 0 forces the mutual information between x and its code to 0: the code says nothing.  We
# estimate $I_q(x;z) = \mathbb E_{x}\mathbb E_{q(z|x)}[\log q(z|x) - \log q(z)]$ with the aggregate posterior
# of N test digits, $\log q(z) \approx \log \frac1N \sum_m q(z|x_m)$; the estimate cannot exceed $\log N$.

# %%
import numpy as np
import matplotlib.pyplot as plt

import minivae
from minivae.data import load_mnist, static_binarize
from minivae.evaluate import active_units, iw_log_likelihood
from minivae.families import FamilyConfig, FamilyVAE
from minivae.figures import tile
from minivae.gaussian import log_diag_normal
from minivae.lessonkit import check, fit, lesson_args, save_figure
from minivae.made import connectivity, made_masks, masked_dense_backward, masked_dense_forward

args = lesson_args("lesson_output/26_autoregressive_collapse", "Lesson 26: posterior collapse with an "
                   "autoregressive decoder")
rng = np.random.default_rng(args.seed)

# %% [markdown]
# ## 2. The masked dense layer
#
# MADE gives every unit a degree: input $i$ has degree $i$, hidden unit $k$ a degree $m_k \in \{1..D-1\}$, output
# $d$ degree $d$.  A weight is kept when it cannot carry $x_i$ to an output of degree $\le i$:
# input $i \to$ hidden $k$ when $m_k \ge i$, hidden $k \to$ output $d$ when $d > m_k$.  With the 0/1 mask $M$
# fixed at construction the layer is
#
# $$y = x\,(M \odot W) + b,\qquad
#   \frac{\partial L}{\partial x} = G\,(M\odot W)^\top,\quad
#   \frac{\partial L}{\partial W} = M \odot (x^\top G),\quad
#   \frac{\partial L}{\partial b} = \textstyle\sum_n G_n,$$
#
# the dense layer of lesson 02 with the mask in the forward weight and in the weight gradient: a masked-out weight
# does not exist, so it gets no gradient (`minivae.made.masked_dense_backward`).  We check it against central
# differences with a random upstream gradient, and check that forgetting the mask in $dW$ fails that check.

# %%
mask = made_masks(6, [9], 1)[0]
xs, Ws, bs = rng.standard_normal((5, 6)), rng.standard_normal((6, 9)), rng.standard_normal(9)
rep = minivae.check_op(lambda x, W, b: masked_dense_forward(x, W, b, mask), masked_dense_backward, [xs, Ws, bs],
                       rng=rng, tol=1.0)   # tol=1: the report comes back and CHECK judges it
print("  masked dense, rel errors:", {k: f"{v:.1e}" for k, v in rep.items()})
check(max(rep.values()) <= 1e-7, "the masked dense backward matches central differences (float64, random upstream)")


def forgot_the_mask(dy, cache):                    # a planted mistake: dW = x^T G
    x, Wm, _ = cache
    return dy @ Wm.T, x.T @ dy, dy.sum(axis=0)


try:
    minivae.check_op(lambda x, W, b: masked_dense_forward(x, W, b, mask), forgot_the_mask, [xs, Ws, bs], rng=rng)
    caught = False
except minivae.GradientCheckError as exc:
    caught = True
    print("  planted mistake:", str(exc)[:100])
check(caught, "a backward that forgets the mask in dW fails the gradient check")

# %% [markdown]
# The decoder: one masked hidden layer reads $[x, z]$ (z's rows of the mask are all 1: every hidden unit sees z),
# and the logits read $[h, x]$, with direct connections $x_i \to l_d$ for $i < d$.  That $l_d$ depends on $x_{<d}$
# only is a property of the masks: the product of the masks, thresholded, must be strictly upper triangular.  And the
# whole model's gradient is checked against central differences on a tiny float64 instance.

# %%
D = 784
H_MADE = 64
m_in, m_out = made_masks(D, [H_MADE], 1)
reach = connectivity([m_in, m_out]) + np.triu(np.ones((D, D), dtype=np.int64), 1)     # through h, and direct
check(not np.tril(reach).any() and reach[0, 1:].all(),
      f"in the {D}-pixel decoder, logit d sees pixels < d only (and pixel 1 reaches every later logit)")

tiny = FamilyVAE(FamilyConfig(x_dim=8, hidden=(6,), z_dim=3, dtype="float64", decoder="made", activation="tanh"),
                 rng=0)
x_tiny = (rng.random((4, 8)) < 0.5).astype(np.float64)
rep = minivae.check_model(tiny, x_tiny, n_samples=2, rng=rng, tol=1.0)
check(max(rep.values()) <= 1e-7, f"the whole MADE-decoder VAE's gradient matches central differences "
      f"({len(rep)} parameters, worst {max(rep.values()):.1e})")

# %% [markdown]
# ## 3. Training: factorised against autoregressive
#
# Two 784-64-16 VAEs (ReLU, Bernoulli, Adam, batches of 100, statically binarized digits), the same encoder,
# the same steps and the same data order; only the decoder differs (`FamilyConfig(decoder="made")`).  We record the
# test KL as training goes.
#
# The step size is a large one, `LR` = 2e-2.  That is the lever: with its direct connections $x_{<d} \to l_d$ the
# MADE decoder fits the digits fast, faster than the encoder learns a code worth its KL nats, and from then on
# the KL term only pushes q(z|x) to the prior.  With the smaller step of the earlier lessons (2e-3) the
# MADE VAE's KL only sags within these steps, and the collapse is partial; with 2e-2 it is complete.  The
# factorised decoder cannot model a digit without z, so the same step size leaves its code in use.  Default mode shows the collapse in full (KL, $I(x; z)$ and active units near 0); `--quick` is the
# test mode, with fewer steps and digits, and checks only that the MADE VAE is the one losing its code.

# %%
N_TRAIN, STEPS = (3000, 200) if args.quick else (10000, 1000)
N_EVAL, IW_K = (300, 10) if args.quick else (500, 50)
LR = 2e-2
x_train = static_binarize(load_mnist("train")[0][:N_TRAIN], seed=1)
x_test = static_binarize(load_mnist("test")[0][:N_EVAL], seed=2)
EVERY = STEPS // 10


def mutual_information(model, x, seed=0):
    """I_q(x; z) with the aggregate posterior of the rows of x (one z per x): at most log N."""
    mu, logvar = (np.asarray(a, np.float64) for a in model.encode(x))
    z = mu + np.exp(0.5 * logvar) * np.random.default_rng(seed).standard_normal(mu.shape)
    own = log_diag_normal(z, mu, logvar)                                        # log q(z_n | x_n)
    pair = log_diag_normal(z[:, None, :], mu[None], logvar[None])              # log q(z_n | x_m), (N, N)
    top = pair.max(axis=1)
    agg = top + np.log(np.exp(pair - top[:, None]).mean(axis=1))               # log q(z_n), stable
    return float((own - agg).mean())


def train(decoder, beta=1.0, loss_kwargs=None):
    model = FamilyVAE(FamilyConfig(hidden=(H_MADE,), z_dim=16, decoder=decoder), rng=args.seed + 1)
    curve = []

    def record(step, b):
        if step % EVERY == 0:
            model.loss(x_test, eps=eps_ev, backward=False)
            curve.append((step, float(model.parts["kl"])))
    fit(model, x_train, STEPS, np.random.default_rng(args.seed + 2), batch_size=100, binarize=False, beta=beta,
        opt=minivae.Adam(lr=LR), loss_kwargs=loss_kwargs, on_step=record)
    return model, curve


def evaluate(model):
    model.loss(x_test, eps=eps_ev, backward=False)
    return dict(kl=float(model.parts["kl"]), mi=mutual_information(model, x_test),
                au=active_units(model, x_test),
                iw=float(-iw_log_likelihood(model, x_test, IW_K, np.random.default_rng(4)).mean()))


eps_ev = np.random.default_rng(3).standard_normal((1, N_EVAL, 16)).astype(np.float32)
runs = {}
for name, dec in (("factorised", "factorised"), ("MADE", "made")):
    model, curve = train(dec)
    runs[name] = dict(model=model, curve=curve, **evaluate(model))
    r = runs[name]
    print(f"  {name:10s} KL {r['kl']:6.2f}  I(x;z) {r['mi']:5.2f} (max {np.log(N_EVAL):.2f})  active {r['au']:2d}/16"
          f"  IW-NLL (k={IW_K}) {r['iw']:7.2f}")

# %%
fig, ax = plt.subplots(figsize=(6, 3.5))
for name, r in runs.items():
    steps, kls = zip(*r["curve"])
    ax.plot(steps, kls, marker="o", label=f"{name} decoder")
ax.set_xlabel("training step")
ax.set_ylabel("test KL (nats)")
ax.set_title("the autoregressive decoder pushes the KL down")
ax.legend()
save_figure(fig, args.out, "kl_curves.png")

fac, made = runs["factorised"], runs["MADE"]
check(made["kl"] < fac["kl"], f"the MADE decoder's KL ({made['kl']:.2f}) is below the factorised decoder's "
      f"({fac['kl']:.2f})")
check(made["mi"] < 0.5 * fac["mi"], f"and its I(x; z) is less than half: {made['mi']:.2f} against {fac['mi']:.2f} "
      "nats")
check(made["iw"] < fac["iw"], f"yet it is the better model of the digits: IW-NLL {made['iw']:.1f} < {fac['iw']:.1f}")
if not args.quick:        # the full collapse needs default mode's steps
    check(made["kl"] < 0.5 and made["mi"] < 0.2 and made["au"] == 0,
          f"the MADE VAE's posterior has collapsed: KL {made['kl']:.3f} < 0.5 nats, I(x; z) {made['mi']:.3f} < 0.2 "
          f"nats, {made['au']} of 16 units active")
    check(fac["kl"] > 5 and fac["mi"] > 2 and fac["au"] >= 8,
          f"while the factorised VAE, trained the same way, uses its code: KL {fac['kl']:.2f} > 5 nats, "
          f"I(x; z) {fac['mi']:.2f} > 2 nats, {fac['au']} >= 8 of 16 units active")

# %% [markdown]
# ## 4. Three cures, measured
#
# * **KL warm-up**: $\beta_t = \min(1, t/T)$, T = half the steps: the decoder learns to use z before the KL
#   term pushes q to the prior.
# * **Free bits** (lesson 21): each latent dimension's batch-mean KL below $\lambda$ = 0.5 nats costs nothing,
#   so there is no gradient towards the prior below it.
# * $\beta$ = 0.5: the KL term weighs half; not a bound on $\log p(x)$ any more, so every model is judged by the
#   same importance-weighted estimate.
#
# Each is judged by what it is for, $I(x; z)$, and by the test bound.  The decomposition of section 1 predicts
# what free bits can and cannot do: they floor the KL, and the KL can be paid by $\mathrm{KL}(q(z)\,\|\,p(z))$,
# codes pushed off the prior in the same way for every x, without any information about x.  Warm-up only changes
# the start: once $\beta$ reaches 1 the incentive to ignore z is back, and what survives is the use of z the
# decoder learned while $\beta$ was small.  $\beta$ = 0.5 halves that incentive without removing it: a decoder
# that fits the digits without z has no use for z at any $\beta > 0$, and at this step size the plain $\beta$ = 0.5
# run can collapse as well (under some seeds it does; under others it keeps a code).

# %%
CURES = {"warm-up": dict(beta=lambda t: min(1.0, t / (STEPS / 2))),
         "free bits 0.5": dict(loss_kwargs={"free_bits": 0.5}),
         "beta 0.5": dict(beta=0.5)}
for name, kw in CURES.items():
    model, curve = train("made", **kw)
    runs[name] = dict(model=model, curve=curve, **evaluate(model))
print(f"  {'model':14s} {'KL':>6s} {'I(x;z)':>7s} {'active':>6s} {'IW-NLL':>8s}")
for name, r in runs.items():
    print(f"  {name:14s} {r['kl']:6.2f} {r['mi']:7.2f} {r['au']:6d} {r['iw']:8.2f}")
wu = runs["warm-up"]
if not args.quick:
    check(min(wu["mi"], runs["free bits 0.5"]["mi"]) > 1.0,
          f"warm-up and free bits each keep more than 1 nat of information in z ({wu['mi']:.2f} and "
          f"{runs['free bits 0.5']['mi']:.2f} nats, against the collapsed VAE's {made['mi']:.2f})")
    check(all(abs(runs[n]["iw"] - made["iw"]) < 3 for n in CURES),
          "and no cure moves the test bound by as much as 3 nats from the collapsed VAE's: IW-NLL "
          + ", ".join(f"{n} {runs[n]['iw']:.1f}" for n in CURES) + f" against {made['iw']:.1f}")
    best = max(CURES, key=lambda n: runs[n]["mi"])
    check(best != "beta 0.5", f"of the three cures, {best} keeps the most information in z "
          f"({runs[best]['mi']:.2f} nats); beta 0.5 keeps {runs['beta 0.5']['mi']:.2f}")
else:                     # test mode: fewer steps, a partial collapse; each cure must still beat it
    check(all(runs[n]["mi"] > made["mi"] + 0.3 for n in CURES),
          "each cure keeps more information in z than the plain MADE VAE (" + ", ".join(
              f"{n} {runs[n]['mi']:.2f}" for n in CURES) + f" against {made['mi']:.2f} nats)")
fb = runs["free bits 0.5"]
check(fb["kl"] > made["kl"] and fb["mi"] < 0.5 * fb["kl"],
      f"free bits buy KL ({fb['kl']:.2f} > {made['kl']:.2f} nats), not information: I(x; z) = {fb['mi']:.2f} is "
      "less than half of it")
check(all(runs[n]["mi"] < fac["mi"] and runs[n]["iw"] < fac["iw"] for n in CURES),
      "no cure brings I(x; z) up to the factorised decoder's, and every MADE VAE stays the better density model")

# %%
fig, ax = plt.subplots(figsize=(6, 3.5))
names = list(runs)
ax.scatter([runs[n]["mi"] for n in names], [runs[n]["iw"] for n in names])
for n in names:
    ax.annotate(n, (runs[n]["mi"], runs[n]["iw"]), fontsize=8)
ax.set_xlabel("I(x; z) estimate (nats)")
ax.set_ylabel(f"test IW-NLL, k={IW_K} (nats)")
ax.set_title("information in z against the test bound")
save_figure(fig, args.out, "cures.png")

# %% [markdown]
# ## 5. Samples
#
# The MADE decoder draws pixel by pixel (`FamilyVAE.decode`: one rank-one update of the hidden pre-activations per
# pixel).  When z carries little information, digits drawn from the same z differ as much as digits from
# different z.

# %%
fig, axes = plt.subplots(1, 2, figsize=(7, 3.5))
z = np.random.default_rng(5).standard_normal((8, 16)).astype(np.float32)
for ax, name in zip(axes, ("factorised", "MADE")):
    m = runs[name]["model"]
    imgs = m.decode(np.repeat(z[:4], 2, axis=0), rng=6)              # the MADE's draw follows rng
    ax.imshow(tile(np.asarray(imgs), nrow=4), cmap="gray")
    ax.set_title(f"{name}: pairs share z")
    ax.axis("off")
save_figure(fig, args.out, "samples.png")
