#!/usr/bin/env bash
# One device call: re-tune the fused kernel's M = 1 tiles of the Llama-3-8B shapes in a copy of
# this GPU's table (gate_up gating its own result and the norms folded, as the models run them),
# then batch-1 decode end to end with the copy (B) and with jint8's table (A), as A/B/A. Each
# step has its own time limit and appends to ${OUT:-/tmp}/retune.log; the tuned table is
# written to ${OUT:-/tmp}/${TABLE}.json. About 7 minutes.
#
#   TABLE=nvidia_h100 SHAPES="gate_up_proj down_proj o_proj" bash benchmarks/retune_m1_ab.sh
# TUNE_ARGS adds tuner options (e.g. "--max-tile-kib 64 --stages 3 4"); TUNE_SECONDS bounds it.
set -u
cd "$(dirname "$0")/.."
out="${OUT:-/tmp}"
log="$out/retune.log"
table="${TABLE:-nvidia_h100}"
source benchmarks/steps.sh
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.max.mem --format=csv | tee -a "$log"
mkdir -p /tmp/retuned && cp "jint8/ops/int8_matmul/data/$table.json" /tmp/retuned/
# shellcheck disable=SC2086
step "${TUNE_SECONDS:-240}" python3 benchmarks/tune_decode_shapes.py --m 1 --norm --output-gate \
    --reduce xla --json "$out/retune.jsonl" --write-table "/tmp/retuned/$table.json" \
    --shapes ${SHAPES:-gate_up_proj down_proj o_proj} ${TUNE_ARGS:-}
cp "/tmp/retuned/$table.json" "$out/$table.json"
decode_ab 120 "$out/retune_e2e.jsonl" /tmp/retuned
echo "== done $(date +%T)" | tee -a "$log"
