#!/usr/bin/env bash
# Issue 14's benchmark in one sitting: MT-Bench first turns (3 per category), the first 20 HumanEval prompts and
# the long-prompt set, greedy, 256 new tokens, every registered method (--budget auto where it applies) with
# transformers' AR and prompt lookup (configs/bench_issue14_*.yaml). It takes hours on a 2-core CPU, so it is
# made to run unattended and to be resumed:
#   setsid nohup bash scripts/bench_issue14.sh >/dev/null 2>&1 &    # detached; progress in the log
#   tail -f results/issue14/bench.log
# Run it again (same arguments) after it was stopped or killed: every bench resumes its folder, so methods
# already complete are not run again and an interrupted one starts over. A part that fails does not stop the
# parts after it; the script then exits 1 (run it again to retry). Extra arguments go to every `spec-jax bench`
# (e.g. --methods ar,pld --num-prompts 1 --max-new-tokens 16 for a smoke run; settings that differ from a
# stored run are refused, so give a smoke run its own ISSUE14_OUT).
# Environment: ISSUE14_OUT (results root, default results/issue14), ISSUE14_PARTS (default
# "mtbench humaneval long"), SPEC_JAX (the command, default spec-jax).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=${ISSUE14_OUT:-results/issue14}
PARTS=${ISSUE14_PARTS:-mtbench humaneval long}
SPEC_JAX=${SPEC_JAX:-spec-jax}
mkdir -p "$ROOT"
LOG="$ROOT/bench.log"

exec 9>"$ROOT/.lock"  # one run per results root: a second one would decode next to the first and skew both
if ! flock -n 9; then
    echo "bench_issue14: another run holds $ROOT/.lock; wait for it or stop it first" >&2
    exit 1
fi
echo "bench_issue14: logging to $LOG"
exec >>"$LOG" 2>&1
stamp() { echo "[$(date '+%Y-%m-%d %H:%M:%S')] $*"; }

stamp "start: parts $PARTS, results in $ROOT, extra arguments: ${*:-none}"
if [ ! -f results/skip_smollm2.json ]; then
    "$SPEC_JAX" search-skip --out results/skip_smollm2.json || { stamp "search-skip failed"; exit 1; }
fi
if [ ! -f results/exit_smollm2.json ]; then
    "$SPEC_JAX" search-exit --out results/exit_smollm2.json || { stamp "search-exit failed"; exit 1; }
fi
failed=()
for part in $PARTS; do
    stamp "$part: spec-jax bench --config configs/bench_issue14_$part.yaml --out $ROOT/$part $*"
    "$SPEC_JAX" bench --config "configs/bench_issue14_$part.yaml" --out "$ROOT/$part" "$@"
    rc=$?
    stamp "$part: exit $rc"
    if [ "$rc" -eq 130 ] || [ "$rc" -eq 143 ]; then  # Ctrl-C or SIGTERM: stop here, resume later
        stamp "stopped; run the same command again to resume"
        exit "$rc"
    fi
    [ "$rc" -eq 0 ] || failed+=("$part")
done
if [ "${#failed[@]}" -gt 0 ]; then
    stamp "done; failed: ${failed[*]} (their folders keep what finished; run again to retry)"
    exit 1
fi
stamp "done; summaries: $(for p in $PARTS; do printf '%s ' "$ROOT/$p/summary.md"; done)"
