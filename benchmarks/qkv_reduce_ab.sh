#!/usr/bin/env bash
# One device call: batch-1 decode with qkv_proj's M = 1 split-K partials summed in the kernel
# (Config.split_reduce "kernel": the tile's last program, by a ticket counter) instead of by an
# XLA kernel before attention: B keeps the table's split 8, C takes split 4. Order A/B/C/A, then
# bf16 once (the 1.6x ratio of #7). Each step has its own time limit and appends to
# ${OUT:-/tmp}/qkv_reduce.log. About 5 minutes.
#
#   TABLE=nvidia_h100 bash benchmarks/qkv_reduce_ab.sh
set -u
cd "$(dirname "$0")/.."
out="${OUT:-/tmp}"
log="$out/qkv_reduce.log"
table="${TABLE:-nvidia_h100}"
source benchmarks/steps.sh
table_variant /tmp/qk8 "4096,6144" split_reduce=kernel split_k=8
table_variant /tmp/qk4 "4096,6144" split_reduce=kernel split_k=4
decode_ab 100 "$out/qkv_reduce.jsonl" /tmp/qk8 /tmp/qk4
decode_run 100 bf16 "$out/qkv_reduce.jsonl"
echo "== done $(date +%T)" | tee -a "$log"
