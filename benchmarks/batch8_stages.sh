#!/usr/bin/env bash
# Device calls for NOTES "Next steps" 2: the M = 2-16 plans (batch-8 decode) with 3 pipeline
# stages instead of 4. Session 11 timed them at M = 16 only: qkv 17.9 vs 19.8 us, down 35.9 vs
# 37.3, o 13.7 vs 14.1, gate_up 54.5 vs 53.6, the 8192x28672 layer the same. One batch-8
# bench_generate process takes 3-7 minutes, so this is three calls:
#   TABLE=nvidia_h100 bash benchmarks/batch8_stages.sh tune   # M = 8 timings, >= 3 % winners
#                                                             # into a table copy, and B: batch 8
#                                                             # with the copy
#   TABLE=nvidia_h100 bash benchmarks/batch8_stages.sh a      # A: batch 8 with jint8's table
#   TABLE=nvidia_h100 bash benchmarks/batch8_stages.sh b      # B again: /tmp/s8 of the tune
#                                                             # call, on a machine still warm
# Each step has its own time limit and appends to ${OUT:-/tmp}/batch8_stages.log.
set -u
cd "$(dirname "$0")/.."
out="${OUT:-/tmp}"
log="$out/batch8_stages.log"
table="${TABLE:-nvidia_h100}"
source benchmarks/steps.sh
bench=(python3 benchmarks/bench_generate.py --variants int8 --batch 8 --fuse --quantize-lm-head
       --quantize-embeddings --repeats 2 --json "$out/batch8_stages.jsonl")
mkdir -p /tmp/s8
case "${1:-tune}" in
    tune)
        cp "jint8/ops/int8_matmul/data/$table.json" /tmp/s8/
        step 150 python3 benchmarks/tune_decode_shapes.py --table-only --m 8 --row-scales input \
            --stages 3 4 --output-gate --json "$out/batch8_stages.jsonl" --write-table "/tmp/s8/$table.json"
        cp "/tmp/s8/$table.json" "$out/s8_$table.json"
        JINT8_KERNEL_TABLES=/tmp/s8 step 420 "${bench[@]}" ;;
    a)
        step 540 "${bench[@]}" ;;
    b)
        if [ ! -f "/tmp/s8/$table.json" ]; then
            echo "no /tmp/s8/$table.json on this machine: run '$0 tune' first" >&2; exit 2
        fi
        JINT8_KERNEL_TABLES=/tmp/s8 step 540 "${bench[@]}" ;;
    *)
        echo "usage: $0 tune|a|b" >&2; exit 2 ;;
esac
echo "== done $(date +%T)" | tee -a "$log"
