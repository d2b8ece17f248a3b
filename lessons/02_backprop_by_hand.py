# %% [markdown]
# # Lesson 02: backprop by hand, the chain rule, the dense layer and gradient checks
#
# minivae has no autograd.  Every backward pass is the chain rule written out by hand, and every one is checked
# against finite differences.  This lesson does that for the smallest possible example (a scalar), then for the dense
# layer that every encoder and decoder is built from, and then shows why the check must use a *random* upstream
# gradient.
#
# Run it as a script, `python lessons/02_backprop_by_hand.py [--out DIR] [--seed N]`, or open it as a
# notebook (jupytext or VS Code; `MINIVAE_QUICK=1` in the kernel's environment selects the tests' quick mode).
#
# Exercise: `dense_backward` in `minivae/layers.py` (the region between `### BEGIN SOLUTION dense_backward` and
# `### END SOLUTION`).

# %%
import time

import matplotlib.pyplot as plt
import numpy as np

import minivae
from minivae.gradcheck import numerical_gradient, rel_error
from minivae.layers import dense_backward, dense_forward
from minivae.lessonkit import check, lesson_args, save_figure

# --quick (or MINIVAE_QUICK=1), --out DIR, --seed N; unknown arguments (a Jupyter kernel's) are ignored
args = lesson_args("lesson_output/02_backprop_by_hand", "Lesson 02: backprop by hand",
                   quick_help="smaller problem (for tests)")
rng = np.random.default_rng(args.seed)
t0 = time.time()

# %% [markdown]
# ## 1. A scalar chain rule
#
# Take $f(w, b) = (w x + b)^2$ with a fixed input $x$.  Name the intermediate $a = w x + b$, so $f = a^2$.  The chain
# rule multiplies local derivatives:
#
# $$\frac{\partial f}{\partial a} = 2a, \qquad \frac{\partial a}{\partial w} = x,
#   \qquad \frac{\partial a}{\partial b} = 1,$$
#
# $$\frac{\partial f}{\partial w} = \frac{\partial f}{\partial a}\frac{\partial a}{\partial w} = 2 (w x + b)\, x,
#   \qquad \frac{\partial f}{\partial b} = \frac{\partial f}{\partial a}\frac{\partial a}{\partial b} = 2 (w x + b).$$
#
# Backprop computes exactly this, from the output backwards: first the "upstream" gradient $\partial f / \partial a$,
# then each input's gradient as upstream times local derivative.  The central difference
# $\big(f(w + h) - f(w - h)\big) / 2h$ checks it with an error of order $h^2$.

# %%
x, w, b = 1.7, -0.4, 0.9
a = w * x + b                  # forward
f = a ** 2
df_da = 2 * a                  # backward: upstream
df_dw = df_da * x              # times local derivative da/dw
df_db = df_da * 1.0            # times local derivative da/db

h = 1e-5
fd_w = (((w + h) * x + b) ** 2 - ((w - h) * x + b) ** 2) / (2 * h)
fd_b = ((w * x + b + h) ** 2 - (w * x + b - h) ** 2) / (2 * h)
print(f"f = {f:.6f};  df/dw: hand {df_dw:.10f}  finite diff {fd_w:.10f}")
print(f"            df/db: hand {df_db:.10f}  finite diff {fd_b:.10f}")
check(abs(df_dw - fd_w) < 1e-8 and abs(df_db - fd_b) < 1e-8,
      "scalar chain rule df/dw = 2(wx+b)x, df/db = 2(wx+b) matches central differences to 1e-8")

