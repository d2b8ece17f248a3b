"""The whole VAE: gradient checks for every parameter, shapes, dtypes, overfitting, API contracts."""
import numpy as np
import pytest

import minivae
from minivae import VAE, VAEConfig, check_model
from minivae.backend import BackendError, to_numpy
from minivae.gradcheck import GradientCheckError
from conftest import backends


def small(likelihood="bernoulli", activation="tanh", hidden=(5, 4), backend="numpy", dtype="float64", seed=1):
    cfg = VAEConfig(x_dim=6, hidden=hidden, z_dim=3, activation=activation, likelihood=likelihood, dtype=dtype)
    return VAE(cfg, rng=seed, backend=backend)


def data(rng, likelihood, n=4, d=6):
    if likelihood == "bernoulli":
        return rng.uniform(0.05, 0.95, (n, d))
    return rng.standard_normal((n, d))


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian", "gaussian_learned_var"])
@pytest.mark.parametrize("activation", ["tanh", "relu", "leaky_relu", "sigmoid", "softplus"])
def test_whole_model_gradcheck(backend, likelihood, activation, rng):
    model = small(likelihood, activation, backend=backend)
    x = data(rng, likelihood)
    report = check_model(model, x, n_samples=3, beta=0.7, rng=rng)
    assert set(report) == set(model.params)
    assert max(report.values()) < 1e-7, report


def test_gradcheck_three_hidden_layers_keras_style(rng):
    model = small(hidden=(7, 5, 4), activation="relu")
    report = check_model(model, data(rng, "bernoulli"), n_samples=2, beta=2.5, rng=rng)
    assert max(report.values()) < 1e-7


def test_gradcheck_catches_a_broken_model_backward(rng, monkeypatch):
    """A planted bug in the model's backward (a wrong sign in the KL gradient) must fail the check."""
    import minivae.model as mm
    real = mm.kl_backward
    monkeypatch.setattr(mm, "kl_backward", lambda d, c: tuple(-g for g in real(d, c)))
    with pytest.raises(GradientCheckError, match="enc\\."):
        check_model(small(), data(rng, "bernoulli"), rng=rng)


def test_param_names_order_and_shapes():
    m = VAE(VAEConfig(x_dim=784, hidden=(200, 100), z_dim=8, likelihood="gaussian_learned_var"), rng=0)
    assert list(m.params) == [
        "enc.0.W", "enc.0.b", "enc.1.W", "enc.1.b", "enc.mu.W", "enc.mu.b", "enc.logvar.W", "enc.logvar.b",
        "dec.0.W", "dec.0.b", "dec.1.W", "dec.1.b", "dec.out.W", "dec.out.b", "dec.out_logvar.W", "dec.out_logvar.b"]
    assert m.params["enc.0.W"].shape == (784, 200) and m.params["dec.0.W"].shape == (8, 100)
    assert m.params["dec.1.W"].shape == (100, 200) and m.params["dec.out.W"].shape == (200, 784)
    assert m.size == sum(p.size for p in m.params.values()) == m.flat.size
    # params are views of the flat buffer
    m.params["enc.0.b"][:] = 7.0
    assert np.all(m.flat[784 * 200: 784 * 200 + 200] == 7.0)
    m.params["enc.0.b"] = np.zeros(200)
    assert np.all(m.flat[784 * 200: 784 * 200 + 200] == 0.0)
    with pytest.raises(ValueError, match="shape"):
        m.params["enc.0.b"] = np.zeros(3)


def test_init_matches_pytorch_linear_default_scheme():
    m = VAE(VAEConfig(), rng=0)
    W = m.params["enc.0.W"]
    bound = 1 / np.sqrt(784)
    assert np.abs(W).max() <= bound and np.abs(W).max() > 0.99 * bound
    assert abs(W.std() - bound / np.sqrt(3)) < 0.01 * bound


def test_loss_parts_and_grads_keys(rng):
    m = small()
    x = data(rng, "bernoulli")
    loss, grads = m.loss(x, beta=0.5)
    assert list(grads) == list(m.params)
    assert all(grads[k].shape == m.params[k].shape for k in grads)
    assert np.isclose(float(loss), float(m.parts["recon"]) + 0.5 * float(m.parts["kl"]))
    loss2, none = m.loss(x, eps=rng.standard_normal((4, 3)), backward=False)
    assert none is None and np.isfinite(loss2)


