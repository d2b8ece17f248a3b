# %% [markdown]
# # Lesson 16 - Convolution as a matrix product, and its backward passes by hand
#
# Run: `python lessons/16_conv_ops.py [--out DIR] [--seed N]`
#
# A convolutional VAE needs four new ops, each a forward/backward pair in `minivae/conv.py`:
# the convolution, the *transposed* convolution (the decoder's learned upsampling), max-pooling and
# nearest-neighbour upsampling.  We write the convolution as one matrix product over image patches
# (**im2col**), so that its backward is the dense layer's backward we derived in lesson 02, plus one new
# step: adding the patch gradients back into the image (**col2im**).  The transposed convolution then
# comes for free: it is the *adjoint* of the convolution, and we check that identity numerically.
#
# Every op is gradient-checked in float64 against central finite differences with a random upstream
# gradient.  At the end we look at what convolutions do to an MNIST digit, and recover a bank of filters
# from their outputs with nothing but the weight gradient $\bar W = \bar Y\,\mathrm{col}^\top$.
#
# Exercises: `conv2d_backward`, `conv_transpose2d_forward`, `maxpool2d_backward`,
# `upsample_nearest2d_backward` in `minivae/conv.py`.

# %%
import time

import matplotlib.pyplot as plt
import numpy as np

import minivae.data
from minivae import conv
from minivae.gradcheck import check_op
from minivae.lessonkit import check, lesson_args, save_figure
from minivae.optim import Adam

args = lesson_args("lesson_output/16_conv_ops", "Lesson 16: convolution ops as matrix products")
rng = np.random.default_rng(args.seed)
t_start = time.time()

# %% [markdown]
# ## 1. The convolution, by definition
#
# Layout NCHW: a batch of $N$ images with $C$ channels of size $H\times W$.  A bank of $F$ filters
# $W \in \mathbb{R}^{F\times C\times K_H\times K_W}$ (PyTorch's layout) slides over the zero-padded input
# $x_{\text{pad}}$ with stride $s$:
#
# $$y_{n,f,o_h,o_w} = b_f + \sum_{c=1}^{C}\sum_{i=0}^{K_H-1}\sum_{j=0}^{K_W-1}
#   W_{f,c,i,j}\; x_{\text{pad}}\,[n,\, c,\, o_h s + i,\, o_w s + j],
# \qquad O_H = \left\lfloor \frac{H + 2p - K_H}{s} \right\rfloor + 1 .$$
#
# (Deep-learning "convolution" is a cross-correlation: the kernel is not flipped.)  Below, six nested
# loops compute exactly this formula on a small example with odd sizes, a non-square kernel, stride 2 and
# padding 1.

# %%
N, C, H, W, F, KH, KW, s, p = 2, 3, 7, 5, 4, 3, 2, 2, 1
x = rng.standard_normal((N, C, H, W))
Wt = rng.standard_normal((F, C, KH, KW))
b = rng.standard_normal(F)
OH, OW = (H + 2 * p - KH) // s + 1, (W + 2 * p - KW) // s + 1
xpad = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
y_loops = np.zeros((N, F, OH, OW))
for n in range(N):
    for f in range(F):
        for oh in range(OH):
            for ow in range(OW):
                y_loops[n, f, oh, ow] = b[f] + np.sum(Wt[f] * xpad[n, :, oh * s:oh * s + KH, ow * s:ow * s + KW])
y, cache = conv.conv2d_forward(x, Wt, b, stride=s, padding=p)
print(f"x {x.shape}  W {Wt.shape}  ->  y {y.shape}   (O_H = ({H} + 2*{p} - {KH}) // {s} + 1 = {OH})")
check(y.shape == (N, F, OH, OW) and np.max(np.abs(y - y_loops)) < 1e-12,
      "conv2d_forward equals the six-loop definition (max abs difference < 1e-12)")

