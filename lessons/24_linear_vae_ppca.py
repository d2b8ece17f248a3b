# %% [markdown]
# # Lesson 24: the linear VAE is probabilistic PCA, and its collapse rule is exact
#
# Everything a VAE approximates can be computed exactly when the decoder and the encoder are linear and Gaussian:
# $\log p(x)$, the posterior $p(z \mid x)$, the best $q$, and the optimum of the whole objective.  The model is
# probabilistic PCA (Tipping & Bishop 1999, *Probabilistic principal component analysis*, JRSS B), and Lucas, Tucker,
# Grosse & Norouzi (2019, *Don't Blame the ELBO! A Linear VAE Perspective on Posterior Collapse*, NeurIPS) showed
# what the ELBO does with it: its optimum is the maximum-likelihood solution, with nothing lost to the bound.  This
# lesson derives both, trains a linear VAE on MNIST with minivae's op pairs, checks the trained model against the
# closed form, and derives the rule that decides, exactly, which latent directions collapse: a direction survives only
# if the data's variance along it exceeds the decoder's variance $v$.  That rule explains lesson 23's collapse.
#
# Run it as a script, `python lessons/24_linear_vae_ppca.py [--quick] [--out DIR] [--seed N]`, or open it as a
# notebook (jupytext or VS Code).  `--quick` (or `MINIVAE_QUICK=1`) is the short run the tests use.
#
# ## 1. The model and its exact marginal likelihood
#
# $$p(z) = \mathcal{N}(0, I_L), \qquad p(x \mid z) = \mathcal{N}\big(x;\, W z + b,\, v I_D\big),$$
#
# with $W \in \mathbb{R}^{D \times L}$ (in minivae's `dense` convention, $y = z W_d + b$ with $W_d = W^\top$, shape
# (L, D)) and a fixed decoder variance $v$.  Then $x = Wz + b + \sqrt{v}\,\epsilon$ is a sum of independent Gaussians,
# so $x \sim \mathcal{N}(b, C)$ with $C = W W^\top + v I_D$:
#
# $$\log p(x) = -\frac12 \Big[ D \log 2\pi + \log\det C + (x - b)^\top C^{-1} (x - b) \Big].$$
#
# $C$ is $D \times D$, but only $M = W^\top W + v I_L$ ($L \times L$) needs to be inverted: by the Woodbury identity
# and the matrix determinant lemma,
#
# $$C^{-1} = \frac1v \big( I_D - W M^{-1} W^\top \big), \qquad \log\det C = (D - L)\log v + \log\det M .$$
#
# **The posterior.**  $\log p(z \mid x) = \log p(z) + \log p(x \mid z) + \text{const} =
# -\frac12 z^\top z - \frac{1}{2v}\lVert x - b - Wz \rVert^2 + \text{const}$ is quadratic in $z$ with precision
# $I + W^\top W / v = M / v$, so
#
# $$p(z \mid x) = \mathcal{N}\big( M^{-1} W^\top (x - b),\; v M^{-1} \big).$$
#
# Its mean is linear in $x$ and its covariance does not depend on $x$ at all.  A linear encoder
# $q(z \mid x) = \mathcal{N}\big(x V + c,\, \mathrm{diag}\, e^{\text{logvar}}\big)$ with one learned logvar vector (the
# encoder of Lucas et al.) can therefore be *exact*, as long as $v M^{-1}$ is diagonal.
#
# We check the two formulas on a small random model ($D = 6$, $L = 3$) against the dense $D \times D$ computation, and
# the posterior against Bayes' rule, $\log p(z \mid x) = \log p(z) + \log p(x \mid z) - \log p(x)$, at random $z$.

# %%
import time

import matplotlib.pyplot as plt
import numpy as np

from minivae.data import load_mnist
from minivae.gaussian import (LOG_2PI, kl_backward, kl_forward, reparameterize_backward,
                              reparameterize_forward)
from minivae.gradcheck import numerical_gradient, rel_error
from minivae.layers import dense_backward, dense_forward
from minivae.lessonkit import check, lesson_args, save_figure
from minivae.likelihoods import gaussian_nll_backward, gaussian_nll_forward
from minivae.optim import Adam

# --quick (or MINIVAE_QUICK=1), --out DIR, --seed N; unknown arguments (a Jupyter kernel's) are ignored
args = lesson_args("lesson_output/24_linear_vae_ppca", "Lesson 24: the linear VAE is probabilistic PCA",
                   quick_help="fewer images and training steps (the test mode)")
rng = np.random.default_rng(args.seed)
t0 = time.time()


