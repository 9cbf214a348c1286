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
table_variant /tmp/rs_o "4096,4096" row_scales=input
table_variant /tmp/rs_od "4096,4096 14336,4096" row_scales=input
decode_ab 120 "$out/m1rs.jsonl" /tmp/rs_o /tmp/rs_od
echo "== done $(date +%T)" | tee -a "$log"
