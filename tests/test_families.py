"""The model families beyond the plain VAE: the MADE layer and decoder, planar and IAF flows, STL and DReG.

Every op pair against central differences in float64 with a random upstream gradient (relative error
<= 1e-7), the whole FamilyVAE against central differences, the log-determinants against the Jacobian's,
the estimators against the surrogate objectives they are gradients of, checkpoints, the fast path's refusal,
and the command line.
"""
import numpy as np
import pytest

from minivae.checkpoint import load_checkpoint, save_checkpoint
from minivae.config import VAEConfig
from minivae.families import FamilyConfig, FamilyVAE, parse_flow
from minivae.flows import (iaf_backward, iaf_forward, planar_backward, planar_forward, planar_uhat_backward,
                           planar_uhat_forward)
from minivae.gaussian import log_standard_normal, reparameterize_forward
from minivae.gradcheck import check_model, check_op, numerical_gradient, rel_error
from minivae.iwae_grads import (iwae_estimator_backward, iwae_estimator_forward, log_q_fixed_backward,
                                log_q_fixed_forward)
from minivae.made import connectivity, made_masks, masked_dense_backward, masked_dense_forward
from minivae.model import VAE, build_model, config_from_json
from minivae.objectives import iwae_forward

TOL = 1e-7


def _two_outputs(forward, L):
    """An op with outputs (out (M, L), logdet (M,)) as one (M, L + 1) array, for check_op."""
    def f(*args):
        out, logdet, cache = forward(*args)
        return np.concatenate([out, logdet[:, None]], axis=1), cache
    return f


# ----------------------------------------------------------------------------- MADE
def test_masked_dense_gradients_and_the_masked_weights_get_zero():
    rng = np.random.default_rng(0)
    mask = made_masks(5, [7], 1)[0]
    x, W, b = rng.standard_normal((4, 5)), rng.standard_normal((5, 7)), rng.standard_normal(7)
    rep = check_op(lambda x, W, b: masked_dense_forward(x, W, b, mask), masked_dense_backward, [x, W, b], rng=rng)
    assert max(rep.values()) <= TOL
    _, dW, _ = masked_dense_backward(rng.standard_normal((4, 7)), masked_dense_forward(x, W, b, mask)[1])
    assert np.all(dW[mask == 0] == 0) and np.all(dW[mask == 1] != 0)


def test_masked_dense_backward_without_the_mask_is_caught():
    rng = np.random.default_rng(1)
    mask = made_masks(5, [7], 1)[0]
    x, W, b = rng.standard_normal((4, 5)), rng.standard_normal((5, 7)), rng.standard_normal(7)

    def unmasked(dy, cache):                      # the planted bug: dW = x^T G, the mask forgotten
        x, Wm, _ = cache
        return dy @ Wm.T, x.T @ dy, dy.sum(0)
    with pytest.raises(AssertionError):
        check_op(lambda x, W, b: masked_dense_forward(x, W, b, mask), unmasked, [x, W, b], rng=rng)


@pytest.mark.parametrize("n_in,widths,groups", [(5, [7], 1), (6, [9, 8], 2), (1, [3], 2), (4, [2], 1)])
def test_made_masks_are_autoregressive(n_in, widths, groups):
    reach = connectivity(made_masks(n_in, widths, groups))
    for g in range(groups):
        block = reach[:, g * n_in:(g + 1) * n_in]
        assert np.all(np.tril(block) == 0), "output o may depend only on inputs < o"
    if n_in > 1 and min(widths) >= n_in - 1:
        assert np.all(reach[:, :n_in][np.triu_indices(n_in, 1)] == 1), "wide enough: every allowed connection exists"


