"""minivae.conv: forward values against slow loop-by-definition references, backward against central finite
differences (float64, random upstream gradient), the adjoint identities, pooling ties, shapes, dtypes, CuPy."""
import numpy as np
import pytest

from minivae import conv
from minivae.backend import get_xp, to_numpy
from minivae.gradcheck import check_op, rel_error
from conftest import backends

TOL = 1e-7


@pytest.fixture(params=backends())
def xp(request):
    return get_xp(request.param)


# ----------------------------------------------------------------------------
# slow references, written from the definitions (loops over output pixels)
# ----------------------------------------------------------------------------
def naive_conv2d(x, W, b, s, p):
    N, C, H, Wd = x.shape
    F, _, KH, KW = W.shape
    OH, OW = (H + 2 * p - KH) // s + 1, (Wd + 2 * p - KW) // s + 1
    y = np.zeros((N, F, OH, OW))
    for n in range(N):
        for f in range(F):
            for oh in range(OH):
                for ow in range(OW):
                    acc = b[f]
                    for c in range(C):
                        for i in range(KH):
                            for j in range(KW):
                                h, w = oh * s + i - p, ow * s + j - p
                                if 0 <= h < H and 0 <= w < Wd:
                                    acc += W[f, c, i, j] * x[n, c, h, w]
                    y[n, f, oh, ow] = acc
    return y


def naive_conv_transpose2d(x, W, b, s, p):
    """Each input pixel stamps its kernel, scaled by its value, at (h·s - p, w·s - p); stamps add."""
    N, Cin, H, Wd = x.shape
    _, Cout, KH, KW = W.shape
    OH, OW = (H - 1) * s - 2 * p + KH, (Wd - 1) * s - 2 * p + KW
    y = np.zeros((N, Cout, OH, OW)) + b[None, :, None, None]
    for n in range(N):
        for c in range(Cin):
            for h in range(H):
                for w in range(Wd):
                    for i in range(KH):
                        for j in range(KW):
                            oh, ow = h * s - p + i, w * s - p + j
                            if 0 <= oh < OH and 0 <= ow < OW:
                                y[n, :, oh, ow] += x[n, c, h, w] * W[c, :, i, j]
    return y


