# %% [markdown]
# # Lesson 22: the amortization gap
#
# A VAE's encoder is *amortized* inference: one network maps every $x$ to its $q_\phi(z \mid x)$, instead of fitting
# a separate $q$ for each data point.  That saves an optimisation per image, and costs something: the encoder's
# $q_\phi(z \mid x)$ need not be the best Gaussian for that $x$.  Here we fit the best one, per test image, by gradient
# steps on its own $(\mu, \text{logvar})$, using minivae's op pairs, and split the gap between $\log p(x)$ and the
# encoder's ELBO into the two parts that Cremer, Li & Duvenaud (2018), *Inference Suboptimality in Variational
# Autoencoders* (ICML), named:
#
# * the **approximation gap**: what the family of diagonal Gaussians cannot do (lesson 05 showed it on a toy model);
# * the **amortization gap**: what the encoder does worse than the best member of that family.
#
# Run it as a script, `python lessons/22_amortization_gap.py [--out DIR] [--seed N]`, or open it as a
# notebook (jupytext or VS Code; `MINIVAE_QUICK=1` in the kernel's environment selects the tests' quick mode).
#
# ## The decomposition
#
# Write $\mathcal{Q}$ for the family of diagonal Gaussians $q(z) = \mathcal{N}\big(\mu, \mathrm{diag}\, e^{\text{logvar}}\big)$,
# $q_\phi = q_\phi(\cdot \mid x)$ for the encoder's member, and
#
# $$q^* = \arg\max_{q \in \mathcal{Q}} \mathrm{ELBO}(q), \qquad
#   \mathrm{ELBO}(q) = \mathbb{E}_q\big[\log p(x \mid z)\big] - \mathrm{KL}\big(q \,\|\, p(z)\big)$$
#
# for the best member for this one $x$ (the decoder is held fixed).  Adding and subtracting $\mathrm{ELBO}(q^*)$:
#
# $$\underbrace{\log p(x) - \mathrm{ELBO}(q_\phi)}_{\text{inference gap}}
#   = \underbrace{\log p(x) - \mathrm{ELBO}(q^*)}_{\text{approximation gap}}
#   + \underbrace{\mathrm{ELBO}(q^*) - \mathrm{ELBO}(q_\phi)}_{\text{amortization gap}} .$$
#
# Both parts are $\ge 0$: the first because every ELBO is $\le \log p(x)$ (lesson 05: the difference is
# $\mathrm{KL}(q^* \,\|\, p(z \mid x)) \ge 0$), the second because $q_\phi \in \mathcal{Q}$ and $q^*$ is the best member
# of $\mathcal{Q}$.  By the identity of lesson 05, the three gaps are KL divergences to the true posterior:
# inference gap $= \mathrm{KL}(q_\phi \,\|\, p(z \mid x))$, approximation gap $= \mathrm{KL}(q^* \,\|\, p(z \mid x))$, and
# the amortization gap is their difference.

# %%
import time

import matplotlib.pyplot as plt
import numpy as np

import minivae
from minivae.data import load_mnist, static_binarize
from minivae.evaluate import log_mean_exp
from minivae.gaussian import (kl_backward, kl_forward, log_diag_normal, log_standard_normal,
                              reparameterize_backward, reparameterize_forward)
from minivae.gradcheck import numerical_gradient, rel_error
from minivae.lessonkit import check, fit, lesson_args, save_figure

# --quick (or MINIVAE_QUICK=1), --out DIR, --seed N; unknown arguments (a Jupyter kernel's) are ignored
args = lesson_args("lesson_output/22_amortization_gap", "Lesson 22: the amortization gap",
                   quick_help="a shorter training run, fewer test images, fewer samples (for tests)")
rng = np.random.default_rng(args.seed)
t0 = time.time()

# %% [markdown]
# ## 1. A small trained model
#
# A 784-200-8 Bernoulli VAE, trained briefly with `lessonkit.fit` (lesson 10's loop: dynamic binarization, Adam
# $10^{-3}$, batches of 128).  A short training run leaves the encoder imperfect, which is the typical situation the
# amortization gap describes.  The test images are binarized once (a fixed draw), so that $\log p(x)$ is a
# probability of a fixed binary image.

