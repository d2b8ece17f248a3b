# %% [markdown]
# # Lesson 28 - Better IWAE gradients: STL and DReG.
#
# Lesson 21 trained on the IWAE bound $\mathcal L_K$.  More samples tighten the bound, but Rainforth et al. (2018),
# *Tighter Variational Bounds are Not Necessarily Better*, showed that the encoder's gradient gets *worse*: its
# signal-to-noise ratio falls as K grows (like $1/\sqrt K$ for large K).  We split the encoder's gradient into a
# path term and a score term, derive "sticking the landing" (Roeder, Wu & Duvenaud 2017) and the doubly
# reparameterised gradient (Tucker, Lawson, Gu & Maddison 2019) by hand, check them, measure the encoder's SNR
# against K for all three, and train with DReG (`--iwae-grad dreg`).
#
# Run:  python lessons/28_iwae_gradients.py [--quick] [--out DIR] [--seed N]

# %% [markdown]
# ## 1. Path and score
#
# With $z_k = \mu_\phi(x) + \sigma_\phi(x)\odot\varepsilon_k$ and
# $\log w_k = \log p(x|z_k) + \log p(z_k) - \log q_\phi(z_k|x)$, the total derivative in the encoder's parameters
# $\phi$ has two parts:
#
# $$\frac{d\log w_k}{d\phi} = \underbrace{\frac{\partial \log w_k}{\partial z_k}\frac{\partial z_k}{\partial\phi}}_{
#   \text{path}_k} - \underbrace{\frac{\partial \log q_\phi(z_k|x)}{\partial\phi}\Big|_{z_k}}_{\text{score}_k},
#   \qquad \nabla_\phi\mathcal L_K = \sum_k \tilde w_k\,(\text{path}_k - \text{score}_k),$$
#
# $\tilde w = \mathrm{softmax}(\log w)$ (lesson 21).  In the path term, $q$'s parameters are held, so
# $\partial(-\log q)/\partial z = (z-\mu)/\sigma^2 = \varepsilon/\sigma$.  For K = 1 the score term has expectation 0
# ($\mathbb E_q[\nabla_\phi\log q_\phi] = 0$) but it is noise, and it does not vanish when q equals the posterior.
#
# * **STL**: drop it, $g_{\mathrm{STL}} = \sum_k \tilde w_k\,\text{path}_k$.  Unbiased for K = 1; biased for K > 1.
# * **DReG**: reparameterise it.  For any $f$,
#   $\mathbb E_{q}[f(z)\,\nabla_\phi\log q_\phi(z)] = \mathbb E_\varepsilon[\nabla_z f(z)\,\partial z/\partial\phi]$
#   (Tucker et al. 2019, eq. 5).  With $f = \tilde w_k$ and $\partial\tilde w_k/\partial\log w_k = \tilde w_k - \tilde w_k^2$
#   (the other $k'$ terms sum out), the score term becomes a path term, and
#
# $$g_{\mathrm{DReG}} = \sum_k \tilde w_k^2\;\text{path}_k,\qquad \mathbb E[g_{\mathrm{DReG}}] = \nabla_\phi\mathcal L_K
#   \text{ for every } K.$$
#
# The decoder's gradient is the ordinary $\sum_k\tilde w_k\nabla_\theta\log w_k$ in all three.  In minivae the op
# pair `iwae_estimator_forward / iwae_estimator_backward` (`minivae/iwae_grads.py`) returns the weights the decoder
# and the encoder each get, and `FamilyVAE.loss(x, iwae_k=K, iwae_grad="dreg")` runs the decoder's backward a
# second time with the encoder's weights, for the path term alone.

# %%
import numpy as np
import matplotlib.pyplot as plt

import minivae
from minivae.data import load_mnist, static_binarize
from minivae.evaluate import iw_log_likelihood
from minivae.families import FamilyConfig, FamilyVAE
from minivae.gaussian import log_standard_normal, reparameterize_forward
from minivae.gradcheck import numerical_gradient, rel_error
from minivae.iwae_grads import log_q_fixed_forward
from minivae.lessonkit import check, fit, lesson_args, save_figure
from minivae.objectives import iwae_forward

args = lesson_args("lesson_output/28_iwae_gradients", "Lesson 28: STL and DReG gradients for the IWAE bound")
rng = np.random.default_rng(args.seed)