def naive_maxpool(x, k):
    N, C, H, W = x.shape
    y = np.zeros((N, C, H // k, W // k))
    for oh in range(H // k):
        for ow in range(W // k):
            y[:, :, oh, ow] = x[:, :, oh * k:oh * k + k, ow * k:ow * k + k].max(axis=(2, 3))
    return y


def naive_upsample(x, s):
    N, C, H, W = x.shape
    y = np.zeros((N, C, H * s, W * s))
    for oh in range(H * s):
        for ow in range(W * s):
            y[:, :, oh, ow] = x[:, :, oh // s, ow // s]
    return y


# (N, C, H, W, F, KH, KW, stride, padding): odd sizes, stride 1 and 2, padding 0 and 1, non-square kernels
CONV_CASES = [
    (2, 3, 7, 5, 4, 3, 2, 1, 0),
    (2, 3, 7, 5, 4, 3, 3, 2, 1),
    (1, 2, 6, 6, 3, 4, 4, 2, 1),
    (3, 1, 5, 7, 2, 2, 3, 1, 1),
    (2, 2, 8, 7, 3, 3, 3, 3, 1),
    (1, 1, 4, 4, 1, 4, 4, 1, 0),   # output 1x1
]
CASE_IDS = ["N{}C{}H{}W{}F{}k{}x{}s{}p{}".format(*c) for c in CONV_CASES]


def rnd(rng, xp, *shape):
    return xp.asarray(rng.standard_normal(shape))


# ----------------------------------------------------------------------------
# forward values against the loops
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("case", CONV_CASES, ids=CASE_IDS)
def test_conv2d_forward_matches_definition(rng, case):
    N, C, H, W, F, KH, KW, s, p = case
    x, Wt, b = rng.standard_normal((N, C, H, W)), rng.standard_normal((F, C, KH, KW)), rng.standard_normal(F)
    y, _ = conv.conv2d_forward(x, Wt, b, stride=s, padding=p)
    ref = naive_conv2d(x, Wt, b, s, p)
    assert y.shape == ref.shape == (N, F, (H + 2 * p - KH) // s + 1, (W + 2 * p - KW) // s + 1)
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", CONV_CASES, ids=CASE_IDS)
def test_conv_transpose2d_forward_matches_definition(rng, case):
    N, C, H, W, F, KH, KW, s, p = case
    x, Wt, b = rng.standard_normal((N, C, H, W)), rng.standard_normal((C, F, KH, KW)), rng.standard_normal(F)
    if (H - 1) * s - 2 * p + KH < 1 or (W - 1) * s - 2 * p + KW < 1:
        pytest.skip("output would be empty")
    y, _ = conv.conv_transpose2d_forward(x, Wt, b, stride=s, padding=p)
    ref = naive_conv_transpose2d(x, Wt, b, s, p)
    assert y.shape == ref.shape == (N, F, (H - 1) * s - 2 * p + KH, (W - 1) * s - 2 * p + KW)
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)


def test_the_model_shapes():
    """The shapes the conv VAE uses: 28 -> 14 -> 7 and back, 3x3 'same' convs."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 1, 28, 28)).astype(np.float32)
    h1, _ = conv.conv2d_forward(x, np.zeros((32, 1, 4, 4), np.float32), np.zeros(32, np.float32), 2, 1)
    h2, _ = conv.conv2d_forward(h1, np.zeros((64, 32, 4, 4), np.float32), np.zeros(64, np.float32), 2, 1)
    g1, _ = conv.conv_transpose2d_forward(h2, np.zeros((64, 32, 4, 4), np.float32), np.zeros(32, np.float32), 2, 1)
    g2, _ = conv.conv_transpose2d_forward(g1, np.zeros((32, 1, 4, 4), np.float32), np.zeros(1, np.float32), 2, 1)
    assert (h1.shape, h2.shape, g1.shape, g2.shape) == ((2, 32, 14, 14), (2, 64, 7, 7), (2, 32, 14, 14), (2, 1, 28, 28))
    s1, _ = conv.conv2d_forward(x, np.zeros((32, 1, 3, 3), np.float32), np.zeros(32, np.float32), 1, 1)
    p1, _ = conv.maxpool2d_forward(s1, 2)
    u1, _ = conv.upsample_nearest2d_forward(p1, 2)
    assert (s1.shape, p1.shape, u1.shape) == ((2, 32, 28, 28), (2, 32, 14, 14), (2, 32, 28, 28))


@pytest.mark.parametrize("shape,k", [((2, 3, 6, 4), 2), ((2, 2, 7, 5), 2), ((1, 2, 9, 7), 3), ((1, 1, 3, 3), 1)])
def test_maxpool_forward_matches_definition(rng, shape, k):
    x = rng.standard_normal(shape)
    y, _ = conv.maxpool2d_forward(x, k)
    np.testing.assert_array_equal(y, naive_maxpool(x, k))


@pytest.mark.parametrize("shape,s", [((2, 3, 3, 5), 2), ((1, 2, 2, 3), 3), ((1, 1, 4, 4), 1)])
def test_upsample_forward_matches_definition(rng, shape, s):
    x = rng.standard_normal(shape)
    y, _ = conv.upsample_nearest2d_forward(x, s)
    np.testing.assert_array_equal(y, naive_upsample(x, s))


def test_im2col_layout_is_the_documented_one(rng):
    N, C, H, W, KH, KW, s, p = 2, 3, 5, 4, 3, 2, 2, 1
    x = rng.standard_normal((N, C, H, W))
    col = conv.im2col(x, KH, KW, s, p)
    OH, OW = (H + 2 * p - KH) // s + 1, (W + 2 * p - KW) // s + 1
    assert col.shape == (C * KH * KW, OH * OW * N)
    xpad = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    # every entry, in the documented order: row (c, i, j), column (oh, ow, n) with the batch fastest
    for c, i, j, oh, ow, n in np.ndindex(C, KH, KW, OH, OW, N):
        assert col[c * KH * KW + i * KW + j, (oh * OW + ow) * N + n] == xpad[n, c, oh * s + i, ow * s + j]


# ----------------------------------------------------------------------------
# backward against central finite differences (float64, random upstream gradient)
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("case", CONV_CASES, ids=CASE_IDS)
def test_conv2d_gradients(rng, xp, case):
    N, C, H, W, F, KH, KW, s, p = case
    x, Wt, b = rnd(rng, xp, N, C, H, W), rnd(rng, xp, F, C, KH, KW), rnd(rng, xp, F)
    rep = check_op(lambda x_, W_, b_: conv.conv2d_forward(x_, W_, b_, s, p), conv.conv2d_backward,
                   [x, Wt, b], ["x", "W", "b"], rng)
    assert max(rep.values()) < TOL


@pytest.mark.parametrize("case", CONV_CASES, ids=CASE_IDS)
def test_conv_transpose2d_gradients(rng, xp, case):
    N, C, H, W, F, KH, KW, s, p = case
    if (H - 1) * s - 2 * p + KH < 1 or (W - 1) * s - 2 * p + KW < 1:
        pytest.skip("output would be empty")
    x, Wt, b = rnd(rng, xp, N, C, H, W), rnd(rng, xp, C, F, KH, KW), rnd(rng, xp, F)
    rep = check_op(lambda x_, W_, b_: conv.conv_transpose2d_forward(x_, W_, b_, s, p),
                   conv.conv_transpose2d_backward, [x, Wt, b], ["x", "W", "b"], rng)
    assert max(rep.values()) < TOL


def distinct(rng, shape, gap=0.01):
    """Values that differ pairwise by >= gap, so a finite-difference step h << gap never changes an argmax."""
    return (rng.permutation(int(np.prod(shape))) * gap).reshape(shape) - 0.5 * gap * np.prod(shape)


@pytest.mark.parametrize("shape,k", [((2, 3, 6, 4), 2), ((2, 2, 7, 5), 2), ((1, 2, 9, 7), 3)])
def test_maxpool_gradients(rng, xp, shape, k):
    x = xp.asarray(distinct(rng, shape))
    rep = check_op(lambda x_: conv.maxpool2d_forward(x_, k), conv.maxpool2d_backward, [x], ["x"], rng)
    assert rep["x"] < TOL


@pytest.mark.parametrize("shape,s", [((2, 3, 3, 5), 2), ((1, 2, 2, 3), 3)])
def test_upsample_gradients(rng, xp, shape, s):
    x = rnd(rng, xp, *shape)
    rep = check_op(lambda x_: conv.upsample_nearest2d_forward(x_, s), conv.upsample_nearest2d_backward, [x], ["x"], rng)
    assert rep["x"] < TOL


# ----------------------------------------------------------------------------
# the adjoint identities
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("case", CONV_CASES, ids=CASE_IDS)
def test_transposed_conv_is_the_adjoint_of_conv(rng, case):
    """<conv(x), y> = <x, conv^T(y)> with the same W and zero bias."""
    N, C, H, W, F, KH, KW, s, p = case
    Wt = rng.standard_normal((F, C, KH, KW))
    x = rng.standard_normal((N, C, H, W))
    ax, _ = conv.conv2d_forward(x, Wt, np.zeros(F), s, p)
    y = rng.standard_normal(ax.shape)
    aty, _ = conv.conv_transpose2d_forward(y, Wt, np.zeros(C), s, p)
    if aty.shape != x.shape:
        # strides that do not divide (H + 2p - KH) drop the last rows: conv^T maps back to a slightly smaller
        # image, the conv input with those unread rows cut off
        assert aty.shape[2] <= H and aty.shape[3] <= W
        x_read = x[:, :, :aty.shape[2], :aty.shape[3]]
        ax, _ = conv.conv2d_forward(np.ascontiguousarray(x_read), Wt, np.zeros(F), s, p)
        x = x_read
    lhs, rhs = float(np.sum(ax * y)), float(np.sum(x * aty))
    assert abs(lhs - rhs) <= 1e-12 * max(1.0, abs(lhs))


def test_transposed_conv_forward_is_conv_dx_and_its_dx_is_conv_forward(rng):
    """conv^T(y) = conv2d_backward's dx for upstream y, and conv^T's dx = conv2d(dy) (no bias)."""
    Wt = rng.standard_normal((4, 3, 4, 4))
    x = rng.standard_normal((2, 3, 8, 8))
    y, cache = conv.conv2d_forward(x, Wt, np.zeros(4), 2, 1)
    g = rng.standard_normal(y.shape)
    dx, _, _ = conv.conv2d_backward(g, cache)
    t, tcache = conv.conv_transpose2d_forward(g, Wt, np.zeros(3), 2, 1)
    np.testing.assert_allclose(t, dx, rtol=1e-13, atol=1e-13)
    dt = rng.standard_normal(t.shape)
    dg, _, _ = conv.conv_transpose2d_backward(dt, tcache)
    np.testing.assert_allclose(dg, conv.conv2d_forward(dt, Wt, np.zeros(4), 2, 1)[0], rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("shape,k,s,p", [((2, 3, 7, 5), (3, 2), 1, 0), ((2, 2, 8, 7), (4, 4), 2, 1), ((1, 2, 5, 5), (3, 3), 3, 1)])
def test_col2im_is_the_adjoint_of_im2col(rng, shape, k, s, p):
    x = rng.standard_normal(shape)
    col = conv.im2col(x, *k, s, p)
    c = rng.standard_normal(col.shape)
    back = conv.col2im(c, shape, *k, s, p)
    assert back.shape == shape
    lhs, rhs = float(np.sum(col * c)), float(np.sum(x * back))
    assert abs(lhs - rhs) <= 1e-12 * max(1.0, abs(lhs))


# ----------------------------------------------------------------------------
# pooling ties and upsampling sums
# ----------------------------------------------------------------------------
def test_maxpool_tie_sends_the_gradient_to_the_first_maximum_only():
    x = np.array([[[[1.0, 3.0, 0.0, 0.0],
                    [3.0, 3.0, 0.0, 0.0],
                    [2.0, 1.0, 5.0, 4.0],
                    [2.0, 0.0, 5.0, 5.0]]]])
    y, cache = conv.maxpool2d_forward(x, 2)
    np.testing.assert_array_equal(y, [[[[3.0, 0.0], [2.0, 5.0]]]])
    dx = conv.maxpool2d_backward(np.array([[[[10.0, 20.0], [30.0, 40.0]]]]), cache)
    expect = np.array([[[[0, 10, 20, 0],      # three 3s tie: the first in row-major order (0, 1) gets it
                         [0, 0, 0, 0],          # all four 0s tie: only (0, 0) of the window
                         [30, 0, 40, 0],        # 2, 2 tie down a column: the upper one
                         [0, 0, 0, 0]]]], float)
    np.testing.assert_array_equal(dx, expect)
    assert dx.sum() == 100.0      # the gradient is routed, never duplicated


def test_maxpool_dropped_border_gets_zero_gradient(rng):
    x = rng.standard_normal((1, 1, 5, 5))
    y, cache = conv.maxpool2d_forward(x, 2)
    dx = conv.maxpool2d_backward(np.ones(y.shape), cache)
    assert y.shape == (1, 1, 2, 2) and np.all(dx[:, :, 4, :] == 0) and np.all(dx[:, :, :, 4] == 0)
    assert dx.sum() == 4 and set(np.unique(dx)) <= {0.0, 1.0}


def test_upsample_backward_sums_each_block(rng):
    dy = rng.standard_normal((2, 3, 6, 9))
    dx = conv.upsample_nearest2d_backward(dy, conv.upsample_nearest2d_forward(np.zeros((2, 3, 2, 3)), 3)[1])
    for h in range(2):
        for w in range(3):
            np.testing.assert_allclose(dx[:, :, h, w], dy[:, :, 3 * h:3 * h + 3, 3 * w:3 * w + 3].sum(axis=(2, 3)))
    ones = conv.upsample_nearest2d_backward(np.ones((1, 1, 4, 4)), ((1, 1, 2, 2), 2))
    np.testing.assert_array_equal(ones, np.full((1, 1, 2, 2), 4.0))


# ----------------------------------------------------------------------------
# shapes, errors, dtypes
# ----------------------------------------------------------------------------
def test_wrong_shapes_raise_valueerror_naming_the_expected_shape():
    x = np.zeros((2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"conv2d_forward: x must have shape \(N, C, H, W\), got \(3, 8, 8\)"):
        conv.conv2d_forward(np.zeros((3, 8, 8)), np.zeros((4, 3, 3, 3)), np.zeros(4))
    with pytest.raises(ValueError, match=r"conv2d_forward: W must have shape \(F, 3, KH, KW\).*got \(4, 2, 3, 3\)"):
        conv.conv2d_forward(x, np.zeros((4, 2, 3, 3)), np.zeros(4))
    with pytest.raises(ValueError, match=r"conv2d_forward: b must have shape \(4,\)"):
        conv.conv2d_forward(x, np.zeros((4, 3, 3, 3)), np.zeros(5))
    with pytest.raises(ValueError, match=r"conv_transpose2d_forward: W must have shape \(3, C_out, KH, KW\)"):
        conv.conv_transpose2d_forward(x, np.zeros((4, 3, 3, 3)), np.zeros(3))
    with pytest.raises(ValueError, match=r"conv_transpose2d_forward: b must have shape \(5,\)"):
        conv.conv_transpose2d_forward(x, np.zeros((3, 5, 3, 3)), np.zeros(3))
    with pytest.raises(ValueError, match=r"maxpool2d_forward: x must have shape \(N, C, H, W\)"):
        conv.maxpool2d_forward(np.zeros((8, 8)))
    with pytest.raises(ValueError, match=r"upsample_nearest2d_forward: x must have shape \(N, C, H, W\)"):
        conv.upsample_nearest2d_forward(np.zeros((1, 8, 8, 1, 1)))
    with pytest.raises(ValueError, match=r"col2im: col must have shape \(27, 128\)"):
        conv.col2im(np.zeros((27, 100)), (2, 3, 8, 8), 3, 3, 1, 1)


def test_empty_outputs_and_bad_hyperparameters_raise():
    with pytest.raises(ValueError, match="conv2d_forward: output size 0x"):
        conv.conv2d_forward(np.zeros((1, 1, 2, 5)), np.zeros((1, 1, 3, 3)), np.zeros(1))
    with pytest.raises(ValueError, match="conv_transpose2d_forward: output size"):
        conv.conv_transpose2d_forward(np.zeros((1, 1, 1, 1)), np.zeros((1, 1, 2, 2)), np.zeros(1), 1, 1)
    with pytest.raises(ValueError, match="maxpool2d_forward: output size 0x"):
        conv.maxpool2d_forward(np.zeros((1, 1, 1, 4)), 2)
    with pytest.raises(ValueError, match="stride must be an integer >= 1"):
        conv.conv2d_forward(np.zeros((1, 1, 4, 4)), np.zeros((1, 1, 3, 3)), np.zeros(1), stride=0)
    with pytest.raises(ValueError, match="padding must be an integer >= 0"):
        conv.conv2d_forward(np.zeros((1, 1, 4, 4)), np.zeros((1, 1, 3, 3)), np.zeros(1), padding=-1)
    with pytest.raises(ValueError, match="size must be an integer >= 1"):
        conv.maxpool2d_forward(np.zeros((1, 1, 4, 4)), 1.5)


def test_error_messages_name_the_op_the_argument_and_the_sizes():
    """Each one-line error says which op, which argument or which input size, and why."""
    with pytest.raises(ValueError, match=r"^maxpool2d_forward: size must be an integer >= 1, got 0$"):
        conv.maxpool2d_forward(np.zeros((1, 1, 4, 4)), 0)
    with pytest.raises(ValueError, match=r"^upsample_nearest2d_forward: scale must be an integer >= 1, got 0$"):
        conv.upsample_nearest2d_forward(np.zeros((1, 1, 4, 4)), 0)
    with pytest.raises(ValueError, match=r"^maxpool2d_forward: output size 0x2 is < 1 for input 1x4 \(size=2\)$"):
        conv.maxpool2d_forward(np.zeros((1, 1, 1, 4)), 2)
    with pytest.raises(ValueError,
                       match=r"^upsample_nearest2d_forward: output size 0x6 is < 1 for input 0x3 \(scale=2\)$"):
        conv.upsample_nearest2d_forward(np.zeros((1, 1, 0, 3)), 2)
    with pytest.raises(ValueError, match=r"^conv_transpose2d_forward: output size 0x2 is < 1 for input 1x3 "
                                         r"\(KH=2, KW=2, stride=1, padding=1\)$"):
        conv.conv_transpose2d_forward(np.zeros((1, 1, 1, 3)), np.zeros((1, 1, 2, 2)), np.zeros(1), 1, 1)


def test_pool_and_upsample_default_to_a_factor_of_two(rng):
    x = rng.standard_normal((2, 3, 6, 4))
    y, _ = conv.maxpool2d_forward(x)
    np.testing.assert_array_equal(y, naive_maxpool(x, 2))
    u, _ = conv.upsample_nearest2d_forward(x)
    np.testing.assert_array_equal(u, naive_upsample(x, 2))


F32_OPS = {
    "conv2d": lambda r: (conv.conv2d_forward, conv.conv2d_backward, (r((4, 3, 3, 3)), r(4), 2, 1)),
    "conv_transpose2d": lambda r: (conv.conv_transpose2d_forward, conv.conv_transpose2d_backward,
                                   (r((3, 4, 3, 3)), r(4), 2, 1)),
    "maxpool2d": lambda r: (conv.maxpool2d_forward, conv.maxpool2d_backward, (2,)),
    "upsample_nearest2d": lambda r: (conv.upsample_nearest2d_forward, conv.upsample_nearest2d_backward, (2,)),
}


@pytest.mark.parametrize("op", list(F32_OPS))
def test_float32_stays_float32(rng, op):
    f = np.float32

    def r(shape):
        return rng.standard_normal(shape).astype(f)

    x = r((2, 3, 8, 8))
    fwd, bwd, rest = F32_OPS[op](r)
    y, cache = fwd(x, *rest)
    grads = bwd(r(y.shape), cache)
    grads = grads if isinstance(grads, tuple) else (grads,)
    assert y.dtype == f and all(g.dtype == f for g in grads)
    assert grads[0].shape == x.shape


def test_im2col_col2im_keep_float32(rng):
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    col = conv.im2col(x, 3, 3, 1, 1)
    assert col.dtype == np.float32 and conv.col2im(col, x.shape, 3, 3, 1, 1).dtype == np.float32


# ----------------------------------------------------------------------------
# CuPy computes the same numbers (marked gpu; skipped without a GPU)
# ----------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 1e-5)])
def test_cupy_matches_numpy(rng, dtype, tol):
    cp = get_xp("cupy")
    x = rng.standard_normal((4, 3, 9, 8)).astype(dtype)
    cases = [(conv.conv2d_forward, conv.conv2d_backward, (x, rng.standard_normal((5, 3, 4, 3)).astype(dtype),
                                                          rng.standard_normal(5).astype(dtype), 2, 1)),
             (conv.conv_transpose2d_forward, conv.conv_transpose2d_backward,
              (x, rng.standard_normal((3, 5, 4, 4)).astype(dtype), rng.standard_normal(5).astype(dtype), 2, 1)),
             (conv.maxpool2d_forward, conv.maxpool2d_backward, (x, 2)),
             (conv.upsample_nearest2d_forward, conv.upsample_nearest2d_backward, (x, 2))]
    for fwd, bwd, args in cases:
        y, cache = fwd(*args)
        dy = rng.standard_normal(y.shape).astype(dtype)
        g = bwd(dy, cache)
        dargs = [cp.asarray(a) if isinstance(a, np.ndarray) else a for a in args]
        yd, cached = fwd(*dargs)
        gd = bwd(cp.asarray(dy), cached)
        assert type(yd).__module__.startswith("cupy") and yd.dtype == dtype
        assert rel_error(yd, y) < tol
        for a, d in zip(g if isinstance(g, tuple) else (g,), gd if isinstance(gd, tuple) else (gd,)):
            assert d.dtype == dtype and rel_error(to_numpy(d), a) < tol


# ----------------------------------------------------------------------------
# the fused copies (numba): the same bits as the NumPy code, on any thread count
# ----------------------------------------------------------------------------
# minivae.fast.conv_copies installs them into conv (import minivae does, when the fast package is there)
from minivae.fast import cpu_kernels, threads  # noqa: E402

needs_numba = pytest.mark.skipif(not cpu_kernels.AVAILABLE, reason="numba is not installed (the fused CPU kernels)")
FUSED_CASES = [(128, 32, 14, 14, 4, 4, 2, 1), (3, 2, 5, 7, 3, 2, 2, 1), (2, 3, 6, 5, 3, 3, 1, 1),
               (4, 1, 28, 28, 4, 4, 2, 1), (2, 2, 5, 5, 2, 2, 3, 0), (1, 1, 3, 3, 3, 3, 1, 2)]


def numpy_path(fn, *args):
    """Run ``fn`` with the fused kernels switched off (the NumPy code)."""
    saved = conv.use_copy_kernels(None)
    try:
        return fn(*args)
    finally:
        conv.use_copy_kernels(saved)


@needs_numba
def test_importing_minivae_installs_the_fused_copies():
    from minivae.fast.conv_copies import copy_kernel
    assert conv._copy_kernels[0] is copy_kernel
    x = np.zeros((2, 1, 4, 4), np.float32)
    assert copy_kernel("to_batch_last", x, np.empty((1, 4, 4, 2), np.float32)) is cpu_kernels.KERNELS["to_batch_last"]
    assert copy_kernel("to_batch_last", x, np.empty((1, 4, 4, 2), np.float64)) is None     # mixed dtypes: NumPy
    assert copy_kernel("to_batch_last", x.astype(np.int32), np.empty((1, 4, 4, 2), np.int32)) is None


@needs_numba
@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", FUSED_CASES, ids=lambda c: "x".join(map(str, c)))
def test_fused_copies_give_the_numpy_bits(rng, case, dtype, n_threads):
    N, C, H, W, KH, KW, s, p = case
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    with threads.using(n_threads):
        col = conv.im2col(x, KH, KW, s, p)
        ref = numpy_path(conv.im2col, x, KH, KW, s, p)
        assert col.dtype == ref.dtype and np.array_equal(col, ref)
        g = rng.standard_normal(col.shape).astype(dtype)     # overlapping patches: real sums, in a fixed order
        dx = conv.col2im(g, x.shape, KH, KW, s, p)
        dref = numpy_path(conv.col2im, g, x.shape, KH, KW, s, p)
        assert dx.dtype == dref.dtype and np.array_equal(dx, dref)
        a = conv.to_batch_last(x)
        assert np.array_equal(a, x.transpose(1, 2, 3, 0)) and a.flags.c_contiguous
        b = conv.to_batch_first(a[:, ::-1])                  # any strides
        assert np.array_equal(b, np.ascontiguousarray(a[:, ::-1].transpose(3, 0, 1, 2))) and b.flags.c_contiguous


@needs_numba
def test_conv_vae_step_is_the_same_with_and_without_the_fused_copies(rng):
    """The whole conv model's loss and every gradient: the same bits from the fused kernels and the NumPy code."""
    from minivae import VAE, VAEConfig
    model = VAE(VAEConfig(arch="conv", hidden=(16,), z_dim=3), rng=0)
    x = (rng.random((6, 784)) < 0.3).astype(np.float32)
    eps = rng.standard_normal((6, 3)).astype(np.float32)
    with threads.using(2):                                  # the same BLAS threads for both
        loss, grads = model.loss(x, eps)
        loss0, grads0 = numpy_path(model.loss, x, eps)
    assert float(loss) == float(loss0)
    assert np.array_equal(grads.flat, grads0.flat)


def test_stride_and_padding_default_to_one_and_zero(rng):
    """Called without stride and padding, every op is the stride-1, unpadded one."""
    x, Wt, b = rng.standard_normal((2, 3, 6, 5)), rng.standard_normal((4, 3, 3, 2)), rng.standard_normal(4)
    assert conv.conv_output_size(6, 5, 3, 2) == (4, 4)
    np.testing.assert_array_equal(conv.im2col(x, 3, 2), conv.im2col(x, 3, 2, 1, 0))
    col = rng.standard_normal(conv.im2col(x, 3, 2).shape)
    np.testing.assert_array_equal(conv.col2im(col, x.shape, 3, 2), conv.col2im(col, x.shape, 3, 2, 1, 0))
    y, _ = conv.conv2d_forward(x, Wt, b)
    np.testing.assert_allclose(y, naive_conv2d(x, Wt, b, 1, 0), rtol=1e-12, atol=1e-12)
    Wt2 = rng.standard_normal((3, 2, 2, 3))
    yt, _ = conv.conv_transpose2d_forward(x, Wt2, b[:2])
    np.testing.assert_allclose(yt, naive_conv_transpose2d(x, Wt2, b[:2], 1, 0), rtol=1e-12, atol=1e-12)


def test_im2col_and_conv_errors_name_the_op_and_the_input():
    with pytest.raises(ValueError, match=r"^im2col: x must have shape \(N, C, H, W\), got \(2, 3\)$"):
        conv.im2col(np.zeros((2, 3)), 2, 2)
    with pytest.raises(ValueError, match=r"^im2col: output size 0x2 is < 1 for input 1x3 "
                                         r"\(KH=2, KW=2, stride=1, padding=0\)$"):
        conv.im2col(np.zeros((1, 1, 1, 3)), 2, 2)
    with pytest.raises(ValueError, match=r"^conv2d_forward: output size 0x3 is < 1 for input 2x5 "):
        conv.conv2d_forward(np.zeros((1, 1, 2, 5)), np.zeros((1, 1, 3, 3)), np.zeros(1))
    with pytest.raises(ValueError, match=r"^conv2d_forward: stride must be an integer >= 1, got 0$"):
        conv.conv2d_forward(np.zeros((1, 1, 4, 4)), np.zeros((1, 1, 3, 3)), np.zeros(1), stride=0)
    with pytest.raises(ValueError, match=r"^conv_transpose2d_forward: padding must be an integer >= 0, got -1$"):
        conv.conv_transpose2d_forward(np.zeros((1, 1, 4, 4)), np.zeros((1, 1, 3, 3)), np.zeros(1), padding=-1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", FUSED_CASES, ids=[str(c) for c in FUSED_CASES])
def test_cupy_im2col_col2im_kernels_equal_the_numpy_code(rng, monkeypatch, dtype, case):
    """minivae.fast.conv_cuda's one-kernel im2col (a gather) and col2im (a gather per pixel, the NumPy code's order
    of additions) give the NumPy code's bits; so does CuPy with the kernels off (MINIVAE_CONV_KERNELS=0)."""
    cp = get_xp("cupy")
    N, C, H, W, KH, KW, s, p = case
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    col = numpy_path(conv.im2col, x, KH, KW, s, p)
    dcol = rng.standard_normal(col.shape).astype(dtype)
    dx = numpy_path(conv.col2im, dcol, x.shape, KH, KW, s, p)
    col_d = conv.im2col(cp.asarray(x), KH, KW, s, p)
    dx_d = conv.col2im(cp.asarray(dcol), x.shape, KH, KW, s, p)
    assert col_d.dtype == dtype and col_d.flags.c_contiguous and np.array_equal(to_numpy(col_d), col)
    assert dx_d.shape == x.shape and np.array_equal(to_numpy(dx_d), dx)
    monkeypatch.setenv("MINIVAE_CONV_KERNELS", "0")
    assert np.array_equal(to_numpy(conv.im2col(cp.asarray(x), KH, KW, s, p)), col)
    assert np.array_equal(to_numpy(conv.col2im(cp.asarray(dcol), x.shape, KH, KW, s, p)), dx)


def test_conv_kernels_are_only_for_cupy_arrays(monkeypatch):
    from minivae.fast import conv_cuda
    assert not conv_cuda.enabled(np.zeros(3, np.float32))
    assert set(conv_cuda.SPECS) == {"im2col_float", "im2col_double", "col2im_float", "col2im_double"}
    for key, spec in conv_cuda.SPECS.items():
        assert "REAL" not in spec.code and f"minivae_{key}(" in spec.code
