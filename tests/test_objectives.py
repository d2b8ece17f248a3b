"""Objectives beyond the ELBO: the IWAE bound and free bits (op pairs and in VAE.loss)."""
import numpy as np
import pytest

from minivae import VAE, VAEConfig, check_model, check_op
from minivae.evaluate import log_mean_exp
from minivae.gaussian import kl_per_dim, log_diag_normal, log_standard_normal
from minivae.objectives import (free_bits_backward, free_bits_forward, iwae_backward, iwae_forward,
                                kl_dim_backward, kl_dim_forward)

from conftest import backends

LIKELIHOODS = ["bernoulli", "gaussian", "gaussian_learned_var"]


def tiny(likelihood="bernoulli", seed=0, L=3, hidden=(5,)):
    cfg = VAEConfig(x_dim=6, hidden=hidden, z_dim=L, activation="tanh", likelihood=likelihood, dtype="float64")
    return VAE(cfg, rng=seed)


def data(likelihood, n=4, seed=0):
    r = np.random.default_rng(seed)
    if likelihood == "bernoulli":
        return (r.random((n, 6)) < 0.5).astype(np.float64)
    return r.standard_normal((n, 6))


def mc_parts(model, x, eps):
    """Per-sample -log p(x|z) and log q(z|x) - log p(z) computed from public pieces, (K, N) each."""
    mu, logvar = model.encode(x)
    z = mu + np.exp(0.5 * logvar) * eps
    rec = -model.log_px_given_z(x, z)
    log_ratio = log_diag_normal(z, mu, logvar) - log_standard_normal(z)
    return rec, log_ratio


# ---------------------------------------------------------------- op pairs
def test_iwae_op_gradcheck():
    r = np.random.default_rng(0)
    log_w = r.standard_normal((7, 5)) * 3
    dl = lambda dout, cache: iwae_backward(dout, cache)   # noqa: E731
    err = check_op(iwae_forward, dl, [log_w], names=["log_w"], rng=r)
    assert err["log_w"] < 1e-7


def test_iwae_op_value_and_stability():
    r = np.random.default_rng(1)
    log_w = r.standard_normal((6, 4))
    loss, (wt, _) = iwae_forward(log_w)
    assert np.isclose(loss, -log_mean_exp(log_w, axis=0).mean())
    assert np.allclose(wt.sum(axis=0), 1.0)
    loss_big, _ = iwae_forward(log_w - 5000.0)               # huge negative log-weights do not underflow
    assert np.isclose(loss_big, loss + 5000.0)
    loss1, _ = iwae_forward(log_w[:1])                        # K = 1: just -mean(log w)
    assert np.isclose(loss1, -log_w[0].mean())


def test_iwae_backward_is_minus_softmax_over_n():
    log_w = np.array([[0.0, 1.0], [np.log(3.0), 1.0]])
    _, cache = iwae_forward(log_w)
    g = iwae_backward(1.0, cache)
    assert np.allclose(g, [[-0.25 / 2, -0.5 / 2], [-0.75 / 2, -0.5 / 2]])


def test_free_bits_op_gradcheck_away_from_kink():
    r = np.random.default_rng(2)
    kl = np.abs(r.standard_normal((5, 6)))
    kl[:, :3] *= 0.1                        # dims 0..2 well below the floor, 3..5 above
    lam = 0.5 * (kl[:, :3].mean(axis=0).max() + kl[:, 3:].mean(axis=0).min())
    assert (np.abs(kl.mean(axis=0) - lam) > 1e-3).all()
    obj, cache = free_bits_forward(kl, lam)
    assert np.isclose(obj, 3 * lam + kl[:, 3:].mean(axis=0).sum())
    err = check_op(lambda k: free_bits_forward(k, lam), free_bits_backward, [kl], names=["kl"], rng=r)
    assert err["kl"] < 1e-7
    g = free_bits_backward(1.0, cache)
    assert (g[:, :3] == 0).all() and np.allclose(g[:, 3:], 1 / 5)


def test_kl_dim_op_gradcheck():
    r = np.random.default_rng(3)
    mu, logvar = r.standard_normal((4, 3)), r.standard_normal((4, 3))
    out, _ = kl_dim_forward(mu, logvar)
    assert np.allclose(out, kl_per_dim(mu, logvar))
    err = check_op(kl_dim_forward, kl_dim_backward, [mu, logvar], names=["mu", "logvar"], rng=r)
    assert max(err.values()) < 1e-7


# ---------------------------------------------------------------- IWAE in the model
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("beta", [1.0, 0.3])
def test_iwae_model_gradcheck(likelihood, beta):
    m = tiny(likelihood)
    x = data(likelihood)
    eps = np.random.default_rng(4).standard_normal((5, 4, 3))
    report = check_model(m, x, eps=eps, beta=beta, loss_kwargs={"iwae_k": 5}, tol=1e-6)
    assert max(report.values()) < 1e-6


