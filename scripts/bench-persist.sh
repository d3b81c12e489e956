#!/usr/bin/env bash
# Persistence benchmarks (part of make bench; also runs alone):
#
# 1. Time to first token with persistence off and on. Same chat-stream
#    build, same Redis (rate limits, breakers), API-key auth on; "on" adds
#    the table and the turn queue, so each request also sends its turn to
#    SQS and the recent-turns buffer after `done`. "on, continuing" keeps
#    one conversation per client worker going, so every request also loads
#    history (DynamoDB GetItem + Query and the Redis buffer, in parallel
#    with the rate-limit check) before the model is called.
# 2. db-writer: turns/s and DynamoDB calls per 1000 turns, through the
#    local poller and db-writer's handler, at event-source batch sizes 100
#    (the template's default) and 10 (SQS's default without a batching
#    window), plus batch size 1 (one transaction per turn) for comparison.
#
# It starts its own moto server and Redis on free ports (a fresh moto: it
# slows down as it accumulates data), model-sim answering at once (16
# tokens), and pins chat-stream to CPU 0 and everything else to CPU 1 when
# it can. Knobs: BENCH_PERSIST_REQUESTS (500 per row), BENCH_ROUNDS (3),
# WRITER_TURNS (1000; 0 skips part 2), THINK_MS (0: a pause between one
# client worker's requests, as a user reading the answer).
#
# moto is far slower than SQS and DynamoDB (an SQS send takes milliseconds
# and it serves some tens of sends per second), so TURN_QUEUE_TIMEOUT_MS is
# raised here: with the production 2 s, sends that moto is slow to answer
# would go down the direct-write path, which is not what is being measured.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=target/release
VENV=${VENV:-.venv}
REQ=${BENCH_PERSIST_REQUESTS:-500}
ROUNDS=${BENCH_ROUNDS:-3}
TURNS=${WRITER_TURNS:-1000}
THINK_MS=${THINK_MS:-0}
OUT=$(mktemp -d)
pids=()
svc=()
trap 'stop_chat; for p in "${svc[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$OUT"' EXIT

. scripts/bench-lib.sh

MPORT=$(free_port); RPORT=$(free_port); SIM_PORT=$(free_port); PORT=$(free_port)
start_moto "$MPORT"
start_redis "$RPORT"
start_sim "$SIM_PORT" --ttft-ms 0 --tps 0 --tokens 16
wait_for "$MPORT"; wait_for "$RPORT"; wait_for "$SIM_PORT"

eval "$("$VENV/bin/python" scripts/local_aws.py ensure --prefix bench)"

# chat-bench sends x-api-key: bench; only its hash is configured.
KEY_HASH=$(printf %s bench | sha256sum | cut -d' ' -f1)
common=(ANTHROPIC_BASE_URL="http://127.0.0.1:$SIM_PORT" ANTHROPIC_API_KEY=bench LOG_LEVEL=info
  AUTH_MODE=api_key API_KEY_HASHES="$KEY_HASH:bench-user" REDIS_URL="redis://127.0.0.1:$RPORT"
  RATE_LIMIT_RPM=1000000 RATE_LIMIT_TPM=1000000000 MAX_STREAMS_PER_USER=10000 TURN_QUEUE_TIMEOUT_MS=60000)

# run NAME CONVERSATION ENV...: one round of one configuration at c=1 and 20.
run() {
  local name=$1 conv=$2
  shift 2
  env -u TABLE_NAME -u TURN_QUEUE_URL "${common[@]}" "$@" \
    "${on_chat[@]}" "$BIN/chat-stream" --bind-addr "127.0.0.1:$PORT" >>"$OUT/chat.log" 2>&1 &
  pids+=($!)
  wait_for "$PORT"
  for c in 1 20; do
    "${on_rest[@]}" "$BIN/chat-bench" --url "http://127.0.0.1:$PORT/chat" --api chat --conversation "$conv" \
      --concurrency "$c" --requests "$REQ" --warmup 100 --think-ms "$THINK_MS" --label "$name" --json >/dev/null 2>>"$OUT/$name-$c.jsonl"
  done
  stop_chat
}

for _ in $(seq 1 "$ROUNDS"); do
  run off new
  run on new TABLE_NAME="$TABLE_NAME" TURN_QUEUE_URL="$TURN_QUEUE_URL"
  run on-continue continue TABLE_NAME="$TABLE_NAME" TURN_QUEUE_URL="$TURN_QUEUE_URL"
done

THINK_MS=$THINK_MS python3 - "$OUT" "$REQ" "$ROUNDS" "$(nproc)" <<'PY'
import os, sys, datetime
sys.path.insert(0, "scripts")
from benchstats import load, med
out, req, rounds, cores = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
def runs(name, c):
    return load(os.path.join(out, f"{name}-{c}.jsonl"))
think = os.environ.get("THINK_MS", "0")
print(f"### Persistence off vs on ({datetime.date.today()}, {cores} cores, {req} requests per row after 100 warm-up, think time {think} ms, median of {rounds} interleaved rounds)\n")
print("chat-stream pinned to CPU 0; client, model-sim, Redis and moto on CPU 1. API-key auth and Redis rate limits in every row.\n")
print("TTFT is what the client saw; server TTFT is chat-stream's own (the done event's timings_ms.ttft), which leaves out the client's CPU time (the client shares CPU 1 with moto). Body end: when the response ended, i.e. when the turn was durable.\n")
print("| configuration | concurrency | TTFT p50 ms | TTFT p95 ms | TTFT p99 ms | TTFT p50 vs off | server TTFT p50 ms | server vs off | body end p50 ms | req/s | errors |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
labels = {"off": "persistence off", "on": "on, new conversation each request", "on-continue": "on, continuing a conversation (history load)"}
for c in (1, 20):
    base = med(runs("off", c), "ttft_ms", "p50")
    sbase = med(runs("off", c), "server_ttft_ms", "p50")
    for name in ("off", "on", "on-continue"):
        rs = runs(name, c)
        p50 = med(rs, "ttft_ms", "p50")
        sp50 = med(rs, "server_ttft_ms", "p50")
        print(f"| {labels[name]} | {c} | {p50:.3f} | {med(rs,'ttft_ms','p95'):.3f} | {med(rs,'ttft_ms','p99'):.3f} | "
              f"{p50 - base:+.3f} | {sp50:.3f} | {sp50 - sbase:+.3f} | {med(rs,'total_ms','p50'):.2f} | {med(rs,'rps'):.0f} | {sum(r['errors'] for r in rs)} |")
print()
PY

[ "$TURNS" -gt 0 ] || exit 0
echo "### db-writer through the local poller ($TURNS turns of 600-byte answers, 100 conversations of 10 users; a fresh table each row)"
echo
echo "| batch size | turns | batches | seconds | turns/s | DynamoDB calls | calls per 1000 turns | each turn stored exactly once |"
echo "|---|---|---|---|---|---|---|---|"
for b in 100 10 1; do
  n=$TURNS
  # One transaction per turn is slow against moto; fewer turns, same ratio.
  [ "$b" = 1 ] && n=$(( TURNS < 200 ? TURNS : 200 ))
  eval "$("$VENV/bin/python" scripts/local_aws.py ensure --prefix "w$b-$RANDOM")"
  "${on_rest[@]}" "$BIN/chat-bench" writer --table "$TABLE_NAME" --queue-url "$TURN_QUEUE_URL" \
    --turns "$n" --batch-size "$b" --window-ms 2000
done
echo
