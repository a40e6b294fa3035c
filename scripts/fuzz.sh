#!/usr/bin/env bash
# The fuzzing tests, longer: damaged ring frames and handshakes, manifests, OpenAI requests (to a running
# 2-agent endpoint) and model files (see tests/fixtures/src/damage.rs), CASES cases each
# (default 50,000; the test run has 256). A failure is shrunk to the fewest changes and kept
# in a `.regressions` file beside the test's source: commit it with the fix, and every later
# run replays it first.
set -euo pipefail
cd "$(dirname "$0")/.."
cases=${CASES:-50000}
export PROPTEST_CASES=$cases
echo "fuzzing with $cases cases per target" >&2
cargo test -p clusteragent --lib ring::frame::tests::damaged_frames_parse_or_are_refused
cargo test -p clusteragent --lib ring::handshake::tests::damaged_handshakes_end_refused
cargo test -p cluster-api --test fuzz_manifests
cargo test -p clusteragent --test control openai::damaged_requests
# A model case writes and loads a whole (tiny) model: a tenth as many.
PROPTEST_CASES=$(( (cases + 9) / 10 )) cargo test -p cluster-engine --test fuzz_model_files
