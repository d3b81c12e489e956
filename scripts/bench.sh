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
stop_all() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done; pids=(); }
trap 'stop_all; kill ${redis_pid:-} 2>/dev/null || true; rm -rf "$OUT"' EXIT

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
    RATE_LIMIT_RPM=1000000 RATE_LIMIT_TPM=1000000000 \
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

# Overhead of rate limiting + circuit breaking on the request path: the
# same chat-stream with limits off and no Redis, with limits on in memory
# (per instance), and with limits and breakers in Redis (one Lua round trip
# for the limit, one for the breaker). Limits are set high enough never to
# refuse. Pinned layout; Redis shares CPU 1 with the client and sim.
overhead_row() { # label env...
  local label=$1; shift
  taskset -c 1 "$BIN/model-sim" --addr "127.0.0.1:$SIM_PORT" --ttft-ms 0 --tps 0 --tokens 16 >"$OUT/sim.log" 2>&1 &
  pids+=($!)
  wait_for "$SIM_PORT"
  env ANTHROPIC_BASE_URL="http://127.0.0.1:$SIM_PORT" ANTHROPIC_API_KEY=bench LOG_LEVEL=info "$@" \
    taskset -c 0 "$BIN/chat-stream" --bind-addr "127.0.0.1:$PORT" >"$OUT/chat.log" 2>&1 &
  pids+=($!)
  wait_for "$PORT"
  for c in 1 20; do
    taskset -c 1 "$BIN/chat-bench" --url "http://127.0.0.1:$PORT/chat" --api chat \
      --concurrency "$c" --requests "$REQ" --warmup 200 --label "$label" --json 2>"$OUT/oh-$label-$c.json"
  done
  stop_all
}
if command -v taskset >/dev/null && command -v redis-server >/dev/null && [ "$(nproc)" -ge 2 ]; then
  RPORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  taskset -c 1 redis-server --port "$RPORT" --bind 127.0.0.1 --save "" --appendonly no >"$OUT/redis.log" 2>&1 &
  redis_pid=$!
  wait_for "$RPORT"
  echo "### Rate limiter + circuit breaker overhead (pinned layout)"
  echo
  echo "| configuration | concurrency | requests | TTFT p50 ms | TTFT p95 ms | TTFT p99 ms | total p50 ms | req/s | errors |"
  echo "|---|---|---|---|---|---|---|---|---|"
  overhead_row "limits off" RATE_LIMIT_RPM=0 RATE_LIMIT_TPM=0
  overhead_row "limits in memory" RATE_LIMIT_RPM=1000000 RATE_LIMIT_TPM=1000000000
  overhead_row "limits + breakers in Redis" RATE_LIMIT_RPM=1000000 RATE_LIMIT_TPM=1000000000 REDIS_URL="redis://127.0.0.1:$RPORT"
  echo
  echo "Added TTFT p50 over \"limits off\":"
  echo
  echo "| configuration | concurrency 1, ms | concurrency 20, ms |"
  echo "|---|---|---|"
  python3 - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
def p50(label, c):
    return json.loads(open(os.path.join(out, f"oh-{label}-{c}.json")).read().strip().splitlines()[-1])["ttft_ms"]["p50"]
for label in ["limits in memory", "limits + breakers in Redis"]:
    print(f"| {label} | {p50(label, 1) - p50('limits off', 1):.3f} | {p50(label, 20) - p50('limits off', 20):.3f} |")
PY
  echo
  kill "$redis_pid" 2>/dev/null || true; wait "$redis_pid" 2>/dev/null || true; redis_pid=""
fi

scripts/faults.sh
echo

boot=target/lambda/chat-stream/bootstrap
if [ -f "$boot" ]; then
  zipped=$(python3 -c "import io,sys,zipfile; b=io.BytesIO(); z=zipfile.ZipFile(b,'w',zipfile.ZIP_DEFLATED); z.write(sys.argv[1],'bootstrap'); z.close(); print(len(b.getvalue()))" "$boot")
  echo "arm64 bootstrap (make build, stripped): $(stat -c %s "$boot") bytes; zip-deflated: $zipped bytes"
else
  echo "no arm64 bootstrap yet: run make build for the binary size"
fi
