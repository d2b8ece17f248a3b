"""Every op pair against central finite differences in float64, with a random upstream gradient."""
import numpy as np
import pytest

from minivae import gaussian, layers, likelihoods
from minivae.backend import get_xp
from minivae.gradcheck import GradientCheckError, check_op, numerical_gradient, rel_error
from conftest import backends

TOL = 1e-7


def away_from_zero(rng, shape, margin=0.1):
    """Uniform values with |x| >= margin (keeps ReLU's kink out of the finite-difference stencil)."""
    x = rng.uniform(margin, 2.0, shape)
    return x * rng.choice([-1.0, 1.0], shape)


@pytest.fixture(params=backends())
def xp(request):
    return get_xp(request.param)


def test_dense(rng, xp):
    x, W, b = (xp.asarray(rng.standard_normal(s)) for s in [(5, 4), (4, 3), (3,)])
    rep = check_op(layers.dense_forward, lambda d, c: layers.dense_backward(d, c), [x, W, b], ["x", "W", "b"], rng)
    assert max(rep.values()) < TOL


@pytest.mark.parametrize("name", ["relu", "leaky_relu", "tanh", "sigmoid", "softplus", "identity"])
def test_activations(rng, xp, name):
    fwd, bwd = layers.activation(name)
    x = xp.asarray(away_from_zero(rng, (6, 5)))
    rep = check_op(fwd, bwd, [x], ["x"], rng)
    assert rep["x"] < TOL


def test_activations_at_and_around_the_kink(rng):
    # finite differences cannot see x = 0 exactly; the docstrings give the value there
    x = np.array([-2.0, -1e-12, 0.0, 1e-12, 3.0])
    dy = rng.standard_normal(5)
    y, cache = layers.relu_forward(x)
    assert np.array_equal(y, [0.0, 0.0, 0.0, 1e-12, 3.0])
    assert np.array_equal(layers.relu_backward(dy, cache), dy * [0, 0, 0, 1, 1])      # 0 at the kink x = 0
    assert np.allclose(layers.leaky_relu_forward(np.array([-2.0, 3.0]))[0], [-0.02, 3.0])   # alpha = 0.01
    y, cache = layers.leaky_relu_forward(x, alpha=0.2)
    assert np.allclose(y, [-0.4, -2e-13, 0.0, 1e-12, 3.0], rtol=1e-15, atol=0)
    assert np.allclose(layers.leaky_relu_backward(dy, cache), dy * [0.2, 0.2, 0.2, 1, 1], rtol=1e-15, atol=0)


def test_reparameterize(rng, xp):
    mu, logvar = xp.asarray(rng.standard_normal((4, 3))), xp.asarray(rng.standard_normal((4, 3)))
    for eps_shape in [(4, 3), (5, 4, 3)]:
        eps = xp.asarray(rng.standard_normal(eps_shape))
        rep = check_op(lambda m, lv: gaussian.reparameterize_forward(m, lv, eps), gaussian.reparameterize_backward,
                       [mu, logvar], ["mu", "logvar"], rng)
        assert max(rep.values()) < TOL


def test_kl(rng, xp):
    mu, logvar = xp.asarray(rng.standard_normal((4, 3))), xp.asarray(rng.standard_normal((4, 3)))
    rep = check_op(gaussian.kl_forward, gaussian.kl_backward, [mu, logvar], ["mu", "logvar"], rng)
    assert max(rep.values()) < TOL


def test_bernoulli(rng, xp):
    x = xp.asarray(rng.uniform(0, 1, (4, 6)))
    logits = xp.asarray(rng.standard_normal((4, 6)) * 3)
    rep = check_op(lambda l: likelihoods.bernoulli_nll_forward(l, x), likelihoods.bernoulli_nll_backward,
                   [logits], ["logits"], rng)
    assert rep["logits"] < TOL


def test_bernoulli_with_sample_axis(rng, xp):
    x = xp.asarray((rng.uniform(0, 1, (4, 6)) > 0.5).astype(float))
    logits = xp.asarray(rng.standard_normal((3, 4, 6)))
    rep = check_op(lambda l: likelihoods.bernoulli_nll_forward(l, x), likelihoods.bernoulli_nll_backward,
                   [logits], ["logits"], rng)
    assert rep["logits"] < TOL


def test_gaussian_fixed_var(rng, xp):
    x = xp.asarray(rng.standard_normal((4, 6)))
    mean = xp.asarray(rng.standard_normal((4, 6)))
    rep = check_op(lambda m: likelihoods.gaussian_nll_forward(m, x, 0.3), likelihoods.gaussian_nll_backward,
                   [mean], ["mean"], rng)
    assert rep["mean"] < TOL


def test_gaussian_learned_var(rng, xp):
    x = xp.asarray(rng.standard_normal((4, 6)))
    mean, logvar = xp.asarray(rng.standard_normal((4, 6))), xp.asarray(rng.standard_normal((4, 6)))
    rep = check_op(lambda m, lv: likelihoods.gaussian_learned_var_nll_forward(m, lv, x),
                   likelihoods.gaussian_learned_var_nll_backward, [mean, logvar], ["mean", "logvar"], rng)
    assert max(rep.values()) < TOL


