#!/usr/bin/env bash
# One device call: the tables' decode plans with 3 pipeline stages against their own (4 mostly).
# Session 11 found gate_up's 256x256 tiles (two 128x256 weight tiles per stage) 6 % faster with
# 3 stages, and lm_head's best tiles with 3. Times each table plan at M = 16 and M = 1 with 3
# and 4 stages (tune_decode_shapes --table-only --stages), writes >= 3 % winners into a table
# copy, runs #3's layer at M = 1 / 16 with the copy and without, and batch-1 decode: bf16, then
# int8 A/B/A (B: the copy). Each step has its own time limit and appends to
# ${OUT:-/tmp}/stages.log. About 7 minutes.
#
#   TABLE=nvidia_h100 bash benchmarks/stages_questions.sh
set -u
cd "$(dirname "$0")/.."
out="${OUT:-/tmp}"
log="$out/stages.log"
table="${TABLE:-nvidia_h100}"
source benchmarks/steps.sh
mkdir -p /tmp/st3 && cp "jint8/ops/int8_matmul/data/$table.json" /tmp/st3/
tune=(python3 benchmarks/tune_decode_shapes.py --table-only --stages 3 4 --output-gate
      --json "$out/stages.jsonl" --write-table "/tmp/st3/$table.json")
step 110 "${tune[@]}" --m 16 --row-scales input \
    --shapes layer_8192x28672 gate_up_proj down_proj qkv_proj o_proj
step 110 "${tune[@]}" --m 1 --norm --shapes layer_8192x28672 qkv_proj o_proj down_proj lm_head
cp "/tmp/st3/$table.json" "$out/st3_$table.json"
layer=(python3 benchmarks/bench_int8_matmul.py --shapes layer --brief --ms 1,16)
JINT8_KERNEL_TABLES=/tmp/st3 step 60 "${layer[@]}"
step 60 "${layer[@]}"
decode_run 100 bf16 "$out/stages_e2e.jsonl"
decode_ab 100 "$out/stages_e2e.jsonl" /tmp/st3
echo "== done $(date +%T)" | tee -a "$log"