# %% [markdown]
# ## 2. im2col: the convolution is one matrix product
#
# Every output pixel is the dot product of a filter with one $C\times K_H\times K_W$ patch.  Copy every
# patch into a column of one matrix,
#
# $$\mathrm{col}\big[(c,i,j),\,(o_h,o_w,n)\big] = x_{\text{pad}}[n,\,c,\,o_h s+i,\,o_w s+j],
# \qquad \mathrm{col} \in \mathbb{R}^{(C K_H K_W)\times(O_H O_W N)},$$
#
# flatten the filters into the rows of $W_m = W.\text{reshape}(F, C K_H K_W)$, and the whole convolution is
#
# $$Y = W_m\,\mathrm{col} + b\,\mathbf{1}^\top \in \mathbb{R}^{F\times(O_H O_W N)},$$
#
# reshaped to $(F, O_H, O_W, N)$ and transposed to $(N, F, O_H, O_W)$.  The batch index $n$ runs fastest
# along a column index: then every copy below moves contiguous runs of $N$ numbers, which measured about 3×
# faster than putting $n$ first.  `conv.im2col` builds `col` without a loop over pixels: it pads $x$ into a
# batch-last array `xpad` of shape $(C, H+2p, W+2p, N)$, loops over the $K_H K_W$ kernel offsets $(i, j)$
# only, and for each one copies a whole strided slice `xpad[:, i : i + s*OH : s, j : j + s*OW : s, :]`
# (all pixels $(o_h s + i, o_w s + j)$ at once).
# The picture shows `col` for one MNIST digit with the encoder's first layer (4×4 kernel, stride 2,
# padding 1): 196 patches of 16 pixels.

# %%
x_test, y_test = minivae.data.load_mnist("test")
digit = x_test[0].reshape(1, 1, 28, 28).astype(np.float64)          # a 7
col = conv.im2col(digit, 4, 4, stride=2, padding=1)
print("im2col of one 1x28x28 digit, 4x4 kernel, stride 2, padding 1:", col.shape, "= (C*KH*KW, OH*OW*N)")
col_small = conv.im2col(x, KH, KW, s, p)
Y = Wt.reshape(F, -1) @ col_small + b[:, None]
check(np.allclose(Y.reshape(F, OH, OW, N).transpose(3, 0, 1, 2), y_loops, rtol=0, atol=1e-12),
      "W.reshape(F, C*KH*KW) @ im2col(x) + b, reshaped to (F, OH, OW, N) and moved to (N, F, OH, OW), is the convolution")
xpad = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
c_, i_, j_, oh_, ow_, n_ = np.indices((C, KH, KW, OH, OW, N)).reshape(6, -1)
rows_ = (c_ * KH + i_) * KW + j_
want = xpad[n_, c_, oh_ * s + i_, ow_ * s + j_]
check(np.array_equal(col_small[rows_, (oh_ * OW + ow_) * N + n_], want)
      and not np.array_equal(col_small[rows_, (n_ * OH + oh_) * OW + ow_], want),
      "col's column index is (o_h, o_w, n) = (o_h*O_W + o_w)*N + n, batch last (reading it as (n, o_h, o_w) fails)")

fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), gridspec_kw={"width_ratios": [1, 1, 3.2]})
axes[0].imshow(digit[0, 0], cmap="gray_r")
for k, (oh, ow) in enumerate([(3, 5), (7, 7), (10, 4)]):
    axes[0].add_patch(plt.Rectangle((ow * 2 - 1 - 0.5, oh * 2 - 1 - 0.5), 4, 4, fill=False,
                                    color=f"C{k + 1}", lw=2))
axes[0].set_title("digit, three 4x4 patches")
axes[1].imshow(np.pad(digit[0, 0], 1), cmap="gray_r")
axes[1].set_title("zero-padded (p = 1)")
axes[2].imshow(col, cmap="gray_r", aspect="auto", interpolation="nearest")
for k, (oh, ow) in enumerate([(3, 5), (7, 7), (10, 4)]):
    axes[2].axvline(oh * 14 + ow, color=f"C{k + 1}", lw=1.5)
