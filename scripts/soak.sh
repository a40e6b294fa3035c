#!/usr/bin/env bash
# The long soak of docs/security.md: 30 minutes of 16 clients (streams, whole answers, a fifth
# walking away mid-stream, random sizes) against a pipeline's two replicas on four agents, one
# agent restarted every 5 minutes. Passes with no client error, sequences in flight back to 0,
# no stage cache left, and the endpoint agent's resident memory within 2% of what it was after
# the first quarter (its open files flat). CI runs the same test for 40 s.
set -euo pipefail
cd "$(dirname "$0")/.."
export SOAK_SECONDS="${SOAK_SECONDS:-1800}"
export SOAK_RESTART_SECONDS="${SOAK_RESTART_SECONDS:-300}"
export SOAK_RSS_GROWTH="${SOAK_RSS_GROWTH:-0.02}"
exec cargo test -p clusteragent --test control soak -- --nocapture