# %% [markdown]
# ## 2. Each estimator is the gradient of a surrogate
#
# STL and DReG are not gradients of $\mathcal L_K$ draw by draw, so finite differences of the loss cannot check
# them.  Each is, though, the exact gradient of a surrogate in which what the estimator holds fixed is frozen at the
# current $\phi_0$: the weights $\tilde w_k^{p}$ (p = 1 for STL, 2 for DReG) and $q$'s parameters inside $\log q$,
#
# $$S_p(\phi) = -\frac1N\sum_{n,k} \tilde w_{nk}(\phi_0)^p\,\Big[\log p(x_n|z_{nk}(\phi)) + \log p(z_{nk}(\phi))
#   - \log q_{\phi_0}(z_{nk}(\phi)|x_n)\Big].$$
#
# Central differences of $S_p$ in the encoder's parameters, float64, must match the encoder's gradients; the
# decoder's must equal the plain IWAE gradient's exactly.

# %%
tiny = FamilyVAE(FamilyConfig(x_dim=7, hidden=(6,), z_dim=2, activation="tanh", dtype="float64"), rng=0)
xt = (rng.random((3, 7)) < 0.5).astype(np.float64)
K = 5
eps = rng.standard_normal((K, 3, 2))


def surrogate_grads(model, x, eps, power):
    mu0, lv0 = (a.copy() for a in model.encode(x))
    weights = iwae_forward(model.log_weights(x, eps))[1][0] ** power        # frozen wtilde^power

    def S():
        mu, lv = model.encode(x)
        z = reparameterize_forward(mu, lv, eps)[0]
        log_w = model.log_px_given_z(x, z) + log_standard_normal(z) - log_q_fixed_forward(z, mu0, lv0)[0]
        return -(weights * log_w).sum() / x.shape[0]
    return {k: numerical_gradient(S, p) for k, p in model.params.items() if k.startswith("enc.")}


_, g_iwae = tiny.loss(xt, eps=eps, iwae_k=K)
for est, power in (("stl", 1), ("dreg", 2)):
    _, g = tiny.loss(xt, eps=eps, iwae_k=K, iwae_grad=est)
    num = surrogate_grads(tiny, xt, eps, power)
    worst = max(rel_error(g[k], v) for k, v in num.items())
    same_dec = all(np.allclose(g[k], g_iwae[k], rtol=1e-12, atol=1e-15) for k in g if k.startswith("dec."))
    check(worst <= 1e-7 and same_dec, f"{est.upper()}: the encoder's gradient is the surrogate's (rel. error "
          f"{worst:.1e}); the decoder's is the IWAE gradient")
num = surrogate_grads(tiny, xt, eps, 2)
_, g_stl = tiny.loss(xt, eps=eps, iwae_k=K, iwae_grad="stl")
bad = max(rel_error(g_stl[k], v) for k, v in num.items())
check(bad > 1e-3, f"a planted mistake, DReG with the weights wtilde instead of wtilde^2, fails that check "
      f"(rel. error {bad:.2f})")

# %% [markdown]
# ## 3. DReG is unbiased, STL is not
#
# Over many draws of $\varepsilon$, the mean DReG gradient must equal the mean IWAE gradient (both estimate
# $\nabla_\phi\mathcal L_K$), within their standard errors; STL's mean differs by its bias.  Both estimators see
# the same draws, so we test the mean of their difference: a paired z-score per parameter.  For an unbiased
# estimator none should be far beyond 3; the parameters' z-scores are correlated (they all move with the same few
# latent quantities), so they need not spread like independent normals.  With ten times the draws, a bias would
# multiply every |z| by about 3; for DReG they stay where they are (checked while writing this lesson: median |z|
# 1.02 with 2000 draws, 0.91 with 20000).

# %%
R = 400 if args.quick else 2000
draws = {e: [] for e in ("iwae", "stl", "dreg")}
r = np.random.default_rng(1)
for _ in range(R):
    e_ = r.standard_normal((K, 3, 2))
    for est in draws:
        g = tiny.loss(xt, eps=e_, iwae_k=K, iwae_grad=est)[1]
        draws[est].append(np.concatenate([g[k].ravel() for k in g if k.startswith("enc.")]))
live = np.array(draws["iwae"]).std(0) > 0                 # weights of a pixel that is 0 in every x get exactly 0
A = {e: np.array(v)[:, live] for e, v in draws.items()}


def paired_z(a, b):
    """z-score of the mean difference of paired draws (the same eps for both estimators), per parameter."""
    d = a - b
    return d.mean(0) / (d.std(0, ddof=1) / np.sqrt(len(d)))