axes[2].set_xlabel("column = patch (oh, ow), 14 x 14 = 196 of them")
axes[2].set_ylabel("row = pixel (i, j) of the patch")
axes[2].set_title("im2col: every patch becomes a column")
for a in axes[:2]:
    a.set_xticks([])
    a.set_yticks([])
save_figure(fig, args.out, "im2col.png")

# %% [markdown]
# ## 3. The backward pass of the convolution
#
# $Y = W_m\,\mathrm{col} + b\mathbf 1^\top$ is a dense layer (lesson 02) whose "batch" is the set of all
# $N O_H O_W$ patches.  With the upstream gradient $\bar Y = \partial L/\partial Y$ reshaped to
# $(F, O_H O_W N)$ (the batch last, as in col):
#
# $$\bar W_m = \bar Y\,\mathrm{col}^\top \;(F\times C K_H K_W),\qquad
#   \bar{\mathrm{col}} = W_m^\top\,\bar Y \;(C K_H K_W\times O_H O_W N),\qquad
#   \bar b_f = \sum_{n,o_h,o_w} \bar y_{n,f,o_h,o_w}.$$
#
# The product $\bar Y\,\mathrm{col}^\top$ sums over *every* patch, over the batch as well: one filter is
# shared by all positions and all images, so its gradient collects all of their contributions.
#
# The last step is new.  im2col copied each input pixel into every patch that contains it, and a value
# used several times receives the *sum* of the gradients of its uses.  So
#
# $$\bar x[n,c,h,w] = \sum_{\substack{i,j,o_h,o_w:\\ o_h s+i-p=h,\; o_w s+j-p=w}}
#   \bar{\mathrm{col}}\big[(c,i,j),(o_h,o_w,n)\big] = \mathrm{col2im}(\bar{\mathrm{col}}),$$
#
# a scatter-*add*: `conv.col2im` loops over the kernel offsets and does `xpad[..., i::s, j::s] += ...`.
# col2im is the adjoint of im2col, $\langle \mathrm{im2col}(x), c\rangle = \langle x, \mathrm{col2im}(c)\rangle$.
# The picture below, col2im(im2col(1)), counts how many patches read each pixel: how many terms its
# gradient sums.

# %%
ones = np.ones((1, 1, 28, 28))
cover = {(k, st, pd): conv.col2im(conv.im2col(ones, k, k, st, pd), ones.shape, k, k, st, pd)[0, 0]
         for k, st, pd in [(4, 2, 1), (3, 1, 1), (5, 2, 0)]}
c1 = rng.standard_normal(col_small.shape)
lhs, rhs = np.sum(col_small * c1), np.sum(x * conv.col2im(c1, x.shape, KH, KW, s, p))
print(f"<im2col(x), c> = {lhs:.12f}   <x, col2im(c)> = {rhs:.12f}")
check(abs(lhs - rhs) < 1e-10 * abs(lhs), "col2im is the adjoint of im2col: <im2col(x), c> = <x, col2im(c)>")
check(np.all(cover[(4, 2, 1)][1:-1, 1:-1] == 4) and cover[(4, 2, 1)][0, 0] == 1,
      "with a 4x4 kernel, stride 2, padding 1 every interior pixel is read by 4 patches (its gradient sums 4 terms), a corner by 1")
check(np.all(cover[(3, 1, 1)][1:-1, 1:-1] == 9), "with a 3x3 kernel, stride 1, padding 1 every interior pixel is read 9 times")

fig, axes = plt.subplots(1, 3, figsize=(10, 3.3))
for a, ((k, st, pd), m) in zip(axes, cover.items()):
    im = a.imshow(m, cmap="viridis", vmin=0)
    a.set_title(f"k{k} s{st} p{pd}: patches per pixel")
    a.set_xticks([])
    a.set_yticks([])
    fig.colorbar(im, ax=a, shrink=0.8)
save_figure(fig, args.out, "col2im_coverage.png")

# %% [markdown]
# Now the gradient check: $\bar x$, $\bar W$, $\bar b$ of `conv2d_backward` against central finite
# differences of $L = \sum_{n,f,o_h,o_w} y_{n,f,o_h,o_w}\, g_{n,f,o_h,o_w}$ with a random $g$, in float64,
# over odd sizes, strides 1 and 2, paddings 0 and 1, non-square kernels and several channels.