def log_marginal(x, W, b, v):
    """Exact log p(x) of the linear Gaussian model, per row of x (N,), by Woodbury: only M (L, L) is inverted.

    W (D, L) in the math's convention; x (N, D); float64.
    """
    D, L = W.shape
    M = W.T @ W + v * np.eye(L)
    r = x - b
    rW = r @ W                                                                # (N, L)
    quad = ((r * r).sum(1) - (rW * np.linalg.solve(M, rW.T).T).sum(1)) / v    # r^T C^-1 r
    logdet_c = (D - L) * np.log(v) + np.linalg.slogdet(M)[1]
    return -0.5 * (D * LOG_2PI + logdet_c + quad)


def exact_posterior(x, W, b, v):
    """p(z | x) = N(M^-1 W^T (x - b), v M^-1): means (N, L) and the covariance (L, L), shared by every x."""
    M = W.T @ W + v * np.eye(W.shape[1])
    return np.linalg.solve(M, (W.T @ (x - b).T)).T, v * np.linalg.inv(M)


def log_gauss(y, m, cov):
    """log N(y; m, cov) for rows of y, full covariance (small L only)."""
    d = y - m
    return -0.5 * (len(m) * LOG_2PI + np.linalg.slogdet(cov)[1] + (d * np.linalg.solve(cov, d.T).T).sum(1))


Dt, Lt, vt = 6, 3, 0.3
Wt, bt = rng.normal(size=(Dt, Lt)), rng.normal(size=Dt)
xt = rng.normal(size=(5, Dt)) * 2
Ct = Wt @ Wt.T + vt * np.eye(Dt)
dense = np.array([log_gauss(xt[i:i + 1], bt, Ct)[0] for i in range(5)])
err = rel_error(log_marginal(xt, Wt, bt, vt), dense)
check(err < 1e-12, f"Woodbury log p(x) = the dense D x D Gaussian log-density (rel. error {err:.0e})")
zt = rng.normal(size=(5, Lt))
pm, pc = exact_posterior(xt, Wt, bt, vt)
bayes = (-0.5 * (Lt * LOG_2PI + (zt * zt).sum(1))                                     # log p(z)
         - 0.5 * (((xt - bt - zt @ Wt.T) ** 2).sum(1) / vt + Dt * (LOG_2PI + np.log(vt)))  # log p(x | z)
         - log_marginal(xt, Wt, bt, vt))                                               # - log p(x)
post = np.array([log_gauss(zt[i:i + 1], pm[i], pc)[0] for i in range(5)])
err = rel_error(post, bayes)
check(err < 1e-12, f"log N(z; M^-1 W^T (x - b), v M^-1) = log p(z) + log p(x|z) - log p(x) (rel. error {err:.0e})")

# %% [markdown]
# ## 2. The ELBO in closed form, and the gap
#
# For $q(z \mid x) = \mathcal{N}(m, S)$ with $S = \mathrm{diag}(s_1^2, \dots, s_L^2)$, the reconstruction term is a
# Gaussian expectation of a quadratic: with $z = m + (z - m)$ and $\mathbb{E}[(z - m)(z - m)^\top] = S$,
#
# $$\mathbb{E}_q \lVert x - b - W z \rVert^2 = \lVert x - b - W m \rVert^2 + \mathrm{tr}(W S W^\top)
#   = \lVert x - b - W m \rVert^2 + \sum_j s_j^2 \lVert w_j \rVert^2 ,$$
#
# ($w_j$ the $j$-th column of $W$), so with the KL of lesson 07 (Kingma & Welling 2014, Appendix B):
#
# $$\mathrm{ELBO}(x) = -\frac{\lVert x - b - W m \rVert^2 + \sum_j s_j^2 \lVert w_j \rVert^2}{2v}
#   - \frac D2 \log 2\pi v - \frac12 \sum_j \big( m_j^2 + s_j^2 - 1 - \log s_j^2 \big).$$
#
# Lesson 05's identity $\log p(x) - \mathrm{ELBO}(x) = \mathrm{KL}\big(q(z \mid x) \,\|\, p(z \mid x)\big)$ is now a
# statement about three closed forms.  With the KL between two Gaussians,
# $\mathrm{KL}(\mathcal{N}(m, S) \,\|\, \mathcal{N}(m', S')) = \frac12 \big[ \mathrm{tr}(S'^{-1} S)
# + (m' - m)^\top S'^{-1} (m' - m) - L + \log\det S' - \log\det S \big]$, we check it on the small model for an
# arbitrary encoder.

# %%
def elbo_closed_form(x, W, b, v, m, logvar):
    """The exact ELBO per row of x (N,), for q = N(m (N, L), diag exp(logvar) (L,)); float64."""
    s2 = np.exp(logvar)                                                        # s_j^2 = e^logvar (logvar = log s^2)
    rec = ((x - b - m @ W.T) ** 2).sum(1) + (s2 * (W * W).sum(0)).sum()        # E_q ||x - b - W z||^2
    kl = 0.5 * (m * m + s2 - 1.0 - logvar).sum(1)
    return -rec / (2 * v) - 0.5 * x.shape[1] * (LOG_2PI + np.log(v)) - kl


