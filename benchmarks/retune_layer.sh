#!/usr/bin/env bash
# One device call for #3's M <= 16 target on the 8192x28672 layer: re-tune the fused kernel's
# tiles there at M = 1 (kernel's row sweep) and M = 16 (row scales from XLA) in a copy of this
# GPU's table, then bench_int8_matmul's layer table with the copy (B) and with jint8's table (A).
# Each step has its own time limit and appends to ${OUT:-/tmp}/layer.log. About 6 minutes.
#
#   TABLE=nvidia_h100 bash benchmarks/retune_layer.sh
set -u
cd "$(dirname "$0")/.."
out="${OUT:-/tmp}"
log="$out/layer.log"
table="${TABLE:-nvidia_h100}"
source benchmarks/steps.sh
mkdir -p /tmp/layer && cp "jint8/ops/int8_matmul/data/$table.json" /tmp/layer/
tune=(python3 benchmarks/tune_decode_shapes.py --shapes layer_8192x28672 --splits 1 --reduce xla
      --stages 4 6 --max-tile-kib 64 --json "$out/layer.jsonl" --write-table "/tmp/layer/$table.json")
step 150 "${tune[@]}" --m 1
step 150 "${tune[@]}" --m 16 --row-scales input
cp "/tmp/layer/$table.json" "$out/layer_$table.json"
bench=(python3 benchmarks/bench_int8_matmul.py --shapes layer --brief --ms 1,16)
JINT8_KERNEL_TABLES=/tmp/layer step 90 "${bench[@]}"
step 90 "${bench[@]}"
echo "== done $(date +%T)" | tee -a "$log"
