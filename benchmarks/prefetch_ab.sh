#!/usr/bin/env bash
# One device call: Config.prefetch_first_tile (session 12): the fused kernel loads its first K
# step's weight tiles before it sweeps x (norm, row absmax, a gate's input), so that their HBM
# reads overlap the sweeps' L2 reads. (Session 12's first try, the sweeps in a branch of the
# K loop's first step, broke Triton's pipelining of the loop: 1.1-1.7x slower, reverted.)
#   1. tune_decode_shapes --table-only at M = 1 (the four Llama projections, norm and output
#      gate as the model runs them), off and on: isolated times, outputs checked on the GPU;
#   2. the same for #3's layer (8192x28672) at M = 1 and at M = 16 (row scales from the
#      kernel's sweep and from XLA);
#   3. batch-1 decode A/B/A, B: every M = 1 Llama entry (and lm_head's) with it on.
# Each step has its own time limit and appends to ${OUT:-/tmp}/prefetch.log. About 6 minutes.
#
#   TABLE=nvidia_h100 bash benchmarks/prefetch_ab.sh
set -u
cd "$(dirname "$0")/.."
out="${OUT:-/tmp}"
log="$out/prefetch.log"
table="${TABLE:-nvidia_h100}"
source benchmarks/steps.sh
step 120 python3 benchmarks/tune_decode_shapes.py --table-only --m 1 --norm --output-gate \
    --prefetch-first-tile off on --json "$out/prefetch_tune.jsonl"
step 40 python3 benchmarks/tune_decode_shapes.py --table-only --m 1 --shapes 8192x28672 \
    --prefetch-first-tile off on --json "$out/prefetch_tune.jsonl"
step 60 python3 benchmarks/tune_decode_shapes.py --table-only --m 16 --shapes 8192x28672 \
    --row-scales kernel input --prefetch-first-tile off on --json "$out/prefetch_tune.jsonl"
table_variant /tmp/prefetch "4096,6144 4096,4096 4096,28672 14336,4096 4096,128256" \
    prefetch_first_tile=true
decode_ab 100 "$out/prefetch_e2e.jsonl" /tmp/prefetch
echo "== done $(date +%T)" | tee -a "$log"
