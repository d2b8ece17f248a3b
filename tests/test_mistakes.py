"""Cheap numerical demonstrations for lessons/MISTAKES.md: each test shows, with minivae's own code, the
difference between a statement that VAE tutorials get wrong and the correct one.

Every test asserts the property that tells the two apart, so it fails if minivae made the same mistake.
"""
import numpy as np
import pytest

from minivae import VAE, VAEConfig
from minivae.data import load_mnist
from minivae.gaussian import kl_forward, log_diag_normal, reparameterize_forward
from minivae.likelihoods import gaussian_nll_forward


def test_sigma_squared_times_eps_gives_variance_sigma_to_the_fourth():
    # Wrong: z = mu + sigma^2 * eps.  Right: z = mu + sigma * eps, whose variance is sigma^2.
    rng = np.random.default_rng(0)
    n = 400_000
    mu = np.zeros((1, 2))
    sigma = np.array([[0.5, 2.0]])
    logvar = np.log(sigma ** 2)
    eps = rng.standard_normal((n, 1, 2))
    z_right = reparameterize_forward(mu, logvar, eps)[0].reshape(n, 2)
    z_wrong = (mu + sigma ** 2 * eps).reshape(n, 2)
    var_right, var_wrong = z_right.var(axis=0), z_wrong.var(axis=0)
    # sample variance of n normals has relative standard error sqrt(2/n) ~ 0.2%; allow 1.5%
    np.testing.assert_allclose(var_right, sigma[0] ** 2, rtol=0.015)
    np.testing.assert_allclose(var_wrong, sigma[0] ** 4, rtol=0.015)
    assert abs(var_wrong[0] - 0.25) > 0.15 and abs(var_wrong[1] - 4.0) > 10.0


def test_elementwise_product_is_not_a_dot_product():
    # Wrong: "⊙ is the dot product".  A dot product of sigma and eps is one number, so every latent
    # dimension would be shifted by the same amount: the covariance of z would have rank 1, not diag(sigma^2).
    rng = np.random.default_rng(1)
    sigma = np.array([0.5, 1.0, 2.0])
    eps = rng.standard_normal((50_000, 3))
    z_dot = (eps @ sigma)[:, None] * np.ones(3)          # mu = 0, sigma . eps broadcast to every dimension
    z_had = reparameterize_forward(np.zeros((1, 3)), np.log(sigma ** 2)[None], eps)[0]
    assert np.linalg.matrix_rank(np.cov(z_dot.T), tol=1e-8) == 1
    np.testing.assert_allclose(np.cov(z_had.T), np.diag(sigma ** 2), atol=0.06)


def test_the_posterior_is_a_density_over_z_not_over_x():
    # Wrong: q(z|x) = N(x | mu_z, sigma_z^2 I).  Right: N(z | mu(x), diag sigma^2(x)), a density in the
    # L-dimensional z that integrates to one over z (here L = 1, by a Riemann sum).
    mu, logvar = np.array([[0.3]]), np.array([[np.log(0.49)]])
    zs = np.linspace(-8, 8, 20001)[:, None, None]           # (G, 1, 1) grid over z
    dens = np.exp(log_diag_normal(zs, mu, logvar))[:, 0]
    assert abs(dens.sum() * (zs[1, 0, 0] - zs[0, 0, 0]) - 1.0) < 1e-9
    model = VAE(VAEConfig(x_dim=784, hidden=(8,), z_dim=2, dtype="float64"), rng=0)
    with pytest.raises(ValueError, match=r"z must have shape \(N, 2\)"):
        model.decode(np.zeros((1, 784)))                      # an x is not a z


def test_mse_minus_kl_is_unbounded_below():
    # Wrong: loss = MSE - KL.  Right: loss = recon + KL.  With "- KL" the loss falls without bound as the
    # posterior moves away from the prior: the optimiser is rewarded for the worst possible posterior.
    mu = np.array([[0.0], [10.0], [1000.0]])
    logvar = np.zeros_like(mu)
    kl = kl_forward(mu, logvar)[0]
    assert kl[0] == 0 and np.all(np.diff(kl) > 0)
    assert -kl[2] < -kl[1] < -kl[0] == 0                      # "- KL" rewards moving mu far away
    assert -kl[2] < -4e5


def test_mse_is_a_gaussian_nll_only_for_a_fixed_variance():
    # Right: -log N(x; m, v I) = |x - m|^2 / (2 v) + D/2 log(2 pi v).  For a fixed v this is the summed squared
    # error up to a scale and a constant; the scale v acts as a KL weight.  With a learned v it is not MSE.
    rng = np.random.default_rng(2)
    x, m = rng.random((4, 784)), rng.random((4, 784))
    sse = ((x - m) ** 2).sum(axis=1)
    for v in (1.0, 0.5, 0.01):
        nll = gaussian_nll_forward(m, x, v)[0]
        np.testing.assert_allclose(nll, sse / (2 * v) + 392 * np.log(2 * np.pi * v), rtol=1e-12)
    # summed MSE + KL is the negative ELBO of a Gaussian decoder with v = 1/2 (up to a constant)
    np.testing.assert_allclose(gaussian_nll_forward(m, x, 0.5)[0] - 392 * np.log(np.pi), sse, rtol=1e-12)


