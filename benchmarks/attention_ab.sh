#!/usr/bin/env bash
# One device call: the decode-attention kernel's launch parameters (block_s, num_warps,
# num_stages, target_programs; never tuned since session 3). attention_tiles.py times a grid at
# batch 1; if its best runs >= 7 % faster than the defaults, a copy of the tree with those
# defaults runs batch-1 decode int8 and bf16 against this tree's (A/B each: the kernel runs in
# both variants' steps). Appends to ${OUT:-/tmp}/attention.log. About 8 minutes.
#
#   bash benchmarks/attention_ab.sh
set -u
cd "$(dirname "$0")/.."
out="${OUT:-/tmp}"
log="$out/attention.log"
source benchmarks/steps.sh
step 200 python3 benchmarks/attention_tiles.py
read -r _ _ params best _ default < <(grep "^best B=1 " "$log" | tail -1)
if [ -z "${params:-}" ] || ! python3 -c "import sys; sys.exit(not $best < 0.93 * $default)"; then
    echo "== no parameter set >= 7 % faster than the defaults: no A/B" | tee -a "$log"; exit 0
fi
IFS=, read -r block_s warps stages target <<< "$params"
rm -rf /tmp/attn && mkdir /tmp/attn && cp -r benchmarks jint8 /tmp/attn/
sed -i -e "s/^BLOCK_S = .*/BLOCK_S = $block_s/" -e "s/^_TARGET_PROGRAMS = .*/_TARGET_PROGRAMS = $target/" \
    -e "s/num_warps: int = 4, num_stages: int = 2,/num_warps: int = $warps, num_stages: int = $stages,/" \
    /tmp/attn/jint8/ops/attention/pallas_triton.py
grep -n "^BLOCK_S\|^_TARGET_PROGRAMS\|num_warps: int" /tmp/attn/jint8/ops/attention/pallas_triton.py | tee -a "$log"
for variant in int8 bf16; do
    decode_run 100 "$variant" "$out/attention_e2e.jsonl" > /dev/null
    (cd /tmp/attn && decode_run 100 "$variant" "$out/attention_e2e.jsonl" > /dev/null)
done
echo "== done $(date +%T)" | tee -a "$log"
