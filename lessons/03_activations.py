# %% [markdown]
# # Lesson 03: activations and their gradients
#
# The nonlinearities between dense layers, each as a forward/backward pair, each checked against finite differences;
# why gradient checks avoid kinks; and why sigmoid and log-sigmoid must be computed stably.
#
# Run it as a script, `python lessons/03_activations.py [--out DIR] [--seed N]`, or open it as a notebook
# (jupytext or VS Code; `MINIVAE_QUICK=1` in the kernel's environment selects the tests' quick mode).
#
# Exercises: `relu_backward`, `tanh_backward`, `sigmoid_backward` in `minivae/layers.py`.
#
# | activation | forward | derivative |
# |---|---|---|
# | ReLU | $y = \max(x, 0)$ | $\mathbb{1}[x > 0]$ |
# | LeakyReLU | $y = x$ if $x > 0$, else $\alpha x$ | $1$ if $x > 0$, else $\alpha$ |
# | tanh | $y = \tanh x$ | $1 - y^2$ |
# | sigmoid | $y = \sigma(x) = 1 / (1 + e^{-x})$ | $y (1 - y)$ |
# | softplus | $y = \log(1 + e^x)$ | $\sigma(x)$ |
#
# The derivations of the less obvious ones.  For tanh, $\tanh x = (e^x - e^{-x}) / (e^x + e^{-x})$ and the quotient
# rule gives
#
# $$\frac{d \tanh x}{dx} = \frac{(e^x + e^{-x})^2 - (e^x - e^{-x})^2}{(e^x + e^{-x})^2} = 1 - \tanh^2 x .$$
#
# For the sigmoid, $\sigma = (1 + e^{-x})^{-1}$, so
#
# $$\frac{d\sigma}{dx} = \frac{e^{-x}}{(1 + e^{-x})^2} = \frac{1}{1 + e^{-x}} \cdot \frac{e^{-x}}{1 + e^{-x}}
#   = \sigma (1 - \sigma).$$
#
# For softplus, $\dfrac{d}{dx} \log(1 + e^x) = \dfrac{e^x}{1 + e^x} = \sigma(x)$.
#
# tanh and sigmoid cache their *output* $y$, since the derivative is a function of $y$ alone: no exponential is
# recomputed in the backward pass.

# %%
import time
import warnings

import matplotlib.pyplot as plt
import numpy as np

import minivae
from minivae import layers
from minivae.gradcheck import numerical_gradient, rel_error
from minivae.lessonkit import check, lesson_args, save_figure

# --quick (or MINIVAE_QUICK=1), --out DIR, --seed N; unknown arguments (a Jupyter kernel's) are ignored
args = lesson_args("lesson_output/03_activations", "Lesson 03: activations and their gradients",
                   quick_help="smaller problem (for tests)")
rng = np.random.default_rng(args.seed)
t0 = time.time()

# %% [markdown]
# ## 1. Gradient checks of every activation
#
# Inputs are float64, drawn away from the ReLU/LeakyReLU kink at 0 (section 2 says why: $|x| \ge 0.1 \gg h$), with a
# random upstream gradient.

# %%
shape = (4, 6) if args.quick else (16, 32)
x = rng.standard_normal(shape) * 2
x = np.where(np.abs(x) < 0.1, 0.1 * np.sign(x) + x, x)   # keep |x| >= 0.1 >> h
worst = 0.0
for name in ["relu", "leaky_relu", "tanh", "sigmoid", "softplus"]:
    fwd, bwd = layers.activation(name)
    rep = minivae.check_op(fwd, bwd, [x.copy()], names=["x"], rng=rng, tol=1e-8)
    print(f"  {name:10s} rel error {rep['x']:.2e}")
    worst = max(worst, rep["x"])
check(worst < 1e-8, "relu, leaky_relu, tanh, sigmoid, softplus backward all pass check_op (rel error < 1e-8)")

# %% [markdown]
# ## 2. Why gradient checks avoid kinks
#
# At $x = 0$, ReLU has no derivative; minivae defines it as 0 (a subgradient).  The central difference straddles the
# kink:
#
# $$\frac{\mathrm{relu}(0 + h) - \mathrm{relu}(0 - h)}{2h} = \frac{h - 0}{2h} = \frac12,$$
#
# which matches neither one-sided slope: the check would report a failure that is not a bug.  For any $|x| > h$ both
# $x \pm h$ lie on the same side and the difference is exact.

# %%
x0 = np.array([0.0])
fd0 = numerical_gradient(lambda: layers.relu_forward(x0)[0], x0, np.ones(1), h=1e-5)[0]
an0 = layers.relu_backward(np.ones(1), layers.relu_forward(x0)[1])[0]
print(f"  at x=0: finite difference {fd0:.6f}, backward {an0:.1f}")
check(abs(fd0 - 0.5) < 1e-9, "finite differences of ReLU at the kink x=0 give 0.5 (neither 0 nor 1)")
xs = np.array([-2e-5, 2e-5, -0.3, 0.7])          # |x| > h = 1e-5: safe
fds = numerical_gradient(lambda: layers.relu_forward(xs)[0], xs, np.ones(4), h=1e-5)
ans = layers.relu_backward(np.ones(4), layers.relu_forward(xs)[1])
check(rel_error(ans, fds) < 1e-9, "with |x| > h (even |x| = 2h) the ReLU check is exact")