# %% [markdown]
# ## 2. The dense layer, in index notation
#
# Forward, with rows as examples ($N$ of them), $x \in \mathbb{R}^{N \times D_\text{in}}$,
# $W \in \mathbb{R}^{D_\text{in} \times D_\text{out}}$, $b \in \mathbb{R}^{D_\text{out}}$:
#
# $$y_{nj} = \sum_i x_{ni} W_{ij} + b_j .$$
#
# Some scalar loss $L$ sits downstream; call the upstream gradient $G_{nj} = \partial L / \partial y_{nj}$.  Every
# $y_{nk}$ that depends on a variable contributes, and $[k = j]$ is 1 when $k = j$ and 0 otherwise:
#
# $$\frac{\partial L}{\partial W_{ij}} = \sum_{n,k} G_{nk} \frac{\partial y_{nk}}{\partial W_{ij}}
#   = \sum_{n,k} G_{nk}\, x_{ni}\, [k = j] = \sum_n x_{ni} G_{nj}
#   \quad\Longrightarrow\quad dW = x^\top G \quad (D_\text{in} \times D_\text{out}),$$
#
# $$\frac{\partial L}{\partial b_j} = \sum_{n,k} G_{nk}\, [k = j] = \sum_n G_{nj}
#   \quad\Longrightarrow\quad db = G \text{ summed over rows (axis 0)},$$
#
# $$\frac{\partial L}{\partial x_{ni}} = \sum_{m,k} G_{mk}\, W_{ik}\, [m = n] = \sum_k G_{nk} W_{ik}
#   \quad\Longrightarrow\quad dx = G W^\top \quad (N \times D_\text{in}).$$
#
# A quick sanity rule: each gradient has the shape of the thing it is the gradient of, and there is only one way to
# multiply the pieces to get it.  The cell writes the index formulas literally with `einsum`.

# %%
N, D_in, D_out = (4, 5, 3) if args.quick else (8, 10, 6)
X = rng.standard_normal((N, D_in))
W = rng.standard_normal((D_in, D_out))
B = rng.standard_normal(D_out)
G = rng.standard_normal((N, D_out))           # a random upstream gradient
y, cache = dense_forward(X, W, B)
dx, dW, db = dense_backward(G, cache)
dW_idx = np.einsum("ni,nj->ij", X, G)
db_idx = np.einsum("nj->j", G)
dx_idx = np.einsum("nk,ik->ni", G, W)
check(np.allclose(dW, dW_idx) and np.allclose(db, db_idx) and np.allclose(dx, dx_idx),
      "minivae.dense_backward equals the index-notation formulas dW=x^T G, db=sum_n G, dx=G W^T")

# %% [markdown]
# ## 3. The gradient check, with a random upstream gradient
#
# To check a backward we need a scalar.  Take $L = \sum_{n,j} y_{nj}\, g_{nj}$ with a *random* $g$ (the `dout`):
# then $\partial L / \partial y = g$, the backward's input.  The numerical gradient perturbs each input entry by
# $\pm h$ and differences $L$.  `minivae.check_op` does all of this and reports the relative error
#
# $$\mathrm{rel\_error}(a, n) = \frac{\max_i |a_i - n_i|}{\max_i \big(|a_i| + |n_i|\big)},$$
#
# which should be about $10^{-10}$ in float64 for a correct backward.

# %%
report = minivae.check_op(dense_forward, dense_backward, [X.copy(), W.copy(), B.copy()],
                          names=["x", "W", "b"], rng=rng, tol=1e-8)
for k, v in report.items():
    print(f"  dense gradcheck  {k}: rel error {v:.2e}")
check(max(report.values()) < 1e-8, "dense_backward passes check_op (float64, random dout) with rel error < 1e-8")

# %% [markdown]
# ## 4. Why the upstream gradient must be random
#
# Here is a real bug: summing the bias gradient over the wrong axis, `db = G.sum(axis=1)`, which sums over the
# outputs, per example.  With $N = D_\text{out}$ this even has the right shape.  With an all-ones upstream gradient,
# $\sum_n G_{nj} = N$ and $\sum_j G_{nj} = D_\text{out}$ are the *same* vector, so a check with $g = 1$ passes the
# bug.  A random $g$ gives every output a different weight and the bug is caught at once.

# %%
def buggy_dense_backward(dy, cache):
    x_, W_ = cache
    return dy @ W_.T, x_.T @ dy, dy.sum(axis=1)      # BUG: wrong sum axis for db