# %%
conv_cases = [(2, 3, 7, 5, 4, 3, 2, 1, 0), (2, 3, 7, 5, 4, 3, 3, 2, 1), (1, 2, 6, 6, 3, 4, 4, 2, 1),
              (3, 1, 5, 7, 2, 2, 3, 1, 1)]
if args.quick:
    conv_cases = conv_cases[1:3]
worst = 0.0
for (n_, c_, h_, w_, f_, kh, kw, st, pd) in conv_cases:
    xs = [rng.standard_normal((n_, c_, h_, w_)), rng.standard_normal((f_, c_, kh, kw)), rng.standard_normal(f_)]
    rep = check_op(lambda a, w, bb: conv.conv2d_forward(a, w, bb, st, pd), conv.conv2d_backward, xs,
                   ["x", "W", "b"], rng)
    print(f"  conv2d x{xs[0].shape} W{xs[1].shape} s{st} p{pd}: " + ", ".join(f"{k} {v:.1e}" for k, v in rep.items()))
    worst = max(worst, *rep.values())
check(worst < 1e-7, f"conv2d_backward: dx, dW, db match finite differences (worst rel error {worst:.1e} < 1e-7)")

# %% [markdown]
# ## 4. The transposed convolution is the adjoint of the convolution
#
# For fixed $W$ and $b = 0$ the convolution is a linear map $A: x \mapsto y$, a (huge, sparse) matrix.
# Its transpose $A^\top$ is defined by
#
# $$\langle A x,\, y\rangle = \langle x,\, A^\top y\rangle \quad\text{for all } x, y .$$
#
# We have already computed $A^\top$: the backward pass of a linear map multiplies the upstream gradient by
# the transpose, so conv2d's $\bar x = \mathrm{col2im}(W_m^\top \bar Y)$ *is* $A^\top \bar Y$.  The
# **transposed convolution** is that map used as a forward op:
#
# $$\mathrm{conv}^\top(x) = \mathrm{col2im}\big(W_m^\top X\big) + b,\qquad X = x \text{ as } (C_{in}, H W N),$$
#
# with weight layout $(C_{in}, C_{out}, K_H, K_W)$: the $(F, C, K_H, K_W)$ weight of the convolution it
# transposes.  Each input pixel stamps its kernel, scaled by its value, onto the output, and overlapping
# stamps add.  Its output size $O_H = (H-1)s - 2p + K_H$ is the input size of the convolution that maps
# back to $H$: with $k = 4, s = 2, p = 1$ it doubles $7 \to 14 \to 28$, the decoder of the conv VAE.
#
# Its backward needs no new derivation: the adjoint of $A^\top$ is $A$, so
# $\bar x = \text{conv2d}(\bar y)$ (no bias), and $\bar W_m = X\, \mathrm{im2col}(\bar y)^\top$.
# We check the identity for several shapes, the two equalities, and the gradients.

# %%
adj_cases = [(2, 3, 8, 8, 4, 4, 4, 2, 1), (2, 2, 7, 7, 3, 3, 3, 1, 1), (1, 3, 9, 5, 2, 3, 1, 2, 0),
             (2, 64, 14, 14, 32, 4, 4, 2, 1)]
worst_adj = 0.0
for (n_, c_, h_, w_, f_, kh, kw, st, pd) in adj_cases:
    Wa = rng.standard_normal((f_, c_, kh, kw))
    xa = rng.standard_normal((n_, c_, h_, w_))
    Ax, _ = conv.conv2d_forward(xa, Wa, np.zeros(f_), st, pd)
    ya = rng.standard_normal(Ax.shape)
    Aty, _ = conv.conv_transpose2d_forward(ya, Wa, np.zeros(c_), st, pd)
    lhs, rhs = np.sum(Ax * ya), np.sum(xa * Aty)
    worst_adj = max(worst_adj, abs(lhs - rhs) / abs(lhs))
    print(f"  x{xa.shape} -> conv -> {Ax.shape} -> conv^T -> {Aty.shape}:  <Ax,y> = {lhs:+.10f}  <x,A^T y> = {rhs:+.10f}")