def test_the_decoder_takes_z_so_a_label_cannot_be_decoded():
    # Wrong (generate_and_classify): decode a 0/1 label with a decoder that takes a 2-D z.  Right: a label can
    # only steer generation through a conditional model p(x|z, y).
    model = VAE(VAEConfig(x_dim=784, hidden=(16,), z_dim=2), rng=0)
    with pytest.raises(ValueError, match=r"z must have shape \(N, 2\), got \(1, 1\)"):
        model.decode(np.array([[1.0]]))


def test_the_zero_one_subset_of_mnist_has_12665_and_2115_images():
    _, y_train = load_mnist("train")
    _, y_test = load_mnist("test")
    assert int(np.isin(y_train, [0, 1]).sum()) == 12665
    assert int(np.isin(y_test, [0, 1]).sum()) == 2115


def test_encoder_and_decoder_learn_in_the_same_step_and_the_prior_has_no_parameters():
    # Wrong: separate encoder and decoder training phases; a prior that is "updated".  Right: one gradient of
    # one objective reaches both networks at once, and p(z) = N(0, I) has no parameters at all.
    model = VAE(VAEConfig(x_dim=12, hidden=(6,), z_dim=2, dtype="float64"), rng=0)
    x = (np.random.default_rng(3).random((5, 12)) > 0.5).astype(float)
    _, grads = model.loss(x, eps=np.random.default_rng(4).standard_normal((5, 2)))
    assert all(k.startswith(("enc.", "dec.")) for k in grads)
    assert any(np.abs(g).max() > 0 for k, g in grads.items() if k.startswith("enc."))
    assert any(np.abs(g).max() > 0 for k, g in grads.items() if k.startswith("dec."))


def test_keras_compile_mse_pulls_the_returned_loss_toward_the_pixels():
    # Wrong: a model whose call() returns the VAE loss l, compiled with loss='mse' and fit(x, x).  Keras then
    # minimises mean((x - l)^2), whose gradient 2 (l - mean(x)) drives l to the mean pixel: the returned loss is
    # pulled to about 0.13 and held there, from either side, not made small.
    x = load_mnist("test")[0][:256].astype(np.float64)
    target = x.mean()                                         # about 0.13
    assert 0.05 < target < 0.25
    for value in (0.0, 50.0):
        for _ in range(200):
            value -= 0.1 * (-2.0 * (x - value).mean())        # gradient descent on mean((x - l)^2)
        assert abs(value - target) < 1e-6                     # from 0 it moved *up*: the VAE loss is not minimised


def test_one_scalar_variance_per_example_cannot_fit_a_diagonal_posterior():
    # Wrong: z_log_var of shape (batch, 1) (one variance shared by every latent dimension).  The best such
    # q still has KL(q || p) > 0 from a posterior with unequal variances; a diagonal q reaches 0.
    v = np.array([0.01, 1.0])                                 # target posterior variances (mean 0)

    def kl_gauss(s2, v):                                      # KL(N(0, diag s2) || N(0, diag v))
        return 0.5 * np.sum(s2 / v - 1 - np.log(s2 / v))
    grid = np.exp(np.linspace(-8, 2, 4001))
    best_iso = min(kl_gauss(np.full(2, s), v) for s in grid)
    assert kl_gauss(v, v) == 0 and best_iso > 0.5


def test_a_scaled_decoder_mean_is_absorbed_by_the_output_layer():
    # sqrt(1 - alpha) * mu(z) with a fixed alpha is still a fixed-variance Gaussian decoder: scaling the output
    # layer's W and b by sqrt(1 - alpha) gives exactly the same likelihood, so the factor adds nothing.
    rng = np.random.default_rng(5)
    h, W, b, x = rng.random((3, 5)), rng.standard_normal((5, 7)), rng.standard_normal(7), rng.random((3, 7))
    a = 0.3
    c = np.sqrt(1 - a)
    np.testing.assert_allclose(gaussian_nll_forward(c * (h @ W + b), x, a)[0],
                               gaussian_nll_forward(h @ (c * W) + c * b, x, a)[0], rtol=1e-12)


def test_a_scaled_sigmoid_mean_is_capped_not_absorbed():
    # With a sigmoid output the factor sqrt(1 - alpha) is not absorbed by the output layer: the mean
    # sqrt(1 - alpha) * sigmoid(t) never exceeds sqrt(1 - alpha), so a white pixel keeps a squared error of at
    # least (1 - sqrt(1 - alpha))^2 whatever the weights, while sigmoid(t) alone fits it as closely as asked.
    a = 0.3
    c = np.sqrt(1 - a)
    t = np.linspace(-40, 40, 8001)                            # every pre-activation the output layer could give
    sig = 1 / (1 + np.exp(-t))
    best_scaled = np.min((1.0 - c * sig) ** 2)
    best_plain = np.min((1.0 - sig) ** 2)
    assert best_scaled >= (1 - c) ** 2 - 1e-12 and (1 - c) ** 2 > 0.02
    assert best_plain < 1e-12