# %%
n_sq = 4                                             # N == D_out, so the bug has the right shape
Xs, Ws, Bs = rng.standard_normal((n_sq, 6)), rng.standard_normal((6, n_sq)), rng.standard_normal(n_sq)
errors = {}
for label, dout in [("ones", np.ones((n_sq, n_sq))), ("random", rng.standard_normal((n_sq, n_sq)))]:
    _, c = dense_forward(Xs, Ws, Bs)
    db_bug = buggy_dense_backward(dout, c)[2]
    db_num = numerical_gradient(lambda: dense_forward(Xs, Ws, Bs)[0], Bs, dout)
    errors[label] = rel_error(db_bug, db_num)
    print(f"  buggy db with {label:6s} dout: rel error {errors[label]:.2e}")
check(errors["ones"] < 1e-8, "the wrong-axis db bug PASSES a gradient check with an all-ones dout")
check(errors["random"] > 1e-2, "the same bug FAILS the check with a random dout")
try:
    minivae.check_op(dense_forward, buggy_dense_backward, [Xs, Ws, Bs], names=["x", "W", "b"], rng=rng)
    caught = False
except minivae.GradientCheckError as exc:
    caught = True
    print(f"  check_op says: {exc}")
check(caught, "minivae.check_op raises GradientCheckError on the planted bug")

# %% [markdown]
# ## 5. Finite-difference error versus the step $h$
#
# The dense layer is linear, so central differences are exact for it up to round-off.  Put a tanh after it,
# $y = \tanh(x W + b)$, to see both sources of error: truncation, of order $h^2$ (large $h$), and round-off, of order
# $\epsilon_\text{machine} / h$ (small $h$).  In float64 the sweet spot is near $h \approx 10^{-5}$, which is why
# `numerical_gradient` uses $h = 10^{-5}$.  In float32 the best achievable error is orders of magnitude worse (and
# needs a much larger $h$), so a real bug of size $10^{-4}$ could hide in it: gradient checks run in float64.
#
# The chain rule for the composition gives the exact gradient to compare with:
#
# $$dW = x^\top \big(G \odot (1 - y^2)\big).$$

# %%
def tanh_dense(x_, W_, b_):
    return np.tanh(dense_forward(x_, W_, b_)[0])


# %%
yt = tanh_dense(X, W, B)
dW_true = dense_backward(G * (1 - yt ** 2), (X, W))[1]
hs = np.logspace(-12, -1, 23 if args.quick else 45)
errs64, errs32 = [], []
W32, X32, B32, G32 = (a_.astype(np.float32) for a_ in (W, X, B, G))
for hh in hs:
    errs64.append(rel_error(dW_true, numerical_gradient(lambda: tanh_dense(X, W, B), W, G, h=hh)))
    errs32.append(rel_error(dW_true, numerical_gradient(lambda: tanh_dense(X32, W32, B32), W32, G32, h=hh)))
errs64, errs32 = np.array(errs64), np.array(errs32)
best64, best32 = errs64.min(), errs32.min()
print(f"  best float64 error {best64:.1e} at h = {hs[errs64.argmin()]:.0e}; "
      f"best float32 error {best32:.1e} at h = {hs[errs32.argmin()]:.0e}")
check(best64 < 1e-8 and best32 > 100 * best64,
      "float64 central differences reach < 1e-8; float32 is at least 100x worse (so check in float64)")
check(errs64[-1] > 100 * best64 and errs64[0] > 100 * best64,
      "both too large h (truncation) and too small h (round-off) are >100x worse than the best h")

# %%
fig, ax = plt.subplots(figsize=(6, 4))
ax.loglog(hs, errs64, "o-", label="float64")
ax.loglog(hs, errs32, "s-", label="float32")
ax.axvline(1e-5, color="gray", ls="--", lw=1, label="h = 1e-5")
ax.set_xlabel("finite-difference step h")
ax.set_ylabel("relative error of dW")
ax.set_title("tanh(xW+b): round-off (left) vs truncation (right)")
ax.legend()
fig.tight_layout()
save_figure(fig, args.out, "fd_error_vs_h.png")
print(f"done in {time.time() - t0:.1f} s")
