#!/usr/bin/env bash
# Throughput under load through the whole product, side by side in one run: two clusteragent
# daemons, each pinned to its own core, serve one model three ways at once (idle pipelines use
# no CPU, so each is measured alone):
#   one       the whole model on agent a (core 0)
#   replicas  the whole model on a and again on b; the streams split evenly between the two
#             endpoints
#   routed    the same two copies as one pipeline with `replicas: 2` behind one endpoint, which
#             spreads the streams itself (what the router costs against an even split)
#   ring      a 2-stage pipeline, the first half of the layers on a, the second on b
# `clusterctl bench` drives each endpoint at 1, 2, 4, 8, 16 and 32 concurrent streams, and the
# ratios the throughput issue asks for are printed last.
#
# Environment: LEVELS (default 1,2,4,8,16,32), TOKENS per request (96), PROMPT tokens per request
# (16: decode dominates; raise it to see prefill's share), REQUESTS per stream and level (2),
# LAYERS (12), HIDDEN (768), MODEL (a model folder to use instead of the random-weight
# Llama-shaped one written here), AGENT (another clusteragent binary, e.g. an earlier build's), ONLY (a space-separated subset of "one replicas routed ring"), LONG=0
# to leave out the long prompt admitted beside 8 streams, KEEP=1 to leave the agents running.
set -euo pipefail
cd "$(dirname "$0")/.."

LEVELS=${LEVELS:-1,2,4,8,16,32}
TOKENS=${TOKENS:-96}
PROMPT=${PROMPT:-16}
ONLY=${ONLY:-one replicas routed ring}
REQUESTS=${REQUESTS:-2}
LAYERS=${LAYERS:-12}
HIDDEN=${HIDDEN:-768}

command -v taskset >/dev/null || { echo "bench-serving: taskset is needed to pin the agents to cores" >&2; exit 1; }
[ "$(nproc)" -ge 2 ] || { echo "bench-serving: needs 2 cores, this machine has $(nproc)" >&2; exit 1; }

echo "==> building clusteragent and clusterctl (release)"
cargo build --release -q -p clusteragent -p clusterctl
agent=${AGENT:-$PWD/target/release/clusteragent}
ctl=$PWD/target/release/clusterctl

dir=$(mktemp -d -t bench-serving.XXXXXX)
pids=()
cleanup() {
  if [ "${KEEP:-0}" != 1 ]; then
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$dir"
  else
    echo "agents left running (pids ${pids[*]}); files in $dir"
  fi
}
trap cleanup EXIT

model=${MODEL:-}
if [ -z "$model" ]; then
  model=$dir/model
  echo "==> writing a random-weight Llama-shaped model: $LAYERS layers, hidden $HIDDEN, f32"
  "$agent" make-model --out "$model" --arch llama --layers "$LAYERS" --hidden "$HIDDEN" \
    --intermediate $((HIDDEN * 8 / 3 / 64 * 64)) --heads $((HIDDEN / 64)) --kv-heads 4 >/dev/null
fi
layers=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['num_hidden_layers'])" "$model/config.json")
half=$((layers / 2))

head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$dir/token"
port() { python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])"; }
a_api=$(port); a_ring=$(port); b_api=$(port); b_ring=$(port)
echo "==> starting agent a on core 0 and agent b on core 1"
taskset -c 0 "$agent" --name a --listen "127.0.0.1:$a_api" --ring-listen "127.0.0.1:$a_ring" \
  --data-dir "$dir/a" --token-file "$dir/token" >"$dir/a.log" 2>&1 &
pids+=($!)
taskset -c 1 "$agent" --name b --listen "127.0.0.1:$b_api" --ring-listen "127.0.0.1:$b_ring" \
  --data-dir "$dir/b" --token-file "$dir/token" >"$dir/b.log" 2>&1 &
pids+=($!)
export CLUSTERCTL_SERVER=http://127.0.0.1:$a_api CLUSTERCTL_TOKEN_FILE=$dir/token
for _ in $(seq 200); do "$ctl" get nodes >/dev/null 2>&1 && break; sleep 0.1; done

