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
    with pytest.raises(ValueError, match="clip_norm"):
        Adam(clip_norm=0)
    with pytest.raises(ValueError, match="weight_decay"):
        Adagrad(weight_decay=-1e-3)
    for opt in (SGD(lr=0.1), Adagrad(lr=0.1), Adam(lr=0.1)):      # the boundaries are allowed
        assert opt.weight_decay == 0.0 and opt.clip_norm is None and opt.t == 0


# ------------------------------------------------------------------ textbook formulas, with decay and clipping
def _textbook(name, p0, gs, lr, wd, clip, **h):
    """The optimizers as the papers write them, in float64, one array at a time.

    Each step: rescale the whole gradient by min(1, clip / (||g|| + 1e-6)) (||.|| over every array
    together, as torch.nn.utils.clip_grad_norm_), add the L2 term wd * p, then the update.
    """
    p = {k: v.copy() for k, v in p0.items()}
    st = {k: {"a": np.zeros_like(v), "b": np.zeros_like(v)} for k, v in p0.items()}
    for t, g in enumerate(gs, start=1):
        norm = np.sqrt(sum(np.sum(a * a) for a in g.values()))
        scale = 1.0 if clip is None else min(1.0, clip / (norm + 1e-6))
        for k in p:
            gk = scale * g[k] + wd * p[k]
            s = st[k]
            if name == "sgd":                            # v <- mu v - lr g;  p <- p + v
                s["a"] = h["momentum"] * s["a"] - lr * gk
                p[k] = p[k] + s["a"]
            elif name == "adagrad":                      # G <- G + g^2;  p <- p - lr g / (sqrt(G) + eps)
                s["a"] = s["a"] + gk * gk
                p[k] = p[k] - lr * gk / (np.sqrt(s["a"]) + h["eps"])
            else:                                        # Adam (Kingma & Ba 2015, Algorithm 1)
                b1, b2 = h["betas"]
                s["a"] = b1 * s["a"] + (1 - b1) * gk
                s["b"] = b2 * s["b"] + (1 - b2) * gk * gk
                m_hat, v_hat = s["a"] / (1 - b1 ** t), s["b"] / (1 - b2 ** t)
                p[k] = p[k] - lr * m_hat / (np.sqrt(v_hat) + h["eps"])
    return p


OPTIMIZER_CASES = [
    ("sgd", SGD, dict(momentum=0.7)),
    ("adagrad", Adagrad, dict(eps=1e-2)),
    ("adam", Adam, dict(betas=(0.8, 0.95), eps=1e-2)),
]


@pytest.mark.parametrize("wd", [0.0, 0.3])
@pytest.mark.parametrize("clip", [None, 2.0])
@pytest.mark.parametrize("name, cls, hyper", OPTIMIZER_CASES, ids=[c[0] for c in OPTIMIZER_CASES])
def test_optimizers_match_the_textbook_with_decay_and_clipping(name, cls, hyper, wd, clip):
    rng = np.random.default_rng(3)
    p0 = {"a": rng.standard_normal(5) * 2, "b": rng.standard_normal((2, 3)) * 2}
    # gradient norms about 0.3 (below the clip) and 10 (above it), alternating
    gs = [{k: rng.standard_normal(v.shape) * (3.0 if t % 2 else 0.1) for k, v in p0.items()} for t in range(6)]
    params = {k: v.copy() for k, v in p0.items()}
    opt = cls(lr=0.05, weight_decay=wd, clip_norm=clip, **hyper)
    for g in gs:
        opt.step(params, {k: v.copy() for k, v in g.items()})
    expect = _textbook(name, p0, gs, 0.05, wd, clip, **hyper)
    for k in p0:
        np.testing.assert_allclose(params[k], expect[k], rtol=1e-12, atol=1e-14)
    # the settings matter here: without the decay (or the clip) the parameters would be elsewhere
    if wd:
        other = _textbook(name, p0, gs, 0.05, 0.0, clip, **hyper)
        assert max(np.abs(other[k] - expect[k]).max() for k in p0) > 1e-3
    if clip:
        other = _textbook(name, p0, gs, 0.05, wd, None, **hyper)
        assert max(np.abs(other[k] - expect[k]).max() for k in p0) > 1e-3


def test_weight_decay_alone_shrinks_the_parameters():
    # with a zero gradient, the only force is the decay: every parameter moves towards 0
    for opt in (SGD(lr=0.1, momentum=0.0, weight_decay=0.5), Adagrad(lr=0.1, weight_decay=0.5),
                Adam(lr=0.1, weight_decay=0.5)):
        p = {"w": np.array([2.0, -3.0, 0.5])}
        opt.step(p, {"w": np.zeros(3)})
        assert np.all(np.abs(p["w"]) < [2.0, 3.0, 0.5]) and np.all(np.sign(p["w"]) == [1, -1, 1])
    p = {"w": np.array([2.0, -3.0])}
    SGD(lr=0.1, momentum=0.0, weight_decay=0.5).step(p, {"w": np.zeros(2)})
    assert np.allclose(p["w"], [2.0 * 0.95, -3.0 * 0.95])           # p - lr * wd * p


