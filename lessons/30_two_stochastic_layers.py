# %% [markdown]
# # Lesson 30 - Two stochastic layers.
#
# Burda, Grosse & Salakhutdinov (2015) trained VAEs and IWAEs with two layers of latent variables: $z_2 \to z_1
# \to x$, each conditional a Gaussian MLP.  We write the importance weight of this model, derive its backward pass
# through the two reparameterisations by hand (`minivae/twolayer.py`, `--stochastic-layers 2`), check it against
# central differences, and train it beside a one-layer model to see how its upper layer is used.
#
# Run:  python lessons/30_two_stochastic_layers.py [--quick] [--out DIR] [--seed N]

# %% [markdown]
# ## 1. The model and its weight
#
# $$p(z_2) = \mathcal N(0, I),\quad p(z_1|z_2) = \mathcal N(m_p(z_2), e^{l_p(z_2)}),\quad p(x|z_1) = \mathrm{Bern}(f(z_1)),$$
# $$q(z_1|x) = \mathcal N(m_1(x), e^{l_1(x)}),\quad q(z_2|z_1) = \mathcal N(m_2(z_1), e^{l_2(z_1)}).$$
#
# One draw: $z_1 = m_1 + \sigma_1\odot\varepsilon_1$, then $z_2 = m_2(z_1) + \sigma_2(z_1)\odot\varepsilon_2$, and
#
# $$\log w = \log p(x|z_1) + \log p(z_1|z_2) + \log p(z_2) - \log q(z_1|x) - \log q(z_2|z_1).$$
#
# No term is a closed-form KL any more: the loss is the negative IWAE bound of K draws (K = 1: the ELBO by Monte
# Carlo).  With $\varepsilon$ held, $\log q(z_i|\cdot) = -\tfrac12\sum(\varepsilon_i^2 + l_i + \log 2\pi)$.
#
# ## 2. The backward: z1 has three consumers
#
# With $g = \partial\mathrm{loss}/\partial\log w$ and $r = (z_1 - m_p)/e^{l_p}$:
#
# $$\frac{\partial}{\partial z_2}: -g z_2 + \text{(p1 net)}^\top\Big[g r,\ \tfrac g2(r\odot(z_1 - m_p) - 1)\Big],
# \qquad \frac{\partial}{\partial l_2} \mathrel{+}= \frac g2,$$
#
# then $z_2 = m_2 + \sigma_2\varepsilon_2$ gives $(\partial m_2, \partial l_2)$, and
#
# $$\frac{\partial}{\partial z_1} = \underbrace{-g\,r}_{p(z_1|z_2)} + \underbrace{\text{(q2 net)}^\top[\partial m_2,
#   \partial l_2]}_{q(z_2|z_1)} + \underbrace{\text{(decoder)}^\top[\partial\,\text{logits}]}_{p(x|z_1)},$$
#
# the three paths added, before $z_1 = m_1 + \sigma_1\varepsilon_1$ carries it into the encoder (with
# $\partial l_1 \mathrel{+}= g/2$ from $-\log q(z_1|x)$).  Forgetting one path is the classic mistake; the check
# below catches it.

# %%
import numpy as np
import matplotlib.pyplot as plt

import minivae
from minivae.data import load_mnist, static_binarize
from minivae.evaluate import iw_log_likelihood, posterior_mean_variance
from minivae.figures import tile
from minivae.lessonkit import check, fit, lesson_args, save_figure
from minivae.twolayer import TwoLayerConfig, TwoLayerVAE

args = lesson_args("lesson_output/30_two_stochastic_layers", "Lesson 30: two stochastic layers")
rng = np.random.default_rng(args.seed)

# %%
tiny = TwoLayerVAE(TwoLayerConfig(x_dim=7, hidden=(6,), z_dim=5, z2_dim=2, hidden2=(4,), activation="tanh",
                                  dtype="float64"), rng=0)
xt = (rng.random((4, 7)) < 0.5).astype(np.float64)
for kw, what in (({}, "the ELBO (S = 2)"), ({"iwae_k": 3}, "the IWAE bound (K = 3)")):
    rep = minivae.check_model(tiny, xt, n_samples=kw.get("iwae_k", 2), loss_kwargs=kw, rng=rng, tol=1.0)
    check(max(rep.values()) <= 1e-7, f"{what}: every parameter's gradient matches central differences "
          f"({len(rep)} arrays, worst {max(rep.values()):.1e})")


class ForgetsAPath(TwoLayerVAE):                     # a planted mistake: z1's path through q(z2|z1)'s log-variance
    def _net_backward(self, net, douts, cache, grads):
        if net == "q2":
            douts = [douts[0], 0 * douts[1]]
        return super()._net_backward(net, douts, cache, grads)


