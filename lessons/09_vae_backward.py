# %% [markdown]
# # Lesson 09 — The whole VAE backward, assembled from the pieces
#
# Earlier lessons derived each op pair on its own: dense, activation, reparameterization, Bernoulli NLL and the
# analytic KL.  Here we chain them by hand for a VAE with one hidden layer, run the backward pass in reverse
# order, and check that the hand-assembled gradients are *the same numbers* that `model.loss` returns (same
# $\varepsilon$).  Then the whole model passes a finite-difference gradient check with two hidden layers, several
# samples of $z$ and $\beta \ne 1$.
#
# **Run** `python lessons/09_vae_backward.py [--out DIR] [--seed N]`, or open it as a notebook
# (jupytext); in a kernel, set `MINIVAE_QUICK=1` for the small version.
# **Exercise** `vae_backward`: the backward in `minivae/model.py`, and the hand-chained backward cell below.

# %%
import time

import matplotlib.pyplot as plt
import numpy as np

import minivae
import minivae.data
from minivae.gaussian import kl_backward, kl_forward, reparameterize_backward, reparameterize_forward
from minivae.layers import dense_backward, dense_forward, relu_backward, relu_forward
from minivae.likelihoods import bernoulli_nll_backward, bernoulli_nll_forward
from minivae.lessonkit import check, lesson_args, save_figure

args = lesson_args("lesson_output/09_vae_backward", "Lesson 09: the whole VAE backward",
                   quick_help="smaller checks (for tests)")
rng = np.random.default_rng(args.seed)
t0 = time.time()

# %% [markdown]
# ## 1. The forward graph and the loss
#
# A minibatch $x$ of shape $(N, D)$, $S$ samples of noise $\varepsilon$ of shape $(S, N, L)$, one hidden layer
# of width $H$.  Rows are examples, dense layers are $y = xW + b$:
#
# $$a = x W_1 + b_1,\qquad h = \mathrm{relu}(a)$$
# $$\mu = h W_\mu + b_\mu,\qquad \ell = h W_\ell + b_\ell \qquad (\ell = \log\sigma^2)$$
# $$z_{sn} = \mu_n + e^{\ell_n/2} \odot \varepsilon_{sn}$$
# $$a'_{sn} = z_{sn} V_1 + c_1,\qquad g_{sn} = \mathrm{relu}(a'_{sn}),\qquad o_{sn} = g_{sn} V_o + c_o
#   \qquad (\text{logits})$$
# $$r_{sn} = \sum_d \big[\mathrm{softplus}(o_{snd}) - x_{nd}\, o_{snd}\big] = -\log p(x_n \mid z_{sn})$$
# $$k_n = \tfrac12 \sum_j \big(\mu_{nj}^2 + e^{\ell_{nj}} - 1 - \ell_{nj}\big)
#   = \mathrm{KL}\big(q(z \mid x_n)\,\|\,p(z)\big)$$
# $$\mathcal{J} = \frac{1}{SN}\sum_{s,n} r_{sn} + \frac{\beta}{N}\sum_n k_n$$
#
# The cell below runs exactly this forward on 8 binarized test digits in float64, with every op's cache kept
# for the backward.  The $S$ samples are stacked as $S N$ rows before the decoder.

# %%
x_all, _ = minivae.data.load_mnist("test")
N, S, beta = 8, 3, 0.7
x = minivae.data.binarize(x_all[:N], rng).astype(np.float64)
cfg = minivae.VAEConfig(x_dim=784, hidden=(64,), z_dim=5, dtype="float64")
model = minivae.VAE(cfg, rng=np.random.default_rng(args.seed + 1))
p = model.params
eps = rng.standard_normal((S, N, cfg.z_dim))
L, D = cfg.z_dim, x.shape[1]

a, c_a = dense_forward(x, p["enc.0.W"], p["enc.0.b"])                      # (N, H)
h, c_h = relu_forward(a)
mu, c_mu = dense_forward(h, p["enc.mu.W"], p["enc.mu.b"])                 # (N, L)
logvar, c_lv = dense_forward(h, p["enc.logvar.W"], p["enc.logvar.b"])     # (N, L)
z, c_z = reparameterize_forward(mu, logvar, eps)                          # (S, N, L)
a2, c_a2 = dense_forward(z.reshape(S * N, L), p["dec.0.W"], p["dec.0.b"])  # (S*N, H)
g, c_g = relu_forward(a2)
logits, c_o = dense_forward(g, p["dec.out.W"], p["dec.out.b"])           # (S*N, D)
rec, c_rec = bernoulli_nll_forward(logits.reshape(S, N, D), x)            # (S, N)
kl, c_kl = kl_forward(mu, logvar)                                         # (N,)
loss_hand = rec.mean() + beta * kl.mean()
print(f"J = {float(rec.mean()):.3f} (recon) + {beta} x {float(kl.mean()):.3f} (KL) = {float(loss_hand):.3f} nats")

