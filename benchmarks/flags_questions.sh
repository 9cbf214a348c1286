#!/usr/bin/env bash
# One device call for Config.outlier_flags="input" (built in session 10 with no device time
# left): the K loop loads its outlier columns and per-step flags from one XLA fusion instead of
# reducing its x tile for them every step. Times it against the tables' plans at M = 1 / 8 / 16
# (the tuner checks every plan's output against the reference first), writes the >= 3 % winners
# into a table copy, and runs #3's layer at M = 1 / 16 with the copy (B) and without (A). Each
# step has its own time limit and appends to ${OUT:-/tmp}/flags.log. About 5 minutes. Then, in
# a second call, batch-8 decode with and without the copy:
#   JINT8_KERNEL_TABLES=/tmp/flags python3 benchmarks/bench_generate.py --variants int8 \
#       --batch 8 --fuse --quantize-lm-head --quantize-embeddings --repeats 2
#
#   TABLE=nvidia_h100 bash benchmarks/flags_questions.sh
set -u
cd "$(dirname "$0")/.."
out="${OUT:-/tmp}"
log="$out/flags.log"
table="${TABLE:-nvidia_h100}"
source benchmarks/steps.sh
mkdir -p /tmp/flags && cp "jint8/ops/int8_matmul/data/$table.json" /tmp/flags/
tune=(python3 benchmarks/tune_decode_shapes.py --table-only --outlier-flags kernel input
      --json "$out/flags.jsonl" --write-table "/tmp/flags/$table.json")
step 120 "${tune[@]}" --m 8 --row-scales input
step 120 "${tune[@]}" --m 16 --row-scales input --shapes layer_8192x28672 down_proj
step 120 "${tune[@]}" --m 1 --row-scales kernel input --shapes layer_8192x28672 down_proj o_proj
cp "/tmp/flags/$table.json" "$out/flags_$table.json"
layer=(python3 benchmarks/bench_int8_matmul.py --shapes layer --brief --ms 1,16)
JINT8_KERNEL_TABLES=/tmp/flags step 90 "${layer[@]}"
step 90 "${layer[@]}"
echo "== done $(date +%T)" | tee -a "$log"
