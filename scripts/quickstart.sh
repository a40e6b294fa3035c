#!/usr/bin/env bash
# Quick start: build, make a small demo model offline, start a real two-process pipeline ring on
# 127.0.0.1 (layers 0-1 in one process, 2-3 in the other), and stream a chat answer through it.
# Safe to run again: the model is made once; stages from an earlier run are stopped first.
set -euo pipefail
cd "$(dirname "$0")/.."

dir=target/demo
model=$dir/model
mkdir -p "$dir"
echo "==> building clusteragent (the first build compiles candle: several minutes on 2 cores)"
cargo build -p clusteragent
agent=target/debug/clusteragent

if [ ! -f "$model/config.json" ]; then
  echo "==> making a random-weight Qwen3-shaped demo model in $model"
  "$agent" make-model --out "$model" --arch qwen3 --layers 4 --hidden 128 --intermediate 256 \
    --heads 4 --kv-heads 2 --head-dim 32
fi

if [ -f "$dir/pids" ]; then
  kill $(cat "$dir/pids") 2>/dev/null || true
  rm -f "$dir/pids"
fi
cat > "$dir/ring.json" <<JSON
{
  "pipeline": "demo", "generation": 1, "model": "$PWD/$model", "device": "cpu",
  "token": "demo-cluster-token",
  "stages": [
    {"node": "local-a", "address": "127.0.0.1:7101", "layers": "0-1"},
    {"node": "local-b", "address": "127.0.0.1:7102", "layers": "2-3"}
  ]
}
JSON

echo "==> starting stage 0 (layers 0-1, API on http://127.0.0.1:7100) and stage 1 (layers 2-3)"
"$agent" stage --config "$dir/ring.json" --index 0 --http 127.0.0.1:7100 >"$dir/stage-0.log" 2>&1 &
echo $! >>"$dir/pids"
"$agent" stage --config "$dir/ring.json" --index 1 >"$dir/stage-1.log" 2>&1 &
echo $! >>"$dir/pids"

echo "==> asking the ring (random weights: the text is noise, the machinery is real)"
"$agent" ask --head http://127.0.0.1:7100 --wait 60 --chat --prompt "What do two machines on a shelf do?" --max-tokens 48

cat <<TXT

The ring is still running. Talk to it:
  $agent ask --head http://127.0.0.1:7100 --chat --prompt "Hello"
  curl -N http://127.0.0.1:7100/generate -d '{"prompt": "Hello", "max_tokens": 32}'
  curl http://127.0.0.1:7100/health
Logs: $dir/stage-0.log, $dir/stage-1.log
Stop it: kill \$(cat $dir/pids) && rm $dir/pids
TXT
