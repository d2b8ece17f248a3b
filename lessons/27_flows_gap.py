# %% [markdown]
# # Lesson 27 - Normalising flows shrink the approximation gap.
#
# Lesson 22 split the gap between $\log p(x)$ and the encoder's ELBO into an **approximation gap** (what no diagonal
# Gaussian can do) and an **amortization gap** (what the encoder does worse than the best Gaussian).  Here we make
# the family richer: a diagonal Gaussian followed by T planar flow steps (Rezende & Mohamed 2015).  We derive the
# planar step's backward, log-determinant included, check it, and fit the best member of each family per test image
# exactly as lesson 22 did: the approximation gap shrinks as T grows.  The same ops run inside the model
# (`FamilyVAE`, `--flow planar:T`), together with one inverse autoregressive flow step (Kingma et al. 2016).
#
# Run:  python lessons/27_flows_gap.py [--quick] [--out DIR] [--seed N]

# %% [markdown]
# ## 1. Change of variables
#
# Push $z_0 \sim q_0 = \mathcal N(\mu, \mathrm{diag}\,\sigma^2)$ through invertible maps $z_t = f_t(z_{t-1})$.  The
# density of $z_T$ is
#
# $$\log q_T(z_T) = \log q_0(z_0) - \sum_{t=1}^T \log\Big|\det \frac{\partial f_t}{\partial z_{t-1}}\Big|,$$
#
# and with $z_0 = \mu + \sigma\odot\varepsilon$, $\log q_0(z_0) = -\tfrac12\sum_j(\varepsilon_j^2 + \log\sigma_j^2
# + \log 2\pi)$.  The ELBO needs only samples and this density:
# $\mathrm{ELBO}(q_T) = \mathbb E_\varepsilon[\log p(x|z_T) + \log p(z_T) - \log q_T(z_T)]$; there is no closed-form
# KL any more, so the KL is estimated by Monte Carlo.
#
# ## 2. The planar step and its log-determinant
#
# $$f(z) = z + u\,\tanh(w^\top z + b),\qquad \frac{\partial f}{\partial z} = I + u\,\psi^\top,\quad
#   \psi = (1 - h^2)\,w,\quad h = \tanh(w^\top z + b).$$
#
# By the matrix determinant lemma, $\det(I + u\psi^\top) = 1 + \psi^\top u = 1 + (1-h^2)(w^\top u)$.  With upstream
# gradients $F = \partial L/\partial f$ and $G = \partial L/\partial \log|\det|$, and $a = w^\top z + b$:
#
# $$\frac{\partial L}{\partial a} = (F^\top u)(1-h^2) - G\,\frac{2h(1-h^2)(w^\top u)}{\det},\qquad
#   \frac{\partial L}{\partial z} = F + \frac{\partial L}{\partial a}\,w,$$
#
# $$\frac{\partial L}{\partial u} = \sum_m F_m h_m + \sum_m \frac{G_m(1-h_m^2)}{\det_m}\,w,\quad
#   \frac{\partial L}{\partial w} = \sum_m \frac{\partial L}{\partial a_m} z_m + \sum_m \frac{G_m(1-h_m^2)}{\det_m}\,u,
#   \quad \frac{\partial L}{\partial b} = \sum_m \frac{\partial L}{\partial a_m}.$$
#
# The $G$ terms are the log-determinant's gradient; forgetting them is the classic mistake, and the check below
# catches it.  $f$ is invertible when $w^\top u \ge -1$; the paper's Appendix A maps a free $u$ to
# $\hat u = u + (m(w^\top u) - w^\top u)\,w/|w|^2$, $m(a) = -1 + \mathrm{softplus}(a)$, so $w^\top\hat u = m(\cdot) > -1$
# (`planar_uhat_forward`, its backward derived in `minivae/flows.py`).

# %%
import numpy as np
import matplotlib.pyplot as plt

import minivae
from minivae.data import load_mnist, static_binarize
from minivae.evaluate import iw_log_likelihood, log_mean_exp
from minivae.families import FamilyConfig, FamilyVAE
from minivae.flows import planar_backward, planar_forward, planar_uhat_backward, planar_uhat_forward
from minivae.gaussian import LOG_2PI, log_standard_normal, reparameterize_backward, reparameterize_forward
from minivae.gradcheck import numerical_gradient, rel_error
from minivae.lessonkit import check, fit, lesson_args, save_figure

args = lesson_args("lesson_output/27_flows_gap", "Lesson 27: flows and the approximation gap")
rng = np.random.default_rng(args.seed)