def kl_gauss(m, S, m2, S2):
    """KL(N(m, S) || N(m2, S2)) per row of m (N, L); S, S2 (L, L)."""
    S2inv = np.linalg.inv(S2)
    d = m2 - m
    return 0.5 * (np.trace(S2inv @ S) + (d @ S2inv * d).sum(1) - len(S)
                  + np.linalg.slogdet(S2)[1] - np.linalg.slogdet(S)[1])


mq, lvq = rng.normal(size=(5, Lt)), rng.normal(size=Lt)
gap = log_marginal(xt, Wt, bt, vt) - elbo_closed_form(xt, Wt, bt, vt, mq, lvq)
kl_post = kl_gauss(mq, np.diag(np.exp(lvq)), pm, pc)
err = rel_error(gap, kl_post)
check(err < 1e-12 and gap.min() > 0,
      f"log p(x) - ELBO = KL(q || p(z|x)) > 0, all three in closed form (rel. error {err:.0e})")

# %% [markdown]
# ## 3. The best diagonal $q$, and why the ELBO picks orthogonal columns
#
# For a fixed decoder, the best $q$ in the family has the posterior's mean, $m = M^{-1} W^\top (x - b)$, and the
# variances that minimise $\mathrm{KL}(q \,\|\, p(z \mid x))$ over diagonal $S$: setting the derivative of
# $\frac12[\mathrm{tr}(\tfrac{M}{v} S) - \log\det S]$ to zero gives $s_j^2 = v / M_{jj}$, and then
#
# $$\log p(x) - \max_{q\ \text{diagonal}} \mathrm{ELBO}(x) = \frac12 \Big[ \sum_j \log M_{jj} - \log\det M \Big] \;\ge\; 0 ,$$
#
# for every $x$ (Hadamard's inequality $\det M \le \prod_j M_{jj}$ for a positive definite $M$), with equality exactly
# when $M = W^\top W + vI$ is diagonal: when the columns of $W$ are **orthogonal**.
#
# Now $\log p(x)$ depends on $W$ only through $C = W W^\top + vI$, which does not change under $W \to W R$ for any
# rotation $R$: the likelihood has a whole orbit of equally good decoders.  Every orbit contains decoders with
# orthogonal columns ($W = U \Sigma V^\top$, take $R = V$), and there the gap is 0.  So
# $\max_{W, q} \mathrm{ELBO} = \max_W \log p(x)$: **the ELBO's optimum is the maximum-likelihood solution**, and of
# the orbit it picks the members with orthogonal columns (Lucas et al. 2019).  We check the gap formula, and that a
# rotation leaves $\log p$ unchanged and lowers the best ELBO by exactly that gap.

# %%
Wq = np.linalg.svd(Wt, full_matrices=False)
Wo = Wq[0] * Wq[1]                                                            # W R with orthogonal columns
R = np.linalg.qr(rng.normal(size=(Lt, Lt)))[0]                                # a random rotation
for name, Wx in (("orthogonal columns", Wo), ("rotated", Wo @ R)):
    M = Wx.T @ Wx + vt * np.eye(Lt)
    m_best = exact_posterior(xt, Wx, bt, vt)[0]
    best = elbo_closed_form(xt, Wx, bt, vt, m_best, np.log(vt / np.diag(M)))
    hadamard = 0.5 * (np.log(np.diag(M)).sum() - np.linalg.slogdet(M)[1])
    lp = log_marginal(xt, Wx, bt, vt)
    print(f"  {name:18s}: log p(x) {lp.mean():.6f}, best diagonal ELBO {best.mean():.6f}, "
          f"Hadamard gap {hadamard:.2e}")
    check(np.allclose(lp - best, hadamard, atol=1e-10, rtol=0) and abs(lp.mean() - dense.mean()) < 1e-9,
          f"{name}: log p(x) unchanged by the rotation, log p(x) - best diagonal ELBO = 1/2 [sum log M_jj - log det M]")
check(hadamard > 1e-3, f"(rotated) a rotation that mixes the columns costs the ELBO {hadamard:.3f} nats, the likelihood nothing")

