"""The CUDA-graph step (minivae.fast.cuda_graph) and its cuBLAS binding (minivae.fast.cublas).

Without a GPU: the ctypes prototypes against cublas_api.h and the real libcublas file; the row-major ->
column-major product mapping against a column-major reference (tests/graph_stub.py); the whole step program
-- its buffers, products, step counter and per-step data slices -- with NumPy twins of its kernels, against
eager FastTrainer over several epochs; the fall-back rules.  On a GPU (gpu-marked): the captured graph against
eager FastTrainer on CuPy, and `train` with the graph against the NumPy run.  The kernels' CUDA sources are
compiled for sm_80/sm_90 by tests/test_nvrtc.py.
"""
from __future__ import annotations

import ctypes
import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest

import minivae
from minivae.fast import cublas as cb
from minivae.fast import cuda_graph as cg
from minivae.fast import FastTrainer
from minivae.gradcheck import rel_error

from graph_stub import TWINS, StubDevice

CONFIGS = {
    "relu": dict(x_dim=20, hidden=(16,), z_dim=3),
    "tanh-equal-widths": dict(x_dim=20, hidden=(12, 12), z_dim=4, activation="tanh"),
    "relu-deep-gaussian": dict(x_dim=18, hidden=(10, 7), z_dim=3, likelihood="gaussian", obs_var=0.5),
    "no-hidden": dict(x_dim=9, hidden=(), z_dim=2),
}


def make(name, seed=0, lr=1e-2, **opt):
    model = minivae.VAE(minivae.VAEConfig(**CONFIGS[name]), rng=seed)
    return model, FastTrainer(model, minivae.Adam(lr=lr, **opt), fused=False)


def epoch_data(rng, n, n_all, D, L):
    order = rng.permutation(n_all)[:n].astype(np.int32)
    return order, rng.random((n, D), dtype=np.float32), rng.standard_normal((n, L), dtype=np.float32)


# ------------------------------------------------------------------------------------------ cuBLAS binding
def _cublas_header():
    try:
        spec = importlib.util.find_spec("nvidia.cublas")
    except ImportError:                                       # no "nvidia" package at all
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return None
    for base in spec.submodule_search_locations:
        h = Path(base) / "include" / "cublas_api.h"
        if h.exists():
            return h
    return None


C_TO_CTYPES = {"cublasHandle_t": ctypes.c_void_p, "cudaStream_t": ctypes.c_void_p, "int": ctypes.c_int,
               "size_t": ctypes.c_size_t, "long long int": ctypes.c_longlong, "cublasOperation_t": ctypes.c_int,
               "cublasMath_t": ctypes.c_int, "libraryPropertyType": ctypes.c_int, "cublasStatus_t": ctypes.c_int}


def _prototype(header_text, name):
    m = re.search(r"CUBLASAPI[ \t]+([A-Za-z_][\w \t]*\**)[ \t]*CUBLASWINAPI\s+" + name + r"\s*\((.*?)\)\s*;",
                  header_text, re.S)
    assert m, f"{name} not declared in cublas_api.h"
    ret = " ".join(m.group(1).split())
    params = [" ".join(p.split()) for p in m.group(2).split(",")]
    return ret, params


def _ctype_of(param):
    if param == "void":
        return None
    decl = re.sub(r"\b(const|__restrict__)\b", "", param)
    if "*" in decl:
        return ctypes.c_void_p
    words = decl.split()
    return C_TO_CTYPES[" ".join(words[:-1])]                # drop the parameter's name


def test_cublas_prototypes_match_cublas_api_h():
    header = _cublas_header()
    if header is None:
        pytest.skip("nvidia-cublas (cublas_api.h) is not installed: pip install -e '.[cuda12x]'")
    text = header.read_text(errors="replace")
    for name, (restype, argtypes) in cb.PROTOTYPES.items():
        ret, params = _prototype(text, name)
        want = [t for t in (_ctype_of(p) for p in params) if t is not None]
        assert list(argtypes) == want, f"{name}: {params}"
        assert restype == (ctypes.c_char_p if ret == "const char*" else C_TO_CTYPES[ret]), name


