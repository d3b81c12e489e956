#!/usr/bin/env bash
# make bench: what chat-stream adds to time to first token, with release
# builds on this machine, then the fault matrix and the binary size.
#
# The sim answers at once (ttft 0, no pacing, 16 tokens), so what differs
# between a "direct" row and a "via chat-stream" row is chat-stream's hop:
# accept, validate, rate-limit, call the model over a pooled connection,
# parse its SSE, re-encode, write, log.
#
# Layouts:
# - shared: client, chat-stream and sim float over every core. On a small
#   machine at concurrency 20 this measures CPU queueing: the proxy doubles
#   the HTTP work per request on the same cores.
# - pinned: chat-stream alone on CPU 0, client and sim on CPU 1 (in the
#   direct rows too). Closer to Lambda, where each concurrent invocation
#   has its own environment and CPU.
#
# Shared machines are noisy, so every configuration runs BENCH_ROUNDS times,
# interleaved (A B C, A B C, ...); tables show the median of the rounds'
# figures and differences are taken between those medians.
#
# Knobs: BENCH_REQUESTS (2000 per row), BENCH_ROUNDS (3), PORT (3110),
# SIM_PORT (4110).
set -euo pipefail
cd "$(dirname "$0")/.."

print_size() {
  boot=target/lambda/chat-stream/bootstrap
  if [ -f "$boot" ]; then
    zipped=$(python3 -c "import io,sys,zipfile; b=io.BytesIO(); z=zipfile.ZipFile(b,'w',zipfile.ZIP_DEFLATED); z.write(sys.argv[1],'bootstrap'); z.close(); print(len(b.getvalue()))" "$boot")
    echo "arm64 bootstrap (make build, stripped): $(stat -c %s "$boot") bytes; zip-deflated: $zipped bytes"
  else
    echo "no arm64 bootstrap yet: run make build for the binary size"
  fi
}
# `scripts/bench.sh size`: only the binary size of the last `make build`;
# `scripts/bench.sh ttft`: only the added-TTFT and limiter tables.
if [ "${1:-}" = size ]; then print_size; exit 0; fi

BIN=target/release
REQ=${BENCH_REQUESTS:-2000}
ROUNDS=${BENCH_ROUNDS:-3}
PORT=${PORT:-3110}
SIM_PORT=${SIM_PORT:-4110}
OUT=$(mktemp -d)
pids=()
redis_pid=""
stop_all() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done; pids=(); }
trap 'stop_all; kill ${redis_pid:-} 2>/dev/null || true; rm -rf "$OUT"' EXIT

. scripts/bench-lib.sh

# run NAME CHAT_CPU REST_CPU ENV... : one round of one configuration: the
# direct rows and the via-chat-stream rows at concurrency 1 and 20.
run() {
  local name=$1 on_chat=() on_rest=()
  if [ -n "$2" ]; then on_chat=(taskset -c "$2"); on_rest=(taskset -c "$3"); fi
  shift 3
  "${on_rest[@]}" "$BIN/model-sim" --addr "127.0.0.1:$SIM_PORT" --ttft-ms 0 --tps 0 --tokens 16 >"$OUT/sim.log" 2>&1 &
  pids+=($!)
  wait_for "$SIM_PORT"
  # Production log level: one JSON line per request is part of the cost.
  # API-key auth as deployed (chat-bench sends x-api-key: bench; only its
  # hash is configured). Persistence off here: see bench-persist.sh.
  env -u TABLE_NAME -u TURN_QUEUE_URL ANTHROPIC_BASE_URL="http://127.0.0.1:$SIM_PORT" ANTHROPIC_API_KEY=bench LOG_LEVEL=info \
    AUTH_MODE=api_key API_KEY_HASHES="$(printf %s bench | sha256sum | cut -d' ' -f1):bench-user" "$@" \
    "${on_chat[@]}" "$BIN/chat-stream" --bind-addr "127.0.0.1:$PORT" >"$OUT/chat.log" 2>&1 &
  pids+=($!)
  wait_for "$PORT"
  for c in 1 20; do
    "${on_rest[@]}" "$BIN/chat-bench" --url "http://127.0.0.1:$SIM_PORT/v1/messages" --api anthropic \
      --concurrency "$c" --requests "$REQ" --warmup 200 --label direct --json >/dev/null 2>>"$OUT/$name-direct-$c.jsonl"
    "${on_rest[@]}" "$BIN/chat-bench" --url "http://127.0.0.1:$PORT/chat" --api chat \
      --concurrency "$c" --requests "$REQ" --warmup 200 --label chat --json >/dev/null 2>>"$OUT/$name-chat-$c.jsonl"
    # The OpenAI-compatible route: the same turn, re-framed.
    "${on_rest[@]}" "$BIN/chat-bench" --url "http://127.0.0.1:$PORT/v1/chat/completions" --api openai \
      --concurrency "$c" --requests "$REQ" --warmup 200 --label openai --json >/dev/null 2>>"$OUT/$name-openai-$c.jsonl"
  done
  stop_all
}

# Limits high enough never to refuse: the production path without Redis.
LIMITS=(RATE_LIMIT_RPM=1000000 RATE_LIMIT_TPM=1000000000 MAX_STREAMS_PER_USER=10000)
have_redis=false
if can_pin && command -v redis-server >/dev/null; then
  RPORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  taskset -c 1 redis-server --port "$RPORT" --bind 127.0.0.1 --save "" --appendonly no >"$OUT/redis.log" 2>&1 &
  redis_pid=$!
  wait_for "$RPORT"
  have_redis=true
fi

