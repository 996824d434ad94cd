#!/usr/bin/env bash
# One device-tool call that checks attnc on the lent GPU: GPU tests, the TVM CUDA artifacts, host overhead and
# (with `sweep`) the Triton tile sweep. Run from a snapshot of the repo with the carried wheels beside it:
#   carry [".whl", ".snap", ".tvmrt", ".tvm-aot", ".aot-demo.tar.xz"]; cd .snap && bash benchmarks/gpu_check.sh [sweep]
# (the Triton AOT artifacts travel compressed: cubins shrink ~10x, and a carry holds 64 MiB in all).
# Everything it writes goes under $OUT.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site ../.whl/*.whl || exit 1
[ -f ../.aot-demo.tar.xz ] && tar -xJf ../.aot-demo.tar.xz -C ..
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 OUT="${OUT:-/tmp/out}"
# pytest-xdist among the wheels: the GPU tests are bound by Triton compiles on the host's cores
XDIST=""; python3 -c "import xdist" 2>/dev/null && XDIST="-n ${WORKERS:-8}"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
GPU_TESTS="tests/test_decode_kernels.py tests/test_merge.py tests/test_host_overhead.py tests/test_trace.py
  tests/test_flex.py tests/test_paged_varlen.py tests/test_aot.py tests/test_triton_tma.py tests/test_tvm_kernels.py
  tests/test_triton_gpu.py tests/test_autotune.py"
# Host-time tests run alone afterwards: parallel workers compiling beside them would inflate their timings.
timeout "${TEST_SECONDS:-260}" python3 -m pytest -m gpu -q -rf -p no:cacheprovider $XDIST -k "not host_time" \
  $GPU_TESTS > "$OUT/gpu-tests.log" 2>&1
echo "gpu tests exit $?"; grep -E "passed|failed|error" "$OUT/gpu-tests.log" | tail -3; grep -E "^FAILED|^ERROR" "$OUT/gpu-tests.log" | head -30
timeout 120 python3 -m pytest -m gpu -q -rf -p no:cacheprovider -k host_time $GPU_TESTS > "$OUT/gpu-host-tests.log" 2>&1
echo "host-time tests exit $?"; grep -E "passed|failed|error|us per call" "$OUT/gpu-host-tests.log" | tail -6
if [ -d ../.tvm-aot ]; then
  ln -sfn ../.tvm-aot .tvm-aot  # where tests/test_tvm_cuda.py looks
  PYTHONPATH="../.tvmrt:$PYTHONPATH" timeout 200 python3 benchmarks/tvm_cuda_check.py run --aot ../.tvm-aot \
    --json "$OUT/tvm_cuda.json" > "$OUT/tvm_cuda.log" 2>&1; echo "tvm cuda exit $?"; tail -40 "$OUT/tvm_cuda.log"
  PYTHONPATH="../.tvmrt:$PYTHONPATH" timeout 120 python3 -m pytest -m gpu -q -rf -p no:cacheprovider \
    tests/test_tvm_cuda.py > "$OUT/gpu-tvm-tests.log" 2>&1
  echo "tvm gpu tests exit $?"; grep -E "passed|failed|error" "$OUT/gpu-tvm-tests.log" | tail -3
fi
if [ -d ../.aot-demo ]; then
  timeout 90 python3 benchmarks/aot_roundtrip.py ../.aot-demo > "$OUT/aot.log" 2>&1; echo "aot exit $?"; tail -12 "$OUT/aot.log"
fi
timeout 60 python3 benchmarks/host_overhead.py > "$OUT/host_overhead.log" 2>&1; echo "host exit $?"; tail -14 "$OUT/host_overhead.log"
if [ "${1:-}" = sweep ]; then
  timeout 190 python3 benchmarks/sweep_triton.py --out "$OUT" --budget 170 > "$OUT/sweep.log" 2>&1
  echo "sweep exit $?"; grep -v '^{' "$OUT/sweep.log" | tail -25
fi
