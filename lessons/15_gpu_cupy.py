# %% [markdown]
# # Lesson 15 — The same code on a GPU with CuPy
#
# minivae never calls `numpy` directly inside its ops: each op finds its array module from its inputs
# (`xp = get_array_module(x)`), and a model keeps the backend it was built with.  So the very same VAE runs on
# CuPy arrays when you ask for it.  This lesson times training steps on each available backend and checks that
# CuPy computes the same loss as NumPy for the same seed and $\varepsilon$.
#
# Without a GPU (e.g. in CI) it shows that asking for CuPy raises a clear `minivae.BackendError`, still times
# NumPy, and ends normally.
#
# **Run** `python lessons/15_gpu_cupy.py [--out DIR] [--seed N]`, or open it as a notebook
# (jupytext); in a kernel, set `MINIVAE_QUICK=1` for the small version.  For the GPU half, install
# CuPy on a machine with an NVIDIA GPU (from a clone of minivae: `pip install -e '.[cuda12x]'`, or `.[cuda13x]`).

# %%
import time

import matplotlib.pyplot as plt
import numpy as np

import minivae
import minivae.data
from minivae.lessonkit import check, lesson_args, save_figure

args = lesson_args("lesson_output/15_gpu_cupy", "Lesson 15: the same code on a GPU with CuPy",
                   quick_help="fewer timed steps (for tests)")
t0 = time.time()
x, _ = minivae.data.load_mnist("test")
cfg = minivae.VAEConfig(hidden=(400,), z_dim=20)
n_steps = 5 if args.quick else 30
timings = {}

# %% [markdown]
# ## 1. What changes between backends, and what does not
#
# The math is identical: the dense layer $y = xW + b$ with $\bar W = x^\top\bar y$ is `x @ W` on either module.
# What differs is *where* the arrays live and how fast the matrix products run.
#
# **The cost of a training step.**  A dense layer with `in` inputs and `out` outputs costs
# $2 \cdot \mathrm{in} \cdot \mathrm{out}$ FLOPs per image for the forward product $xW$, as much again for
# $\bar W = x^\top \bar y$, and as much again for $\bar x = \bar y W^\top$, except in the first layer, where no
# gradient with respect to the data is needed.  For a 784-H-L VAE (encoder $784 \to H$, two heads $H \to L$,
# decoder $L \to H \to 784$) that is, per image,
#
# $$\text{FLOPs} = 2\cdot 2\cdot 784 H + 3 \cdot 2 \cdot 2HL + 3\cdot 2\cdot LH + 3 \cdot 2 \cdot 784 H,$$
#
# i.e. 3.28 MFLOP for $H = 400$, $L = 20$, and 0.42 GFLOP per step at batch 128: tens of milliseconds on two CPU
# cores, well under a millisecond of arithmetic on a modern GPU, where kernel-launch overhead then dominates
# small models.  The elementwise ops (activations, reparameterization, likelihood) add only $O(H + L + 784)$ per
# image.

# %%
def flops_per_image(model):
    """FLOPs of the matrix products in one step, per image: 2*in*out for y = xW, again for dW = x^T dy,
    and again for dx = dy W^T except in the first layer (no gradient with respect to the data)."""
    total = 0
    for name, (_, shape) in model.layout.items():
        if name.endswith(".W"):
            n_products = 2 if name == "enc.0.W" else 3
            total += n_products * 2 * shape[0] * shape[1]
    return total


def time_steps(model, x, n_steps, trng, sync=lambda: None):
    """Median seconds per training step (loss + Adam), after 3 warm-up steps."""
    opt = minivae.Adam(lr=1e-3)
    times = []
    for i in range(n_steps + 3):
        xb = minivae.data.binarize(x[(i * 128) % (len(x) - 128):][:128], trng)
        sync()
        t = time.perf_counter()
        _, grads = model.loss(xb)
        opt.step(model.params, grads)
        sync()
        if i >= 3:
            times.append(time.perf_counter() - t)
    return float(np.median(times))


model_np = minivae.VAE(cfg, rng=np.random.default_rng(args.seed), backend="numpy")
flops = flops_per_image(model_np)
H, L = cfg.hidden[0], cfg.z_dim
check(flops == 2 * 2 * 784 * H + 3 * 2 * 2 * H * L + 3 * 2 * L * H + 3 * 2 * 784 * H == 3_280_000,
      f"the matrix products of one training step cost {flops / 1e6:.2f} MFLOP per image "
      "(forward, dW for every layer, dx for every layer but the first)")
timings["numpy"] = time_steps(model_np, x, n_steps, np.random.default_rng(args.seed))
print(f"numpy: {1000 * timings['numpy']:.1f} ms per step (784-400-20, batch 128, median of {n_steps}) = "
      f"{128 * flops / timings['numpy'] / 1e9:.1f} GFLOP/s")