# %% [markdown]
# ## 2. The backward, in reverse order: one node at a time
#
# Write $\bar u = \partial\mathcal{J}/\partial u$ for every intermediate $u$.  Walking the graph backwards:
#
# 1. The loss is a mean: $\bar r_{sn} = \dfrac{1}{SN}$ and $\bar k_n = \dfrac{\beta}{N}$.
# 2. Bernoulli NLL (lesson 08): $\partial r_{sn}/\partial o_{snd} = \sigma(o_{snd}) - x_{nd}$, so
#    $\bar o_{snd} = \bar r_{sn}\,\big(\sigma(o_{snd}) - x_{nd}\big)$.
# 3. Output dense (lesson 02), on the $SN$ stacked rows:
#    $\bar V_o = g^\top \bar o$, $\ \bar c_o = \sum_{\text{rows}} \bar o$, $\ \bar g = \bar o\, V_o^\top$.
#    A sum over rows is a sum over both $n$ and $s$.
# 4. ReLU (lesson 03): $\bar a' = \bar g \odot [a' > 0]$; then the dense layer
#    $\bar V_1 = z^\top \bar a'$, $\ \bar c_1 = \sum_{\text{rows}} \bar a'$, $\ \bar z = \bar a' V_1^\top$.
# 5. Reparameterization (lesson 06): $z_{sn} = \mu_n + e^{\ell_n/2}\odot\varepsilon_{sn}$ uses $\mu_n$ and
#    $\ell_n$ in all $S$ samples, so
#    $$\bar\mu_n = \sum_s \bar z_{sn},\qquad
#      \bar\ell_n = \sum_s \bar z_{sn} \odot \varepsilon_{sn} \odot \tfrac12 e^{\ell_n/2}.$$
# 6. The KL (lesson 07) also uses $\mu$ and $\ell$, and its contribution **adds**:
#    $$\bar\mu \mathrel{+}= \frac{\beta}{N}\,\mu,\qquad \bar\ell \mathrel{+}= \frac{\beta}{N}\,\tfrac12\big(e^{\ell} - 1\big).$$
# 7. The two heads both read $h$, so their paths **add** too:
#    $$\bar W_\mu = h^\top\bar\mu,\quad \bar W_\ell = h^\top\bar\ell,\quad
#      \bar h = \bar\mu\, W_\mu^\top + \bar\ell\, W_\ell^\top.$$
# 8. ReLU and the first dense layer: $\bar a = \bar h \odot [a > 0]$,
#    $\ \bar W_1 = x^\top \bar a$, $\ \bar b_1 = \sum_n \bar a_n$ (no gradient with respect to the data is needed).
#
# Forgetting the sum over samples in step 5, or the $+$ in steps 6 and 7, are the classic bugs.
#
# The next cell is the exercise region `vae_backward` (in a student's copy it is a stub): it must leave every
# gradient in the dict `G` (keys as in `model.params`), and the totals `dmu`, `dlogvar` (steps 5 + 6), which
# section 4 reuses.

# %%
### BEGIN SOLUTION vae_backward
G = {}
drec = np.full((S, N), 1.0 / (S * N))                                   # 1. dJ/dr_sn
dlogits = bernoulli_nll_backward(drec, c_rec).reshape(S * N, D)         # 2. (sigmoid(o) - x) / (S N)
dg, G["dec.out.W"], G["dec.out.b"] = dense_backward(dlogits, c_o)       # 3. output dense
da2 = relu_backward(dg, c_g)                                            # 4. ReLU of the decoder
dz, G["dec.0.W"], G["dec.0.b"] = dense_backward(da2, c_a2)              # 4. first decoder dense
dmu, dlogvar = reparameterize_backward(dz.reshape(S, N, L), c_z)        # 5. sums over the S samples
dmu_kl, dlogvar_kl = kl_backward(np.full((N,), beta / N), c_kl)         # 6. dJ/dk_n = beta / N
dmu = dmu + dmu_kl                                                      # 6. the KL path adds
dlogvar = dlogvar + dlogvar_kl
dh, G["enc.mu.W"], G["enc.mu.b"] = dense_backward(dmu, c_mu)            # 7. mu head
dh_lv, G["enc.logvar.W"], G["enc.logvar.b"] = dense_backward(dlogvar, c_lv)   # 7. logvar head
dh = dh + dh_lv                                                         # 7. h feeds both heads: add
da = relu_backward(dh, c_h)                                             # 8. encoder ReLU
_, G["enc.0.W"], G["enc.0.b"] = dense_backward(da, c_a)                 # 8. first encoder dense
### END SOLUTION

