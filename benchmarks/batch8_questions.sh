#!/usr/bin/env bash
# One device call for NOTES_int8_matmul.md "Next steps" 1 (batch-8 decode, M = 2-16): each step
# has its own time limit and appends to ${OUT:-/tmp}/batch8.log as it finishes, so a call cut
# short still returns what ran. About 6 minutes on an H100.
#
#   bash benchmarks/batch8_questions.sh            # kernel-level answers, and /tmp/t8's table
# then, in separate calls (one bench_generate process needs 3-7 minutes):
#   JINT8_KERNEL_TABLES=/tmp/t8 python3 benchmarks/bench_generate.py --variants int8 --batch 8 \
#       --fuse --quantize-lm-head --quantize-embeddings
#   python3 benchmarks/bench_generate.py --variants int8 --batch 8 --fuse --quantize-lm-head \
#       --quantize-embeddings
set -u
cd "$(dirname "$0")/.."
log="${OUT:-/tmp}/batch8.log"
source benchmarks/steps.sh
tune=("${PYTHON:-python3}" benchmarks/tune_decode_shapes.py ${TUNE_FLAGS:-})
# 1. Row scales from XLA instead of every program's sweep, on the table's plans.
step 150 "${tune[@]}" --table-only --m 8 --row-scales kernel input
step 120 "${tune[@]}" --table-only --m 16 --row-scales kernel input --shapes layer_8192x28672 down_proj
# 2. The two-kernel route (x quantized once) against the fused kernel on the slowest M = 8 shape.
step 300 "${tune[@]}" --m 8 --routes fused pallas --reduce xla --shapes down_proj
# 3. A table for the end-to-end A/B: a variant >= 3 % faster at M = 8 takes M = 2-16.
mkdir -p /tmp/t8 && cp jint8/ops/int8_matmul/data/nvidia_h100.json /tmp/t8/
step 150 "${tune[@]}" --table-only --m 8 --row-scales kernel input --write-table /tmp/t8/nvidia_h100.json
cp /tmp/t8/nvidia_h100.json "${OUT:-/tmp}/t8_nvidia_h100.json" 2>/dev/null
echo "== done $(date +%T)" | tee -a "$log"