check(worst_adj < 1e-12, f"<conv(x), y> = <x, conv_transpose(y)> for all four shapes (rel diff {worst_adj:.1e})")

W4 = rng.standard_normal((4, 3, 4, 4))                       # a conv 3 -> 4 channels, k4 s2 p1: 8x8 -> 4x4
y4, cache4 = conv.conv2d_forward(rng.standard_normal((2, 3, 8, 8)), W4, np.zeros(4), 2, 1)
g = rng.standard_normal(y4.shape)
dx_conv, _, _ = conv.conv2d_backward(g, cache4)
t_out, t_cache = conv.conv_transpose2d_forward(g, W4, np.zeros(3), 2, 1)   # the same W, read as (C_in=4, C_out=3, 4, 4)
check(t_out.shape == (2, 3, 8, 8) and np.allclose(t_out, dx_conv, rtol=0, atol=1e-12),
      "conv_transpose2d_forward(g) is conv2d_backward's dx for upstream g (4x4 -> 8x8)")
dt = rng.standard_normal(t_out.shape)
check(np.allclose(conv.conv_transpose2d_backward(dt, t_cache)[0], conv.conv2d_forward(dt, W4, np.zeros(4), 2, 1)[0],
                  rtol=0, atol=1e-12), "conv_transpose2d_backward's dx is conv2d_forward (no bias)")

worst = 0.0
for (n_, c_, h_, w_, f_, kh, kw, st, pd) in conv_cases:
    xs = [rng.standard_normal((n_, c_, h_, w_)), rng.standard_normal((c_, f_, kh, kw)), rng.standard_normal(f_)]
    rep = check_op(lambda a, w, bb: conv.conv_transpose2d_forward(a, w, bb, st, pd), conv.conv_transpose2d_backward,
                   xs, ["x", "W", "b"], rng)
    worst = max(worst, *rep.values())
check(worst < 1e-7, f"conv_transpose2d_backward: dx, dW, db match finite differences (worst rel error {worst:.1e})")

# %% [markdown]
# One input pixel set to 1 shows the stamp: the output is the kernel itself, placed at
# $(h s - p, w s - p)$.  Two neighbouring pixels with stride 2 and a 4×4 kernel overlap by two columns,
# where their stamps add up.

# %%
k_demo = np.arange(1.0, 17.0).reshape(1, 1, 4, 4)
one = np.zeros((1, 1, 3, 3))
one[0, 0, 1, 1] = 1.0
stamp, _ = conv.conv_transpose2d_forward(one, k_demo, np.zeros(1), 2, 1)
two = one.copy()
two[0, 0, 1, 2] = 1.0
stamps, _ = conv.conv_transpose2d_forward(two, k_demo, np.zeros(1), 2, 1)
check(np.array_equal(stamp[0, 0, 1:5, 1:5], k_demo[0, 0]) and stamp.sum() == k_demo.sum(),
      "a single input pixel stamps the kernel, unflipped, at (h*s - p, w*s - p)")
fig, axes = plt.subplots(1, 3, figsize=(9, 3))
for a, im, t in zip(axes, [k_demo[0, 0], stamp[0, 0], stamps[0, 0]],
                    ["kernel 4x4", "one pixel -> 6x6 output", "two pixels: stamps overlap and add"]):
    a.imshow(im, cmap="magma")
    a.set_title(t, fontsize=9)
    a.set_xticks([])
    a.set_yticks([])
save_figure(fig, args.out, "transposed_conv_stamps.png")

