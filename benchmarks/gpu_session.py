"""Everything GPU-side in one run, for a lent GPU machine: one JSON and one log.  Run through gpu_session.sh.

Each part is a separate process with its own time limit (killed with its process group when over), and the
whole run keeps inside a budget (``GPU_SESSION_BUDGET``, 510 s): a part that would start with less than
``MIN_PART_S`` left is skipped, and a part never gets more than what is left.  A failing part does not stop the
others.  After every part the JSON is rewritten (a run cut short still leaves its results), and the log holds
every part's full output (tracebacks included).  The most important parts come first.

    OUT=gpu_out bash benchmarks/gpu_session.sh        # -> $OUT/gpu_session.json, $OUT/gpu_session.log

``GPU_SESSION_PARTS=env,train_default`` runs only those parts (for a check of this script on any machine).
The exit status is the number of parts that failed or timed out.
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
MIN_PART_S = 15

ENV_SNIPPET = r"""
import json, platform, sys
info = {"python": sys.version.split()[0], "platform": platform.platform()}
def grab(name, fn):
    try:
        info[name] = fn()
    except Exception as exc:
        info[name] = f"unavailable: {type(exc).__name__}: {exc}"
import numpy; info["numpy"] = numpy.__version__
def cupy_info():
    import cupy as cp
    rt = cp.cuda.runtime
    props = rt.getDeviceProperties(cp.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    return {"cupy": cp.__version__, "cuda_runtime": rt.runtimeGetVersion(), "cuda_driver": rt.driverGetVersion(),
            "device": name, "compute_capability": f"{props['major']}.{props['minor']}",
            "memory_gib": round(props["totalGlobalMem"] / 2**30, 1), "sms": props["multiProcessorCount"],
            "nvrtc": cp.cuda.nvrtc.getVersion(), "begin_capture": hasattr(cp.cuda.Stream, "begin_capture")}
grab("cupy", cupy_info)
def cublas_info():
    from minivae.fast import cublas as cb
    lib = cb.load()
    return {"path": lib.path, "version": lib.version(), "missing": list(lib.missing)}
grab("libcublas_ctypes", cublas_info)
def torch_info():
    import torch
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "available": torch.cuda.is_available(),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
grab("torch", torch_info)
def jax_info():
    import jax
    return {"jax": jax.__version__, "devices": [str(d) for d in jax.devices()]}
grab("jax", jax_info)
grab("tqdm", lambda: __import__("tqdm").__version__)
grab("threadpoolctl", lambda: __import__("threadpoolctl").__version__)
print("ENVJSON " + json.dumps(info))
"""


def parts(tmp):
    """(name, limit_s, argv, extra_env) in order of importance."""
    py = [PY]
    train = py + ["-m", "minivae", "train", "--backend", "cupy", "--no-figures"]
    return [
        ("env", 40, py + ["-c", ENV_SNIPPET], {}),
        ("pytest_graph", 75, py + ["-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "--junitxml",
                                   str(tmp / "pytest_graph.xml"), "tests/test_cuda_graph.py",
                                   "tests/test_fast.py::test_cupy_fast_path_matches_numpy_reference"], {}),
        ("train_default", 50, train + ["--epochs", "10", "--out", str(tmp / "default")], {}),
        # the same command again, the kernels now in CuPy's cache: the whole command's wall time (target < 15 s)
        ("train_default_cached", 35, train + ["--epochs", "10", "--out", str(tmp / "default2")], {}),
        ("bench_dense", 110, py + ["benchmarks/epoch.py", "--backend", "cupy", "--batch-size", "128", "1024",
                                   "--epochs", "3", "--warmup", "1", "--json", str(tmp / "bench_dense.json")], {}),
        ("eval_iw5000", 55, py + ["-m", "minivae", "eval", "--checkpoint", str(tmp / "default"), "--backend", "cupy",
                                  "--iw-k", "5000", "--json", str(tmp / "eval_iw5000.json")], {}),
        ("burda_short", 45, train + ["--recipe", "burda2015-short", "--epochs", "3", "--out", str(tmp / "burda")], {}),
        ("burda_short_eager", 30, train + ["--recipe", "burda2015-short", "--epochs", "1",
                                           "--out", str(tmp / "burda_eager")], {"MINIVAE_CUDA_GRAPH": "0"}),
        ("bench_conv", 60, py + ["benchmarks/epoch.py", "--arch", "conv", "--backend", "cupy", "--batch-size", "128",
                                 "1024", "--n-batches", "60", "--epochs", "2", "--warmup", "1",
                                 "--json", str(tmp / "bench_conv.json")], {}),
        ("train_conv", 80, train + ["--recipe", "conv", "--epochs", "10", "--out", str(tmp / "conv")], {}),
        ("pytest_gpu_rest", 70, py + ["-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider",
                                      "--junitxml", str(tmp / "pytest_gpu_rest.xml"), "tests",
                                      "--ignore=tests/test_cuda_graph.py"], {}),
        ("pytest_nvrtc", 30, py + ["-m", "pytest", "-m", "nvrtc", "-q", "-rs", "-p", "no:cacheprovider",
                                   "--junitxml", str(tmp / "pytest_nvrtc.xml"), "tests/test_nvrtc.py"], {}),
    ]


def run_part(argv, limit, env, log_path):
    """Run argv in its own process group, its output appended to the log as it comes (a run killed from outside
    keeps it); (rc, seconds, output, timed_out)."""
    t0 = time.perf_counter()
    start = os.path.getsize(log_path)
    with open(log_path, "a") as sink:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)
        timed_out = False
        try:
            proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            timed_out = True
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=5)
                    break
                except subprocess.TimeoutExpired:
                    continue
    with open(log_path, "rb") as f:
        f.seek(start)
        out = f.read().decode(errors="replace")
    return proc.returncode, time.perf_counter() - t0, out, timed_out


def junit(path):
    """Counts and the failures (test, message) of a pytest junit XML file."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as exc:
        return {"error": f"no junit XML ({type(exc).__name__})"}
    res = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "failed": []}
    for case in root.iter("testcase"):
        res["tests"] += 1
        for kind in ("failure", "error", "skipped"):
            el = case.find(kind)
            if el is not None:
                res[{"failure": "failures", "error": "errors", "skipped": "skipped"}[kind]] += 1
                if kind != "skipped":
                    res["failed"].append({"test": f"{case.get('classname')}::{case.get('name')}",
                                          "message": (el.get("message") or "")[:500]})
    return res


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def train_summary(run_dir, out):
    hist, res = read_json(Path(run_dir) / "history.json"), read_json(Path(run_dir) / "results.json")
    s = {"graph": [line for line in out.splitlines() if line.startswith("CUDA graph:")]}
    if hist:
        s["epoch_s"] = [round(h["time_s"], 3) for h in hist]
        s["test_neg_elbo_per_epoch"] = [round(h["test_neg_elbo"], 3) for h in hist]
        s["median_epoch_s"] = sorted(h["time_s"] for h in hist)[len(hist) // 2]
    if res:
        s["test"] = res.get("test")
    return s


def bench_summary(path):
    rep = read_json(path)
    if not rep:
        return None
    runs = []
    for r in rep.get("runs", []):
        runs.append({"batch_size": r["batch_size"], "median_s": r["median_s"],
                     "ratios": {k: round(v, 3) for k, v in r.items() if k.startswith("ratio_") and v is not None},
                     "first_round_loss": {k: v[0] for k, v in r.get("mean_loss_per_round", {}).items()},
                     "minivae_graph": r.get("minivae_graph")})
    return {"runs": runs, "errors": rep.get("errors", {}), "notes": rep.get("notes", []), "machine": rep.get("machine")}


def summarize(name, tmp, out):
    if name == "env":
        for line in out.splitlines():
            if line.startswith("ENVJSON "):
                return json.loads(line[8:])
        return None
    if name.startswith("pytest"):
        return junit(tmp / f"{name}.xml") | {"last_line": (out.strip().splitlines() or [""])[-1]}
    if name == "train_default":
        return train_summary(tmp / "default", out)
    if name == "train_default_cached":
        return train_summary(tmp / "default2", out)
    if name == "train_conv":
        return train_summary(tmp / "conv", out)
    if name in ("burda_short", "burda_short_eager"):
        return train_summary(tmp / ("burda" if name == "burda_short" else "burda_eager"), out)
    if name in ("bench_dense", "bench_conv"):
        return bench_summary(tmp / f"{name}.json")
    if name == "eval_iw5000":
        return read_json(tmp / "eval_iw5000.json")
    return None


def headlines(results):
    """One line per key figure, for a quick read."""
    lines = []
    b = results.get("bench_dense") or {}
    for r in b.get("runs", []):
        med, rat = r["median_s"], r["ratios"]
        got = "  ".join(f"{k} {v:.4f}s" for k, v in med.items())
        lines.append(f"dense batch {r['batch_size']}: {got}")
        keys = [k for k in rat if k.startswith("ratio_minivae_graph_over_") or k == "ratio_minivae_over_torch"]
        lines.append(f"dense batch {r['batch_size']} ratios: " + "  ".join(f"{k[6:]} {rat[k]:.2f}" for k in keys))
    for name in ("train_default", "train_default_cached", "train_conv", "burda_short", "burda_short_eager"):
        t = results.get(name) or {}
        if t.get("test"):
            lines.append(f"{name}: test -ELBO {t['test'].get('neg_elbo'):.3f}, median epoch {t.get('median_epoch_s', 0):.2f} s, "
                         f"graph: {(t.get('graph') or ['(no line)'])[0][:120]}")
    e = results.get("eval_iw5000") or {}
    if e:
        lines.append("eval --iw-k 5000: " + json.dumps({k: e[k] for k in list(e)[:8]})[:300])
    c = results.get("bench_conv") or {}
    for r in c.get("runs", []):
        lines.append(f"conv batch {r['batch_size']}: minivae/torch {r['ratios'].get('ratio_minivae_over_torch')}")
    return lines


def main():
    out_dir = Path(os.environ.get("OUT") or "gpu_out")
    out_dir.mkdir(parents=True, exist_ok=True)
    budget = float(os.environ.get("GPU_SESSION_BUDGET", "510"))
    only = [p for p in os.environ.get("GPU_SESSION_PARTS", "").split(",") if p]
    tmp = Path(tempfile.mkdtemp(prefix="minivae_gpu_"))
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{tmp / 'stubs'}" + (
        os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""), MPLBACKEND="Agg",
        PYTHONUNBUFFERED="1", CUPY_TF32="0")
    notes = []
    if subprocess.run([PY, "-c", "import tqdm"], capture_output=True).returncode != 0:
        # no network on the GPU machine: a stand-in without bars (train and eval only need the class)
        stub = tmp / "stubs" / "tqdm"
        stub.mkdir(parents=True)
        (stub / "__init__.py").write_text(
            "class tqdm:\n    def __init__(self, iterable=None, *a, **k):\n        self.iterable = iterable\n"
            "    def __iter__(self):\n        return iter(self.iterable)\n"
            "    def update(self, n=1):\n        pass\n    def set_postfix(self, *a, **k):\n        pass\n"
            "    def set_description(self, *a, **k):\n        pass\n    def close(self):\n        pass\n"
            "    def __enter__(self):\n        return self\n    def __exit__(self, *a):\n        pass\n")
        notes.append("tqdm missing: a no-op stand-in was put on PYTHONPATH (no progress bars)")
    log_path, json_path = out_dir / "gpu_session.log", out_dir / "gpu_session.json"
    log = open(log_path, "w", buffering=1)
    t_start = time.perf_counter()
    report = {"started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "budget_s": budget,
              "git": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
              or "unknown", "notes": notes, "parts": [], "results": {}}

    def save():
        report["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        try:
            report["headlines"] = headlines(report["results"])
        except Exception as exc:  # noqa: BLE001
            report["headlines"] = [f"(headlines failed: {type(exc).__name__}: {exc}; see results)"]
        tmp_json = json_path.with_suffix(".json.tmp")
        tmp_json.write_text(json.dumps(report, indent=2, default=str))
        os.replace(tmp_json, json_path)

    for line in notes:
        log.write(f"note: {line}\n")
    try:
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        smi = f"nvidia-smi: {exc}"
    log.write(smi + "\n")
    failed = 0
    for name, limit, argv, extra in parts(tmp):
        if only and name not in only:
            continue
        left = budget - (time.perf_counter() - t_start)
        shown = [a if a != ENV_SNIPPET else "<the versions snippet in gpu_session.py>" for a in argv]
        entry = {"name": name, "cmd": " ".join(shlex.quote(a) for a in shown), "limit_s": limit}
        if left < MIN_PART_S:
            entry.update(status="skipped", reason=f"out of time ({left:.0f} s left of the {budget:.0f} s budget)")
            log.write(f"\n===== {name}: SKIPPED, {entry['reason']}\n")
            report["parts"].append(entry)
            save()
            continue
        lim = min(limit, left - 5)
        entry["limit_s"] = round(lim, 1)
        log.write(f"\n===== {name} (limit {lim:.0f} s, {left:.0f} s left): {entry['cmd']}\n")
        log.flush()
        rc, secs, out, timed_out = run_part(argv, lim, dict(env, **extra), log_path)
        status = "timeout" if timed_out else ("ok" if rc == 0 else "failed")
        failed += status != "ok"
        entry.update(rc=rc, seconds=round(secs, 1), status=status)
        if status != "ok":
            entry["output_tail"] = out[-3000:]
        log.write(f"\n===== {name}: {status} (exit {rc}) after {secs:.1f} s\n")
        try:
            report["results"][name] = summarize(name, tmp, out)
        except Exception as exc:  # noqa: BLE001  (a summary that fails must not lose the run)
            report["results"][name] = {"summary_error": f"{type(exc).__name__}: {exc}"}
        report["parts"].append(entry)
        save()
        print(f"{name}: {status} after {secs:.1f} s", flush=True)
    report["failed_parts"] = failed
    save()
    log.write("\n===== headlines\n" + "\n".join(report["headlines"]) + "\n")
    log.close()
    print("\n".join(report["headlines"]))
    print(f"wrote {json_path} and {log_path}")
    return failed


if __name__ == "__main__":
    sys.exit(main())