def test_iwae_value_matches_log_weights():
    m = tiny()
    x = data("bernoulli")
    eps = np.random.default_rng(5).standard_normal((8, 4, 3))
    loss, _ = m.loss(x, eps=eps, iwae_k=8, backward=False)
    assert np.isclose(loss, -log_mean_exp(m.log_weights(x, eps), axis=0).mean())
    rec, _ = mc_parts(m, x, eps)
    assert np.isclose(m.parts["recon"], rec.mean())
    assert np.isclose(m.parts["kl"], kl_per_dim(*m.encode(x)).sum(axis=1).mean())   # analytic, reported only
    assert m.parts["iwae_k"] == 8


@pytest.mark.parametrize("beta", [1.0, 0.25])
def test_iwae_k1_is_elbo_with_monte_carlo_kl(beta):
    m = tiny()
    x = data("bernoulli")
    eps = np.random.default_rng(6).standard_normal((1, 4, 3))
    loss, g_iw = m.loss(x, eps=eps, beta=beta, iwae_k=1)
    rec, log_ratio = mc_parts(m, x, eps)
    assert np.isclose(loss, rec.mean() + beta * log_ratio.mean())
    # and it differs from the analytic-KL ELBO only through the KL estimate
    elbo, _ = m.loss(x, eps=eps, beta=beta)
    assert np.isclose(loss - elbo, beta * (log_ratio.mean() - m.parts["kl"]))


def test_iwae_never_above_mc_elbo_with_same_samples():
    """Jensen: log mean_k w_k >= mean_k log w_k for every example, so -L_K <= the K-sample MC-KL ELBO loss."""
    m = tiny()
    x = data("bernoulli", n=10)
    for seed in range(5):
        eps = np.random.default_rng(seed).standard_normal((6, 10, 3))
        loss, _ = m.loss(x, eps=eps, iwae_k=6, backward=False)
        rec, log_ratio = mc_parts(m, x, eps)
        assert loss <= rec.mean() + log_ratio.mean() + 1e-12


def test_iwae_draws_eps_and_validates():
    m = tiny()
    x = data("bernoulli")
    loss, grads = m.loss(x, iwae_k=3)
    assert np.isfinite(loss) and set(grads) == set(m.params)
    with pytest.raises(ValueError, match="iwae_k"):
        m.loss(x, iwae_k=0)
    with pytest.raises(ValueError, match="iwae_k"):
        m.loss(x, iwae_k=2.5)
    with pytest.raises(ValueError, match="eps"):
        m.loss(x, eps=np.zeros((4, 4, 3)), iwae_k=3)
    with pytest.raises(ValueError, match="eps has 2 samples"):
        m.loss(x, eps=np.zeros((2, 4, 3)), iwae_k=1)
    with pytest.raises(ValueError, match="disagree"):
        m.loss(x, n_samples=2, iwae_k=3)
    with pytest.raises(ValueError, match="free_bits cannot"):
        m.loss(x, iwae_k=3, free_bits=0.1)


# ---------------------------------------------------------------- free bits in the model
def floor_between(m, x):
    """A floor strictly between the batch-mean KLs of the dims, away from every kink."""
    kl_bar = np.sort(kl_per_dim(*m.encode(x)).mean(axis=0))
    gaps = np.diff(kl_bar)
    i = int(np.argmax(gaps))
    return 0.5 * (kl_bar[i] + kl_bar[i + 1]), i + 1      # floor, number of dims below it


def spread_model(likelihood="bernoulli"):
    """A model whose latent dims have clearly different KLs (so a floor can split them)."""
    m = tiny(likelihood, L=4)
    W = m.params["enc.mu.W"].copy()
    W *= np.array([0.1, 1.0, 3.0, 6.0])
    m.params["enc.mu.W"] = W
    return m


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_free_bits_model_gradcheck(likelihood, beta):
    m = spread_model(likelihood)
    x = data(likelihood, n=5)
    lam, below = floor_between(m, x)
    assert 0 < below < 4
    eps = np.random.default_rng(7).standard_normal((2, 5, 4))
    report = check_model(m, x, eps=eps, beta=beta, n_samples=2, loss_kwargs={"free_bits": lam}, tol=1e-6)
    assert max(report.values()) < 1e-6
    # value: recon + beta * sum_j max(lam, KLbar_j); parts["kl"] stays the true KL
    kl_bar = kl_per_dim(*m.encode(x)).mean(axis=0)
    loss, _ = m.loss(x, eps=eps, beta=beta, free_bits=lam, backward=False)
    assert np.isclose(m.parts["kl_objective"], np.maximum(kl_bar, lam).sum())
    assert np.isclose(m.parts["kl"], kl_bar.sum())
    assert np.isclose(loss, m.parts["recon"] + beta * m.parts["kl_objective"])