# %% [markdown]
# ## 5. Max-pooling routes the gradient to the argmax
#
# With windows of size $k$ and stride $k$, $y_{o_h,o_w} = \max_{i,j} x_{o_h k+i,\,o_w k+j}$.  Locally (away
# from ties) the max *is* one of its inputs, $y = x_a$ with $a$ the argmax, so
# $\partial y/\partial x_{ij} = 1$ for $(i,j) = a$ and $0$ otherwise:
#
# $$\bar x_{o_h k+i,\,o_w k+j} = \bar y_{o_h,o_w}\;\mathbb 1\big[(i,j) = a_{o_h,o_w}\big].$$
#
# The forward stores $a$; the backward copies $\bar y$ there and zeros elsewhere.  On a tie the max is not
# differentiable; like PyTorch we send the gradient to *one* element, the first maximum in row-major order,
# so the gradient is routed, never duplicated.  (The finite-difference check uses inputs whose values
# differ by far more than the step $h$, so no step flips an argmax.)

# %%
xt = np.array([[[[1.0, 3.0, 0.0, 0.0],
                 [3.0, 3.0, 0.0, 0.0],
                 [2.0, 1.0, 5.0, 4.0],
                 [2.0, 0.0, 5.0, 5.0]]]])
yt, ct = conv.maxpool2d_forward(xt, 2)
dxt = conv.maxpool2d_backward(np.array([[[[10.0, 20.0], [30.0, 40.0]]]]), ct)
print("x =\n", xt[0, 0], "\nmaxpool =\n", yt[0, 0], "\ndx for dy = [[10, 20], [30, 40]] =\n", dxt[0, 0])
check(dxt[0, 0, 0, 1] == 10 and dxt[0, 0, 0, 0] == 0 and dxt[0, 0, 0, 2] == 20 and dxt[0, 0, 2, 0] == 30
      and dxt[0, 0, 2, 2] == 40 and np.count_nonzero(dxt) == 4,
      "on ties the whole gradient goes to the first maximum of each window (row-major), one element per window")
xm = (rng.permutation(2 * 3 * 7 * 5) * 0.01).reshape(2, 3, 7, 5)
ym, cm = conv.maxpool2d_forward(xm, 2)
dxm = conv.maxpool2d_backward(np.ones(ym.shape), cm)
check(ym.shape == (2, 3, 3, 2) and np.count_nonzero(dxm) == ym.size and dxm[:, :, 6, :].sum() == 0,
      "on a 7x5 input maxpool(2) gives 3x2; exactly one nonzero gradient per window; the dropped last row gets 0")
worst = 0.0
for shape, k in [((2, 3, 6, 4), 2), ((2, 2, 7, 5), 2), ((1, 2, 9, 7), 3)]:
    xm = (rng.permutation(int(np.prod(shape))) * 0.01).reshape(shape)
    worst = max(worst, check_op(lambda a: conv.maxpool2d_forward(a, k), conv.maxpool2d_backward, [xm], ["x"], rng)["x"])
check(worst < 1e-7, f"maxpool2d_backward matches finite differences (worst rel error {worst:.1e})")

# %% [markdown]
# ## 6. Upsampling's gradient sums
#
# Nearest-neighbour upsampling by $s$ copies each pixel into an $s\times s$ block:
# $y_{h s+i,\, w s+j} = x_{h,w}$.  A value used $s^2$ times receives the sum of the gradients of its uses:
#
# $$\bar x_{h,w} = \sum_{i,j=0}^{s-1} \bar y_{h s+i,\, w s+j}.$$
#
# Upsampling is linear, so this backward is again its adjoint: *sum*-pooling over $s\times s$ blocks.

# %%
xu = rng.standard_normal((2, 3, 3, 5))
yu, cu = conv.upsample_nearest2d_forward(xu, 2)
gu = rng.standard_normal(yu.shape)
dxu = conv.upsample_nearest2d_backward(gu, cu)
check(np.allclose(dxu[:, :, 1, 2], gu[:, :, 2:4, 4:6].sum(axis=(2, 3)), rtol=0, atol=1e-12)
      and np.allclose(conv.upsample_nearest2d_backward(np.ones(yu.shape), cu), 4.0),
      "upsample backward sums dy over each 2x2 block (all-ones dy gives 4 everywhere)")
check(abs(np.sum(yu * gu) - np.sum(xu * dxu)) < 1e-12 * abs(np.sum(yu * gu)),
      "<upsample(x), g> = <x, upsample_backward(g)>: the backward of a linear op is its adjoint")