def test_made_decoder_logit_d_depends_only_on_earlier_pixels_and_on_z():
    rng = np.random.default_rng(2)
    c = FamilyConfig(x_dim=8, hidden=(12,), z_dim=3, dtype="float64", decoder="made")
    m = FamilyVAE(c, rng=0)
    x = (rng.random((1, 8)) < 0.5).astype(float)
    z = rng.standard_normal((1, 3))
    base = m._dec_forward(z, x)[0][0]
    for d in range(8):
        x2 = x.copy()
        x2[0, d] = 1 - x2[0, d]
        changed = np.abs(m._dec_forward(z, x2)[0][0] - base)[0] > 1e-12
        assert not changed[:d + 1].any(), f"flipping x_{d} changed a logit at or before it"
    assert (np.abs(m._dec_forward(z + 1.0, x)[0][0] - base)[0, 1:] > 1e-12).all(), "z reaches every later pixel"


def test_made_decode_gives_probabilities_along_a_draw():
    c = FamilyConfig(x_dim=10, hidden=(6,), z_dim=2, decoder="made")
    m = FamilyVAE(c, rng=0)
    p = m.decode(np.zeros((3, 2), dtype=np.float32), rng=1)
    assert p.shape == (3, 10) and np.all((p > 0) & (p < 1))
    assert np.allclose(p, m.decode(np.zeros((3, 2), dtype=np.float32), rng=1))      # the draw follows rng
    assert m.sample(4, rng=0).shape == (4, 10)
    with pytest.raises(ValueError, match="depend on x"):
        m.decode_raw(np.zeros((1, 2)))


# ----------------------------------------------------------------------------- flows
def test_planar_and_uhat_gradients():
    rng = np.random.default_rng(3)
    L = 4
    z, u, w, b = rng.standard_normal((6, L)), rng.standard_normal(L), rng.standard_normal(L), rng.standard_normal(1)
    rep = check_op(_two_outputs(planar_forward, L), lambda d, c: planar_backward(d[:, :L], d[:, L], c),
                   [z, u, w, b], rng=rng)
    assert max(rep.values()) <= TOL
    assert max(check_op(planar_uhat_forward, planar_uhat_backward, [u, w], rng=rng).values()) <= TOL


def test_planar_backward_without_the_logdet_term_is_caught():
    rng = np.random.default_rng(4)
    L = 3
    z, u, w, b = rng.standard_normal((5, L)), rng.standard_normal(L), rng.standard_normal(L), rng.standard_normal(1)

    def no_logdet(df, dlogdet, cache):            # the planted bug: the log-determinant's gradient forgotten
        return planar_backward(df, 0 * dlogdet, cache)
    with pytest.raises(AssertionError):
        check_op(_two_outputs(planar_forward, L), lambda d, c: no_logdet(d[:, :L], d[:, L], c), [z, u, w, b],
                 rng=rng)


def _jacobian_logdets(f, z, h=1e-6):
    """log |det df/dz| per row by central differences of f (M, L) -> (M, L)."""
    M, L = z.shape
    J = np.zeros((M, L, L))
    for j in range(L):
        e = np.zeros(L)
        e[j] = h
        J[:, :, j] = (f(z + e) - f(z - e)) / (2 * h)
    return np.linalg.slogdet(J)[1]


def test_logdets_are_the_jacobians_and_uhat_keeps_planar_invertible():
    rng = np.random.default_rng(5)
    L = 4
    z, u, w, b = rng.standard_normal((6, L)), rng.standard_normal(L), rng.standard_normal(L), rng.standard_normal(1)
    uhat = planar_uhat_forward(-5 * w, w)[0]      # a u that would break invertibility (w . u << -1)
    assert np.dot(w, uhat) > -1
    for uu in (u, uhat):
        _, ld, _ = planar_forward(z, uu, w, b)
        assert np.allclose(ld, _jacobian_logdets(lambda zz: planar_forward(zz, uu, w, b)[0], z), atol=1e-7)
    masks = made_masks(L, [16], 2)
    P = [rng.standard_normal(s) for s in ((L, 16), (16,), (16, 2 * L), (2 * L,))]
    _, ld, _ = iaf_forward(z, *P, masks)
    assert np.allclose(ld, _jacobian_logdets(lambda zz: iaf_forward(zz, *P, masks)[0], z), atol=1e-7)


