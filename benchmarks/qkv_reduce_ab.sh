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
variant() {  # variant DIR SPLIT: a table copy whose qkv M = 1 entry sums in the kernel
    mkdir -p "$1" && python3 - "jint8/ops/int8_matmul/data/$table.json" "$1/$table.json" "$2" <<'PY'
import json, sys
src, dst, split = sys.argv[1:]
table = json.load(open(src))
for entry in table["shapes_nk"]:
    if (entry["k"], entry["n"]) == (4096, 6144) and entry.get("min_m", 1) == 1:
        entry["gemm"].update(split_reduce="kernel", split_k=int(split))
json.dump(table, open(dst, "w"), indent=1)
PY
}
variant /tmp/qk8 8
variant /tmp/qk4 4
decode_ab 100 "$out/qkv_reduce.jsonl" /tmp/qk8 /tmp/qk4
step 100 python3 benchmarks/bench_generate.py --variants bf16 --batch 1 --fuse --quantize-lm-head \
    --quantize-embeddings --repeats 3 --json "$out/qkv_reduce.jsonl"
echo "== done $(date +%T)" | tee -a "$log"