worst = 0.0
for shape, sc in [((2, 3, 3, 5), 2), ((1, 2, 2, 3), 3)]:
    xu = rng.standard_normal(shape)
    worst = max(worst, check_op(lambda a: conv.upsample_nearest2d_forward(a, sc), conv.upsample_nearest2d_backward,
                                [xu], ["x"], rng)["x"])
check(worst < 1e-7, f"upsample_nearest2d_backward matches finite differences (worst rel error {worst:.1e})")

# %% [markdown]
# ## 7. What a convolution does to a digit: hand-made edge filters
#
# Six 3×3 filters, stride 1, padding 1 (the shape stays 28×28): horizontal and vertical Sobel edges,
# two diagonals, a blur and a Laplacian.  The vertical-edge filter responds where the intensity changes
# from left to right, so on the strokes of a "1" (nearly vertical) it responds much more than the
# horizontal-edge filter.

# %%
bank = np.array([
    [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]],          # vertical edges (d/dx)
    [[-1, -2, -1], [0, 0, 0], [1, 2, 1]],          # horizontal edges (d/dy)
    [[0, 1, 2], [-1, 0, 1], [-2, -1, 0]],          # diagonal /
    [[2, 1, 0], [1, 0, -1], [0, -1, -2]],          # diagonal \
    [[1, 2, 1], [2, 4, 2], [1, 2, 1]],             # blur
    [[0, 1, 0], [1, -4, 1], [0, 1, 0]],            # Laplacian
], dtype=np.float64)[:, None] / np.array([4, 4, 4, 4, 16, 4.0])[:, None, None, None]
names = ["vertical edges", "horizontal edges", "diagonal /", "diagonal \\", "blur", "Laplacian"]
picks = [int(np.flatnonzero(y_test == d)[0]) for d in (1, 0, 7)]
digits = x_test[picks].reshape(-1, 1, 28, 28).astype(np.float64)
maps, _ = conv.conv2d_forward(digits, bank, np.zeros(6), stride=1, padding=1)
energy = np.abs(maps[0]).sum(axis=(1, 2))
print("response energy on the '1':", ", ".join(f"{nm} {e:.1f}" for nm, e in zip(names, energy)))
check(energy[0] > 2 * energy[1], "on a '1' the vertical-edge filter responds > 2x more than the horizontal-edge one")

fig, axes = plt.subplots(3, 7, figsize=(12, 5.6))
for r in range(3):
    axes[r, 0].imshow(digits[r, 0], cmap="gray_r")
    axes[r, 0].set_title("input" if r == 0 else "", fontsize=9)
    for k in range(6):
        lim = np.abs(maps[r, k]).max()
        axes[r, k + 1].imshow(maps[r, k], cmap="RdBu_r", vmin=-lim, vmax=lim)
        if r == 0:
            axes[r, k + 1].set_title(names[k], fontsize=9)
for a in axes.ravel():
    a.set_xticks([])
    a.set_yticks([])
save_figure(fig, args.out, "feature_maps.png")

# %% [markdown]
# ## 8. Learning the filters back from their outputs, with $\bar W = \bar Y\,\mathrm{col}^\top$
#
# Give a randomly initialised conv layer the digits and, as targets, the feature maps of the hand-made
# bank, and minimise the mean squared error $L = \frac{1}{2M}\sum (y - t)^2$ over the $M$ output values.
# The upstream gradient is $\bar y = (y - t)/M$ and `conv2d_backward` turns it into $\bar W$, $\bar b$.
# The problem is a linear least-squares fit, so Adam must find the bank again: the learned filters are the
# hand-made ones.