bad = ForgetsAPath(tiny.config, rng=0)
rep = minivae.check_model(bad, xt, n_samples=2, rng=rng, tol=1.0)
check(max(rep.values()) > 1e-3, f"dropping one of z1's paths fails the check (worst {max(rep.values()):.2f})")

# %% [markdown]
# ## 3. One layer against two
#
# A 784-100-100-20 VAE and a two-layer model 784-100-100-[z1 20]-50-50-[z2 10] (tanh, Bernoulli, IWAE K = 5, Adam
# 2e-3, batches of 100, the same steps and data order).  For each latent unit, its activity
# $\mathrm{Var}_x\,\mathbb E_q[z_j]$ (lesson 13): for $z_2$ the mean of $q(z_2|z_1 = m_1(x))$.  What to expect from
# a short run: the upper layer is the last to be used (its units reach x only through $z_1$), so most of $z_2$ stays
# at the prior, and the deeper model is behind the one-layer model; Burda et al.'s two-layer results come after
# 3280 passes over the data.

# %%
N_TRAIN, STEPS, IW_K = (5000, 800, 20) if args.quick else (10000, 1500, 100)
x_train = static_binarize(load_mnist("train")[0][:N_TRAIN], seed=1)
x_test = static_binarize(load_mnist("test")[0][:500], seed=2)
models = {"one layer": minivae.VAE(minivae.VAEConfig(hidden=(100, 100), z_dim=20, activation="tanh"), rng=1),
          "two layers": TwoLayerVAE(TwoLayerConfig(hidden=(100, 100), z_dim=30, z2_dim=10, hidden2=(50, 50),
                                                   activation="tanh"), rng=1)}
res = {}
for name, m in models.items():
    fit(m, x_train, STEPS, np.random.default_rng(args.seed + 2), batch_size=100, binarize=False,
        opt=minivae.Adam(lr=2e-3), loss_kwargs={"iwae_k": 5})
    eps = np.random.default_rng(3).standard_normal((1, 500, m.config.z_dim)).astype(np.float32)
    m.loss(x_test, eps=eps, backward=False)
    var = posterior_mean_variance(m, x_test)
    res[name] = dict(elbo=float(m.parts["loss"]), var=var,
                     iw=float(-iw_log_likelihood(m, x_test, IW_K, np.random.default_rng(4)).mean()))
    print(f"  {name:10s} test -ELBO {res[name]['elbo']:.2f}  IW-NLL (k={IW_K}) {res[name]['iw']:.2f}  active units "
          f"z1 {(var[:20] > 0.01).sum()}/20" + (f", z2 {(var[20:] > 0.01).sum()}/10" if len(var) > 20 else ""))

two = res["two layers"]
check(all(r["iw"] <= r["elbo"] for r in res.values()), "for both models the IW bound is at least as tight as the ELBO")
med1, med2 = np.median(two["var"][:20]), np.median(two["var"][20:])
check(med2 < med1, f"the upper layer's codes vary less with x: median Var_x E[z2_j] = {med2:.3f} against "
      f"{med1:.3f} for z1 ({(two['var'][20:] > 0.01).sum()} of 10 z2 units and {(two['var'][:20] > 0.01).sum()} of "
      "20 z1 units active)")
print(f"  IW-NLL, two layers minus one layer: {two['iw'] - res['one layer']['iw']:+.1f} nats at {STEPS} steps "
      "(Burda et al. train for 3280 passes)")

# %%
fig, axes = plt.subplots(1, 3, figsize=(11, 3.5))
axes[0].bar(range(20), np.sort(res["one layer"]["var"])[::-1], color="C0")
axes[0].set_title("one layer: Var_x E[z_j]", fontsize=9)
axes[1].bar(range(30), np.concatenate([np.sort(two["var"][:20])[::-1], np.sort(two["var"][20:])[::-1]]),
            color=["C1"] * 20 + ["C2"] * 10)
axes[1].set_title("two layers: z1 (orange), z2 (green)", fontsize=9)
for ax in axes[:2]:
    ax.set_yscale("log")
    ax.axhline(0.01, color="gray", ls="--")
axes[2].imshow(tile(np.asarray(models["two layers"].sample(36, rng=5)), nrow=6), cmap="gray")
axes[2].set_title("two layers: z2 ~ N(0, I), z1 ~ p(z1|z2)", fontsize=9)
axes[2].axis("off")
save_figure(fig, args.out, "two_layers.png")
