# Sourced by the one-call device scripts (batch8_questions.sh, split1_questions.sh, ...):
# `step SECONDS COMMAND...` runs COMMAND under its own time limit and appends its output, less
# XLA's log lines, to $log as it comes, so a call cut short still returns what ran.
step() {
    echo "== $(date +%T) $*" | tee -a "$log"
    timeout "$1" "${@:2}" 2>&1 | grep -v -E '^[WI][0-9]{4} ' | tee -a "$log"
}