def test_eps_controls_the_noise_and_n_samples_averages(rng):
    m = small()
    x = data(rng, "bernoulli")
    eps = rng.standard_normal((3, 4, 3))
    l_all, _ = m.loss(x, eps=eps, n_samples=3, backward=False)
    recons = []
    for s in range(3):
        m.loss(x, eps=eps[s], backward=False)
        recons.append(float(m.parts["recon"]))
    m.loss(x, eps=eps, n_samples=3, backward=False)
    assert np.isclose(float(m.parts["recon"]), np.mean(recons), rtol=1e-12)
    assert np.isclose(float(l_all), np.mean(recons) + float(m.parts["kl"]), rtol=1e-12)
    with pytest.raises(ValueError, match="eps must have shape"):
        m.loss(x, eps=rng.standard_normal((2, 4, 3)), n_samples=3)
    with pytest.raises(ValueError, match="eps must have shape"):
        m.loss(x, eps=rng.standard_normal((4, 2)))


def test_bad_inputs_give_clear_errors(rng):
    m = small()
    with pytest.raises(ValueError, match=r"x must have shape \(N, 6\)"):
        m.loss(np.zeros((4, 5)))
    with pytest.raises(ValueError, match="NaN or inf"):
        m.loss(np.full((2, 6), np.nan))
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        m.loss(np.full((2, 6), 1.5))
    with pytest.raises(ValueError, match="n_samples"):
        m.loss(np.zeros((2, 6)), n_samples=0)
    with pytest.raises(ValueError, match="unknown likelihood"):
        VAEConfig(likelihood="poisson")
    with pytest.raises(ValueError, match="unknown activation"):
        VAEConfig(activation="swish")
    with pytest.raises(ValueError, match="dtype"):
        VAEConfig(dtype="float16")
    # Gaussian likelihoods accept any finite real data
    g = small("gaussian")
    assert np.isfinite(g.loss(np.full((2, 6), 3.0))[0])


def test_float32_training_step_stays_float32(rng):
    m = VAE(VAEConfig(x_dim=20, hidden=(8, 8), z_dim=3), rng=0)
    assert m.flat.dtype == np.float32
    opt = minivae.Adam(lr=1e-2, clip_norm=0.1, weight_decay=0.5)
    x = rng.uniform(0, 1, (5, 20))        # float64 input is cast to the model's dtype
    p = m.flat.astype(np.float64)         # Adam with clipping and decay, done here in float64 on the flat vector
    mom, sq = np.zeros_like(p), np.zeros_like(p)
    for t in range(1, 4):
        loss, grads = m.loss(x, n_samples=2, beta=0.5)
        assert loss.dtype == np.float32 and grads.flat.dtype == np.float32
        assert all(g.dtype == np.float32 for g in grads.values())
        assert all(v.dtype == np.float32 for v in m.parts.values())
        g = grads.flat.astype(np.float64)
        assert np.linalg.norm(g) > 0.2                                   # the clip is active
        g = g * 0.1 / (np.linalg.norm(g) + 1e-6) + 0.5 * p
        mom, sq = 0.9 * mom + 0.1 * g, 0.999 * sq + 0.001 * g * g
        p = p - 1e-2 * (mom / (1 - 0.9 ** t)) / (np.sqrt(sq / (1 - 0.999 ** t)) + 1e-8)
        opt.step(m.params, grads)
        assert m.flat.dtype == np.float32 and all(p.dtype == np.float32 for p in m.params.values())
        assert all(a.dtype == np.float32 for st in opt.state for a in st.values())
        assert np.abs(m.flat - p).max() < 1e-5                           # float32 rounding of a 1e-2 step
        p = m.flat.astype(np.float64)     # continue from the float32 parameters the model really has
    for out in (m.encode(x)[0], m.encode(x)[1], m.decode(np.zeros((2, 3))), m.reconstruct(x), m.sample(4, rng)):
        assert out.dtype == np.float32


