#!/usr/bin/env bash
# The tests as `cargo test --workspace` runs them, then a count of the checks that were skipped
# because a tool or ../shared/data was missing (each prints `SKIPPED in <test>: <what>`), so a
# run that passed with gaps says so at its end. `.ci/run` sets CI=true instead, under which a
# missing tool fails its test.
set -uo pipefail
cd "$(dirname "$0")/.."
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
skipped=$(grep -c '^SKIPPED in ' "$log")
if [ "$skipped" -gt 0 ]; then
    echo
    echo "$skipped checks skipped (install what they name, or run bash .ci/run):"
    grep '^SKIPPED in ' "$log" | sort | uniq -c
else
    echo "no checks skipped"
fi
exit "$status"
