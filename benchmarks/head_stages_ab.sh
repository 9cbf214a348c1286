#!/usr/bin/env bash
# One device call: session 11's two H100 table changes, tried on another GPU's table: gate_up's
# M = 1 tiles with 3 pipeline stages (timed against 4 with tune_decode_shapes --table-only), and
# lm_head's own M = 1 tiles (tuned, written if >= 3 % faster than the generic bucket), both into
# a table copy (B); then batch-1 decode A/B/A (A: jint8's table). Each step has its own time
# limit and appends to ${OUT:-/tmp}/head_stages.log. About 6 minutes.
#
#   TABLE=nvidia_h200 bash benchmarks/head_stages_ab.sh
set -u
cd "$(dirname "$0")/.."
out="${OUT:-/tmp}"
log="$out/head_stages.log"
table="${TABLE:-nvidia_h200}"
source benchmarks/steps.sh
table_variant /tmp/hs "4096,28672" num_stages=3
tune=(python3 benchmarks/tune_decode_shapes.py --m 1 --reduce xla --json "$out/head_stages.jsonl")
step 60 "${tune[@]}" --table-only --norm --output-gate --stages 3 4 --shapes gate_up_proj
step 150 "${tune[@]}" --shapes lm_head --max-tile-kib 64 --stages 3 4 --write-table "/tmp/hs/$table.json"
cp "/tmp/hs/$table.json" "$out/hs_$table.json"
decode_ab 100 "$out/head_stages_e2e.jsonl" /tmp/hs
echo "== done $(date +%T)" | tee -a "$log"