def test_iaf_gradients():
    rng = np.random.default_rng(6)
    L, H = 3, 8
    masks = made_masks(L, [H], 2)
    args = [rng.standard_normal(s) for s in ((5, L), (L, H), (H,), (H, 2 * L), (2 * L,))]
    rep = check_op(_two_outputs(lambda *a: iaf_forward(*a, masks), L),
                   lambda d, c: iaf_backward(d[:, :L], d[:, L], c), args, rng=rng)
    assert max(rep.values()) <= TOL


# ----------------------------------------------------------------------------- whole models
@pytest.mark.parametrize("decoder,flow,kw", [
    ("made", None, {}), ("made", None, {"iwae_k": 3}), ("made", None, {"free_bits": 0.05}),
    ("factorised", "planar:2", {}), ("factorised", "planar:2", {"iwae_k": 3}), ("made", "iaf:2", {"iwae_k": 2}),
    ("factorised", "iaf:2", {})])
def test_whole_model_gradients(decoder, flow, kw):
    rng = np.random.default_rng(7)
    c = FamilyConfig(x_dim=6, hidden=(5,), z_dim=3, dtype="float64", decoder=decoder, flow=flow, activation="tanh")
    m = FamilyVAE(c, rng=1)
    x = (rng.random((3, 6)) < 0.5).astype(float)
    rep = check_model(m, x, beta=0.7, n_samples=kw.get("iwae_k", 2), loss_kwargs=kw, rng=rng)
    assert max(rep.values()) <= TOL


def test_a_factorised_family_without_a_flow_is_the_plain_vae():
    rng = np.random.default_rng(8)
    plain = VAE(VAEConfig(x_dim=6, hidden=(5,), z_dim=3, dtype="float64"), rng=3)
    fam = FamilyVAE(FamilyConfig(x_dim=6, hidden=(5,), z_dim=3, dtype="float64"), rng=3)
    assert list(plain.params) == list(fam.params) and np.array_equal(plain.flat, fam.flat)
    x = (rng.random((4, 6)) < 0.5).astype(float)
    eps = rng.standard_normal((3, 4, 3))
    for kw in ({"n_samples": 3}, {"iwae_k": 3}):
        lp, gp = plain.loss(x, eps=eps, **kw)
        lf, gf = fam.loss(x, eps=eps, **kw)
        assert np.isclose(lp, lf) and np.allclose(gp.flat, gf.flat)
    assert np.allclose(plain.log_weights(x, eps), fam.log_weights(x, eps))


def test_flow_log_weights_are_minus_the_iwae1_loss_and_refusals():
    rng = np.random.default_rng(9)
    m = FamilyVAE(FamilyConfig(x_dim=6, hidden=(5,), z_dim=3, dtype="float64", flow="planar:3"), rng=0)
    x = (rng.random((4, 6)) < 0.5).astype(float)
    eps = rng.standard_normal((1, 4, 3))
    assert np.isclose(m.loss(x, eps=eps, iwae_k=1, backward=False)[0], -m.log_weights(x, eps).mean())
    with pytest.raises(ValueError, match="flow"):
        m.loss(x, iwae_k=2, iwae_grad="dreg")
    with pytest.raises(ValueError, match="free bits"):
        m.loss(x, free_bits=0.1)
    for bad in ("planar", "planar:0", "radial:2", "planar:x"):
        with pytest.raises(ValueError, match="flow must be"):
            parse_flow(bad)
    with pytest.raises(ValueError, match="bernoulli"):
        FamilyConfig(decoder="made", likelihood="gaussian")


# ----------------------------------------------------------------------------- STL and DReG
def test_estimator_op_pairs():
    rng = np.random.default_rng(10)
    log_w = rng.standard_normal((5, 3))
    wt = iwae_forward(log_w)[1][0]
    for est, power in (("iwae", 1), ("stl", 1), ("dreg", 2)):
        loss, cache = iwae_estimator_forward(log_w, est)
        assert np.isclose(loss, iwae_forward(log_w)[0])
        g, g_enc = iwae_estimator_backward(2.0, cache)
        assert np.allclose(g, -2.0 * wt / 3) and np.allclose(g_enc, -2.0 * wt ** power / 3)
    z, mu, lv = rng.standard_normal((4, 3, 2)), rng.standard_normal((3, 2)), rng.standard_normal((3, 2))
    f = lambda z: log_q_fixed_forward(z, mu, lv)       # noqa: E731
    assert check_op(f, log_q_fixed_backward, [z], rng=rng)["x0"] <= TOL


