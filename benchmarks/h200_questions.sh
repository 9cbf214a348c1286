#!/usr/bin/env bash
# One device call on an H200 (kind nvidia-h200): decode tiles of its own for the fused kernel.
# data/nvidia_h200.json's per-shape decode entries were copied from the H100 (same SMs, faster
# HBM); this tunes them at M = 1 on the H200 and compares the kernel's row sweep with row scales
# from XLA at M = 8. Each step has its own time limit and appends to ${OUT:-/tmp}/h200.log as it
# finishes; the tuned table is written to ${OUT:-/tmp}/nvidia_h200.json. About 8 minutes.
#
#   bash benchmarks/h200_questions.sh
set -u
cd "$(dirname "$0")/.."
out="${OUT:-/tmp}"
log="$out/h200.log"
source benchmarks/steps.sh
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv | tee -a "$log"
mkdir -p /tmp/t200 && cp jint8/ops/int8_matmul/data/nvidia_h200.json /tmp/t200/
tune=(python3 benchmarks/tune_decode_shapes.py --json "$out/h200_tune.jsonl")
# 1. M = 1 (batch-1 decode): the shapes of a fused Llama-3-8B layer, norms folded as the models
#    fold them; a candidate >= 3 % faster than the copied plan replaces it.
step 420 "${tune[@]}" --m 1 --norm --reduce xla --write-table /tmp/t200/nvidia_h200.json \
    --shapes o_proj qkv_proj down_proj gate_up_proj
cp /tmp/t200/nvidia_h200.json "$out/nvidia_h200.json"
# 2. M = 8: the (copied) plans with the kernel's row sweep against row scales from XLA.
JINT8_KERNEL_TABLES=/tmp/t200 step 150 "${tune[@]}" --m 8 --table-only --row-scales kernel input
echo "== done $(date +%T)" | tee -a "$log"
