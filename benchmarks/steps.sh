# Sourced by the one-call device scripts (batch8_questions.sh, split1_questions.sh, ...):
# `step SECONDS COMMAND...` runs COMMAND under its own time limit and appends its output, less
# XLA's log lines, to $log as it comes, so a call cut short still returns what ran.
step() {
    echo "== $(date +%T) $*" | tee -a "$log"
    timeout "$1" "${@:2}" 2>&1 | grep -v -E '^[WI][0-9]{4} ' | tee -a "$log"
}

# `decode_run SECONDS VARIANT JSONL`: one batch-1 (DECODE_BATCH) decode process of the
# Llama-3-8B shape (bench_generate, as RESULTS' end-to-end rows), its line appended to JSONL.
decode_run() {
    step "$1" python3 benchmarks/bench_generate.py --variants "$2" --batch "${DECODE_BATCH:-1}" --fuse \
        --quantize-lm-head --quantize-embeddings --repeats 3 --json "$3"
}

# `decode_ab SECONDS JSONL DIR...`: int8 decode_run with jint8's tables, then with each
# JINT8_KERNEL_TABLES directory DIR, then with jint8's again (A/B/.../A); one process each.
decode_ab() {
    decode_run "$1" int8 "$2"
    local dir
    for dir in "${@:3}"; do
        JINT8_KERNEL_TABLES="$dir" decode_run "$1" int8 "$2"
    done
    decode_run "$1" int8 "$2"
}

# `table_variant DIR SHAPES FIELD=VALUE...`: DIR/$table.json, a copy of jint8's table for
# $table whose M = 1 entries of the shapes in SHAPES ("K,N K,N ...") get these plan fields
# (VALUE as JSON, else a string), for decode_ab's B runs.
table_variant() {
    mkdir -p "$1" && python3 - "jint8/ops/int8_matmul/data/$table.json" "$1/$table.json" "${@:2}" <<'PY'
import json, sys
src, dst, shapes, *fields = sys.argv[1:]
def value(text):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text
table = json.load(open(src))
for entry in table["shapes_nk"]:
    if f"{entry['k']},{entry['n']}" in shapes.split() and entry.get("min_m", 1) == 1:
        entry["gemm"].update({k: value(v) for k, v in (f.split("=", 1) for f in fields)})
json.dump(table, open(dst, "w"), indent=1)
PY
}
