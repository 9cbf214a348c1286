#!/usr/bin/env bash
# One device call: batch-1 decode end to end with o_proj's (B) and also down_proj's (C) M = 1
# plans taking row scales from XLA (Config.row_scales "input") against jint8's table (A), as
# A/B/C/A. In the decode step o_proj's input comes out of the attention combine, an XLA fusion
# that can also emit the row absmax, so the kernel's own sweep may be dearer than the input.
# Each step has its own time limit and appends to ${OUT:-/tmp}/m1rs.log. About 5 minutes.
#
#   TABLE=nvidia_h100 bash benchmarks/m1_row_scales_ab.sh
set -u
cd "$(dirname "$0")/.."
out="${OUT:-/tmp}"
log="$out/m1rs.log"
table="${TABLE:-nvidia_h100}"
source benchmarks/steps.sh
variant() {  # variant DIR K,N...: a table copy whose M = 1 entries of these shapes take "input"
    mkdir -p "$1" && python3 - "jint8/ops/int8_matmul/data/$table.json" "$1/$table.json" "${@:2}" <<'PY'
import json, sys
src, dst, *shapes = sys.argv[1:]
table = json.load(open(src))
for entry in table["shapes_nk"]:
    if f"{entry['k']},{entry['n']}" in shapes and entry.get("min_m", 1) == 1:
        entry["gemm"]["row_scales"] = "input"
json.dump(table, open(dst, "w"), indent=1)
PY
}
variant /tmp/rs_o 4096,4096
variant /tmp/rs_od 4096,4096 14336,4096
decode_ab 120 "$out/m1rs.jsonl" /tmp/rs_o /tmp/rs_od
echo "== done $(date +%T)" | tee -a "$log"
