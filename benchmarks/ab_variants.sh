#!/usr/bin/env bash
# The Gluon prefill's variants of one constant each, side by side on the GPU: each VARIANT runs in a copy of this
# tree with its patch, one process per variant, alternated over ROUNDS, through `gluon_schedules.py --persistent`
# (cuDNN, attnc's default, the Gluon kernel's one-tile and persistent programs, each output checked against cuDNN
# before it is timed). Session 19 timed RING_BYTES and L2_KV_BYTES this way (benchmarks/NOTES.md). With AB=backward,
# each runs `sweep_backward.py --ds-under-dkdv` instead: per workload the template's backward (both modes) and the
# Gluon dK/dV kernel (three forms), checked against float32 SDPA first.
#   [AB=backward] bash benchmarks/ab_variants.sh REGEX ROUNDS VARIANT...   # carry [".whl"]; VARIANT: base, or
#                                                                           # patches joined by +
set -u
source .ci/gpu-env.sh || exit 1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
only=$1; rounds=$2; shift 2

patch() {  # patch FILE OLD NEW: OLD must be in FILE
  grep -qF "$2" "$1" || { echo "variant patch does not apply: $2 not in $1"; exit 1; }
  python3 -c "import sys; p, a, b = sys.argv[1:]; s = open(p).read(); open(p, 'w').write(s.replace(a, b))" "$1" "$2" "$3"
}

for v in "$@"; do
  tree=/tmp/variant-${v//+/_}
  rm -rf "$tree" && mkdir "$tree" && cp -r attnc benchmarks "$tree/"
  template=$tree/attnc/backends/triton/gluon.py.j2 passes=$tree/attnc/passes/warpgroups.py
  for piece in ${v//+/ }; do
    case $piece in
      base) ;;
      ring2) patch "$passes" "RING_BYTES = 192 * 1024" "RING_BYTES = 128 * 1024" ;;
      dkdv4|dkdv5) patch "$passes" "DKDV_MAX_STAGES = 3" "DKDV_MAX_STAGES = ${piece#dkdv}" ;;
      l2_*mb) mib=${piece#l2_}; patch "$template" "L2_KV_BYTES = gl.constexpr(4 * 1024 * 1024)" \
                "L2_KV_BYTES = gl.constexpr(${mib%mb} * 1024 * 1024)" ;;
      *) echo "unknown variant $piece"; exit 1 ;;
    esac
  done
done
for r in $(seq 1 "$rounds"); do
  for v in "$@"; do
    tree=/tmp/variant-${v//+/_} name=${v//+/_}-$r
    if [ "${AB:-forward}" = backward ]; then
      run=(python3 benchmarks/sweep_backward.py --ds-under-dkdv --only "$only" --out /tmp/ab-$name --budget 180)
    else
      run=(python3 benchmarks/gluon_schedules.py --persistent --only "$only" --out /tmp/ab-$name)
    fi
    ( cd "$tree" && ATTNC_CACHE_DIR=/tmp/cache-$name PYTHONPATH="/tmp/site:$tree" timeout 200 "${run[@]}" ) \
      > /tmp/ab-$name.log 2>&1
    echo "== $v round $r: exit $?"
    if [ "${AB:-forward}" = backward ]; then
      python3 -c "import json, sys; [print(r['workload'], r['kernel'], 'det' if r['deterministic'] else 'atomic', \
        round(r.get('tflops', 0)), r.get('error', '')[:80]) for r in map(json.loads, open(sys.argv[1]))]" \
        /tmp/ab-$name/sweep-backward.jsonl
      cp /tmp/ab-$name/sweep-backward.jsonl "$OUT/ab-$name.jsonl" 2>/dev/null
    else
      grep -E "TFLOP/s" /tmp/ab-$name.log | tr -s ' ' | tr '\n' ' ' | sed 's/S=/\nS=/g' | sed 's/ TFLOP\/s//g'; echo
      cp /tmp/ab-$name/*.json "$OUT/ab-$name.json" 2>/dev/null  # a call brings back at most 8 files
    fi
  done
done