# %%
L = 8
zc, uc, wc, bc = rng.standard_normal((6, L)), rng.standard_normal(L), rng.standard_normal(L), rng.standard_normal(1)


def both(z, u, w, b):                      # f and logdet as one array, so one random upstream covers both
    f, ld, cache = planar_forward(z, u, w, b)
    return np.concatenate([f, ld[:, None]], axis=1), cache


rep = minivae.check_op(both, lambda d, c: planar_backward(d[:, :L], d[:, L], c), [zc, uc, wc, bc], rng=rng,
                       tol=1.0)                # tol=1: the report comes back and CHECK judges it
check(max(rep.values()) <= 1e-7, f"the planar step's backward, log-det included, matches central differences "
      f"(worst {max(rep.values()):.1e})")
rep = minivae.check_op(planar_uhat_forward, planar_uhat_backward, [uc, wc], rng=rng, tol=1.0)
check(max(rep.values()) <= 1e-7, "u_hat's backward matches central differences")

try:
    minivae.check_op(both, lambda d, c: planar_backward(d[:, :L], 0 * d[:, L], c), [zc, uc, wc, bc], rng=rng)
    caught = False
except minivae.GradientCheckError as exc:
    caught = True
    print("  planted mistake (no log-det gradient):", str(exc)[:90])
check(caught, "a backward that forgets the log-determinant's gradient fails the check")

J = np.stack([(planar_forward(zc + h, uc, wc, bc)[0] - planar_forward(zc - h, uc, wc, bc)[0]) / 2e-6
              for h in np.eye(L) * 1e-6], axis=2)                      # (M, L, L) by central differences
check(np.allclose(planar_forward(zc, uc, wc, bc)[1], np.linalg.slogdet(J)[1], atol=1e-6),
      "log|1 + (1 - h^2) w.u| is the log-determinant of the numerical Jacobian")
u_bad = -3 * wc / (wc @ wc)                                                   # w.u = -3: not invertible
uh = planar_uhat_forward(u_bad, wc)[0]
check(wc @ uh > -1, f"u_hat keeps the step invertible for a u with w.u = -3 (w.u_hat = {wc @ uh:.3f} > -1)")

# %% [markdown]
# ## 3. A trained decoder, and one free flow per image
#
# As in lesson 22: a 784-200-8 Bernoulli VAE trained briefly, then for each test image $x_n$ the variational
# parameters are free: $(\mu_n, \log\sigma^2_n)$ and, for T planar steps, $(u_{nt}, w_{nt}, b_{nt})$.  The negative
# ELBO of one image with S draws is
#
# $$J = \frac1S\sum_s\Big[\mathrm{rec}(z_{T,s}) + \log q_0(z_{0,s}) - \sum_t \log|\det|_{t,s} - \log p(z_{T,s})\Big],$$
#
# and its backward: $\partial J/\partial\mathrm{rec} = 1/S$ through the decoder to $z_T$, plus $z_T/S$ from
# $-\log p(z_T)$; each step's log-det gets $-1/S$; the flow's backward carries $z_T \to z_0$; the
# reparameterization gives $(\mu, \log\sigma^2)$; and $\log q_0$ adds $-\tfrac12$ to each $\log\sigma^2_j$
# ($\varepsilon$ held).  Each step starts as the identity: $w$ random, $b = 0$ and $u = 0.5413\,w/|w|^2$, for
# which $\hat u = 0$ ($\mathrm{softplus}(0.5413) = 1$, so $m = 0$).