def _surrogate_encoder_grads(m, x, eps, power):
    """Central differences of -1/N sum_nk wtilde0_nk^power log w_nk(z(phi); q's parameters held at phi0) in
    the encoder's parameters: the objective whose gradient STL (power 1) and DReG (power 2) are."""
    mu0, lv0 = m.encode(x)
    mu0, lv0 = mu0.copy(), lv0.copy()
    weights = iwae_forward(m.log_weights(x, eps))[1][0] ** power

    def objective():
        mu, lv = m.encode(x)
        z = reparameterize_forward(mu, lv, eps)[0]
        log_w = m.log_px_given_z(x, z) + log_standard_normal(z) - log_q_fixed_forward(z, mu0, lv0)[0]
        return -(weights * log_w).sum() / x.shape[0]
    return {k: numerical_gradient(objective, p) for k, p in m.params.items() if k.startswith("enc.")}


@pytest.mark.parametrize("decoder", ["factorised", "made"])
def test_stl_and_dreg_are_the_gradients_of_their_surrogates(decoder):
    rng = np.random.default_rng(11)
    m = FamilyVAE(FamilyConfig(x_dim=6, hidden=(5,), z_dim=2, dtype="float64", decoder=decoder,
                               activation="tanh"), rng=2)
    x = (rng.random((3, 6)) < 0.5).astype(float)
    eps = rng.standard_normal((4, 3, 2))
    _, g_iwae = m.loss(x, eps=eps, iwae_k=4)
    for est, power in (("stl", 1), ("dreg", 2)):
        _, g = m.loss(x, eps=eps, iwae_k=4, iwae_grad=est)
        for k in g:
            if k.startswith("dec."):
                assert np.allclose(g[k], g_iwae[k], rtol=1e-12, atol=1e-14), f"{est}: decoder gradient {k} changed"
        num = _surrogate_encoder_grads(m, x, eps, power)
        for k, v in num.items():
            assert rel_error(g[k], v) <= TOL, (est, k, rel_error(g[k], v))
        assert any(rel_error(g[k], g_iwae[k]) > 1e-3 for k in num), f"{est} equals the IWAE gradient"
    e1 = eps[:1]
    assert np.allclose(m.loss(x, eps=e1, iwae_k=1, iwae_grad="stl")[1].flat,
                       m.loss(x, eps=e1, iwae_k=1, iwae_grad="dreg")[1].flat)      # wtilde = 1 at K = 1


def test_dreg_with_plain_iwae_weights_is_caught():
    """The planted mistake of the DReG weights (wtilde instead of wtilde^2) fails the surrogate check."""
    rng = np.random.default_rng(12)
    m = FamilyVAE(FamilyConfig(x_dim=6, hidden=(5,), z_dim=2, dtype="float64", activation="tanh"), rng=2)
    x = (rng.random((3, 6)) < 0.5).astype(float)
    eps = rng.standard_normal((4, 3, 2))
    _, g_stl = m.loss(x, eps=eps, iwae_k=4, iwae_grad="stl")
    num = _surrogate_encoder_grads(m, x, eps, 2)
    assert max(rel_error(g_stl[k], v) for k, v in num.items()) > 1e-3


