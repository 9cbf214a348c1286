#!/usr/bin/env bash
# One device call: qkv_proj's M = 1 split-K partials summed by the decode-attention kernel where
# it loads q, k and v (Config.split_reduce "consumer", session 11, not yet run on a GPU) instead of
# by an XLA kernel between the two. Writes a table copy whose qkv M = 1 entry says "consumer",
# checks the attention kernel and a tiny model through it on the GPU (gpu_check_attention.py with
# the copy), then batch-1 decode A/B/A (B: the copy) and bf16 once (#7's 1.6x). Each step has its
# own time limit and appends to ${OUT:-/tmp}/consumer.log. About 6 minutes.
#
#   TABLE=nvidia_h100 bash benchmarks/consumer_ab.sh
set -u
cd "$(dirname "$0")/.."
out="${OUT:-/tmp}"
log="$out/consumer.log"
table="${TABLE:-nvidia_h100}"
source benchmarks/steps.sh
table_variant /tmp/consumer "4096,6144" split_reduce=consumer
JINT8_KERNEL_TABLES=/tmp/consumer step 150 python3 benchmarks/gpu_check_attention.py
decode_ab 100 "$out/consumer_e2e.jsonl" /tmp/consumer
decode_run 100 bf16 "$out/consumer_e2e.jsonl"
echo "== done $(date +%T)" | tee -a "$log"
