#!/usr/bin/env bash
# The fuzzing tests, longer: damaged ring frames, manifests and GGUF files (see
# tests/fixtures/src/damage.rs), CASES cases each (default 50,000; CI runs 256). A failure is
# shrunk to the fewest changes and kept in a `.regressions` file beside the test's source:
# commit it with the fix, and every later run replays it first.
set -euo pipefail
cd "$(dirname "$0")/.."
cases=${CASES:-50000}
export PROPTEST_CASES=$cases
echo "fuzzing with $cases cases per target" >&2
cargo test --release -p clusteragent --lib ring::frame::tests::damaged_frames_parse_or_are_refused
cargo test --release -p cluster-api --test fuzz_manifests
# A model case writes and loads a whole (tiny) model: a tenth as many.
PROPTEST_CASES=$(( (cases + 9) / 10 )) cargo test --release -p cluster-engine --test fuzz_model_files