@pytest.mark.parametrize("objective", [{"iwae_k": 3}, {"free_bits": 0.1}])
def test_float32_objectives_stay_float32(rng, objective):
    # A Python-float beta times a float32 scalar promotes to float64 under NumPy < 2 (value-based casting)
    # unless the library casts it; this holds under both promotion rules.
    m = VAE(VAEConfig(x_dim=20, hidden=(8,), z_dim=3), rng=0)
    loss, grads = m.loss(rng.uniform(0, 1, (5, 20)), beta=0.5, **objective)
    assert loss.dtype == np.float32 and grads.flat.dtype == np.float32
    assert all(v.dtype == np.float32 for v in m.parts.values() if hasattr(v, "dtype"))


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian", "gaussian_learned_var"])
def test_tiny_batch_overfits(likelihood):
    rng = np.random.default_rng(0)
    x = (rng.uniform(size=(8, 30)) > 0.5).astype(np.float32)
    m = VAE(VAEConfig(x_dim=30, hidden=(64,), z_dim=4, likelihood=likelihood, obs_var=0.1), rng=0)
    opt = minivae.Adam(lr=3e-3)
    first = float(m.loss(x, backward=False)[0])
    for _ in range(1500):
        _, g = m.loss(x)
        opt.step(m.params, g)
    rec = np.asarray(m.reconstruct(x))
    if likelihood == "bernoulli":
        assert float(m.parts["recon"]) < 0.15 * first
    assert np.mean((rec > 0.5) == (x > 0.5)) == 1.0, "every pixel of the 8 training images is reconstructed"


def test_same_seed_same_numbers():
    rng = np.random.default_rng(5)
    x = rng.uniform(size=(16, 12))
    losses = []
    for _ in range(2):
        m = VAE(VAEConfig(x_dim=12, hidden=(10,), z_dim=2), rng=42)
        opt = minivae.Adam()
        for _ in range(5):
            loss, g = m.loss(x)
            opt.step(m.params, g)
        losses.append((float(loss), m.flat.copy()))
    assert losses[0][0] == losses[1][0] and np.array_equal(losses[0][1], losses[1][1])


def test_decode_sample_reconstruct_shapes_and_ranges(rng):
    m = VAE(VAEConfig(x_dim=12, hidden=(10,), z_dim=2), rng=0)
    x = rng.uniform(size=(5, 12))
    mu, logvar = m.encode(x)
    assert mu.shape == logvar.shape == (5, 2)
    p = m.decode(mu)
    assert p.shape == (5, 12) and p.min() >= 0 and p.max() <= 1
    assert np.allclose(m.reconstruct(x), p)
    s1, s2 = m.sample(7, rng=3), m.sample(7, rng=3)
    assert s1.shape == (7, 12) and np.array_equal(s1, s2)
    with pytest.raises(ValueError, match="z must have shape"):
        m.decode(np.zeros((3, 5)))


def test_log_weights_match_their_definition(rng):
    from minivae.gaussian import log_diag_normal, log_standard_normal
    m = small(dtype="float64")
    x = data(rng, "bernoulli")
    eps = rng.standard_normal((5, 4, 3))
    lw = m.log_weights(x, eps)
    mu, logvar = m.encode(x)
    z = mu + np.exp(0.5 * logvar) * eps
    p = np.asarray(m.decode(z.reshape(-1, 3))).reshape(5, 4, 6)
    log_px = (x * np.log(p) + (1 - x) * np.log(1 - p)).sum(-1)
    expected = log_px + log_standard_normal(z) - log_diag_normal(z, mu, logvar)
    assert np.allclose(lw, expected, rtol=1e-10)
    # E_q[log w] = ELBO: with the eps, -mean(log w) estimates the loss (MC KL vs analytic KL)
    eps_many = rng.standard_normal((4000, 4, 3))
    elbo_mc = np.mean(m.log_weights(x, eps_many))
    loss, _ = m.loss(x, eps=eps_many, n_samples=4000, backward=False)
    assert abs(-elbo_mc - float(loss)) < 0.05


def test_cupy_request_without_gpu_raises_clearly():
    if minivae.cupy_available():
        pytest.skip("a GPU is available here")
    with pytest.raises(BackendError, match="cupy"):
        VAE(VAEConfig(), rng=0, backend="cupy")