# %%
N_TRAIN, STEPS, N_TEST = (1500, 300, 24) if args.quick else (20000, 1200, 100)
x_train = load_mnist("train")[0][:N_TRAIN]
x = static_binarize(load_mnist("test")[0][:N_TEST], seed=1)                  # (N, D) fixed binary test images
model = minivae.VAE(minivae.VAEConfig(x_dim=784, hidden=(200,), z_dim=8), rng=args.seed)
opt_train = fit(model, x_train, STEPS, rng)                                 # its Adam state, for section 7
N, D, L = x.shape[0], model.config.x_dim, model.config.z_dim
print(f"  {model}, trained for {STEPS} steps on {N_TRAIN} images; {N} test images")

# %% [markdown]
# ## 2. The ELBO of one free $q$ per image, and its gradient
#
# For each test image $x_n$ the variational parameters $(\mu_n, \text{logvar}_n) \in \mathbb{R}^{L} \times \mathbb{R}^{L}$
# are now free variables, not the encoder's output.  With $S$ draws $\epsilon_s \sim \mathcal{N}(0, I)$ and
# $z_{sn} = \mu_n + \sigma_n \odot \epsilon_{sn}$, $\sigma_n = e^{\text{logvar}_n / 2}$ (lesson 06), the objective to
# minimise is the negative ELBO of each image, summed over the images (they do not interact):
#
# $$J(\mu, \text{logvar}) = \sum_n \Big[ \frac1S \sum_s \mathrm{rec}_{sn} + \mathrm{KL}_n \Big], \qquad
#   \mathrm{rec}_{sn} = -\log p(x_n \mid z_{sn}), \quad \mathrm{KL}_n = \mathrm{KL}\big(q_n \,\|\, \mathcal{N}(0, I)\big).$$
#
# Its gradient is the chain of `VAE._loss_backward` (lesson 09), stopped at $(\mu, \text{logvar})$ instead of going on
# into the encoder:
#
# $$\frac{\partial J}{\partial\, \mathrm{rec}_{sn}} = \frac1S
#   \;\xrightarrow{\text{likelihood, decoder}}\; \frac{\partial J}{\partial z_{sn}}
#   \;\xrightarrow{\text{reparameterization}}\;
#   \frac{\partial J}{\partial \mu_n} = \sum_s \frac{\partial J}{\partial z_{sn}} + \mu_n, \quad
#   \frac{\partial J}{\partial\, \text{logvar}_n} = \sum_s \frac{\partial J}{\partial z_{sn}} \odot \epsilon_{sn} \odot \frac{\sigma_n}{2}
#   + \frac{e^{\text{logvar}_n} - 1}{2},$$
#
# the last terms being the KL's gradient (lesson 07).  The decoder's backward also computes its weight gradients; we
# pass a scratch gradient dict and ignore them: the decoder stays fixed.

# %%
def neg_elbo(model, x, mu, logvar, eps, backward=True):
    """Per-image -ELBO estimates (S-sample mean of rec + analytic KL), (N,); with gradients w.r.t. (mu, logvar)."""
    S, N, L = eps.shape
    D = model.config.x_dim
    z, c_rep = reparameterize_forward(mu, logvar, eps)                     # (S, N, L)
    outs, c_dec = model.decoder_forward(z.reshape(S * N, L))              # logits (S*N, D)
    rec, c_rec = model._recon_forward([o.reshape(S, N, D) for o in outs], x)   # (S, N)
    kl, c_kl = kl_forward(mu, logvar)                                      # (N,)
    loss = rec.mean(axis=0) + kl
    if not backward:
        return loss, None, None
    drec = np.full((S, N), 1.0 / S, dtype=rec.dtype)                      # dJ/drec_sn
    douts = model._recon_backward(drec, c_rec)                             # dJ/dlogits, (S, N, D)
    dz = model.decoder_backward([d.reshape(S * N, D) for d in douts], c_dec, model.new_grads())
    dmu, dlogvar = reparameterize_backward(dz.reshape(S, N, L), c_rep)     # sums over s
    dmu_kl, dlogvar_kl = kl_backward(np.ones(N, dtype=rec.dtype), c_kl)    # dJ/dKL_n = 1
    return loss, dmu + dmu_kl, dlogvar + dlogvar_kl                       # mu, logvar feed z and the KL


