#!/usr/bin/env bash
# One device call: Config.sweep "first_step" (session 12, first GPU run): the fused kernel's own
# sweeps of x (RMSNorm's sum of squares, the row absmax, a gate's input) in a branch of the K
# loop's first step, so that the loop's pipelined weight loads for its first num_stages - 1
# steps, issued before the loop, stream while the sweeps read x. Then:
#   1. tune_decode_shapes --table-only at M = 1 (the four Llama projections, norm and output
#      gate as the model runs them) with each sweep: isolated times, and each plan's output
#      checked against the reference on the GPU;
#   2. the same for #3's layer (8192x28672) at M = 16, with row scales from the kernel's sweep
#      (now overlapped) and from XLA;
#   3. batch-1 decode A/B/A, B: every M = 1 Llama entry (and lm_head's) with sweep first_step.
# Each step has its own time limit and appends to ${OUT:-/tmp}/sweep.log. About 6 minutes.
#
#   TABLE=nvidia_h100 bash benchmarks/sweep_ab.sh
set -u
cd "$(dirname "$0")/.."
out="${OUT:-/tmp}"
log="$out/sweep.log"
table="${TABLE:-nvidia_h100}"
source benchmarks/steps.sh
step 120 python3 benchmarks/tune_decode_shapes.py --table-only --m 1 --norm --output-gate \
    --sweep before_loop first_step --json "$out/sweep_tune.jsonl"
step 60 python3 benchmarks/tune_decode_shapes.py --table-only --m 16 --shapes 8192x28672 \
    --row-scales kernel input --sweep before_loop first_step --json "$out/sweep_tune.jsonl"
table_variant /tmp/sweep "4096,6144 4096,4096 4096,28672 14336,4096 4096,128256" sweep=first_step
decode_ab 100 "$out/sweep_e2e.jsonl" /tmp/sweep
echo "== done $(date +%T)" | tee -a "$log"
