#!/usr/bin/env bash
# The GPU checks of issues 12-14 as device-tool calls of at most ~450 s each (benchmarks/NOTES.md, sessions 15-16:
# session 16 ran 1-8; "Next GPU session (after session 16)" says what is next):
#   bash benchmarks/next_gpu_calls.sh 1    # carry [".whl"]: the FP8 quantised-query error, S = 1k steps' time
#   bash benchmarks/next_gpu_calls.sh 2    # carry [".whl"]: the training and template GPU tests
#   bash benchmarks/next_gpu_calls.sh 3    # carry [".whl"]: softcap / ALiBi forward and training, the full bench
#   bash benchmarks/next_gpu_calls.sh 4    # carry [".whl", ".tvmrt"]: the other GPU tests, ncu
#   bash benchmarks/next_gpu_calls.sh 5    # carry [".whl", ".tvmrt", ".tvm-aot"]: the quantised queries after the
#                                          # reference's fix (session 16), the TVM artifacts' GPU tests, MLA FP8 rows
#   bash benchmarks/next_gpu_calls.sh 6    # carry [".whl"]: the quantised queries' new default, ncu of the MLA rows
#                                          # issue 14 misses (benchmarks/mla_ncu.py), the full bf16 MLA grid
#   bash benchmarks/next_gpu_calls.sh 7    # carry [".whl"]: the Gluon default at window / D = 64, its GPU tests, ncu
#                                          # of three more MLA rows
#   bash benchmarks/next_gpu_calls.sh 8    # carry [".whl"]: the full training-step table, the S = 1k profile
#   bash benchmarks/next_gpu_calls.sh 9    # carry [".whl"]: ALiBi's training step by kernel, the GPT example compiled,
#                                          # GQA's dK/dV by atomics and ALiBi without the slopes' gradient
#   bash benchmarks/next_gpu_calls.sh 10   # carry [".whl"]: the hardware tanh (session 17): its error, the A/B
#                                          # against the formula, the softcap GPU tests, the softcap bench rows
#   bash benchmarks/next_gpu_calls.sh 11   # carry [".whl"]: the training, template and Gluon GPU tests and the GQA /
#                                          # ALiBi training rows in one call (session 17, after step 9 was taken back)
#   bash benchmarks/next_gpu_calls.sh 12   # carry [".whl"]: the seeded merge test, the Gluon tests (persistent work
#                                          # tiles as functions), Gluon compile times
#   bash benchmarks/next_gpu_calls.sh 13   # carry [".whl"]: `attnc bench` in full, its cold compile included
#                                          # (session 18 ran D = 256's split dK/dV columns first: slower, removed)
#   bash benchmarks/next_gpu_calls.sh 14   # carry [".whl"]: the Gluon kernel compiled behind the template's first
#                                          # call: its GPU test, the backward's after the split's removal, the bench
#   bash benchmarks/next_gpu_calls.sh 15   # carry [".whl"]: the MLA decode's background compile, then the backward's
#                                          # tiles and Gluon dK/dV kernel at S = 1k, never swept there (dense 1k: 0.86x
#                                          # Flex, causal 1k 0.96x)
#   bash benchmarks/next_gpu_calls.sh 16   # carry [".whl"]: three ring stages at D = 128, 4 MiB L2 sections and
#                                          # persistent programs for dense D = 128 (session 19): the Gluon GPU tests,
#                                          # then `attnc bench` in full
#   bash benchmarks/next_gpu_calls.sh 17   # carry [".whl"]: what session 19 had no device time left for: persistent
#                                          # programs at dense D = 64 / 256, dense S = 1k again, host time, the MLA
#                                          # decode's background compile (~250 s)
#   bash benchmarks/next_gpu_calls.sh 18   # carry [".whl"]: the Gluon dK/dV kernel at five ring stages against three
#                                          # and the template (benchmarks/ab_variants.sh AB=backward, ~300 s)
#   bash benchmarks/next_gpu_calls.sh 19   # carry [".whl"]: lse2 and delta from shared memory, no select of a masked
#                                          # dS (session 20): the backward GPU tests, the Gluon dK/dV kernel at 32 and
#                                          # 64 query rows against the template at dense / causal 1k and 4k (~480 s)
#   bash benchmarks/next_gpu_calls.sh 20   # carry [".whl"]: the Gluon dK/dV kernel with dQ split between its
#                                          # consumers as the sm_90 default at D = 128 (session 20): the training GPU
#                                          # tests, then `attnc bench --backward` in full (~440 s)
#   bash benchmarks/next_gpu_calls.sh 21   # on branch gluon-gqa-atomics, carry [".whl"]: GQA's dK and dV by atomics
#                                          # in the Gluon kernel too (no share per query head; session 20, not run):
#                                          # its GPU tests and the GQA training row (~130 s)
# (.tvm-aot: `python3 benchmarks/tvm_cuda_check.py build` here first, which needs nvcc and no GPU.)
# Each step writes its whole log to $OUT (a call brings back at most 8 files) and prints a summary.
set -u
source .ci/gpu-env.sh || exit 1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
P="python3 -m pytest -m gpu -p no:cacheprovider -p no:warnings -rf -q -o addopts= --tb=short"