# %% [markdown]
# ## 4. The optimum, and the exact collapse rule
#
# Average $\log p$ over the $N$ data points, with the mean $\bar x$ and covariance
# $\hat S = \frac1N \sum_n (x_n - \bar x)(x_n - \bar x)^\top$ of the data:
#
# $$\frac1N \sum_n \log p(x_n) = -\frac12 \Big[ D \log 2\pi + \log\det C + \mathrm{tr}\big(C^{-1} \hat S\big)
#   + (\bar x - b)^\top C^{-1} (\bar x - b) \Big],$$
#
# so $b = \bar x$.  Tipping & Bishop (1999) show that at every stationary point in $W$ ($\hat S C^{-1} W = W$) the
# model covariance $C$ has the eigenvectors $u_i$ of $\hat S$; write $\lambda_1 \ge \lambda_2 \ge \dots$ for the data's
# eigenvalues and $k_i = u_i^\top C u_i$ for the model's.  Then the objective splits into one term per direction,
#
# $$\frac1N \sum_n \log p(x_n) = -\frac12 \Big[ D\log 2\pi + \sum_{i=1}^{D} \Big( \log k_i + \frac{\lambda_i}{k_i} \Big) \Big],$$
#
# and $g(k) = \log k + \lambda / k$ is smallest at $k = \lambda$.  But $k_i = v + \lVert W^\top u_i \rVert^2 \ge v$, and at
# most $L$ directions can have $k_i > v$ (rank of $W W^\top$).  So on the modelled directions
#
# $$k_i = \max(\lambda_i, v), \qquad \lVert w_i \rVert^2 = \max(\lambda_i - v,\ 0),
#   \qquad W^* = U_L \,\mathrm{diag}\big(\max(\lambda_i - v, 0)\big)^{1/2} R .$$
#
# **The collapse rule: latent direction $i$ survives exactly when $\lambda_i > v$**, when the data vary more along
# $u_i$ than the decoder's own noise does.  If $\lambda_i \le v$, the best column is $w_i = 0$, the posterior of
# $z_i$ is the prior, and its KL is 0: posterior collapse as the exact optimum, with no local optimum or bad
# training to blame.  A surviving direction is worth (the difference of $g$ at $k = v$ and at $k = \lambda_i$)
#
# $$\Delta_i = \frac12 \Big[ \frac{\lambda_i}{v} - 1 - \log \frac{\lambda_i}{v} \Big] \ \text{nats per data point},$$
#
# which grows with $\lambda_i$, so the $L$ latents take the top $L$ principal directions.  At the optimum, a
# surviving $z_i$ has posterior variance $s_i^2 = v / \lambda_i$ and posterior mean with
# $\mathrm{Var}_x\, m_i = 1 - v/\lambda_i$, so its KL, averaged over the data, is
# $\frac12 [(1 - v/\lambda_i) + v/\lambda_i - 1 - \log(v/\lambda_i)] = \frac12 \log (\lambda_i / v)$ nats.
#
# The maximal average log-likelihood is therefore
# $\ell^* = -\frac12 \big[ D \log 2\pi + \sum_i (\log k_i + \lambda_i / k_i) \big]$ with $k_i = \max(\lambda_i, v)$ for
# $i \le L$ and $k_i = v$ beyond.  We compute it for the MNIST images lesson 23 trains on (grey, pixels in [0, 1]), at
# $v = 2$ and $L = 8$, and check that the closed-form $W^*$ with the encoder $m = (x - \bar x)\, W^* M^{-1}$,
# $s_j^2 = v / M_{jj}$ reaches it: its closed-form ELBO equals both $\log p(x)$ and $\ell^*$.

# %%
N_TRAIN, STEPS = (5000, 4000) if args.quick else (20000, 8000)             # lesson 23 trains on these images
x = load_mnist("train")[0][:N_TRAIN].astype(np.float64)                    # (N, D) grey MNIST, float64
N, D = x.shape
xbar = x.mean(0)
S_hat = (x - xbar).T @ (x - xbar) / N
lam, U = np.linalg.eigh(S_hat)
lam, U = lam[::-1], U[:, ::-1]                                              # largest first
L, V_DEC = 8, 2.0


def ell_star(lam, v, L):
    """The maximal average log-likelihood of the linear model with L latents and decoder variance v."""
    k = np.full(len(lam), v)
    k[:L] = np.maximum(lam[:L], v)
    return -0.5 * (len(lam) * LOG_2PI + (np.log(k) + lam / k).sum())


def optimum(lam, U, v, L):
    """W* (D, L) = U_L diag(max(lam - v, 0))^1/2, and the exact encoder: V (D, L) with m = (x - xbar) V, logvar (L,)."""
    W = U[:, :L] * np.sqrt(np.maximum(lam[:L] - v, 0.0))
    M = W.T @ W + v * np.eye(L)                                            # diagonal: the columns are orthogonal
    return W, W @ np.linalg.inv(M), np.log(v / np.diag(M))


W_star, V_star, lv_star = optimum(lam, U, V_DEC, L)
l_star = ell_star(lam, V_DEC, L)
lp_star = log_marginal(x, W_star, xbar, V_DEC).mean()
elbo_star = elbo_closed_form(x, W_star, xbar, V_DEC, (x - xbar) @ V_star, lv_star).mean()
survive = lam[:L] > V_DEC                                                   # the collapse rule
print(f"  {N} images, D = {D}: top eigenvalues {np.round(lam[:L + 1], 2)}; v = {V_DEC}, L = {L}: "
      f"{survive.sum()} of {L} directions survive")