# %% [markdown]
# The gradient is checked in float64 (a copy of the trained model with the same weights) against central finite
# differences, with a random upstream gradient on the per-image losses, on three images and $S = 3$.

# %%
m64 = minivae.VAE(minivae.VAEConfig(x_dim=784, hidden=(200,), z_dim=8, dtype="float64"))
m64.flat[:] = model.flat
x3 = x[:3].astype(np.float64)
mu3, lv3 = (a.astype(np.float64) for a in m64.encode(x3))
eps3 = rng.standard_normal((3, 3, L))
up = rng.standard_normal(3)                                                 # random upstream dJ/dloss_n
_, dmu3, dlv3 = neg_elbo(m64, x3, mu3, lv3, eps3)                           # gradients of sum_n loss_n
g_mu, g_lv = up[:, None] * dmu3, up[:, None] * dlv3                         # image n's loss sees only (mu_n, logvar_n)
num_mu = numerical_gradient(lambda: neg_elbo(m64, x3, mu3, lv3, eps3, backward=False)[0], mu3, up)
num_lv = numerical_gradient(lambda: neg_elbo(m64, x3, mu3, lv3, eps3, backward=False)[0], lv3, up)
err = max(rel_error(g_mu, num_mu), rel_error(g_lv, num_lv))
check(err < 1e-7, f"the per-image gradient w.r.t. (mu, logvar) matches central differences (rel. error {err:.1e})")

# %% [markdown]
# ## 3. Fitting $q^*$ per image
#
# Start every image from the encoder's $(\mu_\phi(x_n), \text{logvar}_\phi(x_n))$ and take Adam steps on $J$ with fresh
# $\epsilon$ at each step ($S = 4$) and a step size that decays from $0.03$ to $0$ along a cosine: stochastic
# gradients need a decaying step to settle.  Every image gets its own $q$, but they are optimised together in one
# batch, since $J$ is a sum of independent terms.
#
# All ELBOs below are estimated with one **fixed** set of $S_\text{eval}$ draws $\epsilon$, the same for the encoder's
# $q_\phi$ and for $q^*$ (common random numbers): the noise of the two estimates then largely cancels in their
# difference, the amortization gap.  The fixed set is independent of the draws used in the fit, so $q^*$ cannot
# overfit it.

# %%
OPT_STEPS, S_FIT, S_EVAL = (150, 4, 200) if args.quick else (300, 4, 500)
mu_enc, lv_enc = model.encode(x)
eps_eval = np.random.default_rng(args.seed + 100).standard_normal((S_EVAL, N, L)).astype(np.float32)


def elbo_samples(mu, logvar, mdl=None):
    """Per-sample ELBO terms log p(x|z_s) - KL on the fixed eval draws, (S_eval, N) float64."""
    mdl = model if mdl is None else mdl
    z = reparameterize_forward(mu, logvar, eps_eval)[0]
    return mdl.log_px_given_z(x, z).astype(np.float64) - kl_forward(mu, logvar)[0].astype(np.float64)


def fit_qstar(mdl, rng):
    """Adam on each image's own (mu, logvar) from the encoder's, cosine-decayed step; (mu, logvar, curve)."""
    mu_f, lv_f = (a.copy() for a in mdl.encode(x))
    opt = minivae.Adam(lr=0.03)
    curve = [elbo_samples(mu_f, lv_f, mdl).mean(0)]
    for t in range(OPT_STEPS):
        opt.lr = 0.03 * 0.5 * (1 + np.cos(np.pi * t / OPT_STEPS))          # cosine decay to 0
        _, dmu, dlv = neg_elbo(mdl, x, mu_f, lv_f, rng.standard_normal((S_FIT, N, L)).astype(np.float32))
        opt.step({"mu": mu_f, "logvar": lv_f}, {"mu": dmu, "logvar": dlv})
        if (t + 1) % 25 == 0:
            curve.append(elbo_samples(mu_f, lv_f, mdl).mean(0))
    return mu_f, lv_f, np.array(curve)                                     # curve (checkpoints, N)