z_dreg, z_stl = paired_z(A["dreg"], A["iwae"]), paired_z(A["stl"], A["iwae"])
print(f"  |z| of mean differences from IWAE over {z_dreg.size} encoder parameters: DReG median "
      f"{np.median(np.abs(z_dreg)):.2f}, max {np.abs(z_dreg).max():.2f}; STL median {np.median(np.abs(z_stl)):.2f}, "
      f"max {np.abs(z_stl).max():.2f}")
check(np.abs(z_dreg).max() < 4, "the mean DReG gradient equals the mean IWAE gradient within the standard errors "
      "(unbiased)")
check(np.abs(z_stl).max() > 4, "STL's mean gradient differs from IWAE's: it is biased for K > 1")

# %% [markdown]
# ## 4. The encoder's signal-to-noise ratio against K
#
# For each parameter, $\mathrm{SNR} = |\text{mean}|/\text{standard deviation}$ of its gradient over R draws of
# $\varepsilon$ (Rainforth et al. 2018); we report the median over the encoder's parameters.  A gradient whose mean
# is 0 still shows an SNR of about $1/\sqrt R$ (the noise of the mean itself): that is the floor of the measurement.
#
# Why the IWAE gradient loses its signal: $\mathcal L_K \to \log p(x)$ as $K\to\infty$, which does not depend on
# $\phi$, so $\nabla_\phi\mathcal L_K \to 0$ (like $1/K$), while its estimator's noise falls only like
# $1/\sqrt K$.  DReG removes the score term, whose noise is what stays, and its SNR grows with K (Tucker et al.
# 2019); how fast depends on the model and the x (for the x of seed 0 about like $\sqrt K$).
#
# First the tiny model of section 2, where K can go to thousands: one x, R draws per K.

# %%
KS_TINY = (1, 4, 16, 64, 256, 1024) if args.quick else (1, 4, 16, 64, 256, 1024, 4096)
R_TINY = 100 if args.quick else 200


def snr(model, x1, K, est, R, seed):
    """Median SNR over the encoder's and over the decoder's parameters, from R draws of the gradient."""
    r = np.random.default_rng(seed)
    L = model.config.z_dim
    enc, dec = [], []
    for _ in range(R):
        g = model.loss(x1, eps=r.standard_normal((K, 1, L)).astype(model.dtype), iwae_k=K, iwae_grad=est)[1]
        enc.append(np.concatenate([g[k].ravel() for k in g if k.startswith("enc.")]))
        dec.append(np.concatenate([g[k].ravel() for k in g if k.startswith("dec.")]))
    out = []
    for G in (np.array(enc, np.float64), np.array(dec, np.float64)):
        sd = G.std(0)
        live = sd > 0                                         # a weight of a pixel that is 0 gets exactly 0
        out.append(float(np.median(np.abs(G.mean(0))[live] / sd[live])))
    return out


def snr_table(model, x1, ks, R):
    return {est: np.array([snr(model, x1, K, est, R, seed=K) for K in ks]) for est in ("iwae", "stl", "dreg")}


def show(table, ks):
    print(f"  {'K':>5s} " + " ".join(f"{e + ' enc':>9s}" for e in table) + f" {'dec':>7s}")
    for i, K in enumerate(ks):
        print(f"  {K:5d} " + " ".join(f"{table[e][i, 0]:9.3f}" for e in table) + f" {table['iwae'][i, 1]:7.3f}")


tiny_table = snr_table(tiny, xt[:1], KS_TINY, R_TINY)
show(tiny_table, KS_TINY)
big = np.array(KS_TINY) >= 16
slope = np.polyfit(np.log(np.array(KS_TINY)[big]), np.log(tiny_table["dreg"][big, 0]), 1)[0]
print(f"  DReG encoder SNR ~ K^{slope:.2f} for K >= 16; the measurement's floor 1/sqrt(R) = {1 / np.sqrt(R_TINY):.2f}")
check(tiny_table["dreg"][-1, 0] > 3 * tiny_table["dreg"][0, 0] and slope > 0.15,
      f"DReG's encoder SNR grows with K ({tiny_table['dreg'][0, 0]:.2f} at K = 1, {tiny_table['dreg'][-1, 0]:.1f} at "
      f"K = {KS_TINY[-1]}; fitted exponent {slope:.2f})")
