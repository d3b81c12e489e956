#!/usr/bin/env bash
# make bench: chat-stream's added time to first token over calling model-sim
# directly, at concurrency 1 and 20, with release builds on this machine.
#
# The sim answers at once (ttft 0, no pacing, 16 tokens), so what differs
# between the two runs is chat-stream's hop: accept, validate, call the
# model over a pooled connection, parse its SSE, re-encode, write.
# Everything (client, chat-stream, sim) shares this machine's cores.
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
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$OUT"; }
trap cleanup EXIT

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_for() { for _ in $(seq 1 100); do listening "$1" && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; exit 1; }

"$BIN/model-sim" --addr "127.0.0.1:$SIM_PORT" --ttft-ms 0 --tps 0 --tokens 16 2>"$OUT/sim.log" &
pids+=($!)
wait_for "$SIM_PORT"
# Production log level: one JSON line per request is part of the cost.
ANTHROPIC_BASE_URL="http://127.0.0.1:$SIM_PORT" ANTHROPIC_API_KEY=bench LOG_LEVEL=info \
  "$BIN/chat-stream" --bind-addr "127.0.0.1:$PORT" >"$OUT/chat.log" 2>&1 &
pids+=($!)
wait_for "$PORT"

echo "# make bench ($(date -u +%Y-%m-%d), $(nproc) cores, $REQ requests per row after warm-up)"
echo
echo "| target | concurrency | requests | TTFT p50 ms | TTFT p95 ms | TTFT p99 ms | total p50 ms | req/s | errors |"
echo "|---|---|---|---|---|---|---|---|---|"
for c in 1 20; do
  "$BIN/chat-bench" --url "http://127.0.0.1:$SIM_PORT/v1/messages" --api anthropic \
    --concurrency "$c" --requests "$REQ" --warmup 200 --label "model-sim direct" --json 2>>"$OUT/direct-$c.json"
  "$BIN/chat-bench" --url "http://127.0.0.1:$PORT/chat" --api chat \
    --concurrency "$c" --requests "$REQ" --warmup 200 --label "via chat-stream" --json 2>>"$OUT/chat-$c.json"
done

echo
echo "Added time to first token (via chat-stream minus direct):"
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

if [ -f target/lambda/chat-stream/bootstrap ]; then
  echo
  echo "arm64 bootstrap (make build, stripped): $(stat -c %s target/lambda/chat-stream/bootstrap) bytes"
fi
