#!/usr/bin/env bash
# One device call, two int8-only questions of batch-1 decode (#7's 1.6x):
#  - lm_head (4096 x 128256 at M = 1) runs on the generic M = 1 bucket's tiles: tune it (tiles up
#    to 64 KiB, 3 or 4 stages) into a table copy (B);
#  - qkv_proj unsplit (split_k 1, its norm folded): no split-K partials, so no XLA sum kernel
#    before attention (one per layer); the tuner's best unsplit tiles go into a copy (C)
#    whatever their isolated time, since the sum kernel's cost only shows in the decode step.
# Then decode end to end, A/B/C/A (A: jint8's table). Each step has its own time limit and
# appends to ${OUT:-/tmp}/head_qkv.log. About 7 minutes.
#
#   TABLE=nvidia_h100 bash benchmarks/head_qkv_questions.sh
set -u
cd "$(dirname "$0")/.."
out="${OUT:-/tmp}"
log="$out/head_qkv.log"
table="${TABLE:-nvidia_h100}"
source benchmarks/steps.sh
mkdir -p /tmp/lmh /tmp/q1 && cp "jint8/ops/int8_matmul/data/$table.json" /tmp/lmh/ \
    && cp "jint8/ops/int8_matmul/data/$table.json" /tmp/q1/
tune=(python3 benchmarks/tune_decode_shapes.py --m 1 --reduce xla --json "$out/head_qkv.jsonl")
step 150 "${tune[@]}" --shapes lm_head --max-tile-kib 64 --stages 3 4 --write-table "/tmp/lmh/$table.json"
step 90 "${tune[@]}" --shapes qkv_proj --norm --splits 1 --min-gain -1 --write-table "/tmp/q1/$table.json"
cp "/tmp/lmh/$table.json" "$out/lmh_$table.json"; cp "/tmp/q1/$table.json" "$out/q1_$table.json"
decode_ab 100 "$out/head_qkv_e2e.jsonl" /tmp/lmh /tmp/q1
echo "== done $(date +%T)" | tee -a "$log"
