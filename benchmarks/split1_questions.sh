#!/usr/bin/env bash
# One device call for NOTES_int8_matmul.md "Next steps" 1 (#7's last ~2 % at batch 1): can the
# M = 1 projections whose split-K partials XLA sums (qkv, o, down) run as fast without a split?
# With split_k = 1 the kernel writes the finished output, so qkv's sum kernel goes, and o's and
# down's residual add can move into the kernel's epilogue (int8_matmul(residual=)). Each step has
# its own time limit and appends to ${OUT:-/tmp}/split1.log as it finishes. About 6 minutes.
#
#   bash benchmarks/split1_questions.sh
set -u
cd "$(dirname "$0")/.."
log="${OUT:-/tmp}/split1.log"
source benchmarks/steps.sh
tune=("${PYTHON:-python3}" benchmarks/tune_decode_shapes.py --m 1 --splits 1 --reduce xla
      --stages 4 6 --json "${OUT:-/tmp}/split1.jsonl" ${TUNE_FLAGS:-})
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.max.mem --format=csv | tee -a "$log"
step 200 "${tune[@]}" --shapes o_proj down_proj ${RESIDUAL_FLAG:-}
step 200 "${tune[@]}" --norm --shapes qkv_proj
echo "== done $(date +%T)" | tee -a "$log"
