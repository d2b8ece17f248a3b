#!/usr/bin/env bash
# Everything GPU-side in one command, for a lent GPU machine (one call of the `device` tool):
#
#     bash benchmarks/gpu_session.sh          # writes $OUT/gpu_session.json and $OUT/gpu_session.log ($OUT: gpu_out)
#
# In order of importance, each part a process of its own with its own time limit, the whole inside
# GPU_SESSION_BUDGET seconds (510 by default: 8.5 minutes, under the 9 asked); a part that
# fails or runs over does not stop the others, and the JSON is rewritten after every part:
#
#   env                versions: GPU, driver, CUDA, CuPy, NVRTC, the libcublas the graph binds (ctypes), torch, JAX
#   pytest_graph       tests/test_cuda_graph.py (the CUDA graph against eager FastTrainer, train on CuPy against
#                      NumPy; and the CPU-side tests, the CUDA 13 libcublas included) + the CuPy fast-path test
#   train_default      train --backend cupy, the default recipe, 10 epochs (test -ELBO; NumPy's is ~102.3)
#   train_default_cached  the same command again (kernels cached): the whole command's wall time
#   bench_dense        benchmarks/epoch.py --backend cupy at batch 128 and 1024: minivae eager and graph, torch
#                      eager and graph, JAX jit and scan, the product bound; every ratio
#   eval_iw5000        eval --iw-k 5000 of the default run, on CuPy
#   burda_short        train --recipe burda2015-short --backend cupy, 3 passes (time per pass); and 1 pass with
#                      MINIVAE_CUDA_GRAPH=0 (burda_short_eager), the eager step, to compare
#   bench_conv         the conv VAE, minivae (readable path) against PyTorch/cuDNN, batch 128 and 1024
#   train_conv         train --recipe conv --backend cupy, 10 epochs
#   pytest_gpu_rest    every other gpu-marked test;  pytest_nvrtc  every kernel compiled by this machine's NVRTC
#
# The GPU machine has no network: minivae runs from this checkout (PYTHONPATH); without tqdm a no-op stand-in
# is used (no bars).  GPU_SESSION_PARTS=env,train_default runs only those parts.  Exit status: the number of
# parts that failed or timed out.  The driver is benchmarks/gpu_session.py.
set -u
cd "$(dirname "$0")/.."
export OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python}
command -v "$PY" > /dev/null || PY=python3
"$PY" benchmarks/gpu_session.py
rc=$?
if [[ ! -s "$OUT/gpu_session.json" ]]; then      # the driver itself died: say so in the one JSON
    printf '{"driver_failed": true, "exit": %d}\n' "$rc" > "$OUT/gpu_session.json"
fi
exit $rc