def test_rowmajor_mapping_swaps_the_operands():
    # C (R, S) = A @ B.T row-major -> column-major C^T = B A^T: B first (op T), A second (op N), m = S, n = R
    assert cb.rowmajor_gemm(5, 7, 3, False, True, 3, 3, 7) == (cb.OP_T, cb.OP_N, 7, 5, 3, True, 3, 3, 7)
    assert cb.rowmajor_gemm(5, 7, 3, True, False, 5, 7, 7) == (cb.OP_N, cb.OP_T, 7, 5, 3, True, 7, 5, 7)


def _cupy_libcublas():
    try:
        return cb.find_library()
    except cb.CublasError as exc:
        pytest.skip(f"no libcublas here ({exc}); pip install -e '.[cuda12x]'")


def test_libcublas_loads_with_every_function_and_answers_without_a_gpu():
    lib = cb.load(_cupy_libcublas())
    assert Path(lib.path).name.startswith("libcublas.so")
    assert not lib.missing, lib.missing
    major, minor, patch = lib.version()                       # cublasGetProperty: a real call, no GPU needed
    assert major >= 11 and minor >= 0 and patch >= 0
    assert re.search(rf"libcublas\.so\.{major}\b", Path(lib.path).name) or lib.path == "cublas"
    from minivae.backend import cupy_available
    if not cupy_available():                                  # no GPU: cublasCreate fails cleanly, with a status
        with pytest.raises(cb.CublasError, match=r"cublasCreate_v2 failed: cuBLAS status \d+"):
            cb.Handle(lib)


def test_find_library_picks_cupys_libcublas(monkeypatch):
    monkeypatch.setattr(cb, "_pathfinder_cublas", lambda: None)
    monkeypatch.setattr(cb, "loaded_cublas_paths", lambda: ["/a/libcublas.so.12", "/b/libcublas.so.13"])
    monkeypatch.setattr(cb, "_cuda_major", lambda: 13)              # CuPy's CUDA: a PyTorch one loaded beside it
    assert cb.find_library() == "/b/libcublas.so.13"
    monkeypatch.setattr(cb, "_cuda_major", lambda: None)
    with pytest.raises(cb.CublasError, match="several libcublas"):
        cb.find_library()
    monkeypatch.setattr(cb, "_pathfinder_cublas", lambda: __file__)  # the path finder's answer comes first
    assert cb.find_library() == __file__


