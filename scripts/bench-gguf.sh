#!/usr/bin/env bash
# One GGUF stage against llama.cpp on the same file, one thread each (THREADS=2: two each, on
# cores 0-1), side by side: decode tokens/s for F32 and each block type people download (KINDS
# to choose), medians of interleaved rounds, ratios printed last.
# Needs llama-cpp-python (pip install llama-cpp-python builds llama.cpp from its source).
# BASELINE=path/to/an/older/clusteragent adds that build as a third column, measured in the same
# interleaved rounds, to show what a kernel change gained.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${ROUNDS:-3}
tokens=${TOKENS:-96}
threads=${THREADS:-1}
python3 -c "import llama_cpp" 2>/dev/null || { echo "llama-cpp-python is not installed: pip install llama-cpp-python" >&2; exit 1; }
cargo build --release -p clusteragent
agent=target/release/clusteragent
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
pin() { if command -v taskset >/dev/null; then taskset -c "0-$((threads - 1))" "$@"; else "$@"; fi; }
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
kinds=${KINDS:-f32 f16 q8_0 q4_0 q4_1 q5_0 q5_1 q2_k q3_k q4_k q5_k q6_k}
baseline=${BASELINE:-}
declare -A ours theirs before
run_ours() {
  RAYON_NUM_THREADS=$threads CANDLE_NUM_THREADS=$threads pin "$1" generate --model "$2" --device cpu \
    --prompt "The two machines sat side by side on the shelf, joined by a short cable." \
    --max-tokens "$tokens" --ignore-eos --json | python3 -c "import json,sys; print(json.load(sys.stdin)['timings']['decode_tokens_per_s'])"
}
for kind in $kinds; do
  "$agent" make-model --out "$work/$kind" --arch llama --layers 8 --hidden 768 --intermediate 2048 \
    --heads 12 --kv-heads 4 --gguf "$kind" >/dev/null
  rm "$work/$kind/tokenizer.json"   # both sides tokenize from the GGUF's own metadata
  for r in $(seq "$rounds"); do
    a=$(run_ours "$agent" "$work/$kind/model.gguf")
    if [ -n "$baseline" ]; then
      c=$(run_ours "$baseline" "$work/$kind/model.gguf")
      echo "$kind round $r: baseline $c tok/s" >&2
      before[$kind]+="$c "
    fi
    if ! out=$(pin python3 tests/tools/llamacpp_decode.py "$work/$kind/model.gguf" "$tokens" "$threads"); then
      echo "llama.cpp failed on the $kind file (on a CPU with AMX its AMX kernels have crashed: rebuild it without them," >&2
      echo "CMAKE_ARGS='-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF' pip install --no-cache-dir --force-reinstall llama-cpp-python)" >&2
      exit 1
    fi
    b=$(echo "$out" | python3 -c "import json,sys; print(json.load(sys.stdin)['decode_tokens_per_s'])")
    echo "$kind round $r: clusteragent $a tok/s, llama.cpp $b tok/s" >&2
    ours[$kind]+="$a "
    theirs[$kind]+="$b "
  done
done
echo "GGUF decode, $threads thread(s), 8-layer hidden-768 Llama-shaped model, $tokens tokens, median of $rounds rounds:"
for kind in $kinds; do
  a=$(echo ${ours[$kind]} | tr ' ' '\n' | median)
  b=$(echo ${theirs[$kind]} | tr ' ' '\n' | median)
  printf "%-5s clusteragent %8.2f tok/s   llama.cpp %8.2f tok/s   ratio %.3f (goal >= 1.0)" "$kind" "$a" "$b" "$(echo "$a / $b" | bc -l)"
  if [ -n "$baseline" ]; then
    c=$(echo ${before[$kind]} | tr ' ' '\n' | median)
    printf "   baseline %8.2f tok/s, gain %.2fx" "$c" "$(echo "$a / $c" | bc -l)"
  fi
  printf "\n"
done