# %% [markdown]
# ## 3. Hand-chained vs `model.loss`
#
# `model.loss(x, eps=eps, beta=beta)` runs the library's forward and backward with the same $\varepsilon$.  The
# two computations do the same floating-point operations in the same order, so they agree to rounding, not
# just to a tolerance.

# %%
loss_model, g_model = model.loss(x, eps=eps, beta=beta)
check(abs(float(loss_hand) - float(loss_model)) < 1e-10,
      f"hand-chained loss equals model.loss ({float(loss_hand):.6f} nats, S={S}, beta={beta})")
errs = {k: minivae.rel_error(G[k], g_model[k]) for k in g_model}
print(f"{'parameter':<14}{'shape':>12}{'rel error hand vs model':>26}")
for k, e in errs.items():
    print(f"{k:<14}{str(tuple(model.params[k].shape)):>12}{e:>26.2e}")
check(set(G) == set(g_model), "the hand backward produces a gradient for every parameter")
check(max(errs.values()) < 1e-12, f"hand-assembled gradients equal model.loss grads (max rel error "
      f"{max(errs.values()):.1e} < 1e-12)")

# %% [markdown]
# ## 4. A classic bug, and how big it looks
#
# Overwrite instead of add where $h$ feeds both heads, $\bar h = \bar\ell\, W_\ell^\top$ instead of
# $\bar h = \bar\mu\, W_\mu^\top + \bar\ell\, W_\ell^\top$: the gradient of $W_1$ is then wrong by $O(1)$, not by
# rounding.

# %%
dh_bug, _, _ = dense_backward(dlogvar, c_lv)                           # BUG: "=" where it must be "+"
_, W1_bug, _ = dense_backward(relu_backward(dh_bug, c_h), c_a)
bug_err = minivae.rel_error(W1_bug, g_model["enc.0.W"])
print(f"bug 'h feeds two heads, but gradients overwritten': rel error in enc.0.W = {bug_err:.2f}")
check(bug_err > 1e-3, "forgetting to add the mu head's path gives a visibly wrong enc.0.W gradient")

# %% [markdown]
# ## 5. Whole-model gradient check: two hidden layers, $S > 1$, $\beta \ne 1$, float64
#
# `minivae.check_model` compares the backward with central differences
# $\dfrac{\mathcal{J}(\theta + h e_i) - \mathcal{J}(\theta - h e_i)}{2h}$, $h = 10^{-5}$, on random entries of
# every parameter.  The truncation error is $O(h^2) \approx 10^{-10}$ relative and the rounding error
# $O(\epsilon_{\text{mach}}/h) \approx 10^{-11}$, so we ask for a relative error below $10^{-6}$.  This model
# uses tanh units, which have no kinks for a finite difference to straddle.

# %%
hidden = (16, 12) if args.quick else (32, 24)
cfg2 = minivae.VAEConfig(x_dim=784, hidden=hidden, z_dim=4, dtype="float64", activation="tanh")
model2 = minivae.VAE(cfg2, rng=np.random.default_rng(args.seed + 2))
x2 = minivae.data.binarize(x_all[N:N + 5], rng).astype(np.float64)
S2, beta2 = 4, 2.5
eps2 = rng.standard_normal((S2, x2.shape[0], cfg2.z_dim))
max_entries = 6 if args.quick else 25
report = minivae.check_model(model2, x2, eps=eps2, beta=beta2, n_samples=S2, tol=1e-6,
                             max_entries=max_entries, rng=np.random.default_rng(args.seed))
for k, e in report.items():
    print(f"  gradcheck {k:<14} rel error {e:.2e}")
check(max(report.values()) < 1e-6, f"finite differences agree with the backward for all "
      f"{len(report)} parameters of a 784-{'-'.join(map(str, hidden))}-4 VAE (S={S2}, beta={beta2}; "
      f"max rel error {max(report.values()):.1e})")

# %% [markdown]
# ## 6. Picture: the per-parameter errors on a log scale

# %%
fig, ax = plt.subplots(figsize=(8, 3.5))
names = list(errs)
ax.semilogy(range(len(names)), [max(errs[k], 1e-18) for k in names], "o", label="hand vs model.loss")
names2 = list(report)
ax.semilogy(range(len(names2)), [max(report[k], 1e-18) for k in names2], "s",
            label="model vs finite differences (2 layers)")
ax.set_xticks(range(len(names2)))
ax.set_xticklabels(names2, rotation=60, ha="right", fontsize=7)
ax.axhline(1e-6, color="gray", ls="--", lw=0.8)
ax.set_ylabel("relative error")
ax.set_title("Gradient agreement (float64)")
ax.legend(fontsize=8)
fig.tight_layout()
save_figure(fig, args.out, "gradient_errors.png")
print(f"lesson 09 done in {time.time() - t0:.1f} s; figures in {args.out}")