for _ in $(seq 1 "$ROUNDS"); do
  run shared "" "" "${LIMITS[@]}"
  if can_pin; then
    run pinned 0 1 "${LIMITS[@]}"
    run pinned-off 0 1 RATE_LIMIT_RPM=0 RATE_LIMIT_TPM=0 MAX_STREAMS_PER_USER=0
    if $have_redis; then
      # Redis for limits and breakers only, then with live streams (every
      # event teed into a Redis Stream, for resume and coalescing).
      run pinned-redis-nolive 0 1 "${LIMITS[@]}" REDIS_URL="redis://127.0.0.1:$RPORT" LIVE_STREAMS_ENABLED=false
      run pinned-redis 0 1 "${LIMITS[@]}" REDIS_URL="redis://127.0.0.1:$RPORT"
    fi
  fi
done

python3 - "$OUT" "$REQ" "$ROUNDS" "$(nproc)" <<'PY'
import os, sys, datetime
sys.path.insert(0, "scripts")
from benchstats import load, med
out, req, rounds, cores = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]

def runs(name, who, c):
    return load(os.path.join(out, f"{name}-{who}-{c}.jsonl"))

print(f"# make bench ({datetime.date.today()}, {cores} cores, {req} requests per row after 200 warm-up, median of {rounds} interleaved rounds)\n")

def layout(name, title):
    if runs(name, "chat", 1) is None:
        return
    print(f"### {title}\n")
    print("| target | concurrency | TTFT p50 ms | TTFT p95 ms | TTFT p99 ms | total p50 ms | req/s | errors (all rounds) |")
    print("|---|---|---|---|---|---|---|---|")
    for c in (1, 20):
        for who, label in (("direct", "model-sim direct"), ("chat", "via chat-stream")):
            rs = runs(name, who, c)
            print(f"| {label} | {c} | {med(rs,'ttft_ms','p50'):.2f} | {med(rs,'ttft_ms','p95'):.2f} | "
                  f"{med(rs,'ttft_ms','p99'):.2f} | {med(rs,'total_ms','p50'):.2f} | {med(rs,'rps'):.0f} | "
                  f"{sum(r['errors'] for r in rs)} |")
    print(f"\nAdded time to first token ({title.split(':')[0]}): median via chat-stream minus median direct\n")
    print("| concurrency | p50 ms | p95 ms |")
    print("|---|---|---|")
    for c in (1, 20):
        d, v = runs(name, "direct", c), runs(name, "chat", c)
        print(f"| {c} | {med(v,'ttft_ms','p50') - med(d,'ttft_ms','p50'):.3f} | "
              f"{med(v,'ttft_ms','p95') - med(d,'ttft_ms','p95'):.3f} |")
    print()

layout("shared", "shared: all processes on all cores")
layout("pinned", "pinned: chat-stream on CPU 0, client and sim on CPU 1")

print("### The OpenAI-compatible route next to /chat (same chat-stream, same rounds)\n")
print("Both rows call the same turn; `/v1/chat/completions` (streamed) adds re-framing each event as a "
      "`chat.completion.chunk`. Added = median via the route minus median direct.\n")
print("| layout | concurrency | /chat TTFT p50 ms | /v1 TTFT p50 ms | /chat added p50 ms | /v1 added p50 ms | /v1 minus /chat ms | /v1 errors |")
print("|---|---|---|---|---|---|---|---|")
for name in ("shared", "pinned", "pinned-redis"):
    if runs(name, "openai", 1) is None:
        continue
    for c in (1, 20):
        d = med(runs(name, "direct", c), "ttft_ms", "p50")
        ch = med(runs(name, "chat", c), "ttft_ms", "p50")
        oa = med(runs(name, "openai", c), "ttft_ms", "p50")
        errs = sum(r["errors"] for r in runs(name, "openai", c))
        print(f"| {name} | {c} | {ch:.3f} | {oa:.3f} | {ch - d:.3f} | {oa - d:.3f} | {oa - ch:+.3f} | {errs} |")
print()

if runs("pinned-off", "chat", 1) is not None:
    print("### Rate limiter + circuit breaker overhead (pinned layout)\n")
    print("Same chat-stream, four configurations, rounds interleaved. Limits high enough never to refuse. "
          "With Redis: one Lua round trip for the limit and one for the breaker, sent concurrently; "
          "with live streams also every event teed into a Redis Stream (off the hot path; resume and coalescing). "
          "Redis runs on CPU 1 with the client and the sim.\n")
    print("| configuration | TTFT p50 ms, c=1 | added, c=1 | TTFT p50 ms, c=20 | added, c=20 |")
    print("|---|---|---|---|---|")
    base1 = med(runs("pinned-off", "chat", 1), "ttft_ms", "p50")
    base20 = med(runs("pinned-off", "chat", 20), "ttft_ms", "p50")
    for name, label in (("pinned-off", "limits off"), ("pinned", "limits in memory"),
                        ("pinned-redis-nolive", "limits + breakers in Redis"),
                        ("pinned-redis", "the same + live streams (default with Redis)")):
        if runs(name, "chat", 1) is None:
            continue
        a = med(runs(name, "chat", 1), "ttft_ms", "p50")
        b = med(runs(name, "chat", 20), "ttft_ms", "p50")
        print(f"| {label} | {a:.3f} | {a - base1:+.3f} | {b:.3f} | {b - base20:+.3f} |")
    print()
PY

if [ -n "$redis_pid" ]; then kill "$redis_pid" 2>/dev/null || true; wait "$redis_pid" 2>/dev/null || true; redis_pid=""; fi

# `scripts/bench.sh ttft`: only the tables above.
if [ "${1:-}" = ttft ]; then exit 0; fi

scripts/bench-cache.sh
echo

scripts/bench-persist.sh
echo

scripts/faults.sh
echo

echo "### JWT verification (chat-bench jwt: first verification and cached, per algorithm)"
echo
"$BIN/chat-bench" jwt
echo

print_size