# %%
def neg_elbo_flow(model, x1, p, eps, T, backward=True):
    """-ELBO of one image x1 (1, D) under q = Gaussian + T planar steps with parameters p; eps (S, L)."""
    S = eps.shape[0]
    z0, c_rep = reparameterize_forward(p["mu"][None], p["logvar"][None], eps[:, None, :])   # (S, 1, L)
    z, logdet, caches = z0[:, 0], np.zeros(S), []
    for t in range(T):
        uhat, c_u = planar_uhat_forward(p[f"u{t}"], p[f"w{t}"])
        z, ld, c = planar_forward(z, uhat, p[f"w{t}"], p[f"b{t}"])
        logdet, caches = logdet + ld, caches + [(c_u, c)]
    outs, c_dec = model.decoder_forward(z)                                   # (S, D) logits
    rec, c_rec = model._recon_forward([outs[0][:, None, :]], x1)              # (S, 1)
    log_q = -0.5 * (eps * eps + p["logvar"] + LOG_2PI).sum(axis=1) - logdet
    J = float((rec[:, 0] + log_q - log_standard_normal(z)).mean())
    if not backward:
        return J, None
    g = {}
    douts = model._recon_backward(np.full((S, 1), 1.0 / S), c_rec)
    dz = model.decoder_backward([douts[0][:, 0, :]], c_dec, model.new_grads()) + z / S   # decoder; -log p(z)
    for t in reversed(range(T)):
        c_u, c = caches[t]
        dz, duhat, dw, g[f"b{t}"] = planar_backward(dz, np.full(S, -1.0 / S), c)       # log q has -logdet
        g[f"u{t}"], dw_u = planar_uhat_backward(duhat, c_u)
        g[f"w{t}"] = dw + dw_u
    dmu, dlogvar = reparameterize_backward(dz[:, None, :], c_rep)
    g["mu"], g["logvar"] = dmu[0], dlogvar[0] - 0.5                          # log q0's -1/2 logvar_j
    return J, g


def init_flow(mu, logvar, T, seed):
    r = np.random.default_rng(seed)
    p = {"mu": mu.astype(np.float64).copy(), "logvar": logvar.astype(np.float64).copy()}
    for t in range(T):
        w = r.standard_normal(L)
        p.update({f"w{t}": w, f"u{t}": 0.5413 * w / (w @ w), f"b{t}": np.zeros(1)})   # u_hat = 0: the identity
    return p


N_TRAIN, STEPS, N_TEST = (6000, 300, 6) if args.quick else (20000, 1200, 24)
x_train = load_mnist("train")[0][:N_TRAIN]
x = static_binarize(load_mnist("test")[0][:N_TEST], seed=1).astype(np.float64)
model32 = minivae.VAE(minivae.VAEConfig(hidden=(200,), z_dim=L), rng=args.seed)
fit(model32, x_train, STEPS, rng)
model = minivae.VAE(minivae.VAEConfig(hidden=(200,), z_dim=L, dtype="float64"))
model.flat[:] = model32.flat                                                  # float64 copy for the fits
mu_enc, lv_enc = model.encode(x)

p = init_flow(mu_enc[0], lv_enc[0], 2, seed=1)
for k in ("u0", "w1"):
    p[k] = p[k] + rng.standard_normal(L)                                       # away from the identity
eps_c = rng.standard_normal((3, L))
_, g = neg_elbo_flow(model, x[:1], p, eps_c, 2)
num = {k: numerical_gradient(lambda: neg_elbo_flow(model, x[:1], p, eps_c, 2, False)[0], v) for k, v in p.items()}
# one relative error over the whole gradient vector: J is ~100 nats, so round-off in the differences (~1e-9) is
# large against the smallest parameters' gradients (a bias's can be ~1e-3), not against the vector's scale
worst = rel_error(np.concatenate([g[k].ravel() for k in p]), np.concatenate([num[k].ravel() for k in p]))
check(worst <= 1e-7, f"the per-image flow ELBO's gradient matches central differences (rel. error {worst:.1e} "
      f"over all {sum(v.size for v in p.values())} parameters of the image's q)")

# %% [markdown]
# ## 4. The gap against flow length
#
# For each image and each T: Adam on all of its parameters from the encoder's $(\mu, \log\sigma^2)$, fresh
# $\varepsilon$ every step (S = 8), a cosine-decayed step size.  The ELBO of the fitted $q^*_T$ is then measured on
# one fixed set of draws, and $\log p(x)$ by importance weighting (k = 2000) with the best of the proposals (the
# encoder's, and each fitted $q^*_T$: all are unbiased estimates of $p(x)$, so their log-mean-exps are lower bounds
# that differ only in noise).

# %%
TS = (0, 2, 8) if args.quick else (0, 1, 2, 4, 8)
OPT_STEPS, S_FIT, S_EVAL, IW_K = (120, 8, 200, 500) if args.quick else (300, 8, 500, 2000)


def fit_image(n, T):
    p = init_flow(mu_enc[n], lv_enc[n], T, seed=n)
    opt = minivae.Adam(lr=0.02)
    r = np.random.default_rng(1000 + n)
    for t in range(OPT_STEPS):
        opt.lr = 0.02 * 0.5 * (1 + np.cos(np.pi * t / OPT_STEPS))
        _, g = neg_elbo_flow(model, x[n:n + 1], p, r.standard_normal((S_FIT, L)), T)
        opt.step(p, g)
    return p


