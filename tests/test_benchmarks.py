"""benchmarks/epoch.py's conv mode runs end to end on a tiny setting (2 batches), with and without PyTorch.

These check that the script runs and reports what it documents; they time nothing (the benchmark measures
speed, tests never do).
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import minivae
from minivae.backend import cupy_available

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from gemm_bound import conv_step_products, step_flops  # noqa: E402

HAS_TORCH = importlib.util.find_spec("torch") is not None


def run_bench(tmp_path, *args):
    out = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "epoch.py"), "--n-batches", "2", "--epochs", "1",
                        "--warmup", "0", "--threads", "1", "--json", str(out), *args],
                       capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)
    return r, out


def conv_macs_per_image(arch):
    """Multiply-adds of one forward pass, counted by hand from the architectures in minivae.networks."""
    dense = 3136 * 256 + 256 * 40 + 20 * 256 + 256 * 3136
    if arch == "conv":   # conv 1->32 k4 at 14x14, 32->64 k4 at 7x7; deconv 64->32 k4 from 7x7, 32->1 k4 from 14x14
        convs = [32 * 16 * 196, 64 * 512 * 49, 64 * 512 * 49, 32 * 16 * 196]
    else:                # k3 convs at 28x28 (1->32), 14x14 (32->64), 14x14 (64->32), 28x28 (32->1)
        convs = [32 * 9 * 784, 64 * 288 * 196, 32 * 576 * 196, 1 * 288 * 784]
    return dense + sum(convs), convs[0]


@pytest.mark.parametrize("arch", ["conv", "conv-pool"])
def test_conv_bound_counts_every_product(arch):
    """Forward, dW for every layer and dx for all but the input layer: 3x the forward, less one dx."""
    macs, first = conv_macs_per_image(arch)
    N = 7
    cfg = minivae.VAEConfig(arch=arch)
    assert step_flops(cfg, N) == 2 * N * (3 * macs - first)
    assert len(conv_step_products(cfg, N)) == 3 * 8 - 1       # 8 layers (heads fused), no dx for the first


@pytest.mark.parametrize("arch", ["conv", "conv-pool"])
def test_conv_benchmark_runs_without_torch(tmp_path, arch):
    r, out = run_bench(tmp_path, "--arch", arch, "--no-torch")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "PyTorch skipped" in r.stdout
    d = json.loads(out.read_text())
    assert d["arch"] == arch and d["torch_available"] is False
    run = d["runs"][0]
    assert run["arch"] == arch and run["batch_size"] == 128 and run["n_steps"] == 2 and run["n_examples"] == 256
    assert run["threads"] == 1 and len(d["runs"]) == 1
    assert set(run["median_s"]) == {"minivae", "bound"} and "ratio_minivae_over_torch" not in run
    assert run["ratio_minivae_over_bound"] == pytest.approx(run["median_s"]["minivae"] / run["median_s"]["bound"])
    assert run["gflop_per_epoch"] == pytest.approx(2 * step_flops(minivae.VAEConfig(arch=arch), 128) / 1e9)
    for k, v in run["median_s"].items():
        assert run["median_step_s"][k] == pytest.approx(v / 2)
        assert run["extrapolated_epoch_s"][k] == pytest.approx(v * 60000 / 256)
    assert run["full_epoch_steps"] == 469
    loss = run["mean_loss_per_round"]["minivae"][0]
    assert np.isfinite(loss) and 100 < loss < 1000          # nats per image of an untrained model's first steps
    assert run["minivae_array_bytes"] >= 3 * 4 * minivae.VAE(minivae.VAEConfig(arch=arch)).num_params()


@pytest.mark.skipif(not HAS_TORCH, reason="PyTorch is not installed (optional: the benchmark's torch column)")
def test_conv_benchmark_against_torch(tmp_path):
    """With PyTorch: the same model, init, batches and eps, so the two first-round losses agree."""
    r, out = run_bench(tmp_path, "--arch", "conv")
    assert r.returncode == 0, r.stderr[-2000:]
    run = json.loads(out.read_text())["runs"][0]
    assert set(run["median_s"]) == {"minivae", "torch", "bound"}
    assert run["ratio_minivae_over_torch"] == pytest.approx(run["median_s"]["minivae"] / run["median_s"]["torch"])
    losses = run["mean_loss_per_round"]
    assert losses["minivae"][0] == pytest.approx(losses["torch"][0], rel=1e-4)


@pytest.mark.skipif(cupy_available(), reason="a usable GPU is present: this checks the error without one")
def test_conv_benchmark_cupy_without_gpu_is_a_clear_error(tmp_path):
    r, out = run_bench(tmp_path, "--arch", "conv", "--backend", "cupy", "--no-torch")
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and "cupy" in r.stderr.lower() and "Traceback" not in r.stderr
    assert not out.exists()


def test_dense_only_options_are_refused_for_conv(tmp_path):
    r, _ = run_bench(tmp_path, "--arch", "conv", "--reference", "--no-torch")
    assert r.returncode == 2 and "--reference" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.skipif(not HAS_TORCH, reason="PyTorch is not installed (optional: the benchmark's torch column)")
@pytest.mark.parametrize("where", ["own", "same"])
def test_dense_benchmark_with_torch_in_its_own_process_or_not(tmp_path, where):
    """PyTorch runs in a child process by default (--torch-in-process: in this one); either way it trains the
    same model on the same batches and eps, so its first-round loss is minivae's."""
    extra = ["--torch-in-process"] if where == "same" else []
    r, out = run_bench(tmp_path, "--one-thread", "off", *extra)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["torch_process"] == where and isinstance(report["machine"]["torch"], str)
    losses = report["runs"][0]["mean_loss_per_round"]
    assert losses["minivae"][0] == pytest.approx(losses["torch"][0], rel=1e-4)
    own = report["runs"][0]["own_process"]
    if where == "own":                 # the child timed its own blocks; the round trip's rest is reported apart
        rounds = own["torch"]
        assert len(rounds) == len(report["runs"][0]["times_s"]["torch"])
        assert all(r["pipe_and_wakeup_s"] >= 0 and r["child_cpu_s"] > 0 for r in rounds)
    else:
        assert own == {}


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="JAX is not installed (optional: --jax columns)")
def test_jax_columns_train_the_same_model(tmp_path):
    """--jax: JAX's jitted step and its whole-epoch lax.scan start from minivae's initial values and minimise the
    same loss (their own noise draws: the first round's mean loss within 1%); both give the same numbers."""
    r, out = run_bench(tmp_path, "--one-thread", "off", "--no-torch", "--jax")
    assert r.returncode == 0, r.stderr[-2000:]
    run = json.loads(out.read_text())["runs"][0]
    losses = run["mean_loss_per_round"]
    assert losses["jax_jit"] == pytest.approx(losses["jax_scan"], rel=1e-5)
    assert losses["jax_scan"][0] == pytest.approx(losses["minivae"][0], rel=1e-2)
    assert run["ratio_minivae_over_jax_scan"] == pytest.approx(run["median_s"]["minivae"] / run["median_s"]["jax_scan"])