mu, lv, curve = fit_qstar(model, rng)
e_enc_s, e_opt_s = elbo_samples(mu_enc, lv_enc), elbo_samples(mu, lv)
elbo_enc, elbo_opt = e_enc_s.mean(0), e_opt_s.mean(0)                       # (N,) each
amort = elbo_opt - elbo_enc
amort_se = (e_opt_s - e_enc_s).std(0, ddof=1) / np.sqrt(S_EVAL)            # per image, paired
print(f"  mean ELBO: encoder q {elbo_enc.mean():.3f}   fitted q* {elbo_opt.mean():.3f}   "
      f"({OPT_STEPS} Adam steps, {time.time() - t0:.0f} s so far)")
print(f"  amortization gap per image: mean {amort.mean():.3f}, median {np.median(amort):.3f}, "
      f"min {amort.min():.3f}, max {amort.max():.3f} nats")
check(np.all(amort > -4 * amort_se),
      "the fitted q* is at least as good as the encoder's q for every image (within 4 s.e. of the paired estimate)")
check(np.mean(amort > 0) >= 0.9, f"q* beats the encoder on {np.mean(amort > 0):.0%} of the images (>= 90%)")
check(amort.mean() > 4 * amort.std(ddof=1) / np.sqrt(N),
      "the amortization gap is positive on average (mean > 4 standard errors over the images)")

# %% [markdown]
# ## 4. $\log p(x)$, estimated two ways
#
# The importance-weighted estimate (lesson 14, Burda et al. 2015),
#
# $$\log \hat p_k(x) = \log \frac1k \sum_{i=1}^k \frac{p(x \mid z_i)\, p(z_i)}{q(z_i)}, \qquad z_i \sim q,$$
#
# is a lower bound in expectation for any proposal $q$, and tends to $\log p(x)$ as $k \to \infty$.  We compute it
# with large $k$ twice, with independent draws: with the encoder's $q_\phi$ as proposal and with the fitted $q^*$ as
# proposal, both written out below with `minivae.evaluate.log_mean_exp`.  Which one is closer to $\log p(x)$?  Not
# necessarily $q^*$.  $q^*$ is the best Gaussian in $\mathrm{KL}(q \,\|\, p(z \mid x))$, a mode-seeking divergence that
# tolerates a $q$ narrower than the posterior.  The bias of the importance-weighted estimate depends on the other
# direction: by the delta method, with $w = p(x, z)/q(z)$,
#
# $$\log p(x) - \mathbb E\big[\log \hat p_k(x)\big] \approx \frac{\mathrm{Var}_q[w]}{2k\,p(x)^2}
#   = \frac{\chi^2\big(p(z \mid x) \,\|\, q\big)}{2k},$$
#
# which a narrow $q$ makes large: for a 1-D posterior $N(0, 1)$ and $q = N(0, s^2)$,
# $\chi^2 = s^2/\sqrt{2s^2 - 1} - 1$, infinite for $s \le 1/\sqrt2$, where $\mathrm{KL}(q\,\|\,p)$ is still small.
# The toy below computes both by quadrature, and measures the bias at k = 10 (the delta method is only a
# large-k guide: at k = 10, with heavy-tailed weights, the measured bias is smaller than $\chi^2/2k$).  On the model we estimate $\chi^2$ per image from the weights,
# $\hat\chi^2 = k \sum_i w_i^2 / (\sum_i w_i)^2 - 1$ ($k$ over the effective sample size, minus 1).
# Each $\hat p_k(x)$ (before the log) is an unbiased estimate of $p(x)$, so their mean is one too, with $2k$ draws;
# its log is the $\log p(x)$ we use below.

# %%
s_narrow, s_wide, k_toy = 0.75, 1.5, 10
zg = np.linspace(-12, 12, 24001)
post = np.exp(-0.5 * zg ** 2) / np.sqrt(2 * np.pi)                         # p(z|x) = N(0, 1)
toy = {}
for s_q in (s_narrow, s_wide):
    q = np.exp(-0.5 * (zg / s_q) ** 2) / (np.sqrt(2 * np.pi) * s_q)
    kl_qp = float(np.sum(q * np.log(q / post)) * (zg[1] - zg[0]))            # KL(q || p) by quadrature
    chi2 = float(np.sum(post ** 2 / q) * (zg[1] - zg[0])) - 1                # chi^2(p || q) by quadrature
    zs = s_q * np.random.default_rng(args.seed + 400).standard_normal((20000, k_toy))
    log_w = -0.5 * zs ** 2 + 0.5 * (zs / s_q) ** 2 + np.log(s_q)           # log p(z|x) - log q(z), log p(x) = 0
    bias = -float(log_mean_exp(log_w, axis=1).mean())                       # log p(x) - E log p_k, measured
    toy[s_q] = (kl_qp, chi2, bias)
    print(f"  toy, q = N(0, {s_q}^2): KL(q||p) {kl_qp:.3f}, chi^2(p||q) {chi2:.3f}, bias of log p_{k_toy}: "
          f"{bias:.4f} measured, chi^2/(2k) = {chi2 / (2 * k_toy):.4f}")