print(f"  l* = {l_star:.6f};  log p(x) at W* = {lp_star:.6f};  ELBO at (W*, q*) = {elbo_star:.6f} nats per image")
check(abs(lp_star - l_star) < 1e-9 * abs(l_star) and abs(elbo_star - l_star) < 1e-9 * abs(l_star),
      "at the closed-form optimum, ELBO = log p(x) = l* (rel. 1e-9): the bound is tight")

# %% [markdown]
# ## 5. Training the linear VAE with minivae's op pairs
#
# The forward pass is four op pairs: `dense` (encoder mean), `reparameterize` (with one logvar vector broadcast over
# the batch), `dense` (decoder mean), then `gaussian_nll` with the fixed variance $v$ and `kl` for the loss
# $\frac1N \sum_n [-\log p(x_n \mid z_n) + \mathrm{KL}_n]$.  The backward chains the same pairs in reverse; $\mu$ feeds
# both $z$ and the KL, so its two gradients add, and the logvar vector's gradient is summed over the batch (it was
# broadcast).  The whole chain is checked in float64 against central differences with a random upstream gradient on
# the per-example losses.

# %%
def linear_vae_loss(p, x, eps, v, dloss=None):
    """Per-example -ELBO (one sample of z each) of the linear VAE, and the gradients of sum_n dloss_n * loss_n.

    p: Ve (D, L), be (L,), lv (L,), Wd (L, D), bd (D,);  x (N, D);  eps (N, L).  dloss defaults to 1/N (mean loss).
    """
    mu, c_enc = dense_forward(x, p["Ve"], p["be"])                      # encoder mean (N, L)
    logvar = np.broadcast_to(p["lv"], mu.shape)                          # one logvar vector for every x
    z, c_rep = reparameterize_forward(mu, logvar, eps)                   # z = mu + exp(logvar / 2) eps
    mean, c_dec = dense_forward(z, p["Wd"], p["bd"])                     # decoder mean (N, D)
    nll, c_nll = gaussian_nll_forward(mean, x, var=v)                    # -log N(x; mean, v I)
    kl, c_kl = kl_forward(mu, logvar)                                    # KL(q || N(0, I)), Appendix B
    loss = nll + kl
    g = np.full(len(x), 1.0 / len(x), dtype=x.dtype) if dloss is None else dloss
    dmean = gaussian_nll_backward(g, c_nll)                              # (mean - x) / v, per example
    dz, dWd, dbd = dense_backward(dmean, c_dec)                          # decoder weights
    dmu_rec, dlv_rec = reparameterize_backward(dz, c_rep)                # through z
    dmu_kl, dlv_kl = kl_backward(g, c_kl)                                # through the KL
    _, dVe, dbe = dense_backward(dmu_rec + dmu_kl, c_enc)                # mu has two consumers: gradients add
    dlv = (dlv_rec + dlv_kl).sum(0)                                      # lv was broadcast over the batch
    return loss, {"Ve": dVe, "be": dbe, "lv": dlv, "Wd": dWd, "bd": dbd}


pt = {"Ve": rng.normal(size=(Dt, Lt)), "be": rng.normal(size=Lt), "lv": rng.normal(size=Lt) * 0.5,
      "Wd": rng.normal(size=(Lt, Dt)), "bd": rng.normal(size=Dt)}
eps_t, up = rng.standard_normal((5, Lt)), rng.standard_normal(5)
_, grads = linear_vae_loss(pt, xt, eps_t, vt, dloss=up)
err = max(rel_error(grads[k], numerical_gradient(lambda: linear_vae_loss(pt, xt, eps_t, vt)[0], pt[k], up))
          for k in pt)
check(err < 1e-7, f"the hand-chained backward matches central differences for all five parameters "
                  f"(worst rel. error {err:.1e})")

# %% [markdown]
# Training: float32, Adam with a step size decaying geometrically from $10^{-2}$ to $10^{-4}$, batches of 256, a fresh
# $\epsilon$ every step, from a small random start.  After training we evaluate, in float64 and without sampling,
# the trained model's exact $\log p(x)$ and its encoder's closed-form ELBO, and compare with $\ell^*$.  Both must lie
# below $\ell^*$ (that is a theorem), and the ELBO should come within a small fraction of a nat.  The one-sample
# Monte Carlo loss that the op pairs computed must agree with the closed form too.

# %%
def init_params(L):
    """A small random start, float32: encoder (Ve, be, lv) and decoder (Wd, bd)."""
    p = {"Ve": rng.normal(0, 0.01, (D, L)), "be": np.zeros(L), "lv": np.zeros(L),
         "Wd": rng.normal(0, 0.01, (L, D)), "bd": np.zeros(D)}
    return {k: a.astype(np.float32) for k, a in p.items()}