one_port=$(port); rep_port=$(port); ring_port=$(port); routed_port=$(port)
cat >"$dir/bench.yaml" <<YAML
apiVersion: v1
kind: Node
metadata: {name: a}
spec: {address: "127.0.0.1:$a_api", ringAddress: "127.0.0.1:$a_ring"}
---
apiVersion: v1
kind: Node
metadata: {name: b}
spec: {address: "127.0.0.1:$b_api", ringAddress: "127.0.0.1:$b_ring"}
---
apiVersion: v1
kind: Model
metadata: {name: bench}
spec: {source: {path: "$model"}}
---
apiVersion: v1
kind: Pipeline
metadata: {name: whole-a}
spec: {model: bench, device: cpu, maxSequences: 64, stages: [{node: a, layers: "0-$((layers - 1))"}]}
---
apiVersion: v1
kind: Pipeline
metadata: {name: whole-b}
spec: {model: bench, device: cpu, maxSequences: 64, stages: [{node: b, layers: "0-$((layers - 1))"}]}
---
apiVersion: v1
kind: Pipeline
metadata: {name: ring}
spec:
  model: bench
  device: cpu
  maxSequences: 64
  stages: [{node: a, layers: "0-$((half - 1))"}, {node: b, layers: "$half-$((layers - 1))"}]
---
apiVersion: v1
kind: Pipeline
metadata: {name: routed}
spec:
  model: bench
  device: cpu
  maxSequences: 64
  replicas: 2
  stages: [{replica: 0, node: a, layers: "0-$((layers - 1))"}, {replica: 1, node: b, layers: "0-$((layers - 1))"}]
---
apiVersion: v1
kind: Endpoint
metadata: {name: routed-api}
spec: {pipeline: routed, port: $routed_port}
---
apiVersion: v1
kind: Endpoint
metadata: {name: whole-a-api}
spec: {pipeline: whole-a, port: $one_port}
---
apiVersion: v1
kind: Endpoint
metadata: {name: whole-b-api}
spec: {pipeline: whole-b, port: $rep_port}
---
apiVersion: v1
kind: Endpoint
metadata: {name: ring-api}
spec: {pipeline: ring, port: $ring_port}
YAML
echo "==> clusterctl apply -f bench.yaml --wait"
"$ctl" apply -f "$dir/bench.yaml" --wait --timeout 300
"$ctl" get pipelines

run() {
  local name=$1; shift
  case " $ONLY " in *" $name "*) ;; *) return 0 ;; esac
  echo "==> $name: clusterctl bench $* -c $LEVELS -n $TOKENS -p $PROMPT -r $REQUESTS"
  "$ctl" bench "$@" -c "$LEVELS" -n "$TOKENS" -p "$PROMPT" -r "$REQUESTS" -o json >"$dir/$name.json"
  python3 - "$dir/$name.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
print("  streams  tokens/s  per-stream  ttft p50 ms  itl p50 ms  itl p99 ms")
for l in d["levels"]:
    print(f"  {l['streams']:7d}  {l['outputTokensPerSecond']:8.1f}  {l['streamTokensPerSecondP50']:10.1f}"
          f"  {l['ttftMs']['p50']:11.1f}  {l['itlMs']['p50']:10.1f}  {l['itlMs']['p99']:10.1f}")
PY
}
run one whole-a-api
run replicas whole-a-api whole-b-api
run routed routed-api
run ring ring-api

# A long prompt admitted while 8 streams decode: the gaps between their tokens while it is
# prefilled against the gaps just before it came (their 99th percentile against the quiet
# median), and its own time to first token. The streams are past their own prompts when it
# comes, so only what the long prompt does to them is measured; tokens are timed one by one
# (`continuous_usage_stats`), not by pieces of text.
long_prompt() {
  local name=$1 url=http://127.0.0.1:$2
  case " $ONLY " in *" $name "*) ;; *) return 0 ;; esac
  python3 - "$url" "$name" "$PROMPT" <<'PY'
import json, sys, threading, time, urllib.request
url, name, prompt_words = sys.argv[1], sys.argv[2], int(sys.argv[3])
model = json.load(urllib.request.urlopen(url + "/v1/models", timeout=30))["data"][0]["id"]
stop = threading.Event()
times = [[] for _ in range(8)]
errors = []

def post(body, timeout):
    req = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(),
                                 {"content-type": "application/json"})
    return urllib.request.urlopen(req, timeout=timeout)

