#!/usr/bin/env bash
# The same weights in f32, bf16 and f16, side by side: decode tokens/s of `generate` on one
# pinned core, medians of interleaved rounds, ratios to f32 printed last. A bf16 or f16 stage
# on the CPU reads two bytes per weight, so a memory-bound decode should near 2x f32.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${ROUNDS:-5}
tokens=${TOKENS:-96}
cargo build --release -p clusteragent
agent=target/release/clusteragent
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
pin() { if command -v taskset >/dev/null; then taskset -c 0 "$@"; else "$@"; fi; }
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
"$agent" make-model --out "$work/m" --arch llama --layers 8 --hidden 768 --intermediate 2048 \
  --heads 12 --kv-heads 4 >/dev/null
declare -A rate
for r in $(seq "$rounds"); do
  for dtype in f32 bf16 f16; do
    v=$(RAYON_NUM_THREADS=1 pin "$agent" generate --model "$work/m" --device cpu --dtype "$dtype" \
      --prompt "The two machines sat side by side on the shelf, joined by a short cable." \
      --max-tokens "$tokens" --ignore-eos --json 2>/dev/null |
      python3 -c "import json,sys; print(json.load(sys.stdin)['timings']['decode_tokens_per_s'])")
    echo "round $r: $dtype $v tok/s" >&2
    rate[$dtype]+="$v "
  done
done
f32=$(echo "${rate[f32]}" | tr ' ' '\n' | grep . | median)
for dtype in f32 bf16 f16; do
  m=$(echo "${rate[$dtype]}" | tr ' ' '\n' | grep . | median)
  python3 -c "print(f'{\"$dtype\":<5} {$m:7.1f} tok/s  {$m / $f32:.2f}x f32')"
done