# ----------------------------------------------------------------------------- checkpoints, fast path, CLI
def test_checkpoint_round_trip(tmp_path):
    c = FamilyConfig(x_dim=12, hidden=(6,), z_dim=2, decoder="made", flow="iaf:2")
    m = FamilyVAE(c, rng=5)
    save_checkpoint(tmp_path / "c.npz", m)
    ck = load_checkpoint(tmp_path / "c.npz")
    assert isinstance(ck.config, FamilyConfig) and ck.config == c
    m2 = ck.build_model()
    assert type(m2) is FamilyVAE and np.array_equal(m2.flat, m.flat)
    x = (np.random.default_rng(0).random((3, 12)) < 0.5).astype(np.float32)
    eps = np.random.default_rng(1).standard_normal((2, 3, 2)).astype(np.float32)
    assert np.array_equal(m.log_weights(x, eps), m2.log_weights(x, eps))
    assert config_from_json(c.to_json()) == c and type(build_model(c)) is FamilyVAE


def test_the_fast_path_declines_with_a_reason_and_evaluation_uses_the_models_weights():
    from minivae.fast import FastPathError, check_supported
    from minivae.fast import log_weights as fast_log_weights
    c = FamilyConfig(x_dim=12, hidden=(6,), z_dim=2, flow="planar:2")
    with pytest.raises(FastPathError, match="plain VAE.*family"):
        check_supported(c)
    m = FamilyVAE(c, rng=0)
    x = (np.random.default_rng(0).random((3, 12)) < 0.5).astype(np.float32)
    eps = np.random.default_rng(1).standard_normal((2, 3, 2)).astype(np.float32)
    assert np.array_equal(fast_log_weights(m, x, eps), m.log_weights(x, eps))