def test_global_norm_and_clip_over_all_arrays():
    g = {"a": np.array([1.0, 2.0]), "b": np.array([[2.0], [4.0]])}        # ||g|| = 5
    assert float(global_norm(g)) == 5.0
    norm = clip_grad_norm(g, 2.5)
    assert float(norm) == 5.0                                            # the norm before clipping
    scale = 2.5 / (5.0 + 1e-6)
    assert np.allclose(g["a"], [scale, 2 * scale], rtol=1e-15) and np.allclose(g["b"], [[2 * scale], [4 * scale]])


def test_optimizer_state_dict_holds_step_lr_and_moments():
    opt = Adam(lr=0.02)
    p = {"w": np.array([1.0, 2.0])}
    opt.step(p, {"w": np.array([0.5, -1.0])})
    d = opt.state_dict()
    assert d["t"] == 1 and d["lr"] == 0.02
    assert np.allclose(d["0.m"], 0.1 * np.array([0.5, -1.0])) and np.allclose(d["0.v"], 0.001 * np.array([0.25, 1.0]))
    fresh = Adam(lr=0.5)
    fresh.load_state_dict(d, {"w": np.zeros(2)})
    assert fresh.t == 1 and fresh.lr == 0.02 and np.array_equal(fresh.state[0]["m"], d["0.m"])
    with pytest.raises(ValueError, match="missing '0.v'"):
        Adam().load_state_dict({"t": 2, "0.m": np.zeros(2)}, {"w": np.zeros(2)})
    empty = Adam()
    empty.load_state_dict({"t": 0}, {"w": np.zeros(2)})                 # a fresh optimizer's state: zeros
    assert empty.t == 0 and empty.lr == 1e-3 and np.array_equal(empty.state[0]["v"], np.zeros(2))


def test_defaults_are_the_documented_ones():
    # the usual defaults (PyTorch's, and Kingma & Ba's for Adam), written in the docstrings and the README
    adam, sgd, ada = Adam(), SGD(), Adagrad()
    assert (adam.lr, adam.b1, adam.b2, adam.eps) == (1e-3, 0.9, 0.999, 1e-8)
    assert (sgd.lr, sgd.momentum) == (1e-2, 0.9) and (ada.lr, ada.eps) == (1e-2, 1e-10)
    for opt in (adam, sgd, ada):
        assert opt.weight_decay == 0.0 and opt.clip_norm is None
    sgd = make_optimizer("sgd", 0.5, momentum=0.25, weight_decay=0.1)           # keyword arguments reach it
    assert type(sgd) is SGD and (sgd.lr, sgd.momentum, sgd.weight_decay) == (0.5, 0.25, 0.1)
    assert make_optimizer("adagrad", 0.5).lr == 0.5
    with pytest.raises(ValueError, match="choose one of sgd, adagrad, adam"):
        make_optimizer("rmsprop", 1e-3)


def test_model_parameters_update_as_one_flat_buffer():
    m = VAE(VAEConfig(x_dim=10, hidden=(6,), z_dim=2), rng=1)
    opt = Adam(lr=1e-2)
    opt.step(m.params, m.loss(np.random.default_rng(0).uniform(size=(4, 10)))[1])
    (st,) = opt.state                                  # one state entry: the flat vector, not one per tensor
    assert st["m"].shape == st["v"].shape == m.flat.shape
    assert set(opt.state_dict()) == {"t", "lr", "0.m", "0.v"}
    # the model's parameters with a plain dict of gradients: the per-key path, the same numbers
    m2 = VAE(VAEConfig(x_dim=10, hidden=(6,), z_dim=2), rng=1)
    g = m2.loss(np.random.default_rng(0).uniform(size=(4, 10)))[1]
    m3 = VAE(VAEConfig(x_dim=10, hidden=(6,), z_dim=2), rng=1)
    o2, o3 = Adam(lr=1e-2), Adam(lr=1e-2)
    o3.step(m3.params, {k: v.copy() for k, v in g.items()})
    o2.step(m2.params, g)
    assert len(o3.state) == len(g) and np.allclose(m2.flat, m3.flat, rtol=1e-6, atol=1e-7)
    with pytest.raises(KeyError, match="different keys"):
        Adam().step({"a": np.zeros(2)}, {"b": np.zeros(2)})