def train(p, steps, v):
    """Adam on minibatches of 256 images, step size 1e-2 -> 1e-4 (geometric), a fresh eps each step; p in place."""
    L = p["lv"].shape[0]
    opt = Adam(lr=1e-2)
    for t in range(steps):
        opt.lr = 1e-2 * 0.01 ** (t / steps)
        idx = rng.integers(0, N, 256)
        _, grads = linear_vae_loss(p, x32[idx], rng.standard_normal((256, L)).astype(np.float32), v)
        opt.step(p, grads)
    return p


x32 = x.astype(np.float32)
p = train(init_params(L), STEPS, V_DEC)
W_tr = p["Wd"].T.astype(np.float64)                                        # (D, L), the math's W
b_tr = p["bd"].astype(np.float64)
m_tr = x @ p["Ve"].astype(np.float64) + p["be"]
lv_tr = p["lv"].astype(np.float64)
lp_tr = log_marginal(x, W_tr, b_tr, V_DEC)
elbo_tr = elbo_closed_form(x, W_tr, b_tr, V_DEC, m_tr, lv_tr)
mc_loss, _ = linear_vae_loss({k: a.astype(np.float64) for k, a in p.items()}, x, rng.standard_normal((N, L)), V_DEC)
z_score = (mc_loss.mean() + elbo_tr.mean()) / (mc_loss.std(ddof=1) / np.sqrt(N))
print(f"  trained {STEPS} steps in {time.time() - t0:.1f} s")
print(f"  l* - log p(x) = {l_star - lp_tr.mean():.4f},  l* - ELBO = {l_star - elbo_tr.mean():.4f} nats per image "
      f"(of {-l_star:.1f});  Monte Carlo -ELBO from the op pairs {mc_loss.mean():.3f} vs closed form "
      f"{-elbo_tr.mean():.3f} ({z_score:+.1f} standard errors)")
check(elbo_tr.mean() <= lp_tr.mean() <= l_star + 1e-9, "trained: ELBO <= log p(x) <= l*")
check(l_star - elbo_tr.mean() < 0.05, f"the trained ELBO is within 0.05 nats of the maximal log-likelihood l* "
                                      f"({l_star - elbo_tr.mean():.4f})")
check(abs(z_score) < 4, "the op pairs' one-sample loss estimates the closed-form -ELBO (within 4 standard errors)")

# %% [markdown]
# ## 6. What the trained decoder learned
#
# Three predictions of section 4, checked on the trained weights:
#
# * the decoder spans the top principal directions: the columns with $\lVert w_j \rVert^2$ above $1\%$ of $v$ lie in
#   the span of $u_1, \dots, u_k$, $k = \#\{i \le L : \lambda_i > v\}$ (principal angles between the two subspaces,
#   and the fraction of $\lVert W \rVert_F^2$ inside the span);
# * the column norms are $\lVert w_j \rVert^2 = \lambda_j - v$ for the survivors and $0$ for the rest, and the columns
#   are orthogonal (the Hadamard gap of section 3 is near 0), so the squared singular values of $W$ are
#   $\max(\lambda_j - v, 0)$;
# * the collapse rule: the number of active units (lesson 13: $\mathrm{Var}_x\, m_j > 0.01$) equals the number of
#   eigenvalues above $v$, and each unit's KL is $\frac12 \log(\lambda_j / v)$, or 0.
#
# The likelihood is flat inside the top subspace: turning two columns within the plane of $u_1, u_2$ by a few degrees
# costs thousandths of a nat, less than the noise of a one-sample gradient, so a short run leaves the surviving
# columns slightly mixed.  The checks are set accordingly: sums (the KL, $\lVert W \rVert_F^2$) within a few percent,
# single directions within 25%; the collapsed units are checked tightly.

# %%
k_pred = int((lam[:L] > V_DEC).sum())                                       # the collapse rule's prediction
norms = (W_tr * W_tr).sum(0)
order = np.argsort(norms)[::-1]
kept = order[norms[order] > 0.01 * V_DEC]
Q = np.linalg.qr(W_tr[:, kept])[0]
cos_min = np.linalg.svd(U[:, :k_pred].T @ Q, compute_uv=False).min() if len(kept) == k_pred else 0.0
energy = np.linalg.norm(U[:, :k_pred].T @ W_tr) ** 2 / np.linalg.norm(W_tr) ** 2
M_tr = W_tr.T @ W_tr + V_DEC * np.eye(L)
hadamard_tr = 0.5 * (np.log(np.diag(M_tr)).sum() - np.linalg.slogdet(M_tr)[1])
var_m = m_tr.var(0)
active = int((var_m > 0.01).sum())
print("  Var_x m_j:", np.round(var_m, 4))
kl_unit = 0.5 * (m_tr ** 2 + np.exp(lv_tr) - 1 - lv_tr).mean(0)[order]
kl_pred = 0.5 * np.log(np.maximum(lam[:L], V_DEC) / V_DEC)
print(f"  |w_j|^2 (sorted): {np.round(norms[order], 3)}")
print(f"  lambda_j - v:     {np.round(lam[:L] - V_DEC, 3)}")
print(f"  KL per unit:      {np.round(kl_unit, 3)}")
print(f"  1/2 log(l_j / v): {np.round(kl_pred, 3)}")
print(f"  {len(kept)} columns above 1% of v; smallest cosine of the principal angles to span(u_1..u_{k_pred}) "
      f"{cos_min:.4f}; {energy:.2%} of |W|^2 inside it; Hadamard gap {hadamard_tr:.4f} nats; "
      f"{active} active units")