# %%
n_fit = 32 if args.quick else 64
steps = 600
xf = x_test[:n_fit].reshape(-1, 1, 28, 28).astype(np.float64)
target, _ = conv.conv2d_forward(xf, bank, np.zeros(6), 1, 1)
params = {"W": rng.standard_normal((6, 1, 3, 3)) * 0.3, "b": np.zeros(6)}
opt = Adam(lr=0.05)
losses = []
for step in range(steps):
    yf, cf = conv.conv2d_forward(xf, params["W"], params["b"], 1, 1)
    r = yf - target
    losses.append(0.5 * np.mean(r * r))
    _, dW, db = conv.conv2d_backward(r / r.size, cf)          # dL/dy = (y - t) / M
    opt.step(params, {"W": dW, "b": db})
err = np.max(np.abs(params["W"] - bank))
print(f"loss {losses[0]:.3e} -> {losses[-1]:.3e} after {steps} Adam steps; max |W_learned - W_bank| = {err:.2e}")
check(err < 1e-2 and np.max(np.abs(params["b"])) < 1e-2,
      "the fitted conv layer recovers the hand-made filter bank (every weight within 0.01)")

fig, axes = plt.subplots(2, 7, figsize=(11, 3.6), gridspec_kw={"width_ratios": [1] * 6 + [2]})
for k in range(6):
    lim = np.abs(bank[k, 0]).max()
    axes[0, k].imshow(bank[k, 0], cmap="RdBu_r", vmin=-lim, vmax=lim)
    axes[1, k].imshow(params["W"][k, 0], cmap="RdBu_r", vmin=-lim, vmax=lim)
    axes[0, k].set_title(names[k], fontsize=8)
    for a in axes[:, k]:
        a.set_xticks([])
        a.set_yticks([])
axes[0, 0].set_ylabel("hand-made")
axes[1, 0].set_ylabel("learned")
gs = axes[0, 6].get_gridspec()
axes[0, 6].remove()
axes[1, 6].remove()
ax_loss = fig.add_subplot(gs[:, 6])
ax_loss.semilogy(losses)
ax_loss.yaxis.tick_right()
ax_loss.set_xlabel("Adam step")
ax_loss.set_title("MSE", fontsize=9)
save_figure(fig, args.out, "learned_filters.png")

# %% [markdown]
# ## 9. How fast: the conv VAE's layers at batch 128, float32
#
# The cost of a convolution is its GEMM, $2\,F\,(C K_H K_W)\,(N O_H O_W)$ flops forward and twice that
# backward, plus the memory traffic of im2col/col2im.  The timings below are one run on this machine
# (they vary with the load); they are printed, not asserted.

# %%
layers_ = [("conv 1->32 k4 s2 p1 (28->14)", conv.conv2d_forward, conv.conv2d_backward, (1, 28), (32, 1, 4, 4), 32),
           ("conv 32->64 k4 s2 p1 (14->7)", conv.conv2d_forward, conv.conv2d_backward, (32, 14), (64, 32, 4, 4), 64),
           ("convT 64->32 k4 s2 p1 (7->14)", conv.conv_transpose2d_forward, conv.conv_transpose2d_backward,
            (64, 7), (64, 32, 4, 4), 32),
           ("convT 32->1 k4 s2 p1 (14->28)", conv.conv_transpose2d_forward, conv.conv_transpose2d_backward,
            (32, 14), (32, 1, 4, 4), 1)]
nb = 32 if args.quick else 128
dtypes = set()
for name, fwd, bwd, (c_, h_), wshape, nbias in layers_:
    xb = rng.standard_normal((nb, c_, h_, h_)).astype(np.float32)
    wb = (rng.standard_normal(wshape) * 0.1).astype(np.float32)
    best = np.inf
    for _ in range(3):
        t0 = time.perf_counter()
        yb, cb = fwd(xb, wb, np.zeros(nbias, np.float32), 2, 1)
        grads = bwd(np.ones_like(yb), cb)
        best = min(best, time.perf_counter() - t0)
    dtypes |= {yb.dtype, *(gr.dtype for gr in grads)}
    print(f"  {name:32s} batch {nb}: forward + backward {1e3 * best:6.1f} ms")
check(dtypes == {np.dtype(np.float32)}, "float32 in, float32 out for every layer (no silent float64)")
print(f"lesson 16 done in {time.time() - t_start:.1f} s")
