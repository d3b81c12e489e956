#!/usr/bin/env bash
# make bench: chat-stream's added time to first token over calling model-sim
# directly, at concurrency 1 and 20, with release builds on this machine.
#
# The sim answers at once (ttft 0, no pacing, 16 tokens), so what differs
# between a "direct" row and a "via chat-stream" row is chat-stream's hop:
# accept, validate, call the model over a pooled connection, parse its SSE,
# re-encode, write, log.
#
# Two layouts:
# - shared: client, chat-stream and sim all float over every core. On a
#   small machine at concurrency 20 this measures CPU queueing: the proxy
#   doubles the HTTP work per request on the same cores.
# - pinned: chat-stream alone on CPU 0, client and sim on CPU 1 (in both
#   the direct and the proxied rows). This is closer to Lambda, where each
#   concurrent invocation runs in its own environment with its own CPU.
#
# Knobs: BENCH_REQUESTS (2000), PORT (3110), SIM_PORT (4110).
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=target/release
REQ=${BENCH_REQUESTS:-2000}
PORT=${PORT:-3110}
SIM_PORT=${SIM_PORT:-4110}
OUT=$(mktemp -d)
pids=()
stop_all() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; pids=(); }
trap 'stop_all; rm -rf "$OUT"' EXIT

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_for() { for _ in $(seq 1 100); do listening "$1" && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; exit 1; }

run_layout() { # name cpu_for_chat cpu_for_rest
  local name=$1 on_chat=() on_rest=()
  if [ -n "$2" ]; then on_chat=(taskset -c "$2"); on_rest=(taskset -c "$3"); fi
  "${on_rest[@]}" "$BIN/model-sim" --addr "127.0.0.1:$SIM_PORT" --ttft-ms 0 --tps 0 --tokens 16 >"$OUT/sim.log" 2>&1 &
  pids+=($!)
  wait_for "$SIM_PORT"
  # Production log level: one JSON line per request is part of the cost.
  ANTHROPIC_BASE_URL="http://127.0.0.1:$SIM_PORT" ANTHROPIC_API_KEY=bench LOG_LEVEL=info \
    "${on_chat[@]}" "$BIN/chat-stream" --bind-addr "127.0.0.1:$PORT" >"$OUT/chat.log" 2>&1 &
  pids+=($!)
  wait_for "$PORT"
  echo "### $name"
  echo
  echo "| target | concurrency | requests | TTFT p50 ms | TTFT p95 ms | TTFT p99 ms | total p50 ms | req/s | errors |"
  echo "|---|---|---|---|---|---|---|---|---|"
  for c in 1 20; do
    "${on_rest[@]}" "$BIN/chat-bench" --url "http://127.0.0.1:$SIM_PORT/v1/messages" --api anthropic \
      --concurrency "$c" --requests "$REQ" --warmup 200 --label "model-sim direct" --json 2>"$OUT/direct-$c.json"
    "${on_rest[@]}" "$BIN/chat-bench" --url "http://127.0.0.1:$PORT/chat" --api chat \
      --concurrency "$c" --requests "$REQ" --warmup 200 --label "via chat-stream" --json 2>"$OUT/chat-$c.json"
  done
  echo
  echo "Added time to first token, $name (via chat-stream minus direct):"
  echo
  echo "| concurrency | p50 ms | p95 ms |"
  echo "|---|---|---|"
  for c in 1 20; do
    python3 - "$OUT/direct-$c.json" "$OUT/chat-$c.json" "$c" <<'PY'
import json, sys
d = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
v = json.loads(open(sys.argv[2]).read().strip().splitlines()[-1])
print(f"| {sys.argv[3]} | {v['ttft_ms']['p50'] - d['ttft_ms']['p50']:.3f} | {v['ttft_ms']['p95'] - d['ttft_ms']['p95']:.3f} |")
PY
  done
  echo
  stop_all
}

echo "# make bench ($(date -u +%Y-%m-%d), $(nproc) cores, $REQ requests per row after 200 warm-up)"
echo
run_layout "shared: all processes on all cores" "" ""
if command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then
  run_layout "pinned: chat-stream on CPU 0, client and sim on CPU 1" 0 1
fi

boot=target/lambda/chat-stream/bootstrap
if [ -f "$boot" ]; then
  zipped=$(python3 -c "import io,sys,zipfile; b=io.BytesIO(); z=zipfile.ZipFile(b,'w',zipfile.ZIP_DEFLATED); z.write(sys.argv[1],'bootstrap'); z.close(); print(len(b.getvalue()))" "$boot")
  echo "arm64 bootstrap (make build, stripped): $(stat -c %s "$boot") bytes; zip-deflated: $zipped bytes"
else
  echo "no arm64 bootstrap yet: run make build for the binary size"
fi
