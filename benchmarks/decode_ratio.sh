#!/usr/bin/env bash
# One device call for #7's ratio: batch-1 decode of the Llama-3-8B shape (bench_generate, as
# RESULTS' end-to-end rows), int8 and bf16 alternating, ROUNDS pairs (default 3), one process
# each; then each run's tok/s, the means and the ratio of the means. Appends to
# ${OUT:-/tmp}/decode_ratio.log; one line per run goes to decode_ratio.jsonl.
#
#   ROUNDS=3 bash benchmarks/decode_ratio.sh      # about 5 minutes on an H100
set -u
cd "$(dirname "$0")/.."
out="${OUT:-/tmp}"
log="$out/decode_ratio.log"
source benchmarks/steps.sh
for _ in $(seq "${ROUNDS:-3}"); do
    for variant in int8 bf16; do
        decode_run 100 "$variant" "$out/decode_ratio.jsonl" >/dev/null
    done
done
python3 - "$out/decode_ratio.jsonl" <<'PY' | tee -a "$log"
import json, statistics, sys
runs = {}
for line in open(sys.argv[1]):
    record = json.loads(line)
    runs.setdefault(record["variant"], []).append(record["decode_tokens_per_s"])
for variant, speeds in runs.items():
    print(f"{variant}: " + " / ".join(f"{s:.1f}" for s in speeds)
          + f" tok/s, mean {statistics.mean(speeds):.1f}")
if {"int8", "bf16"} <= runs.keys():
    print(f"int8 / bf16 (means): {statistics.mean(runs['int8']) / statistics.mean(runs['bf16']):.3f}x")
PY