def test_train_and_eval_from_the_command_line(tmp_path, capsys):
    from minivae.cli import main
    small = ["--n-train", "64", "--n-test", "32", "--epochs", "1", "--batch-size", "32", "--hidden", "8",
             "--latent", "2", "--quiet"]
    out = tmp_path / "made"
    assert main(["train", *small, "--decoder", "made", "--flow", "planar:2", "--out", str(out)]) == 0
    assert main(["eval", "--checkpoint", str(out), "--nll-k", "4", "--n", "32"]) == 0
    text = capsys.readouterr().out
    assert "FamilyVAE" in text and "importance-weighted with k = 4" in text
    assert (out / "figures" / "samples.png").exists()
    out2 = tmp_path / "dreg"
    assert main(["train", *small, "--no-figures", "--iwae-k", "3", "--iwae-grad", "dreg", "--out", str(out2)]) == 0
    assert load_checkpoint(out2).settings["iwae_grad"] == "dreg"
    for bad, msg in ((["--flow", "planar:0"], "flow must be"), (["--iwae-grad", "dreg"], "give iwae_k"),
                     (["--decoder", "made", "--likelihood", "gaussian", "--binarize", "none"], "bernoulli")):
        assert main(["train", *small, "--no-figures", *bad, "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("minivae: error:") and msg in err[0], err


# ----------------------------------------------------------------------------- the lessons' checks catch mistakes
PLANTED = {
    "26_autoregressive_collapse.py": (
        "import minivae.made as m\n"
        "def bad(dy, cache):\n"
        "    x, Wm, mask = cache\n"
        "    return dy @ Wm.T, x.T @ dy, dy.sum(0)\n"               # the mask forgotten in dW
        "m.masked_dense_backward = bad\n", "masked dense backward"),
    "27_flows_gap.py": (
        "import minivae.flows as f\n"
        "good = f.planar_backward\n"
        "f.planar_backward = lambda df, dld, c: good(df, 0 * dld, c)\n", "log-det included"),   # no log-det term
    "28_iwae_gradients.py": (
        "import minivae.families as fam\n"
        "good = fam.iwae_estimator_backward\n"
        "def bad(dloss, cache):\n"
        "    wt, N, est = cache\n"
        "    return good(dloss, (wt, N, 'stl'))\n"                 # DReG with STL's weights
        "fam.iwae_estimator_backward = bad\n", "DREG"),
    "29_learned_prior.py": (
        "import minivae.priors as pr\n"
        "good = pr.mixture_log_prob_backward\n"
        "def bad(dlp, cache):\n"
        "    dz, da, dm, ds = good(dlp, cache)\n"
        "    return dz, da + dlp.sum() * cache[3], dm, ds\n"       # the softmax's -pi forgotten in dL/da
        "pr.mixture_log_prob_backward = bad\n", "mixture log-density's backward"),
    "30_two_stochastic_layers.py": (
        "import minivae.twolayer as t\n"
        "good = t.TwoLayerVAE._net_backward\n"
        "def bad(self, net, douts, cache, grads):\n"
        "    if net == 'q2':\n"
        "        douts = [douts[0], 0 * douts[1]]\n"                # z1's path through q(z2|z1)'s log-variance
        "    return good(self, net, douts, cache, grads)\n"
        "t.TwoLayerVAE._net_backward = bad\n", "the ELBO (S = 2)"),
    "31_semi_supervised_m2.py": (
        "import minivae.m2 as m\n"
        "def bad(dU, cache):\n"
        "    q, Lk, logq = cache\n"
        "    return dU[:, None] * q * (Lk + 1.0), dU[:, None] * q\n"    # the entropy's log q_k forgotten
        "m.enumerate_bound_backward = bad\n", "unlabelled digits (U enumerates y)"),
}


@pytest.mark.parametrize("lesson", sorted(PLANTED))
def test_a_lessons_checks_fail_on_a_planted_mistake(lesson, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "lessons" / lesson
    plant, claim = PLANTED[lesson]
    code = plant + f"import runpy\nrunpy.run_path({str(path)!r}, run_name='__main__')\n"
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", MPLBACKEND="Agg")
    r = subprocess.run([sys.executable, "-c", code, "--quick", "--out", str(tmp_path)], capture_output=True,
                       text=True, timeout=300, env=env, cwd=tmp_path)
    assert r.returncode != 0, r.stdout[-2000:]
    assert "CHECK failed" in r.stderr and claim in r.stderr, r.stderr[-2000:]


def test_a_family_run_resumes_exactly(tmp_path, capsys):
    from minivae.cli import main
    small = ["--n-train", "64", "--n-test", "32", "--batch-size", "32", "--hidden", "8", "--latent", "2", "--quiet",
             "--no-figures", "--decoder", "made", "--flow", "iaf:1"]
    assert main(["train", *small, "--epochs", "2", "--out", str(tmp_path / "straight")]) == 0
    assert main(["train", *small, "--epochs", "1", "--out", str(tmp_path / "resumed")]) == 0
    assert main(["train", "--out", str(tmp_path / "resumed"), "--resume", "--epochs", "2", "--quiet"]) == 0
    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "resumed")
    assert b.epoch == 2 and all(np.array_equal(a.params[k], b.params[k]) for k in a.params)


# ----------------------------------------------------------------------------- learned priors
def test_mixture_prior_op_gradients_and_its_special_case():
    from minivae.priors import mixture_log_prob_backward, mixture_log_prob_forward
    rng = np.random.default_rng(20)
    z, a, m, s = rng.standard_normal((6, 3)), rng.standard_normal(4), rng.standard_normal((4, 3)), \
        0.5 * rng.standard_normal((4, 3))
    rep = check_op(mixture_log_prob_forward, mixture_log_prob_backward, [z, a, m, s], rng=rng)
    assert max(rep.values()) <= TOL
    one = mixture_log_prob_forward(z, np.zeros(1), np.zeros((1, 3)), np.zeros((1, 3)))[0]
    assert np.allclose(one, log_standard_normal(z))                       # one standard component: N(0, I)
    far = mixture_log_prob_forward(z + 1e3, a, m, s)[0]                     # every density underflows alone
    assert np.all(np.isfinite(far))


@pytest.mark.parametrize("prior,flow,kw", [("mog:3", None, {}), ("vamp:2", None, {"iwae_k": 3}),
                                           ("vamp:2", "planar:2", {}), ("mog:2", "iaf:1", {"iwae_k": 2})])
def test_whole_model_gradients_with_a_learned_prior(prior, flow, kw):
    rng = np.random.default_rng(21)
    m = FamilyVAE(FamilyConfig(x_dim=6, hidden=(5,), z_dim=3, dtype="float64", flow=flow, prior=prior,
                               activation="tanh"), rng=1)
    x = (rng.random((3, 6)) < 0.5).astype(float)
    rep = check_model(m, x, beta=0.7, n_samples=kw.get("iwae_k", 2), loss_kwargs=kw, rng=rng)
    assert max(rep.values()) <= TOL


def test_learned_prior_log_weights_sampling_and_refusals():
    rng = np.random.default_rng(22)
    m = FamilyVAE(FamilyConfig(x_dim=6, hidden=(5,), z_dim=3, dtype="float64", prior="vamp:4"), rng=0)
    x = (rng.random((4, 6)) < 0.5).astype(float)
    eps = rng.standard_normal((1, 4, 3))
    assert np.isclose(m.loss(x, eps=eps, iwae_k=1, backward=False)[0], -m.log_weights(x, eps).mean())
    z = m.sample_prior(5000, rng=1)
    mu_u, _ = m.encode(m.params["prior.u"])
    assert np.allclose(z.mean(0), mu_u.mean(0), atol=0.1)                  # the mixture's mean: the components'
    assert m.sample(3, rng=0).shape == (3, 6)
    with pytest.raises(ValueError, match="learned prior"):
        m.loss(x, free_bits=0.1)
    with pytest.raises(ValueError, match="N\\(0, I\\) prior"):
        m.loss(x, iwae_k=2, iwae_grad="stl")
    for bad in ("vamp", "vamp:0", "gauss:3"):
        with pytest.raises(ValueError, match="prior must be"):
            FamilyConfig(prior=bad)


def test_train_with_a_learned_prior_from_the_command_line(tmp_path, capsys):
    from minivae.cli import main
    out = tmp_path / "vamp"
    assert main(["train", "--n-train", "64", "--n-test", "32", "--epochs", "1", "--batch-size", "32", "--hidden", "8",
                 "--latent", "2", "--quiet", "--prior", "vamp:5", "--out", str(out)]) == 0
    assert main(["eval", "--checkpoint", str(out), "--nll-k", "3", "--n", "32"]) == 0
    assert "prior vamp:5" in capsys.readouterr().out
    assert main(["train", "--n-train", "64", "--epochs", "1", "--prior", "vamp:0", "--out", str(tmp_path / "b")]) == 2
    assert "prior must be" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the assignments' new exercises
def test_the_planar_exercise_catches_its_planted_bug(tmp_path):
    from pathlib import Path

    from minivae.assignments import grade, make_starter
    d = tmp_path / "course"
    make_starter(d, exercises=())                        # the student layout with the reference in every region
    flows = Path(d) / "minivae" / "flows.py"
    src = flows.read_text()
    old = "r = dlogdet * dh / det"
    assert src.count(old) == 1
    flows.write_text(src.replace(old, "r = 0 * dlogdet * dh / det"))                 # the log-det's terms dropped
    (res,) = grade(d, ["planar_joint_backward"])["exercises"]
    assert res["status"] == "fail" and res["gradient"] in ("dz", "du", "dw", "db"), res


def test_the_masked_dense_exercise_grades_and_catches_a_forgotten_mask(tmp_path):
    from pathlib import Path

    from minivae.assignments import grade, make_starter
    from minivae.assignments.exercises import EXERCISES
    from minivae.assignments.harness import NEEDS
    assert NEEDS == {e.id: e.needs for e in EXERCISES if e.needs}       # check.py's copy of the table's needs
    d = tmp_path / "course"
    make_starter(d, exercises=(), record_expected=False)     # the student layout with the reference in every region
    (res,) = grade(d, ["masked_dense_backward"])["exercises"]
    assert res["passed"], res                                # the reference passes
    made = Path(d) / "minivae" / "made.py"
    src = made.read_text()
    old = "dW = dW * mask "
    assert src.count(old) == 1
    made.write_text(src.replace(old, "dW = dW * 1.0 "))     # the mask forgotten: dW = x^T G everywhere
    (res,) = grade(d, ["masked_dense_backward"])["exercises"]
    assert res["status"] == "fail" and res["gradient"] == "dW", res