@pytest.mark.skipif(importlib.util.find_spec("numba") is None, reason="numba is not installed (the fused kernels)")
def test_profile_iw_accounts_for_a_call(capsys, monkeypatch):
    """benchmarks/profile_iw.py's accounting, checked with a fake clock that moves 1 ms at every read (a real clock
    would make the test depend on the machine's load): every part is timed by two consecutive reads (1 ms), the
    whole call runs from the call's first read to its last, and the parts plus "unaccounted" are the whole call."""
    import itertools
    spec = importlib.util.spec_from_file_location("profile_iw", ROOT / "benchmarks" / "profile_iw.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    import numba
    for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_THREAD_TIMEOUT"):
        monkeypatch.setenv(v, os.environ.get(v, "1"))       # the script sets them; put them back afterwards
    threads = numba.get_num_threads()
    ticks = itertools.count()
    try:
        mod.main(["--calls", "1", "--threads", "1"], clock=lambda: next(ticks) * 1e-3)
    finally:
        numba.set_num_threads(threads)
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): float(line.split("|")[2]) for line in out.splitlines()
            if line.startswith("| ") and not line.startswith("| part")}
    parts = {k: v for k, v in rows.items() if not k.startswith("(") and k not in ("whole call", "unaccounted")}
    assert len(parts) >= 8 and set(parts.values()) == {1.0}            # two consecutive reads each: 1 ms
    assert rows["(the matmuls alone: the bound)"] == 1.0
    assert rows["whole call"] == 2 * len(parts)                       # first read to last, the eps draw included
    assert sum(parts.values()) + rows["unaccounted"] == rows["whole call"]


@pytest.mark.skipif(cupy_available(), reason="checks the session script's failure handling, which needs no GPU")
def test_gpu_session_survives_a_failing_part_and_writes_one_json_and_one_log(tmp_path):
    """benchmarks/gpu_session.sh without a GPU: the env part runs, the CuPy training part fails with its one-line
    reason; both are in the JSON (rewritten after each part) and the log; the exit status counts the failure."""
    env = dict(os.environ, OUT=str(tmp_path / "out"), GPU_SESSION_PARTS="env,train_default", PYTHON=sys.executable)
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_session.sh")], capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gpu_session.json", "gpu_session.log"]
    rep = json.loads((tmp_path / "out" / "gpu_session.json").read_text())
    parts = {p["name"]: p for p in rep["parts"]}
    assert list(parts) == ["env", "train_default"] and rep["failed_parts"] == 1
    assert parts["env"]["status"] == "ok" and rep["results"]["env"]["numpy"] == np.__version__
    assert parts["train_default"]["status"] == "failed" and "backend 'cupy'" in parts["train_default"]["output_tail"]
    log = (tmp_path / "out" / "gpu_session.log").read_text()
    assert "===== train_default: failed" in log and "backend 'cupy' was requested" in log


@pytest.mark.skipif(not HAS_TORCH, reason="PyTorch is not installed (optional: the benchmark's torch column)")
def test_torch_alone_check_times_the_same_work_both_ways(tmp_path):
    """benchmarks/torch_alone.py: the benchmark's PyTorch process and a process of its own train the same model
    on the same batches (the same mean loss), and it reports both times and their ratio."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "torch_alone.py"), "--threads", "1",
                        "--n-batches", "2", "--rounds", "1"], capture_output=True, text=True, timeout=300, env=env,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("round 0:"))
    losses = [float(v) for v in __import__("re").findall(r"loss ([0-9.]+)\)", line)]
    assert len(losses) == 2 and losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert "median benchmark/alone: wall" in r.stdout and "load average" in r.stdout