def test_free_bits_below_floor_removes_kl_gradient():
    """With every dim under the floor the KL term is a constant: gradients equal those of beta = 0."""
    m = spread_model()
    x = data("bernoulli", n=5)
    eps = np.random.default_rng(8).standard_normal((1, 5, 4))
    lam = 1e3
    loss, g_fb = m.loss(x, eps=eps, free_bits=lam)
    _, g_recon = m.loss(x, eps=eps, beta=0.0)
    assert np.allclose(g_fb.flat, g_recon.flat)
    assert np.isclose(loss, m.parts["recon"] + 4 * lam)


def test_free_bits_below_every_dim_equals_elbo():
    m = spread_model()
    x = data("bernoulli", n=5)
    eps = np.random.default_rng(9).standard_normal((1, 5, 4))
    lam = 0.5 * kl_per_dim(*m.encode(x)).mean(axis=0).min()
    loss_fb, g_fb = m.loss(x, eps=eps, beta=0.7, free_bits=lam)
    loss, g = m.loss(x, eps=eps, beta=0.7)
    assert np.isclose(loss_fb, loss)
    assert np.allclose(g_fb.flat, g.flat)


def test_free_bits_validates():
    m = tiny()
    x = data("bernoulli")
    for bad in (-0.1, float("nan"), float("inf"), "a"):
        with pytest.raises(ValueError, match="free_bits"):
            m.loss(x, free_bits=bad)


def test_default_path_untouched():
    m = tiny()
    x = data("bernoulli")
    m.loss(x)
    assert set(m.parts) == {"loss", "recon", "kl"}


@pytest.mark.parametrize("backend", backends())
def test_iwae_and_free_bits_on_backend_float32(backend):
    from minivae.backend import to_numpy, use_backend
    cfg = VAEConfig(x_dim=6, hidden=(5,), z_dim=3, activation="tanh")
    with use_backend(backend):
        m = VAE(cfg, rng=0)
    ref = VAE(VAEConfig(x_dim=6, hidden=(5,), z_dim=3, activation="tanh", dtype="float64"), rng=0)
    x = data("bernoulli")
    eps = np.random.default_rng(1).standard_normal((4, 4, 3))
    for kw in ({"iwae_k": 4}, {"free_bits": 0.05, "n_samples": 4}):
        loss, g = m.loss(x, eps=eps, **kw)
        loss64, g64 = ref.loss(x, eps=eps, **kw)
        assert g.flat.dtype == np.float32
        assert np.isclose(float(to_numpy(loss)), float(loss64), rtol=1e-5)
        assert np.allclose(to_numpy(g.flat), g64.flat, rtol=1e-3, atol=1e-5)


def test_iwae_shift_is_per_example():
    # examples whose log-weights sit 5000 nats apart: one shift for the whole batch would underflow one of them
    log_w = np.array([[0.0, -5000.0], [np.log(3.0), -5000.0 + np.log(3.0)]])
    loss, (wtilde, _) = iwae_forward(log_w)
    bound = np.array([np.log(2.0), -5000.0 + np.log(2.0)])                # log mean(1, 3) = log 2
    assert np.isclose(float(loss), -bound.mean(), rtol=1e-14)
    assert np.allclose(wtilde, [[0.25, 0.25], [0.75, 0.75]])


def test_free_bits_kink_and_dtype():
    lam = 0.5
    kl = np.array([[0.25, 1.0, 0.5], [0.75, 2.0, 0.5]])                 # batch means 0.5 (at the floor), 1.5, 0.5
    obj, cache = free_bits_forward(kl, lam)
    assert float(obj) == 0.5 + 1.5 + 0.5
    g = free_bits_backward(2.0, cache)
    assert np.array_equal(g, [[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])         # 0 at the kink (KLbar == lambda)
    g32 = free_bits_backward(np.float32(1.0), free_bits_forward(kl.astype(np.float32), lam)[1])
    assert g32.dtype == np.float32


def test_chunked_iwae_keeps_the_models_dtype_and_value():
    """The IWAE bound computed in chunks of samples (memory bound) is the one-block bound, in the model's dtype."""
    for dtype, tol in (("float32", 1e-5), ("float64", 1e-12)):
        m = VAE(VAEConfig(x_dim=12, hidden=(6,), z_dim=3, dtype=dtype), rng=0)
        rng = np.random.default_rng(1)
        x = (rng.random((5, 12)) < 0.5).astype(dtype)
        eps = rng.standard_normal((40, 5, 3)).astype(dtype)
        whole, g_whole = m.loss(x, eps=eps.copy(), iwae_k=40)
        m.IWAE_CHUNK_ELEMENTS = 7 * 5 * 12             # chunks of 7 samples: 6 of them
        chunked, g_chunked = m.loss(x, eps=eps.copy(), iwae_k=40)
        assert np.asarray(chunked).dtype == np.asarray(whole).dtype == np.dtype(dtype)
        assert g_chunked.flat.dtype == np.dtype(dtype)
        assert abs(float(chunked) - float(whole)) <= tol * abs(float(whole))
        assert np.max(np.abs(g_chunked.flat - g_whole.flat)) <= 10 * tol * np.max(np.abs(g_whole.flat))