check(active == k_pred, f"the collapse rule: {active} active units = {k_pred} eigenvalues above v = {V_DEC}")
check(len(kept) == k_pred and cos_min > 0.9 and energy > 0.99,
      f"the decoder spans the top {k_pred} principal directions (largest principal angle "
      f"{np.degrees(np.arccos(min(cos_min, 1))):.1f} deg < 25 deg, {energy:.1%} of |W|^2 inside)")
sv2 = np.linalg.svd(W_tr, compute_uv=False) ** 2                          # eigenvalues of W^T W, rotation-free
print(f"  squared singular values of W: {np.round(sv2, 3)}")
sv2_pred = np.maximum(lam[:L] - V_DEC, 0)
check(abs(sv2.sum() - sv2_pred.sum()) < 0.05 * sv2_pred.sum() and np.all(np.abs(sv2 - sv2_pred) < 0.25 * sv2_pred + 0.02),
      "the squared singular values of W are max(lambda_j - v, 0): their sum within 5%, each within 25% + 0.02")
check(abs(kl_unit.sum() - kl_pred.sum()) < 0.1 * kl_pred.sum() and np.all(kl_unit[k_pred:] < 0.005),
      f"the KL is sum_j 1/2 log(lambda_j / v) = {kl_pred.sum():.3f} nats (trained {kl_unit.sum():.3f}, within 10%), "
      "and < 0.005 nats on each collapsed unit")
check(hadamard_tr < 0.02, f"the trained columns are nearly orthogonal: Hadamard gap {hadamard_tr:.4f} < 0.02 nats")

# %% [markdown]
# The spectrum, the threshold $v$, and the trained model's variances $k_j = v + \lVert w_j \rVert^2$ (left): the
# trained $k_j$ sit on the eigenvalues above $v$ and on the line $v$ below it.  Right: the top principal directions
# $u_i$ (top row) and the trained decoder's columns, largest first, signs matched (bottom row).

# %%
fig, axes = plt.subplots(1, 2, figsize=(13, 4), gridspec_kw={"width_ratios": [1, 1.3]})
ax = axes[0]
ax.semilogy(np.arange(1, 61), lam[:60], "k.-", label="data eigenvalues $\\lambda_i$")
ax.semilogy(np.arange(1, L + 1), V_DEC + norms[order], "o", mfc="none", ms=9, label="trained $v + |w_j|^2$")
for vv, style in ((V_DEC, "r--"), (0.5, "g:"), (392.0, "b-.")):
    ax.axhline(vv, ls=style[1:], color=style[0], label=f"v = {vv:g}")
ax.set_xlabel("direction i")
ax.set_ylabel("variance")
ax.set_title(f"MNIST ({N} images): {int((lam > 0.5).sum())} eigenvalues above 1/2, none near 392")
ax.legend(fontsize=8)
cols = W_tr[:, order[:k_pred]]
cols = cols * np.sign((cols * U[:, :k_pred]).sum(0))
imgs = np.concatenate([U[:, :k_pred].T, cols.T / np.sqrt(norms[order[:k_pred]])[:, None]])
lim = np.abs(imgs).max()
canvas = np.zeros((2 * 29 + 1, k_pred * 29 + 1))
for i, im in enumerate(imgs):
    r, c = divmod(i, k_pred)
    canvas[1 + 29 * r:29 * (r + 1), 1 + 29 * c:29 * (c + 1)] = im.reshape(28, 28)
axes[1].imshow(canvas, cmap="RdBu", vmin=-lim, vmax=lim)
axes[1].set_title(f"top: principal directions u_1..u_{k_pred};  bottom: trained decoder columns")
axes[1].axis("off")
fig.tight_layout()
save_figure(fig, args.out, "linear_vae_ppca.png")