@pytest.mark.gpu
def test_cupy_matches_numpy_for_same_seed():
    import cupy
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(6, 12))
    eps = rng.standard_normal((2, 6, 3))
    cfg = VAEConfig(x_dim=12, hidden=(10, 8), z_dim=3, dtype="float64")
    mn, mc = VAE(cfg, rng=7), VAE(cfg, rng=7, backend="cupy")
    ln, gn = mn.loss(x, eps=eps, n_samples=2)
    lc, gc = mc.loss(cupy.asarray(x), eps=eps, n_samples=2)
    assert isinstance(gc["enc.0.W"], cupy.ndarray)
    assert np.isclose(float(ln), float(lc), rtol=1e-10)
    for k in gn:
        assert np.allclose(gn[k], to_numpy(gc[k]), rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("objective", ["elbo", "iwae", "free_bits"])
def test_float32_backward_of_every_objective_stays_float32(objective, monkeypatch):
    """No silent float64 in a float32 model's backward: the objective's gradients (dloss/drec, and the KL's,
    IWAE's or free bits' dloss/d...) and what the likelihood and KL backward make of them are float32, for each
    objective; and the loss the model reports in ``parts`` is the loss it returns."""
    import minivae.likelihoods as lk
    import minivae.model as mm
    seen = []
    for module, name in ((mm, "iwae_backward"), (mm, "free_bits_backward"), (mm, "kl_backward"),
                         (mm, "kl_dim_backward"), (lk, "bernoulli_nll_backward")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real: seen.append(_real(*a)) or seen[-1])
    m = VAE(VAEConfig(x_dim=6, hidden=(5,), z_dim=2), rng=0)
    x = (np.random.default_rng(0).random((4, 6)) < 0.5).astype(np.float32)
    kw = {"elbo": {}, "iwae": {"iwae_k": 3}, "free_bits": {"free_bits": 0.5}}[objective]
    loss, grads = m.loss(x, **kw)
    arrays = [a for out in seen for a in (out if isinstance(out, tuple) else (out,))]
    assert len(seen) >= 2 and all(a.dtype == np.float32 for a in arrays), [a.dtype for a in arrays]
    assert grads.flat.dtype == np.float32
    assert m.parts["loss"] == loss


def test_elbo_with_many_samples_is_not_chunked_as_iwae(monkeypatch):
    """The chunked two-pass path is IWAE's: an ELBO with more samples than one IWAE chunk holds is still the
    plain mean over samples (the chunk made tiny here), while the IWAE bound chunked is the IWAE bound whole."""
    m = VAE(VAEConfig(x_dim=6, hidden=(5,), z_dim=2, dtype="float64"), rng=0)
    x = (np.random.default_rng(0).random((4, 6)) < 0.5).astype(np.float64)
    eps = np.random.default_rng(1).standard_normal((5, 4, 2))
    elbo, g_elbo = m.loss(x, eps=eps, n_samples=5)
    iw, g_iw = m.loss(x, eps=eps, iwae_k=5)
    monkeypatch.setattr(VAE, "IWAE_CHUNK_ELEMENTS", 6)                 # one sample of 4 rows per chunk
    elbo2, g_elbo2 = m.loss(x, eps=eps, n_samples=5)
    iw2, g_iw2 = m.loss(x, eps=eps, iwae_k=5)
    assert np.isclose(float(elbo2), float(elbo), rtol=1e-12) and np.allclose(g_elbo2.flat, g_elbo.flat, rtol=1e-10)
    assert np.isclose(float(iw2), float(iw), rtol=1e-12) and np.allclose(g_iw2.flat, g_iw.flat, rtol=1e-9, atol=1e-12)
    assert not np.isclose(float(elbo), float(iw))


def test_a_conditional_loss_checks_the_label_count():
    m = VAE(VAEConfig(x_dim=6, hidden=(5,), z_dim=2, n_classes=3), rng=0)
    x = (np.random.default_rng(0).random((4, 6)) < 0.5).astype(np.float32)
    with pytest.raises(ValueError, match="has 3 labels for 4 examples"):
        m.loss(x, y=np.array([0, 1, 2]))
