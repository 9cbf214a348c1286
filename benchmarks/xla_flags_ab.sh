#!/usr/bin/env bash
# One device call: does an XLA flag set change batch-1 decode? Lists the installed XLA's flags
# matching $FLAG_GREP (default "pdl") with their defaults (from XLA_FLAGS=--helpfull), then runs
# int8 and bf16 decode (bench_generate, as RESULTS' end-to-end rows) with jint8's defaults and
# with XLA_FLAGS="$FLAGS", alternating (int8 A/B/A/B, then bf16 A/B). Each step has its own time
# limit and appends to ${OUT:-/tmp}/xla_flags.log; one line per run goes to xla_flags.jsonl.
#
#   FLAGS="--xla_gpu_enable_pdl=true" bash benchmarks/xla_flags_ab.sh
set -u
cd "$(dirname "$0")/.."
out="${OUT:-/tmp}"
log="$out/xla_flags.log"
source benchmarks/steps.sh
echo "== XLA flags matching '${FLAG_GREP:-pdl}'" | tee -a "$log"
XLA_FLAGS=--helpfull timeout 60 python3 -c "import jax; jax.devices()" 2>&1 \
    | grep -i -A2 -- "${FLAG_GREP:-pdl}" | tee -a "$log"
run() {  # run VARIANT [XLA_FLAGS]
    XLA_FLAGS="${2:-}" step 100 python3 benchmarks/bench_generate.py --variants "$1" --batch 1 \
        --fuse --quantize-lm-head --quantize-embeddings --repeats 3 --json "$out/xla_flags.jsonl"
}
run int8; run int8 "$FLAGS"; run int8; run int8 "$FLAGS"
run bf16; run bf16 "$FLAGS"
echo "== done $(date +%T)" | tee -a "$log"