# %% [markdown]
# ## 7. Back to lesson 23
#
# Lesson 23 trained small *nonlinear* VAEs on these same images with a Gaussian decoder, and saw both latent units
# collapse at $v = 392$ (a per-pixel mean squared error) while they survived at $v = \tfrac12$ (a summed squared
# error).  For the linear model the rule above decides it exactly:
#
# * at $v = 392$, the data's largest eigenvalue $\lambda_1 \approx 5.2$ is far below $v$, so *every* direction
#   collapses: $W^* = 0$, the decoder outputs the mean image $\bar x$, and the KL is 0.  Collapse is not a failure of
#   training there; it is the maximum of the likelihood, and the ELBO reaches it exactly;
# * at $v = \tfrac12$, two dozen directions exceed $v$, so a 2-D latent keeps both units, each worth $\Delta_i$ nats and
#   carrying $\frac12 \log(\lambda_i / v)$ nats of KL.
#
# A nonlinear decoder is not bound by this rule (it can use directions the linear one cannot), but the mechanism is the
# same one: a latent direction pays for itself only if the data vary along it more than the decoder's own noise $v$.
# Lucas et al. (2019) make this the point of their paper: posterior collapse at a large $v$ is what the likelihood
# asks for, not a defect of the ELBO.

# %%
for v, label in ((0.5, "summed squared error"), (392.0, "per-pixel mean squared error")):
    n_above = int((lam > v).sum())
    gain = 0.5 * (lam[:2] / v - 1 - np.log(lam[:2] / v)) * (lam[:2] > v)
    rate = 0.5 * np.log(np.maximum(lam[:2], v) / v)
    print(f"  v = {v:g} ({label}): {n_above} eigenvalues above v; a 2-D linear VAE gains {gain.sum():.3f} nats "
          f"over the mean image, at a KL of {rate.sum():.3f} nats")
print(f"  largest eigenvalue {lam[0]:.2f} = v / {392.0 / lam[0]:.0f} at v = 392")
check(lam[0] < 392.0 / 50, f"at lesson 23's v = 392 even the largest eigenvalue ({lam[0]:.2f}) is < v / 50: "
                           "every direction collapses at the exact optimum")
check(int((lam > 0.5).sum()) == 23 and lam[1] > 0.5 * 5,
      f"at v = 1/2, 23 directions exceed v (lambda_23 = {lam[22]:.3f}, lambda_24 = {lam[23]:.3f}): "
      "both of a 2-D latent's units survive, lambda_2 > 5 v")

# %% [markdown]
# The same two settings, trained: a 2-D linear VAE at $v = \tfrac12$ from a small random start, and then the same
# weights trained on at $v = 392$, as if the loss had been switched from a summed to a per-pixel mean squared error.
# The rule predicts two units carrying $\frac12 \log(\lambda_1 / v) + \frac12 \log(\lambda_2 / v)$ nats, and then
# their collapse: no active unit, no KL, and an ELBO equal to the collapsed model's exact $\ell^*$.

# %%
results_2d = {}
p2 = init_params(2)
for v in (0.5, 392.0):
    train(p2, STEPS // 2, v)                                               # at v = 392, from the v = 1/2 weights
    m2 = x @ p2["Ve"].astype(np.float64) + p2["be"]
    lv2 = p2["lv"].astype(np.float64)
    elbo2 = elbo_closed_form(x, p2["Wd"].T.astype(np.float64), p2["bd"].astype(np.float64), v, m2, lv2).mean()
    kl2 = 0.5 * (m2 ** 2 + np.exp(lv2) - 1 - lv2).sum(1).mean()
    results_2d[v] = (int((m2.var(0) > 0.01).sum()), kl2, ell_star(lam, v, 2) - elbo2)
    print(f"  2-D linear VAE at v = {v:g}: {results_2d[v][0]}/2 active units, KL {kl2:.4f} nats "
          f"(rule: {0.5 * np.log(np.maximum(lam[:2], v) / v).sum():.4f}), l* - ELBO = {results_2d[v][2]:.4f} nats")
au_half, kl_half, gap_half = results_2d[0.5]
kl_rule = 0.5 * np.log(lam[:2] / 0.5).sum()
gain_half = ell_star(lam, 0.5, 2) - ell_star(lam, 0.5, 0)                  # what the two units are worth
check(au_half == 2 and abs(kl_half - kl_rule) < 0.1 * kl_rule and gap_half < 0.1,
      f"trained at v = 1/2: both units active, KL {kl_half:.2f} = the rule's {kl_rule:.2f} nats (within 10%), "
      f"ELBO within 0.1 nats of l* (the two units are worth {gain_half:.2f} nats)")
au_392, kl_392, gap_392 = results_2d[392.0]
check(au_392 == 0 and kl_392 < 0.01 and abs(gap_392) < 0.01,
      f"trained on at v = 392: both units collapse (0 active, KL {kl_392:.4f} < 0.01 nats), "
      "and the ELBO is the collapsed model's exact l* (within 0.01 nats)")
print(f"done in {time.time() - t0:.1f} s")
