#!/usr/bin/env bash
# One device-tool call that checks attnc on the lent GPU: GPU tests, the TVM CUDA artifacts, the Triton AOT round
# trip, host overhead, the index-data sanitizer run (with `sanitize`) and the Triton tile sweep (with `sweep`).
# Run from the repo root with the carried wheels and artifacts beside it:
#   carry [".whl", ".tvmrt", ".tvm-aot", ".aot-demo.tar.xz"]; bash benchmarks/gpu_check.sh [sanitize] [sweep]
# (the Triton AOT artifacts travel compressed: cubins shrink ~10x, and a carry holds 64 MiB in all).
# Everything it writes goes under $OUT.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
[ -f .aot-demo.tar.xz ] && tar -xJf .aot-demo.tar.xz
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 OUT="${OUT:-/tmp/out}"
# pytest-xdist among the wheels: the GPU tests are bound by Triton compiles on the host's cores
XDIST=""; python3 -c "import xdist" 2>/dev/null && XDIST="-n ${WORKERS:-8}"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
GPU_TESTS="tests"  # every test marked gpu, except the TVM CUDA ones (below, with the trimmed runtime)
# Host-time tests run alone afterwards: parallel workers compiling beside them would inflate their timings.
timeout "${TEST_SECONDS:-300}" python3 -m pytest -m gpu -q -rf -p no:cacheprovider $XDIST -k "not host_time" \
  --ignore=tests/test_tvm_cuda.py $GPU_TESTS > "$OUT/gpu-tests.log" 2>&1
echo "gpu tests exit $?"; grep -E "passed|failed|error" "$OUT/gpu-tests.log" | tail -3; grep -E "^FAILED|^ERROR" "$OUT/gpu-tests.log" | head -30
timeout 120 python3 -m pytest -m gpu -q -rf -p no:cacheprovider -k host_time --ignore=tests/test_tvm_cuda.py $GPU_TESTS \
  > "$OUT/gpu-host-tests.log" 2>&1
echo "host-time tests exit $?"; grep -E "passed|failed|error|us per call" "$OUT/gpu-host-tests.log" | tail -6
if [ -d .tvm-aot ]; then
  PYTHONPATH=".tvmrt:$PYTHONPATH" timeout 200 python3 benchmarks/tvm_cuda_check.py run --aot .tvm-aot \
    --json "$OUT/tvm_cuda.json" > "$OUT/tvm_cuda.log" 2>&1; echo "tvm cuda exit $?"; tail -40 "$OUT/tvm_cuda.log"
  PYTHONPATH=".tvmrt:$PYTHONPATH" timeout 120 python3 -m pytest -m gpu -q -rf -p no:cacheprovider \
    tests/test_tvm_cuda.py > "$OUT/gpu-tvm-tests.log" 2>&1
  echo "tvm gpu tests exit $?"; grep -E "passed|failed|error" "$OUT/gpu-tvm-tests.log" | tail -3
fi
if [ -d .aot-demo ]; then
  timeout 150 python3 benchmarks/aot_roundtrip.py .aot-demo > "$OUT/aot.log" 2>&1; echo "aot exit $?"; tail -16 "$OUT/aot.log"
fi
timeout 60 python3 benchmarks/host_overhead.py > "$OUT/host_overhead.log" 2>&1; echo "host exit $?"; tail -14 "$OUT/host_overhead.log"
if [[ " $* " == *" sanitize "* ]]; then
  N="${N:-300}" timeout 300 bash benchmarks/sanitize_index.sh > "$OUT/sanitize.log" 2>&1; echo "sanitize exit $?"
  tail -12 "$OUT/sanitize.log"
fi
if [[ " $* " == *" sweep "* ]]; then
  timeout 190 python3 benchmarks/sweep_triton.py --out "$OUT" --budget 170 > "$OUT/sweep.log" 2>&1
  echo "sweep exit $?"; grep -v '^{' "$OUT/sweep.log" | tail -25
fi