# %% [markdown]
# ## 2. CuPy, if a GPU is usable
#
# **Reproducibility across backends.**  The noise $\varepsilon$ is always drawn on the host from a NumPy
# Generator and copied to the device, and the initial weights likewise, so the same seed gives the same model
# and the same $\varepsilon$ on both backends.  The losses then agree to float32 rounding, not bit for bit: the
# order of the additions inside a GPU matrix product differs from the CPU's, and float addition is not
# associative.  Relative differences are of order $10^{-6}$.
#
# Without a GPU, asking for CuPy must fail loudly with `minivae.BackendError`: a silent fallback to NumPy would
# make a "GPU run" quietly run on the CPU.

# %%
have_gpu = minivae.cupy_available()
print(f"minivae.cupy_available() = {have_gpu}")
if not have_gpu:
    print("No usable CUDA GPU here (or CuPy is not installed): the CuPy half of this lesson is skipped.\n"
          "Install CuPy on a machine with an NVIDIA GPU to run it (from a clone of minivae: "
          "pip install -e '.[cuda12x]', or .[cuda13x]).")
    default_before = minivae.get_backend()
    try:
        with minivae.use_backend("cupy"):
            pass
        raised = None
    except minivae.BackendError as exc:
        raised = str(exc)
    print(f"use_backend('cupy') raised BackendError: {raised}")
    check(raised is not None and "cupy" in raised, "asking for cupy without a GPU raises a clear "
          "minivae.BackendError (no silent fallback to NumPy)")
    try:
        minivae.VAE(cfg, rng=np.random.default_rng(args.seed), backend="cupy")
        raised2 = False
    except minivae.BackendError:
        raised2 = True
    check(raised2, "VAE(..., backend='cupy') raises BackendError too")
    check(minivae.get_backend() == default_before, f"the failed requests left the default backend unchanged "
          f"({default_before!r})")
else:
    import cupy
    sync = cupy.cuda.Device().synchronize
    model_cp = minivae.VAE(cfg, rng=np.random.default_rng(args.seed), backend="cupy")
    check(model_cp.backend == "cupy" and type(model_cp.flat).__module__.startswith("cupy"),
          "the CuPy model keeps its parameters on the GPU")
    # same seed -> same initial weights; same eps (drawn on the host) -> same loss up to float32 rounding
    fresh_np = minivae.VAE(cfg, rng=np.random.default_rng(args.seed), backend="numpy")
    fresh_cp = minivae.VAE(cfg, rng=np.random.default_rng(args.seed), backend="cupy")
    check(np.array_equal(minivae.to_numpy(fresh_cp.flat), fresh_np.flat),
          "the same seed gives bit-identical initial weights on both backends")
    xb = minivae.data.static_binarize(x[:256], seed=args.seed)
    eps = np.random.default_rng(args.seed + 1).standard_normal((2, 256, cfg.z_dim)).astype(np.float32)
    l_np, g_np = fresh_np.loss(xb, eps=eps, beta=0.8)
    l_cp, g_cp = fresh_cp.loss(cupy.asarray(xb), eps=eps, beta=0.8)
    rel = abs(float(l_np) - float(minivae.to_numpy(l_cp))) / abs(float(l_np))
    grel = minivae.rel_error(g_np.flat, g_cp.flat)
    print(f"loss numpy {float(l_np):.6f}  cupy {float(minivae.to_numpy(l_cp)):.6f}  rel diff {rel:.1e}; "
          f"gradient rel error {grel:.1e}")
    check(rel < 1e-5, f"CuPy loss equals NumPy loss within float32 tolerance (rel diff {rel:.1e})")
    check(grel < 1e-4, f"CuPy gradients equal NumPy gradients within float32 tolerance ({grel:.1e})")
    timings["cupy"] = time_steps(model_cp, x, n_steps, np.random.default_rng(args.seed), sync=sync)
    print(f"cupy : {1000 * timings['cupy']:.2f} ms per step = {128 * flops / timings['cupy'] / 1e9:.0f} GFLOP/s; "
          f"speed-up x{timings['numpy'] / timings['cupy']:.1f}")

# %% [markdown]
# ## 3. Picture: milliseconds per training step, one bar per backend

# %%
fig, ax = plt.subplots(figsize=(5, 3.2))
names = list(timings)
ax.bar(names, [1000 * timings[n] for n in names], color=["C0", "C2"][:len(names)])
ax.set_ylabel("ms per training step")
ax.set_title("784-400-20 VAE, batch 128" + ("" if have_gpu else " (no GPU here)"))
for i, n in enumerate(names):
    ax.text(i, 1000 * timings[n], f"{1000 * timings[n]:.1f}", ha="center", va="bottom")
fig.tight_layout()
save_figure(fig, args.out, "step_times.png")
print(f"lesson 15 done in {time.time() - t0:.1f} s; figures in {args.out}")