def stream(i):
    words = " ".join(f"word{i}x{k}" for k in range(prompt_words))
    body = {"model": model, "prompt": words, "max_tokens": 4000, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    try:
        with post(body, 120) as r:
            for line in r:
                if stop.is_set():
                    return
                if not line.startswith(b"data: {"):
                    continue
                v = json.loads(line[6:])
                if "error" in v:
                    errors.append(f"stream {i}: {v['error']}")
                    return
                if not v.get("choices"):
                    continue
                n = (v.get("usage") or {}).get("completion_tokens")
                if n is None:
                    # A server without running usage (an earlier build): a piece of text
                    # stands for a token.
                    n = len(times[i]) + bool(v["choices"][0].get("text"))
                if n > len(times[i]):
                    times[i].append(time.time())
        if not stop.is_set():
            errors.append(f"stream {i} ended before the long prompt's first token")
    except Exception as e:
        if not stop.is_set():
            errors.append(f"stream {i}: {e}")

threads = [threading.Thread(target=stream, args=(i,)) for i in range(8)]
for t in threads:
    t.start()
deadline = time.time() + 120
while min(len(t) for t in times) < 8 and time.time() < deadline and not errors:
    time.sleep(0.05)
quiet_from = time.time()
time.sleep(3)
words = ("the cat sat on a mat and we saw it from our new house by day " * 100).split()[:1000]
sent = time.time()
try:
    with post({"model": model, "prompt": " ".join(words), "max_tokens": 1}, 300) as r:
        long_tokens = json.load(r)["usage"]["prompt_tokens"]
except Exception as e:
    errors.append(f"the long prompt: {e}")
first = time.time()
stop.set()
for t in threads:
    t.join()
if errors:
    print(f"bench-serving: {name}: " + "; ".join(errors), file=sys.stderr)
    sys.exit(1)

def gaps(lo, hi):
    return sorted(b - a for ts in times for a, b in zip(ts, ts[1:]) if lo <= a and b <= hi)

def pct(xs, p):
    return xs[min(len(xs) - 1, int(len(xs) * p))] * 1e3

quiet, during = gaps(quiet_from, sent), gaps(sent, first)
if not quiet or not during:
    print(f"bench-serving: {name}: no gaps measured (quiet {len(quiet)}, during {len(during)})", file=sys.stderr)
    sys.exit(1)
q50 = pct(quiet, 0.5)
print(f"{name}: 8 streams, inter-token p50 {q50:.1f} ms, p99 {pct(quiet, 0.99):.1f} ms ({len(quiet)} gaps); "
      f"while a {long_tokens}-token prompt is prefilled: p50 {pct(during, 0.5):.1f} ms, "
      f"p99 {pct(during, 0.99):.1f} ms ({len(during)} gaps, {pct(during, 0.99) / q50:.1f}x the quiet p50; "
      f"goal <= 3); the long prompt's first token after {first - sent:.2f} s")
PY
}
if [ "${LONG:-1}" != 0 ]; then
  echo "==> a 2,000-token prompt admitted while 8 streams decode"
  long_prompt one "$one_port"
  long_prompt ring "$ring_port"
fi

python3 - "$dir" <<'PY'
import json, sys, os
d = sys.argv[1]
res = {}
for k in ("one", "replicas", "routed", "ring"):
    path = os.path.join(d, k + ".json")
    if os.path.exists(path):
        res[k] = {l["streams"]: l["outputTokensPerSecond"] for l in json.load(open(path))["levels"]}
levels = sorted(next(iter(res.values())))
cell = lambda k, s: f"{res[k][s]:8.1f}" if k in res else f"{'-':>8}"
ratio = lambda a, b, s: f"{res[a][s] / res[b][s]:.2f}" if a in res and b in res else "-"
print()
print("output tokens/s summed over all streams (one agent per core, one compute thread each)")
print(f"  {'streams':>7}  {'one':>8}  {'replicas':>8}  {'routed':>8}  {'ring':>8}  {'ring/replicas':>13}  {'routed/replicas':>15}  {'one/one before':>14}")
prev = None
for s in levels:
    step = f"{res['one'][s] / res['one'][prev]:.2f}" if prev and "one" in res else "-"
    print(f"  {s:7d}  {cell('one', s)}  {cell('replicas', s)}  {cell('routed', s)}  {cell('ring', s)}  {ratio('ring', 'replicas', s):>13}  {ratio('routed', 'replicas', s):>15}  {step:>14}")
    prev = s
if "one" in res and "ring" in res and 1 in res["one"]:
    print(f"ring / one at 1 stream: {res['ring'][1] / res['one'][1]:.3f} (goal >= 0.98)")
if "one" in res and 4 in res["one"] and 16 in res["one"]:
    print(f"one process, 16 streams / 4 streams: {res['one'][16] / res['one'][4]:.2f} (goal >= 1.3)")
PY