chi2_exact = {s_q: s_q ** 2 / np.sqrt(2 * s_q ** 2 - 1) - 1 for s_q in toy}
check(all(abs(toy[s_q][1] - chi2_exact[s_q]) < 1e-6 for s_q in toy),
      "the quadrature chi^2(p||q) equals s^2 / sqrt(2 s^2 - 1) - 1 for both q (to 1e-6)")
check(toy[s_narrow][0] < 0.5 * toy[s_wide][0] and toy[s_narrow][1] > 2 * toy[s_wide][1],
      f"a narrow q (sd {s_narrow}) is > 2x closer to the posterior in KL(q||p) than a wide one (sd {s_wide}), yet its "
      "chi^2(p||q), which sets the IW bias chi^2/(2k), is > 2x larger: the KL-closer proposal is not the less biased one")

K = 500 if args.quick else 1000


def iw_log_weights(mu_q, lv_q, rng):
    """log w = log p(x|z) + log p(z) - log q(z) for K draws z ~ q, (K, N) float64."""
    lw = []
    for start in range(0, K, 100):                                          # chunks of 100 samples
        z = reparameterize_forward(mu_q, lv_q, rng.standard_normal((100, N, L)).astype(np.float32))[0]
        lw.append(model.log_px_given_z(x, z).astype(np.float64) + log_standard_normal(z)
                  - log_diag_normal(z, mu_q, lv_q))
    return np.concatenate(lw)


est = {}
for name, (mu_q, lv_q, seed) in {"encoder": (mu_enc, lv_enc, 200), "q*": (mu, lv, 201)}.items():
    lw = iw_log_weights(mu_q, lv_q, np.random.default_rng(args.seed + seed))
    chi2_hat = np.exp(log_mean_exp(2 * lw, axis=0) - 2 * log_mean_exp(lw, axis=0)) - 1   # mean w^2 / (mean w)^2 - 1
    est[name] = (log_mean_exp(lw, axis=0), chi2_hat)                        # (N,) each
    print(f"  {name:8s} proposal: mean log p(x) (IW, k={K}) {est[name][0].mean():.3f}; estimated chi^2 median "
          f"{np.median(chi2_hat):.2f}, so a delta-method bias of about {np.median(chi2_hat) / (2 * K):.4f} nats")
lpx_enc, lpx_opt = est["encoder"][0], est["q*"][0]
worse = np.mean(est["q*"][1] > est["encoder"][1])
print(f"  q* has the larger estimated chi^2 on {worse:.0%} of the images, although its ELBO is higher on "
      f"{np.mean(amort > 0):.0%}")
diff = lpx_opt - lpx_enc
print(f"  q* estimate - encoder estimate: {diff.mean():+.3f} nats on average")
check(abs(diff.mean()) < 0.25 * amort.mean(), "the two estimates of log p(x) differ by less than a quarter of the "
      "amortization gap: the split below does not hinge on which one we use")
lpx = np.logaddexp(lpx_opt, lpx_enc) - np.log(2)    # the mean of two unbiased estimates of p(x): one with 2k draws

# %% [markdown]
# ## 5. The split
#
# With $\log p(x)$ from the IW estimates, the encoder's ELBO and the fitted ELBO, every image gets its three gaps.  The
# three numbers add up by construction (inference = approximation + amortization, per image); what the data must
# show is that each part is $\ge 0$ up to the noise of the estimates, as the derivation says.

