"""Backend selection and the optimizers."""
import numpy as np
import pytest

import minivae
from minivae import VAE, VAEConfig
from minivae.backend import BackendError, get_array_module, get_backend, set_backend, to_numpy, use_backend
from minivae.optim import SGD, Adagrad, Adam, clip_grad_norm, global_norm, make_optimizer


def test_default_backend_is_numpy_and_env_is_read_lazily(monkeypatch):
    monkeypatch.delenv("MINIVAE_BACKEND", raising=False)
    assert get_backend() == "numpy"
    monkeypatch.setenv("MINIVAE_BACKEND", "numpy")
    assert get_backend() == "numpy"
    monkeypatch.setenv("MINIVAE_BACKEND", "tpu")
    with pytest.raises(BackendError, match="unknown backend 'tpu'"):
        get_backend()


def test_set_and_use_backend():
    with use_backend("numpy") as xp:
        assert xp is np and get_backend() == "numpy"
    set_backend("numpy")
    try:
        assert get_backend() == "numpy"
    finally:
        set_backend(None)
    with pytest.raises(BackendError, match="unknown backend"):
        set_backend("jax")


def test_cupy_without_gpu_raises_and_never_falls_back(monkeypatch):
    if minivae.cupy_available():
        pytest.skip("a GPU is available here")
    with pytest.raises(BackendError, match="cupy"):
        set_backend("cupy")
    with pytest.raises(BackendError, match="cupy"):
        with use_backend("cupy"):
            pass
    monkeypatch.setenv("MINIVAE_BACKEND", "cupy")
    with pytest.raises(BackendError, match="cupy"):
        VAE(VAEConfig(x_dim=4, hidden=(3,), z_dim=2), rng=0)
    assert get_backend() == "cupy"    # the request stands; it is not silently replaced


def test_array_module_follows_the_data():
    assert get_array_module(np.zeros(2), 3.0) is np
    assert isinstance(to_numpy(np.float32(2.0)), np.ndarray)


def _quadratic_problem():
    """params {a, b}; loss = 1/2 ||a - 3||^2 + 1/2 ||b + 1||^2."""
    params = {"a": np.zeros(3), "b": np.zeros((2, 2))}

    def grads():
        return {"a": params["a"] - 3.0, "b": params["b"] + 1.0}
    return params, grads


@pytest.mark.parametrize("opt", [SGD(lr=0.1, momentum=0.9), Adagrad(lr=0.5), Adam(lr=0.05)])
def test_optimizers_converge_on_a_quadratic(opt):
    params, grads = _quadratic_problem()
    for _ in range(1500):
        opt.step(params, grads())
    assert np.allclose(params["a"], 3.0, atol=1e-3) and np.allclose(params["b"], -1.0, atol=1e-3)


def test_adam_matches_textbook_formula():
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(5)
    gs = [rng.standard_normal(5) for _ in range(4)]
    params = {"w": p0.copy()}
    opt = Adam(lr=0.01, betas=(0.8, 0.95), eps=1e-3)
    m = v = np.zeros(5)
    p = p0.copy()
    for t, g in enumerate(gs, start=1):
        opt.step(params, {"w": g.copy()})
        m = 0.8 * m + 0.2 * g
        v = 0.95 * v + 0.05 * g * g
        p = p - 0.01 * (m / (1 - 0.8 ** t)) / (np.sqrt(v / (1 - 0.95 ** t)) + 1e-3)
    assert np.allclose(params["w"], p, rtol=1e-12, atol=1e-14)


def test_flat_and_per_key_paths_agree():
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(8, 10))
    cfg = VAEConfig(x_dim=10, hidden=(6,), z_dim=2, dtype="float64")
    m1, m2 = VAE(cfg, rng=1), VAE(cfg, rng=1)
    o1, o2 = Adam(lr=1e-2, weight_decay=1e-3), Adam(lr=1e-2, weight_decay=1e-3)
    eps = rng.standard_normal((5, 8, 2))
    for t in range(5):
        _, g1 = m1.loss(x, eps=eps[t])
        _, g2 = m2.loss(x, eps=eps[t])
        o1.step(m1.params, g1)                                            # flat buffers
        plain_p = {k: v for k, v in m2.params.items()}                    # plain dicts of views
        o2.step(plain_p, {k: v.copy() for k, v in g2.items()})
    assert np.allclose(m1.flat, m2.flat, rtol=1e-12)


def test_clip_grad_norm():
    g = {"a": np.array([3.0, 0.0]), "b": np.array([[4.0]])}
    norm = clip_grad_norm(g, 1.0)
    assert np.isclose(float(norm), 5.0)
    assert np.isclose(float(global_norm(g)), 1.0, atol=1e-6)
    g = {"a": np.array([0.3, 0.0]), "b": np.array([[0.4]])}
    clip_grad_norm(g, 1.0)
    assert np.allclose(g["a"], [0.3, 0.0])          # below the threshold: untouched


def test_optimizer_state_round_trip():
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(8, 10))
    cfg = VAEConfig(x_dim=10, hidden=(6,), z_dim=2)
    m = VAE(cfg, rng=1)
    opt = make_optimizer("adam", 1e-2)
    for _ in range(3):
        opt.step(m.params, m.loss(x)[1])
    m2 = VAE(cfg, rng=1)
    m2.params.flat[...] = m.flat
    opt2 = make_optimizer("adam", 1e-2)
    opt2.load_state_dict(opt.state_dict(), m2.params)
    g = m.loss(x, eps=np.ones((8, 2)))[1]
    g2 = m2.loss(x, eps=np.ones((8, 2)))[1]
    opt.step(m.params, g)
    opt2.step(m2.params, g2)
    assert np.array_equal(m.flat, m2.flat)
    with pytest.raises(ValueError, match="shape"):
        Adam().load_state_dict({"t": 3, "0.m": np.zeros(2), "0.v": np.zeros(2)}, m2.params)


def test_bad_optimizer_settings():
    with pytest.raises(ValueError, match="unknown optimizer"):
        make_optimizer("lbfgs", 1e-3)
    with pytest.raises(ValueError, match="learning rate"):
        Adam(lr=0)
    with pytest.raises(ValueError, match="clip_norm"):
        SGD(lr=0.1, clip_norm=-1)