step() {  # step NAME SECONDS COMMAND...: the command's output in $OUT/NAME.log, then its last lines
  local name=$1 seconds=$2
  shift 2
  timeout -s INT "$seconds" "$@" > "$OUT/$name.log" 2>&1
  echo "== $name: exit $?"
  grep -E "passed|failed|error|Error|^FAILED|TFLOP/s|GB/s|ms" "$OUT/$name.log" | tail -12
}

case "${1:-}" in
1)
  step fp8-error 110 python3 benchmarks/fp8_queries_error.py
  step fp8-default 60 $P tests/test_mla_gluon_gpu.py -k quantized_queries_default
  step profile-s1k 80 python3 benchmarks/profile_backward.py --out /tmp/prof --only "^(dense S=1024|causal S=1024)$"
  cat /tmp/prof/*.jsonl > "$OUT/profile-backward.jsonl" 2>/dev/null
  step mla-fp8-sums 100 python3 benchmarks/bench_mla.py --fp8 --quantize-q --float32-sum-every 32 0 --quick \
    --only "H=64" --out /tmp/mla --budget 70
  cp /tmp/mla/*.json "$OUT/" 2>/dev/null
  ;;
2)
  step training 140 $P -n 12 --durations=5 tests/test_training.py
  step backward 120 $P -n 12 --durations=5 tests/test_backward_triton.py
  step template 100 $P -n 12 --durations=5 tests/test_triton_gpu.py
  step host-time 50 $P tests -k host_time  # alone: workers compiling beside them would inflate their timings
  ;;
3)
  step softcap-alibi 100 python3 -m attnc bench --only "softcap|alibi" --out /tmp/fwd
  step softcap-alibi-bwd 120 python3 -m attnc bench --backward --only "softcap|alibi" --out /tmp/bwd
  step bench 280 python3 -m attnc bench --out /tmp/bench
  for d in fwd bwd bench; do for f in /tmp/$d/*.json; do cp "$f" "$OUT/$d-$(basename "$f")"; done; done
  ;;
4)
  step rest 220 env PYTHONPATH=".tvmrt:$PYTHONPATH" $P -n 14 tests -k "not host_time" \
    --ignore=tests/test_training.py --ignore=tests/test_backward_triton.py --ignore=tests/test_triton_gpu.py \
    --ignore=tests/test_gluon_gpu.py --ignore=tests/test_gluon_backward.py
  step ncu-persistent 150 ncu --clock-control none -k regex:attn_fwd_gluon --launch-count 6 \
    --section SpeedOfLight --section WarpStateStats --section SchedulerStats python3 benchmarks/persistent_tiles.py
  ;;
5)
  step fp8-error 90 python3 benchmarks/fp8_queries_error.py
  step quantize 60 python3 -m pytest -p no:cacheprovider -q -o addopts= --tb=short tests/test_quantize.py
  step fp8-gpu-tests 150 $P -n 8 tests/test_mla_gluon_gpu.py -k "quantized or fp8_score_sums"
  step tvm-cuda 90 env PYTHONPATH=".tvmrt:$PYTHONPATH" $P -n 8 tests/test_tvm_cuda.py
  step mla-fp8 150 python3 benchmarks/bench_mla.py --fp8 --quantize-q --quick --only "H=128" --out /tmp/mla --budget 110
  cp /tmp/mla/*.json "$OUT/" 2>/dev/null
  ;;
6)
  step fp8-default 60 $P -n 8 tests/test_mla_gluon_gpu.py -k "quantized or fp8_score_sums"
  for row in 0 1 2 3; do
    step ncu-mla-$row 45 ncu --clock-control none -k regex:attn_decode --launch-skip 2 --launch-count 1 \
      --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section SchedulerStats \
      --section Occupancy python3 benchmarks/mla_ncu.py $row
  done
  cat "$OUT"/ncu-mla-?.log > "$OUT/ncu-mla.log" && rm "$OUT"/ncu-mla-?.log
  step mla-grid 330 python3 benchmarks/bench_mla.py --out /tmp/grid --budget 290
  cp /tmp/grid/*.json /tmp/grid/*.png "$OUT/" 2>/dev/null
  ;;
7)
  step gluon-default 110 python3 -m attnc bench --only "window|D=64|softcap" --out /tmp/fwd
  for f in /tmp/fwd/*.json; do cp "$f" "$OUT/"; done
  step gluon-tests 150 $P -n 12 tests/test_gluon_gpu.py tests/test_warpgroups.py
  for row in 4 5 6; do
    step ncu-mla-$row 45 ncu --clock-control none -k regex:attn_decode --launch-skip 2 --launch-count 1 \
      --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section SchedulerStats \
      --section Occupancy --section LaunchStats python3 benchmarks/mla_ncu.py $row
  done
  cat "$OUT"/ncu-mla-?.log > "$OUT/ncu-mla-more.log" && rm "$OUT"/ncu-mla-?.log
  ;;
8)
  step backward 300 python3 -m attnc bench --backward --out /tmp/bwd
  for f in /tmp/bwd/*; do cp "$f" "$OUT/"; done
  step profile-s1k 80 python3 benchmarks/profile_backward.py --out /tmp/prof --only "^(dense S=1024|causal S=1024)$"
  cat /tmp/prof/*.jsonl > "$OUT/profile-backward.jsonl" 2>/dev/null
  ;;
9)
  step profile-alibi 120 python3 benchmarks/profile_backward.py --out /tmp/prof \
    --only "^(alibi S=8192|gqa 32/8 causal S=8192)$"
  cat /tmp/prof/*.jsonl > "$OUT/profile-backward.jsonl" 2>/dev/null
  step train-gpt 110 python3 examples/train_gpt.py --device cuda --compile --steps 300
  step gqa-tests 150 $P -n 12 tests/test_training.py tests/test_backward_triton.py
  step gqa-bench 120 python3 -m attnc bench --backward --only "gqa|alibi" --out /tmp/gqa
  for f in /tmp/gqa/*.json; do cp "$f" "$OUT/gqa-$(basename "$f")"; done
  ;;
10)
  step tanh-error 60 python3 benchmarks/tanh_approx_error.py
  step ab-approx 150 python3 benchmarks/ab_approx.py --out "$OUT/ab-approx.jsonl"
  step softcap-tests 150 $P -n 8 -k "softcap or tanh or gemma" tests/test_triton_gpu.py tests/test_training.py \
    tests/test_backward_triton.py tests/test_gluon_gpu.py
  step softcap-bench 200 bash -c 'python3 -m attnc bench --only softcap --out /tmp/sc &&
    python3 -m attnc bench --backward --only softcap --out /tmp/scb'
  for f in /tmp/sc/*.json; do cp "$f" "$OUT/softcap-fwd-$(basename "$f")"; done
  for f in /tmp/scb/*.json; do cp "$f" "$OUT/softcap-bwd-$(basename "$f")"; done
  step host-overhead 80 python3 benchmarks/host_overhead.py --no-flex
  step host-time-test 60 $P tests/test_host_overhead.py -k host_time
  ;;
11)
  step gpu-tests 170 $P -n 14 tests/test_training.py tests/test_backward_triton.py tests/test_triton_gpu.py \
    tests/test_gluon_gpu.py
  step gqa-bench 130 python3 -m attnc bench --backward --only "gqa|alibi" --out /tmp/gqa
  for f in /tmp/gqa/*.json; do cp "$f" "$OUT/gqa-$(basename "$f")"; done
  ;;
12)
  step tests 260 $P -n 14 tests/test_merge.py tests/test_gluon_gpu.py
  step compile-times 60 bash -c "python3 benchmarks/compile_gluon_sm90.py --dims 128 --dtypes bf16 --persistent \
    --times --spec causal_lm && python3 benchmarks/compile_gluon_sm90.py --dims 128 --dtypes bf16 --times \
    --spec grok_softcap && python3 benchmarks/compile_phases.py --runs 3 --dims 128 --variants tuned"
  ;;
13)
  step bench 330 python3 -m attnc bench --out /tmp/bench
  for f in /tmp/bench/*; do cp "$f" "$OUT/"; done
  ;;
14)
  step tests 300 bash -c "$P -n 14 tests/test_gluon_gpu.py tests/test_backward_triton.py tests/test_binaries.py && \
    $P tests -k host_time"
  step bench 200 python3 -m attnc bench --out /tmp/bench
  for f in /tmp/bench/*.json; do cp "$f" "$OUT/"; done
  ;;
15)
  step background-tests 90 $P tests/test_mla_gluon_gpu.py tests/test_gluon_gpu.py -k new_variant
  step sweep-s1k 300 python3 benchmarks/sweep_backward.py --gluon --no-tile-sweep --only "^(dense|causal) S=1024$" --out "$OUT" \
    --budget 260
  ;;
16)
  step gluon-tests 200 $P -n 14 tests/test_gluon_gpu.py
  step bench 340 python3 -m attnc bench --out /tmp/bench
  for f in /tmp/bench/*; do cp "$f" "$OUT/"; done
  ;;
17)
  step dense-head-dims 120 python3 benchmarks/gluon_schedules.py --persistent --dense-head-dims --only "^dense D" \
    --out /tmp/hd
  cp /tmp/hd/*.json "$OUT/" 2>/dev/null
  step dense1k 90 python3 -m attnc bench --only "^dense S=1024$" --out /tmp/b1
  for f in /tmp/b1/*.json; do cp "$f" "$OUT/dense1k-$(basename "$f")"; done
  step host-time 60 $P tests -k host_time  # alone: workers compiling beside them would inflate their timings
  step mla-background 90 $P tests/test_mla_gluon_gpu.py -k new_variant
  ;;
18)
  AB=backward bash benchmarks/ab_variants.sh "^(dense|causal) S=(1024|4096)$" 1 base dkdv5
  ;;
19)
  step gluon-backward 170 $P -n 14 tests/test_gluon_backward.py
  step backward-template 120 $P -n 14 tests/test_backward_triton.py
  step sweep-gluon 230 python3 benchmarks/sweep_backward.py --gluon --no-tile-sweep --only "^(dense|causal) S=(1024|4096)$" \
    --out /tmp/sg --budget 200
  cp /tmp/sg/sweep-backward.jsonl "$OUT/sweep-gluon.jsonl" 2>/dev/null
  python3 -c "import json, sys; [print(r['workload'], r['kernel'], r.get('block_m', ''), \
    'det' if r['deterministic'] else 'atomic', round(r.get('tflops', 0)), r.get('error', '')[:80]) \
    for r in map(json.loads, open(sys.argv[1]))]" /tmp/sg/sweep-backward.jsonl
  ;;
20)
  step training 140 $P -n 14 tests/test_training.py
  step backward 300 python3 -m attnc bench --backward --out /tmp/bwd
  for f in /tmp/bwd/*; do cp "$f" "$OUT/"; done
  ;;
*)
  echo "usage: bash benchmarks/next_gpu_calls.sh 1|2|...|20" >&2
  exit 2
  ;;
esac