# %%
inference = lpx - elbo_enc
approx = lpx - elbo_opt
print("                      mean    median   (nats per image)")
for name, g in (("inference gap", inference), ("approximation gap", approx), ("amortization gap", amort)):
    print(f"  {name:18s} {g.mean():7.3f}  {np.median(g):7.3f}")
print(f"  the amortization gap is {amort.mean() / inference.mean():.0%} of the inference gap")
se_approx = approx.std(ddof=1) / np.sqrt(N)
check(approx.mean() > -3 * se_approx, "the approximation gap is non-negative on average (within 3 s.e.)")
check(np.mean(approx > -1.0) >= 0.9, "per image, the approximation gap is >= -1 nat (noise) for >= 90% of the images")
check(inference.mean() > amort.mean() > 0.5 * inference.mean(),
      "the amortization gap is a positive part of the inference gap, and more than half of it")

# %% [markdown]
# ## 6. Pictures
#
# Left: the mean ELBO as the per-image optimisation runs, against the encoder's ELBO and the IW $\log p(x)$.  Right:
# the two gaps per image, sorted by the inference gap.  Here the amortization gap is most of the inference gap, as
# Cremer et al. (2018) found for their MNIST models: the distance to the true posterior came more from the imperfect
# encoder than from the limited family of diagonal Gaussians.  Section 7 asks whether a longer training run shrinks it.

# %%
fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
ax = axes[0]
ax.plot(np.arange(len(curve)) * 25, curve.mean(1), "o-", label="mean ELBO(q), per-image fit")
ax.axhline(elbo_enc.mean(), color="C1", ls=":", label="mean ELBO(encoder q)")
ax.axhline(lpx.mean(), color="k", ls="--", label=f"mean log p(x) (IW, k={K})")
ax.set_xlabel("Adam steps on (mu, logvar)")
ax.set_ylabel("nats per image")
ax.legend()
ax.set_title("fitting q(z|x) per test image")
ax = axes[1]
order = np.argsort(inference)
ax.bar(np.arange(N), approx[order], color="C0", label="approximation gap")
ax.bar(np.arange(N), amort[order], bottom=approx[order], color="C3", label="amortization gap")
ax.plot(np.arange(N), inference[order], "k.", ms=4, label="inference gap")
ax.set_xlabel("test image (sorted by inference gap)")
ax.set_ylabel("nats")
ax.legend()
ax.set_title("log p(x) - ELBO(encoder q), split in two")
fig.tight_layout()
save_figure(fig, args.out, "amortization_gap.png")

# %% [markdown]
# ## 7. Does a longer training run shrink it?
#
# One might expect so: the encoder is imperfect because it is briefly trained.  But the encoder is fitted to the
# *training* images, and the gap is measured on held-out ones; Cremer et al. (2018) found that on test data the
# amortization gap can grow with training, as the encoder overfits.  We continue training a copy of the model (the
# same Adam state) for three times as many steps again, so four times in all, and fit $q^*$ again for the same test
# images.  The two gaps are paired (same images, same evaluation draws), so their difference is measured precisely.

# %%
model_long = minivae.VAE(model.config)
model_long.flat[:] = model.flat                                            # the same weights ...
opt_long = minivae.Adam(lr=opt_train.lr)
opt_long.load_state_dict(opt_train.state_dict(), model_long.params)       # ... and the same Adam moments and step
fit(model_long, x_train, 3 * STEPS, np.random.default_rng(args.seed + 500), opt=opt_long)
mu_l, lv_l, _ = fit_qstar(model_long, np.random.default_rng(args.seed + 501))
enc_l = model_long.encode(x)
amort_long = (elbo_samples(mu_l, lv_l, model_long) - elbo_samples(*enc_l, model_long)).mean(0)
d_long = amort_long - amort
se_long = d_long.std(ddof=1) / np.sqrt(N)
print(f"  amortization gap after {STEPS} steps {amort.mean():.3f}, after {4 * STEPS} steps {amort_long.mean():.3f} nats "
      f"(paired difference {d_long.mean():+.3f} +- {se_long:.3f})")
check(d_long.mean() > -2 * se_long,
      f"training 4x longer does not shrink the test images' amortization gap (change {d_long.mean():+.2f} nats, not "
      "below -2 standard errors)")
print(f"done in {time.time() - t0:.1f} s")
