#!/usr/bin/env bash
# Everything GPU-side in one command, for a lent GPU machine (one call of the `device` tool):
#
#     bash benchmarks/gpu_session.sh            # writes its logs and JSON under $OUT (default ./gpu_out)
#
# 1. every CuPy kernel compiled with NVRTC (pytest -m nvrtc, tests/test_nvrtc.py), 2. the CuPy tests
# (pytest -m gpu), 3. lesson 15 (NumPy vs CuPy), 4. the epoch benchmark on CuPy against PyTorch CUDA at
# batch 128 and 1024 (5. the conv benchmark, once it exists).  Each part has its own time limit so that
# the whole script stays inside one 10-minute call; a failing part does not stop the others.  The exit
# status is the number of parts that failed.
#
# The GPU machine has numpy, cupy, torch, matplotlib and pytest but maybe not tqdm, and no network:
# minivae is used from this checkout (PYTHONPATH), and tqdm is installed from a wheel carried in
# .gpu_wheels/ (`pip download tqdm --no-deps -d .gpu_wheels` here, then carry .gpu_wheels) if it is missing.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" MPLBACKEND=Agg
if ! python -c "import tqdm" 2>/dev/null; then
    python -m pip install --quiet --no-index --find-links .gpu_wheels tqdm || echo "tqdm missing: training bars will fail"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
python -c "import cupy, numpy, sys; print(sys.version.split()[0], 'numpy', numpy.__version__, 'cupy', cupy.__version__)" \
    >> "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

failed=0
part() {   # part NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "== $name"
    local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 15 "$OUT/$name.log"
    echo "== $name: exit $rc after $((SECONDS - t0)) s"
    [[ $rc -eq 0 ]] || failed=$((failed + 1))
}

part pytest_nvrtc 60 python -m pytest -m nvrtc -q -p no:cacheprovider -rs tests/test_nvrtc.py
part pytest_gpu 170 python -m pytest -m gpu -q -p no:cacheprovider -rs tests
part lesson15 90 python lessons/15_gpu_cupy.py --out "$OUT/lesson15"
part bench_gpu 250 python benchmarks/epoch.py --backend cupy --epochs 5 --warmup 1 --json "$OUT/bench_gpu.json"
# ---- CONV BENCHMARK (to be enabled by the conv work, once benchmarks/epoch.py has --arch conv): uncomment,
# and shrink the limits above or run it as a second call so the script stays inside 10 minutes.
# part bench_conv_gpu 240 python benchmarks/epoch.py --arch conv --backend cupy --batch-size 128 1024 \
#     --epochs 3 --warmup 1 --json "$OUT/bench_conv_gpu.json"
exit $failed