# %% [markdown]
# ## 3. Why sigmoid (and log sigmoid) must be written stably
#
# Naively, $\sigma(x) = 1 / (1 + e^{-x})$.  At $x = -1000$, $e^{1000}$ overflows to `inf` (float64 overflows above
# about 709) and NumPy warns; the answer $1/\infty = 0$ happens to be right, but in float32 the overflow starts at
# $x < -88.7$, and the same pattern inside a logarithm is fatal:
#
# $$\log \sigma(x) = -\log(1 + e^{-x}) = -\mathrm{softplus}(-x).$$
#
# Naively $\log \sigma(-1000) = \log 0 = -\infty$, but the true value is
# $-\mathrm{softplus}(1000) = -1000 - \log(1 + e^{-1000}) = -1000$ to machine precision.  minivae's softplus computes
# $\max(x, 0) + \mathrm{log1p}(e^{-|x|})$, and its sigmoid only exponentiates $-|x| \le 0$, so neither can overflow.

# %%
big = np.array([-1000.0, -50.0, 0.0, 50.0, 1000.0])
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    naive = 1.0 / (1.0 + np.exp(-big))
    naive_logsig = np.log(1.0 / (1.0 + np.exp(-big)))
overflow_warned = any("overflow" in str(w_.message) for w_ in caught)
with warnings.catch_warnings():
    warnings.simplefilter("error")                # the stable versions must not warn at all
    stable = layers.sigmoid(big)
    stable_logsig = -layers.softplus(-big)
print("  x            :", big)
print("  naive sigmoid:", naive, " (overflow warning:", overflow_warned, ")")
print("  naive log sig:", naive_logsig)
print("  -softplus(-x):", stable_logsig)
check(overflow_warned, "naive 1/(1+exp(-x)) at x=-1000 overflows (NumPy RuntimeWarning)")
check(np.isneginf(naive_logsig[0]) and stable_logsig[0] == -1000.0,
      "naive log(sigmoid(-1000)) is -inf while -softplus(1000) gives exactly -1000")
check(np.all(np.isfinite(stable)) and stable[0] == 0.0 and stable[-1] == 1.0 and stable[2] == 0.5,
      "minivae sigmoid is finite and warning-free at +-1000 (0, 1/2, 1 where exact)")
x32 = np.array([-100.0], dtype=np.float32)
with warnings.catch_warnings(record=True) as caught32:
    warnings.simplefilter("always")
    np.exp(-x32)
check(any("overflow" in str(w_.message) for w_ in caught32),
      "in float32 exp(-x) already overflows at x = -100 (limit ~ -88.7)")

# %% [markdown]
# Rounding is not symmetric either.  In float32, $\sigma(x) = 1 / (1 + e^{-x})$ rounds to exactly 1 once
# $1 + e^{-x}$ rounds to 1, i.e. once $e^{-x} < 2^{-24}$, from $x \approx 16.6$ on; but $\sigma(x) \approx e^{x}$ rounds
# to exactly 0 only when $e^{x}$ falls below half the smallest subnormal number,
# $2^{-150} \approx 7 \times 10^{-46}$, i.e. below $x = -150 \ln 2 \approx -104$.  In between, $\sigma(x)$ is
# tiny but positive, and $\log \sigma(x)$ would still be finite.

# %%
s32 = layers.sigmoid(np.array([16.0, 17.0, -103.0, -105.0], dtype=np.float32))
print("  float32 sigmoid at 16, 17, -103, -105:", s32)
check(s32.dtype == np.float32 and s32[0] < 1 and s32[1] == 1 and s32[2] > 0 and s32[3] == 0,
      "float32 sigmoid rounds to 1 from x ~ 17, but to 0 only below x ~ -104 (minivae.likelihoods says so)")

# %% [markdown]
# ## 4. Picture: the activations and their derivatives
#
# The derivative curves are the backward passes applied to $dy = 1$; finite differences at a few points (kinks
# excluded) are overlaid as crosses.  LeakyReLU uses $\alpha = 0.1$ so its slope is visible.

# %%
grid = np.linspace(-4, 4, 401 if args.quick else 1601)
pts = np.array([-3.1, -1.3, -0.6, 0.4, 1.1, 2.9])
fig, axes = plt.subplots(1, 2, figsize=(11, 4))
fd_worst = 0.0
for name in ["relu", "leaky_relu", "tanh", "sigmoid", "softplus"]:
    fwd, bwd = layers.activation(name)
    extra = (0.1,) if name == "leaky_relu" else ()
    y, c = fwd(grid, *extra)
    d = bwd(np.ones_like(grid), c)
    axes[0].plot(grid, y, label=name)
    line, = axes[1].plot(grid, d, label=name)
    fpts = numerical_gradient(lambda: fwd(pts, *extra)[0], pts, np.ones_like(pts))
    dpts = bwd(np.ones_like(pts), fwd(pts, *extra)[1])
    fd_worst = max(fd_worst, rel_error(dpts, fpts))
    axes[1].plot(pts, fpts, "x", color=line.get_color())
axes[0].set_title("activations y(x)")
axes[1].set_title("derivatives dy/dx (lines: backward, x: finite differences)")
for ax in axes:
    ax.axhline(0, color="gray", lw=0.5)
    ax.axvline(0, color="gray", lw=0.5)
    ax.legend(fontsize=8)
    ax.set_xlabel("x")
fig.tight_layout()
save_figure(fig, args.out, "activations.png")
check(fd_worst < 1e-8, "plotted derivative curves agree with finite differences at the marked points")
print(f"done in {time.time() - t0:.1f} s")
