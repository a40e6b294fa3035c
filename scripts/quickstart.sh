#!/usr/bin/env bash
# Quick start: build, make a small demo model offline, and stream a chat answer through the
# model split into two stages. Safe to run again: the model is made once.
set -euo pipefail
cd "$(dirname "$0")/.."

model=target/demo-model
echo "==> building clusteragent (first build compiles candle: several minutes on 2 cores)"
cargo build -p clusteragent
agent=target/debug/clusteragent

if [ ! -f "$model/config.json" ]; then
  echo "==> making a random-weight Qwen3-shaped demo model in $model"
  "$agent" make-model --out "$model" --arch qwen3 --layers 4 --hidden 128 --intermediate 256 --heads 4 --kv-heads 2 --head-dim 32
fi

echo "==> generating through two stages (layers 0-1 and 2-3) in one process"
echo "    (random weights: the text is noise, the machinery is real)"
"$agent" generate --model "$model" --chat --prompt "What do two machines on a shelf do?" \
  --split 0-1,2-3 --max-tokens 48 --device cpu