def log_w(n, p, T, eps):
    """log p(x|z_T) + log p(z_T) - log q_T(z_T) of image n for the draws eps (S, L)."""
    z = p["mu"] + np.exp(0.5 * p["logvar"]) * eps
    logdet = np.zeros(len(eps))
    for t in range(T):
        uhat = planar_uhat_forward(p[f"u{t}"], p[f"w{t}"])[0]
        z, ld, _ = planar_forward(z, uhat, p[f"w{t}"], p[f"b{t}"])
        logdet += ld
    log_q = -0.5 * (eps * eps + p["logvar"] + LOG_2PI).sum(axis=1) - logdet
    return model.log_px_given_z(x[n:n + 1], z[:, None, :])[:, 0] + log_standard_normal(z) - log_q


eps_eval = np.random.default_rng(7).standard_normal((S_EVAL, L))
elbo = np.zeros((len(TS), N_TEST))
logp = -np.inf * np.ones(N_TEST)
for i, T in enumerate(TS):
    for n in range(N_TEST):
        p = fit_image(n, T)
        elbo[i, n] = log_w(n, p, T, eps_eval).mean()
        lw = log_w(n, p, T, np.random.default_rng(8 + n).standard_normal((IW_K, L)))
        logp[n] = max(logp[n], float(log_mean_exp(lw)))
    print(f"  T = {T}: mean ELBO(q*_T) = {elbo[i].mean():8.3f} nats")
logp = np.maximum(logp, iw_log_likelihood(model, x, IW_K, np.random.default_rng(9)))
elbo_enc = np.array([log_w(n, init_flow(mu_enc[n], lv_enc[n], 0, 0), 0, eps_eval).mean() for n in range(N_TEST)])
gap = logp[None] - elbo                                                     # approximation gap per T, per image
print(f"  log p(x) (IW, k={IW_K}) mean {logp.mean():.2f}; encoder ELBO {elbo_enc.mean():.2f}; "
      f"amortization gap {np.mean(elbo[0] - elbo_enc):.2f} nats")
for T, gT in zip(TS, gap):
    print(f"  T = {T}: approximation gap {gT.mean():6.3f} nats (images with a larger gap than T = 0: "
          f"{np.mean(gT > gap[0] + 1e-9):.0%})")

# %%
fig, ax = plt.subplots(figsize=(5.5, 3.5))
ax.plot(TS, gap.mean(axis=1), marker="o")
ax.set_xlabel("planar steps T")
ax.set_ylabel("approximation gap (nats)")
ax.set_title(f"log p(x) - ELBO(q*_T), mean of {N_TEST} test digits")
save_figure(fig, args.out, "gap_vs_T.png")

check(gap[-1].mean() < gap[0].mean(), f"the approximation gap shrinks with the flow: {gap[0].mean():.3f} nats "
      f"with the Gaussian, {gap[-1].mean():.3f} with T = {TS[-1]} planar steps")
check(np.mean(elbo[-1] >= elbo[0] - 0.05) >= 0.75, f"the flow's fitted ELBO is at least the Gaussian's (within "
      f"0.05 nats) on {np.mean(elbo[-1] >= elbo[0] - 0.05):.0%} of the images")
check(gap.min() > -0.3, "every gap is >= 0 up to the noise of the estimates (an ELBO cannot exceed log p(x))")

# %% [markdown]
# ## 5. The same ops in the model
#
# `FamilyVAE(FamilyConfig(flow="planar:T"))` puts T planar steps after the encoder's Gaussian, with parameters
# shared by every x (`--flow planar:T` on the command line), and `flow="iaf:T"` T inverse autoregressive steps,
# each a MADE on z (lesson 26's masked layer) giving $z' = \sigma\odot z + (1-\sigma)\odot m$, whose Jacobian is
# triangular with $\log|\det| = \sum_j \log\sigma_j$.  Both models' gradients are checked whole, in float64.

# %%
for flow in ("planar:3", "iaf:2"):
    tiny = FamilyVAE(FamilyConfig(x_dim=7, hidden=(5,), z_dim=3, dtype="float64", activation="tanh", flow=flow),
                     rng=0)
    xt = (rng.random((4, 7)) < 0.5).astype(np.float64)
    rep = minivae.check_model(tiny, xt, n_samples=2, rng=rng, tol=1.0)
    check(max(rep.values()) <= 1e-7, f"FamilyVAE with flow {flow}: every parameter's gradient matches central "
          f"differences (worst {max(rep.values()):.1e})")