check(all(tiny_table["iwae"][i, 0] < 0.1 * tiny_table["dreg"][i, 0] for i in np.flatnonzero(big)) and
      tiny_table["iwae"][-1, 0] < 3 / np.sqrt(R_TINY),
      f"the IWAE gradient's encoder SNR stays at the measurement's floor (at K = {KS_TINY[-1]}: "
      f"{tiny_table['iwae'][-1, 0]:.3f} against DReG's {tiny_table['dreg'][-1, 0]:.1f})")

# %% [markdown]
# Then a 784-64-8 VAE trained on MNIST with the ELBO, on one test digit.  At these K the MNIST model is not yet in
# the asymptotic regime (its bound is still far from $\log p(x)$), so the IWAE SNR need not fall yet; what shows
# already is the order: the decoder's SNR grows with K, and the encoder gets more signal from STL and DReG.

# %%
N_TRAIN, STEPS = (10000, 1500)                    # the same model in quick mode: the SNR needs a trained q
KS = (1, 4, 16, 64) if args.quick else (1, 4, 16, 64, 256)
x_train = static_binarize(load_mnist("train")[0][:N_TRAIN], seed=1)
x_test = static_binarize(load_mnist("test")[0][:500], seed=2)
model = FamilyVAE(FamilyConfig(hidden=(64,), z_dim=8), rng=args.seed)
fit(model, x_train, STEPS, np.random.default_rng(args.seed), batch_size=100, binarize=False,
    opt=minivae.Adam(lr=2e-3))
table = snr_table(model, x_test[:1], KS, 40 if args.quick else 100)
show(table, KS)

fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
for ax, (tab, ks, title) in zip(axes, ((tiny_table, KS_TINY, "tiny model (7 pixels, 2-D z)"),
                                       (table, KS, "784-64-8 on MNIST, one test digit"))):
    for est, v in tab.items():
        ax.loglog(ks, v[:, 0], marker="o", label=f"encoder, {est.upper()}")
    ax.loglog(ks, tab["iwae"][:, 1], marker="s", ls="--", color="gray", label="decoder")
    ax.set_xlabel("K")
    ax.set_ylabel("median SNR")
    ax.set_title(title, fontsize=9)
axes[0].legend(fontsize=8)
save_figure(fig, args.out, "snr_vs_k.png")

check(table["iwae"][-1, 1] > table["iwae"][0, 1], f"the decoder's SNR grows with K "
      f"({table['iwae'][0, 1]:.2f} -> {table['iwae'][-1, 1]:.2f})")
check(all(table[e][i, 0] > table["iwae"][i, 0] for e in ("stl", "dreg") for i in range(1, len(KS))),
      "STL and DReG give the encoder a higher SNR than the IWAE gradient at every K > 1")

# %% [markdown]
# ## 5. Training IWAE-k with DReG
#
# The same model trained on the IWAE bound with K = 8, with the IWAE gradient and with DReG (the command line's
# `train --iwae-k 8 --iwae-grad dreg`), same data order and initial weights; both judged by the test ELBO (how good
# the encoder's q is as a posterior approximation) and the IW bound.

# %%
TRAIN_STEPS = 300 if args.quick else 1200
trained = {}
for est in ("iwae", "dreg"):
    m = FamilyVAE(FamilyConfig(hidden=(64,), z_dim=8), rng=args.seed + 1)
    fit(m, x_train, TRAIN_STEPS, np.random.default_rng(args.seed + 2), batch_size=100, binarize=False,
        opt=minivae.Adam(lr=2e-3), loss_kwargs={"iwae_k": 8, "iwae_grad": est})
    m.loss(x_test, eps=np.random.default_rng(3).standard_normal((1, 500, 8)).astype(np.float32), backward=False)
    elbo = float(m.parts["loss"])
    iw = float(-iw_log_likelihood(m, x_test, 200 if not args.quick else 50, np.random.default_rng(4)).mean())
    trained[est] = (elbo, iw)
    print(f"  IWAE-8 with {est.upper():4s} gradients: test -ELBO {elbo:.2f}, IW-NLL {iw:.2f}, gap {elbo - iw:.2f}")
check(all(np.isfinite(v).all() for v in trained.values()) and trained["dreg"][0] - trained["dreg"][1] <
      trained["iwae"][0] - trained["iwae"][1] + 0.5,
      "training with DReG leaves the encoder's ELBO as close to the IW bound as the IWAE gradient does, or closer "
      "(within 0.5 nats)")
