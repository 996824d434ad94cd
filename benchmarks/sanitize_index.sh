#!/usr/bin/env bash
# compute-sanitizer memcheck over the index-data fuzzer on a GPU (issue 15): the issue's named cases
# (tests/test_index_safety.py, FIXED) and N random adversarial index sets (default 1,000) through the paged and
# ragged serving kernels (tests/fuzz/index.py, which also checks NaN poisoning, the sound rows against the
# reference and the recorded errors). First a control that reads past a tensor, to show that the sanitizer sees
# such a read in this setup.
# PYTORCH_NO_CUDA_MEMORY_CACHING=1 makes every tensor its own allocation: under torch's caching allocator a read
# past a tensor stays inside the allocator's block and memcheck reports nothing (NOTES.md, 2026-12-06). Even so,
# the H100 run of 2026-12-06 (session 7) saw no error in the control: its read landed in the next allocation.
# --padding puts unallocated bytes after every allocation, so a read just past a tensor is outside all of them.
# Run from the repo root on the GPU machine after `source .ci/gpu-env.sh`:
#   N=1000 bash benchmarks/sanitize_index.sh
# It writes $OUT/sanitize-index-<gpu>-<date>.txt (the summary), and beside it the sanitizer's logs, the fuzzer's
# per-case results (.jsonl) and its stderr.
set -u
OUT="${OUT:-/tmp/out}"; N="${N:-1000}"; mkdir -p "$OUT"
export PYTORCH_NO_CUDA_MEMORY_CACHING=1 PYTHONUNBUFFERED=1
gpu=$(python3 -c "import torch; print(torch.cuda.get_device_name().lower().replace(' ', '-'))")
stem="$OUT/sanitize-index-$gpu-$(date +%F)"
sanitize() {  # seconds, log file, command...
  timeout "$1" compute-sanitizer --tool memcheck --padding 4096 --print-limit 20 --log-file "$2" "${@:3}"
}
{
  echo "# compute-sanitizer memcheck, PYTORCH_NO_CUDA_MEMORY_CACHING=1, $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  compute-sanitizer --version | tail -1
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  echo "## control: a Triton kernel reading 4 floats past a 1024-float tensor (errors expected)"
  control=$(mktemp --suffix=.py)  # a file: triton.jit reads its function's source back
  cat > "$control" <<'PY'
import torch, triton, triton.language as tl

@triton.jit
def past_the_end(x, out, n):
    i = tl.arange(0, 4)
    tl.store(out + i, tl.load(x + n + i))

x, out = torch.randn(1024, device="cuda"), torch.empty(4, device="cuda")
past_the_end[(1,)](x, out, 1024)
torch.cuda.synchronize()
PY
  sanitize 120 "$stem-control.log" python3 "$control"
  echo "control exit $?"; grep -E "ERROR SUMMARY" "$stem-control.log"
  echo "## the fuzzer: the named cases and $N random ones (0 errors expected)"
  cases=$(python3 -c "
import json, sys; from dataclasses import asdict; sys.path.insert(0, 'tests')
from test_index_safety import FIXED
print(json.dumps([asdict(case) for case, _ in FIXED.values()]))")
  start=$(date +%s)
  sanitize 540 "$stem-fuzz.log" python3 tests/fuzz/index.py --device cuda --n "$N" --cases "$cases" \
    > "$stem-cases.jsonl" 2> "$stem-fuzz.stderr"
  echo "fuzzer exit $? after $(( $(date +%s) - start )) s (0: every case clean)"
  tail -1 "$stem-fuzz.stderr"; grep -E "ERROR SUMMARY" "$stem-fuzz.log"
  python3 -c "
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
print(len(rows), 'cases run,', sum(bool(r['problems']) for r in rows), 'with problems,',
      sum(r['recorded'] is not None for r in rows), 'with a recorded violation')" "$stem-cases.jsonl"
} > "$stem.txt" 2>&1
cat "$stem.txt"