# ---------------------------------------------------------------------------- forward values
def test_likelihood_values_match_densities(rng):
    x = (rng.uniform(size=(3, 5)) > 0.5).astype(float)
    logits = rng.standard_normal((3, 5))
    p = 1 / (1 + np.exp(-logits))
    direct = -(x * np.log(p) + (1 - x) * np.log(1 - p)).sum(1)
    assert np.allclose(likelihoods.bernoulli_nll_forward(logits, x)[0], direct, rtol=1e-12)

    xg, m, lv = rng.standard_normal((3, 5)), rng.standard_normal((3, 5)), rng.standard_normal((3, 5))
    var = np.exp(lv)
    direct = -(-0.5 * (xg - m) ** 2 / var - 0.5 * np.log(2 * np.pi * var)).sum(1)
    assert np.allclose(likelihoods.gaussian_learned_var_nll_forward(m, lv, xg)[0], direct, rtol=1e-12)
    direct = -(-0.5 * (xg - m) ** 2 / 0.3 - 0.5 * np.log(2 * np.pi * 0.3)).sum(1)
    assert np.allclose(likelihoods.gaussian_nll_forward(m, xg, 0.3)[0], direct, rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_extreme_logits_stay_finite_and_correct(dtype):
    logits = np.array([[1e4, -1e4, 1e4, -1e4, 0.0]], dtype=dtype)
    x = np.array([[1.0, 0.0, 0.0, 1.0, 1.0]], dtype=dtype)
    with np.errstate(over="raise", divide="raise", invalid="raise"):  # underflow to 0 is fine
        nll, cache = likelihoods.bernoulli_nll_forward(logits, x)
        g = likelihoods.bernoulli_nll_backward(np.ones(1, dtype), cache)
        s = layers.sigmoid(np.array([-1e4, 1e4, -100.0, 100.0], dtype))
        sp = layers.softplus(np.array([-1e4, 1e4], dtype))
    # confident and right costs 0, confident and wrong costs |logit|, logit 0 costs log 2
    assert np.isclose(nll[0], 2e4 + np.log(2), rtol=1e-6)
    assert np.allclose(g, [[0, 0, 1, -1, -0.5]])
    assert np.allclose(s, [0, 1, 0, 1], atol=1e-30) and s.dtype == dtype
    assert sp[0] >= 0 and sp[0] < 1e-30 and sp[1] == 1e4


def test_extreme_logvar_kl_and_gaussian_finite():
    mu = np.zeros((1, 4))
    logvar = np.array([[-30.0, 30.0, -300.0, 80.0]])
    kl, cache = gaussian.kl_forward(mu, logvar)
    dmu, dlv = gaussian.kl_backward(np.ones(1), cache)
    assert np.isfinite(kl).all() and np.isfinite(dlv).all()
    # KL_j = (exp(lv) - 1 - lv) / 2 per dimension
    assert np.isclose(kl[0], 0.5 * np.sum(np.exp(logvar) - 1 - logvar))
    z, _ = gaussian.reparameterize_forward(mu, np.array([[-300.0, 0, 0, 0]]), np.ones((1, 4)))
    assert np.isfinite(z).all() and 0 <= z[0, 0] < 1e-60   # sigma = exp(-150)


# ---------------------------------------------------------------------------- the checker itself
def test_checker_flags_planted_wrong_backward(rng):
    def bad_dense_backward(dy, cache):
        x, W = cache
        return dy @ W.T, (x.T @ dy) * 1.01, dy.sum(0)          # dW off by 1 %

    x, W, b = rng.standard_normal((5, 4)), rng.standard_normal((4, 4)), rng.standard_normal(4)
    with pytest.raises(GradientCheckError, match=r"gradient check failed for W: rel error .*\(analytic .*, numerical .*\)"):
        check_op(layers.dense_forward, bad_dense_backward, [x, W, b], ["x", "W", "b"], rng)


def test_checker_flags_wrong_shape(rng):
    x, W, b = rng.standard_normal((5, 4)), rng.standard_normal((4, 3)), rng.standard_normal(3)
    with pytest.raises(GradientCheckError, match="shape"):
        check_op(layers.dense_forward, lambda d, c: (d @ c[1].T, d.T @ c[0], d.sum(0)), [x, W, b], ["x", "W", "b"])


def test_numerical_gradient_of_known_function(rng):
    x = rng.standard_normal((3, 2))
    g = numerical_gradient(lambda: (x ** 3).sum(), x)
    assert rel_error(g, 3 * x ** 2) < 1e-8
    assert rel_error(np.array([1.0, 2.0]), np.array([1.0, 2.0])) == 0.0
    assert rel_error(np.array([1.0]), np.array([-1.0])) == 1.0


def test_fixed_variance_gaussian_nll_closed_form():
    rng = np.random.default_rng(0)
    mean, x = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 3, 4))     # any leading axes: (S, N, D)
    for var, kw in ((1.0, {}), (0.3, {"var": 0.3})):                             # the default variance is 1
        nll, _ = likelihoods.gaussian_nll_forward(mean, x, **kw)
        expect = (0.5 * (x - mean) ** 2 / var + 0.5 * np.log(2 * np.pi * var)).sum(-1)
        assert nll.shape == (2, 3) and np.allclose(nll, expect, rtol=1e-14)
    logvar = rng.standard_normal((2, 3, 4))
    nll, _ = likelihoods.gaussian_learned_var_nll_forward(mean, logvar, x)
    expect = (0.5 * (x - mean) ** 2 / np.exp(logvar) + 0.5 * logvar + 0.5 * np.log(2 * np.pi)).sum(-1)
    assert nll.shape == (2, 3) and np.allclose(nll, expect, rtol=1e-14)
