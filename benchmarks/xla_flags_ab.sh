#!/usr/bin/env bash
# One device call: does an XLA flag set change batch-1 decode? Runs int8 and bf16 decode
# (bench_generate, as RESULTS' end-to-end rows) with jint8's defaults and with
# XLA_FLAGS="$FLAGS", alternating (int8 A/B/A/B, then bf16 A/B). XLA stops at start-up on a flag
# it does not know, so a B run that completes means the installed XLA parsed the flags. Each step
# has its own time limit and appends to ${OUT:-/tmp}/xla_flags.log; one line per run goes to
# xla_flags.jsonl, in that order.
#
#   FLAGS="--xla_gpu_enable_pdl=true" bash benchmarks/xla_flags_ab.sh   # session 12: no change
set -u
cd "$(dirname "$0")/.."
out="${OUT:-/tmp}"
log="$out/xla_flags.log"
source benchmarks/steps.sh
run() {  # run VARIANT [XLA_FLAGS]
    XLA_FLAGS="${2:-}" decode_run 100 "$1" "$out/xla_flags.jsonl"
}
run int8; run int8 "$FLAGS"; run int8; run int8 "$FLAGS"
run bf16; run bf16 "$FLAGS"
echo "== done $(date +%T)" | tee -a "$log"