@pytest.mark.parametrize("ta", [False, True])
@pytest.mark.parametrize("tb", [False, True])
@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_rowmajor_products_through_column_major_gemm(ta, tb, beta):
    # strided sub-matrices (ld > cols, an offset) as in the graph's heads: C = op(A) @ op(B) + beta C
    rng = np.random.default_rng(0)
    R, K, S = 5, 4, 3
    a = rng.standard_normal((K, R) if ta else (R, K)).astype(np.float32)
    b = rng.standard_normal((S, K) if tb else (K, S)).astype(np.float32)
    bufA = np.zeros(200, np.float32)
    bufB = np.zeros(200, np.float32)
    bufC = rng.standard_normal(200).astype(np.float32)
    A = cg.Mat(bufA, 3, *a.shape, ld=a.shape[1] + 2)
    B = cg.Mat(bufB, 7, *b.shape, ld=b.shape[1] + 1)
    C = cg.Mat(bufC, 5, R, S, ld=2 * S)
    for X, x in ((A, a), (B, b)):
        for r in range(X.rows):
            X.buf[X.off + r * X.ld:X.off + r * X.ld + X.cols] = x[r]
    c0 = np.array([bufC[5 + r * 2 * S:5 + r * 2 * S + S] for r in range(R)])
    before = bufC.copy()
    dev = StubDevice()
    cg._mm(dev, C, A, B, ta=ta, tb=tb, beta=beta)()
    want = (a.T if ta else a) @ (b.T if tb else b) + beta * c0
    got = np.array([bufC[5 + r * 2 * S:5 + r * 2 * S + S] for r in range(R)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    untouched = np.ones(200, bool)
    for r in range(R):
        untouched[5 + r * 2 * S:5 + r * 2 * S + S] = False
    assert np.array_equal(bufC[untouched], before[untouched])          # nothing outside C is written


def test_batched_pair_and_shape_checks():
    rng = np.random.default_rng(1)
    N, H, L = 6, 5, 3
    h = rng.standard_normal(N * H).astype(np.float32)
    W = rng.standard_normal(2 * H * L + 4).astype(np.float32)      # W_mu at 0, W_lv at H L + 4 (a bias between)
    heads = np.zeros(N * 2 * L, np.float32)
    hm = cg.Mat(h, 0, N, H)
    Wmu, Wlv = cg.Mat(W, 0, H, L), cg.Mat(W, H * L + 4, H, L)
    Cm, Cl = cg.Mat(heads, 0, N, L, 2 * L), cg.Mat(heads, L, N, L, 2 * L)
    dev = StubDevice()
    cg._mm_pair(dev, [Cm, Cl], [hm, hm], [Wmu, Wlv])()
    x = h.reshape(N, H)
    got = heads.reshape(N, 2 * L)
    np.testing.assert_allclose(got[:, :L], x @ W[:H * L].reshape(H, L), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[:, L:], x @ W[H * L + 4:2 * H * L + 4].reshape(H, L), rtol=1e-5, atol=1e-6)
    assert dev.calls["gemm_batched"] == 1
    with pytest.raises(ValueError, match="gemm shapes"):
        cg._mm(dev, Cm, hm, Wmu, ta=True)
    with pytest.raises(ValueError, match="overruns"):
        cg.Mat(heads, L, N, L + 1, 2 * L + 1)


def test_column_major_reference_refuses_what_cublas_refuses():
    dev = StubDevice()
    buf = np.zeros(10, np.float32)
    with pytest.raises(ValueError, match="leading dimension"):
        dev.gemm(cb.OP_N, cb.OP_N, 3, 2, 2, 1.0, buf, 2, buf, 2, 0.0, buf, 3)
    with pytest.raises(IndexError, match="past its buffer"):
        dev.gemm(cb.OP_N, cb.OP_N, 3, 4, 2, 1.0, buf, 3, buf, 2, 0.0, buf, 3)


# ------------------------------------------------------------------------------------------ the step program
@pytest.mark.parametrize("name", list(CONFIGS))
def test_graph_program_matches_eager_fasttrainer_over_epochs(name):
    """Several epochs through the captured step (NumPy twins of its kernels) against eager FastTrainer on the
    same rows, noise and eps: the per-step losses and the parameters agree to float32 rounding; the counter
    walks the epoch; the KL warm-up's betas and Adam's bias corrections follow the step."""
    rng = np.random.default_rng(3)
    mg, tg = make(name)
    me, te = make(name)
    D, L = mg.config.x_dim, mg.config.z_dim
    X = (rng.random((90, D)) if mg.config.likelihood == "bernoulli" else rng.normal(size=(90, D))).astype(np.float32)
    n, N = 70, 16                                                 # 4 graph steps and a short batch of 6
    dynamic = mg.config.likelihood == "bernoulli"
    dev = StubDevice()
    runner = cg.GraphRunner.create(tg, N, n, dynamic, device=dev, log=lambda m: None)
    assert runner is not None and runner.steps == 4 and runner.short == 6
    runner.prepare(X)
    assert runner.check["counter_after_one_step"] == 1
    assert runner.check["param_max_diff_graph_vs_kernels"] == 0.0
    for ep in range(3):
        order, u, eps = epoch_data(rng, n, 90, D, L)
        betas = [min(1.0, (5 * ep + k) / 8) for k in range(5)]
        losses = np.asarray(runner.run_epoch(X, order, u if dynamic else None, eps, betas))
        assert losses.shape == (5, 3)
        assert int(runner.data.ctr[0]) == 4                       # the counter walked the graph's steps
        for k, lo in enumerate(range(0, n, N)):
            xb = X[order[lo:lo + N]]
            if dynamic:
                xb = (u[lo:lo + N] < xb).astype(np.float32)
            loss = float(te.step(xb, eps[lo:lo + N], beta=betas[k]))
            assert losses[k, 0] == pytest.approx(loss, rel=2e-6), (ep, k)
            assert losses[k, 1] == pytest.approx(float(te.parts["recon"]), rel=2e-6)
            assert losses[k, 2] == pytest.approx(float(te.parts["kl"]), rel=2e-5, abs=1e-7)
        assert tg.opt.t == te.opt.t == 5 * (ep + 1)
        assert rel_error(mg.flat, me.flat) < 1e-5
        np.testing.assert_allclose(tg.opt.state[0]["m"], te.opt.state[0]["m"], rtol=1e-3, atol=1e-7)
    assert dev.calls["capture"] == 1 and dev.calls["replay"] == 1 + 3 * 4     # the check's replay, then 4 a epoch


def test_default_model_step_is_21_kernels():
    model = minivae.VAE(minivae.VAEConfig(), rng=0)
    tr = FastTrainer(model, minivae.Adam(), fused=False)
    runner = cg.GraphRunner(tr, 128, 256, True, device=StubDevice(), log=lambda m: None)
    runner._ensure_state()
    d = cg.EpochData(np, np.zeros((256, 784), np.float32), 256, 128, 784, 20, 2, True)
    prog = cg.Program(runner.dev, tr, 128, d)
    assert prog.n_kernels == 21                       # 12 products (one batched pair each way) + 9 kernels


def test_state_moved_means_capture_again(monkeypatch):
    rng = np.random.default_rng(0)
    mg, tg = make("relu")
    X = rng.random((40, 20)).astype(np.float32)
    logs = []
    runner = cg.GraphRunner.create(tg, 8, 32, True, device=StubDevice(), log=logs.append)
    order, u, eps = epoch_data(rng, 32, 40, 20, 3)
    runner.run_epoch(X, order, u, eps)
    assert runner.dev.calls["capture"] == 1 and "CUDA graph: on" in logs[0]
    tg.opt.state[0]["m"] = tg.opt.state[0]["m"].copy()            # e.g. a resumed optimizer state
    runner.run_epoch(X, order, u, eps)
    assert runner.dev.calls["capture"] == 2 and any("capturing again" in m for m in logs)


# ------------------------------------------------------------------------------------------ falling back
@pytest.mark.parametrize("cfg, opt, reason", [
    (dict(dtype="float64"), {}, "float32 only"),
    (dict(activation="softplus"), {}, "not 'softplus'"),
    (dict(likelihood="gaussian", obs_var=0.5), dict(weight_decay=1e-4), "without weight decay"),
])
def test_what_the_graph_does_not_cover_is_logged(cfg, opt, reason):
    model = minivae.VAE(minivae.VAEConfig(x_dim=8, hidden=(5,), z_dim=2, **cfg), rng=0)
    tr = FastTrainer(model, minivae.Adam(**opt), fused=False)
    logs = []
    assert cg.GraphRunner.create(tr, 4, 16, True, device=StubDevice(), log=logs.append) is None
    assert len(logs) == 1 and reason in logs[0] and logs[0].startswith("CUDA graph: off (")


def test_other_optimizers_and_numpy_models_are_not_covered(monkeypatch):
    model = minivae.VAE(minivae.VAEConfig(x_dim=8, hidden=(5,), z_dim=2), rng=0)
    monkeypatch.setenv("MINIVAE_CUDA_GRAPH", "0")
    assert cg.why_not(FastTrainer(model, minivae.Adam(), fused=False), StubDevice()) == "MINIVAE_CUDA_GRAPH=0"
    monkeypatch.delenv("MINIVAE_CUDA_GRAPH")
    assert "optimizer is SGD" in cg.why_not(FastTrainer(model, minivae.SGD(lr=0.1), fused=False), StubDevice())
    assert "on numpy" in cg.why_not(FastTrainer(model, minivae.Adam(), fused=False))
    with pytest.raises(cg.GraphUnavailable, match="no full batch"):
        cg.GraphRunner(FastTrainer(model, minivae.Adam(), fused=False), 32, 20, True, device=StubDevice())


def _broken(key, fn):
    twins = dict(TWINS)
    twins[key] = fn
    return StubDevice(twins=twins)


def test_a_wrong_kernel_fails_the_self_check_and_leaves_the_state_alone():
    rng = np.random.default_rng(0)
    mg, tg = make("relu")
    X = rng.random((40, 20)).astype(np.float32)
    p0 = mg.flat.copy()

    def adam_without_bias_correction(p, g, m, v, cur, n, b1, c1, b2, c2):
        TWINS["adam"](p, g, m, v, np.array([1e-2, 1e-8], np.float32), n, b1, c1, b2, c2)

    def relu_bwd_without_mask(h, d, db, N, H, act):
        db[:H] = d[:N * H].reshape(N, H).sum(axis=0)

    for key, fn, what in (("adam", adam_without_bias_correction, "update differs"),
                          ("act_bwd_db", relu_bwd_without_mask, "gradients rel. error")):
        runner = cg.GraphRunner.create(tg, 8, 32, True, device=_broken(key, fn), log=lambda m: None)
        with pytest.raises(cg.GraphUnavailable, match=f"self-check failed: .*{what}"):
            runner.prepare(X)
        assert np.array_equal(mg.flat, p0) and tg.opt.t == 0
        assert not tg.opt.state[0]["m"].any()


def test_any_error_while_setting_up_is_a_reason_and_leaves_the_state_alone(monkeypatch):
    rng = np.random.default_rng(0)
    mg, tg = make("relu")
    X = rng.random((40, 20)).astype(np.float32)
    p0 = mg.flat.copy()

    def crashing_gather(*args):
        TWINS["gather"](*args)
        raise ZeroDivisionError("planted")
    runner = cg.GraphRunner.create(tg, 8, 32, True, device=_broken("gather", crashing_gather), log=lambda m: None)
    with pytest.raises(cg.GraphUnavailable, match=r"kernels failed when run eagerly \(ZeroDivisionError: planted"):
        runner.prepare(X)
    assert np.array_equal(mg.flat, p0) and tg.opt.t == 0

    def planted(*args, **kw):
        raise ValueError("planted")
    monkeypatch.setattr(cg.Program, "__init__", planted)
    with pytest.raises(cg.GraphUnavailable, match=r"setting the graph up failed \(ValueError: planted; at test_cuda"):
        runner.prepare(X)
    assert np.array_equal(mg.flat, p0) and tg.opt.t == 0


def test_a_capture_that_fails_is_reported_with_its_reason():
    rng = np.random.default_rng(0)
    mg, tg = make("relu")
    X = rng.random((40, 20)).astype(np.float32)

    class NoCapture(StubDevice):
        def capture(self, fn):
            raise NotImplementedError("calling cuBLAS API during stream capture is currently unsupported")

    runner = cg.GraphRunner.create(tg, 8, 32, True, device=NoCapture(), log=lambda m: None)
    with pytest.raises(cg.GraphUnavailable, match="capturing or replaying the step failed .*NotImplementedError"):
        runner.prepare(X)


def test_adam_schedule_is_fasttrainers_constants():
    from minivae.fast.adam import adam_begin_step
    model = minivae.VAE(minivae.VAEConfig(x_dim=8, hidden=(5,), z_dim=2), rng=0)
    opt = minivae.Adam(lr=3e-3, eps=1e-4)
    opt.t = 7
    table = cg.adam_schedule(opt, 3, [0.25, 0.5, 1.0], 20)
    grads = model.new_grads()
    for s in range(3):
        *_, consts = adam_begin_step(opt, model.params, grads)    # t -> 8, 9, 10
        assert table[s, 2] == consts[4] and table[s, 3] == consts[5]
        assert table[s, 1] == np.float32([0.25, 0.5, 1.0][s] / 20) and table[s, 0] == [0.25, 0.5, 1.0][s]


# ------------------------------------------------------------------------------------------ in `train`
def _train(tmp, **kw):
    from minivae.train import TrainSettings, train
    base = dict(n_train=256, n_test=128, epochs=2, batch_size=48, hidden=(32,), latent=2, figures=False, warmup=1)
    base.update(kw)
    lines = []
    hist = train(TrainSettings.from_recipe("default", **base), tmp, progress=False, log=lines.append)
    return hist, lines


@pytest.mark.parametrize("kw", [{}, dict(activation="tanh", binarize="static"),
                                dict(likelihood="gaussian", binarize="none", obs_var=0.2)],
                         ids=["relu-dynamic-warmup", "tanh-static", "gaussian"])
def test_train_on_cupy_runs_the_graph_with_the_numpy_runs_numbers(tmp_path, monkeypatch, kw):
    """`train --backend cupy` on the stand-in CuPy, with the graph's CPU stand-in device: the graph trains every
    full batch (the short last one eagerly), draws the same noise as the eager loop, and gives the NumPy run's
    history and parameters to float32 rounding."""
    from standin_cupy import installed

    from minivae.checkpoint import load_checkpoint
    host, _ = _train(tmp_path / "host", **kw)
    made = []

    def device():
        made.append(StubDevice(xp=cp))
        return made[-1]

    with installed(monkeypatch) as cp:
        monkeypatch.setattr(cg, "DEVICE", device)
        dev, lines = _train(tmp_path / "dev", backend="cupy", **kw)
    assert any(m.startswith("CUDA graph: on, one captured step for batches of 48 rows") for m in lines), lines
    assert made and made[0].calls["replay"] == 1 + 2 * 5              # the check's, then 5 full batches an epoch
    for a, b in zip(host, dev):
        for k in a:
            if k != "time_s":
                assert b[k] == pytest.approx(a[k], rel=2e-5, abs=1e-6), k
    pa, pb = load_checkpoint(tmp_path / "host"), load_checkpoint(tmp_path / "dev")
    assert all(rel_error(pa.params[k], pb.params[k]) < 1e-4 for k in pa.params)
    assert pa.opt_state.keys() == pb.opt_state.keys()
    assert pa.rng == pb.rng                                             # the same draws: the same RNG states after


def test_train_on_cupy_logs_why_the_graph_is_off(tmp_path, monkeypatch):
    from standin_cupy import installed
    with installed(monkeypatch) as cp:
        monkeypatch.setattr(cg, "DEVICE", lambda: StubDevice(xp=cp))
        _, lines = _train(tmp_path / "r", backend="cupy", activation="softplus", epochs=1)
    assert any(m.startswith("CUDA graph: off (") and "softplus" in m for m in lines), lines


def test_train_on_cupy_stops_at_the_first_bad_step_of_a_graph_epoch(tmp_path, monkeypatch):
    from standin_cupy import installed

    from minivae.checkpoint import load_checkpoint
    from minivae.train import TrainingDiverged
    twins = dict(TWINS)
    calls = {"n": 0}

    def poisoned(*args):                      # from the 3rd graph step of epoch 2 on, the loss record is NaN
        TWINS["latent_bwd"](*args)            # (writes losses[s] and advances the counter to s + 1)
        calls["n"] += 1
        if calls["n"] >= 2 + 5 + 3:           # the self-check's 2 runs, epoch 1's 5 steps, then step 3
            args[12][3 * (int(args[4][0]) - 1)] = np.nan
    twins["latent_bwd"] = poisoned
    with installed(monkeypatch) as cp:
        monkeypatch.setattr(cg, "DEVICE", lambda: StubDevice(xp=cp, twins=twins))
        with pytest.raises(TrainingDiverged, match=r"loss became nan at epoch 2, step 3;"):
            _train(tmp_path / "r", backend="cupy", epochs=2)
    assert load_checkpoint(tmp_path / "r").epoch == 1


# ------------------------------------------------------------------------------------------ on a GPU
GPU_CONFIGS = {
    "standard-128": (dict(), 128, 1000),                                        # 7 graph steps + 104 eagerly
    "burda-shape-tanh-20": (dict(hidden=(200, 200), z_dim=50, activation="tanh"), 20, 400),
    "relu-deep-gaussian-64": (dict(hidden=(300, 100), z_dim=8, likelihood="gaussian", obs_var=0.3), 64, 640),
    "no-hidden-32": (dict(hidden=(), z_dim=5), 32, 100),
}


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(GPU_CONFIGS))
def test_cuda_graph_matches_eager_fasttrainer_on_cupy(name):
    """The captured graph (real cuBLAS through ctypes, the raw kernels) against eager FastTrainer on CuPy, over
    three epochs on the same rows, noise and eps: per-step losses and parameters to float32 tolerance."""
    import cupy as cp
    cfgkw, N, n = GPU_CONFIGS[name]
    cfg = minivae.VAEConfig(**cfgkw)
    mg = minivae.VAE(cfg, rng=0, backend="cupy")
    me = minivae.VAE(cfg, rng=0, backend="cupy")
    tg, te = FastTrainer(mg, minivae.Adam(lr=1e-3)), FastTrainer(me, minivae.Adam(lr=1e-3))
    rng = np.random.default_rng(0)
    X = (rng.random((n + 50, cfg.x_dim)) if cfg.likelihood == "bernoulli"
         else rng.normal(size=(n + 50, cfg.x_dim))).astype(np.float32)
    Xd = cp.asarray(X)
    dynamic = cfg.likelihood == "bernoulli"
    logs = []
    runner = cg.GraphRunner.create(tg, N, n, dynamic, log=logs.append)
    assert runner is not None, logs
    runner.prepare(Xd)
    assert "CUDA graph: on" in logs[-1], logs
    chk = runner.check
    assert chk["grad_rel_error_kernels_vs_eager"] < 1e-4 and chk["grad_rel_error_graph_vs_kernels"] < 1e-6, chk
    steps = -(-n // N)
    for ep in range(3):
        order, u, eps = epoch_data(rng, n, n + 50, cfg.x_dim, cfg.z_dim)
        betas = [min(1.0, (steps * ep + k + 1) / (2 * steps)) for k in range(steps)]
        losses = cp.asnumpy(runner.run_epoch(Xd, order, u if dynamic else None, eps, betas))
        ref = []
        for k, lo in enumerate(range(0, n, N)):
            xb = Xd[cp.asarray(order[lo:lo + N])]
            if dynamic:
                xb = (cp.asarray(u[lo:lo + N]) < xb).astype(cp.float32)
            ref.append(float(te.step(xb, cp.asarray(eps[lo:lo + N]), beta=betas[k])))
        np.testing.assert_allclose(losses[:, 0], ref, rtol=1e-4)
        assert tg.opt.t == te.opt.t
        # Adam moves each parameter by ~lr a step; float32 differences in g near 0 can flip a step's sign
        diff = np.abs(cp.asnumpy(mg.flat) - cp.asnumpy(me.flat))
        assert diff.max() <= 2.5e-3 * tg.opt.t and np.median(diff) < 1e-5, (diff.max(), np.median(diff))
    runner.close()


@pytest.mark.gpu
def test_cuda_graph_train_on_cupy_matches_numpy(tmp_path):
    from minivae.checkpoint import load_checkpoint
    host, _ = _train(tmp_path / "host", n_train=2000, epochs=2, batch_size=128, hidden=(64,), latent=4)
    dev, lines = _train(tmp_path / "dev", n_train=2000, epochs=2, batch_size=128, hidden=(64,), latent=4,
                        backend="cupy")
    assert any(m.startswith("CUDA graph: on") for m in lines), lines
    for a, b in zip(host, dev):
        for k in ("train_neg_elbo", "test_neg_elbo", "test_kl"):
            assert b[k] == pytest.approx(a[k], rel=2e-3), k
    pa, pb = load_checkpoint(tmp_path / "host"), load_checkpoint(tmp_path / "dev")
    assert pa.rng == pb.rng
