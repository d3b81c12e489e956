#!/usr/bin/env bash
# Cache hits (part of make bench; also runs alone): every request asks the
# same question at temperature 0, so after the first all are answered from
# the Redis cache. Reports the time to the first delta and to the end of
# the whole answer (model-sim answers 16 tokens when it is called), and
# requests/s, at concurrency 1 and 20. chat-stream with API-key auth and
# Redis rate limits, pinned to CPU 0; client, Redis and model-sim on CPU 1.
# Knobs: BENCH_REQUESTS (2000 per row), BENCH_ROUNDS (3).
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=target/release
REQ=${BENCH_REQUESTS:-2000}
ROUNDS=${BENCH_ROUNDS:-3}
OUT=$(mktemp -d)
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$OUT"' EXIT
. scripts/bench-lib.sh

RPORT=$(free_port); SIM_PORT=$(free_port); PORT=$(free_port)
"${on_rest[@]}" redis-server --port "$RPORT" --bind 127.0.0.1 --save "" --appendonly no >"$OUT/redis.log" 2>&1 &
pids+=($!)
"${on_rest[@]}" "$BIN/model-sim" --addr "127.0.0.1:$SIM_PORT" --ttft-ms 0 --tps 0 --tokens 16 >"$OUT/sim.log" 2>&1 &
pids+=($!)
wait_for "$RPORT"; wait_for "$SIM_PORT"
env -u TABLE_NAME -u TURN_QUEUE_URL ANTHROPIC_BASE_URL="http://127.0.0.1:$SIM_PORT" ANTHROPIC_API_KEY=bench LOG_LEVEL=info \
  AUTH_MODE=api_key API_KEY_HASHES="$(printf %s bench | sha256sum | cut -d' ' -f1):bench-user" \
  REDIS_URL="redis://127.0.0.1:$RPORT" RATE_LIMIT_RPM=1000000 RATE_LIMIT_TPM=1000000000 \
  "${on_chat[@]}" "$BIN/chat-stream" --bind-addr "127.0.0.1:$PORT" >"$OUT/chat.log" 2>&1 &
pids+=($!)
wait_for "$PORT"

for _ in $(seq 1 "$ROUNDS"); do
  for c in 1 20; do
    "${on_rest[@]}" "$BIN/chat-bench" --url "http://127.0.0.1:$PORT/chat" --api chat --repeat \
      --concurrency "$c" --requests "$REQ" --warmup 200 --label hit --json >/dev/null 2>>"$OUT/hit-$c.jsonl"
  done
done
sim_calls=$(curl -s "http://127.0.0.1:$SIM_PORT/sim/stats" | python3 -c 'import json,sys; print(json.load(sys.stdin)["calls"])')

python3 - "$OUT" "$REQ" "$ROUNDS" "$(nproc)" "$sim_calls" <<'PY'
import os, statistics, sys, datetime
sys.path.insert(0, "scripts")
from benchstats import load, med
out, req, rounds, cores, calls = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
def runs(c):
    return load(os.path.join(out, f"hit-{c}.jsonl"))
print(f"### Cache hits ({datetime.date.today()}, {cores} cores, {req} requests per row after 200 warm-up, median of {rounds} rounds)\n")
print("| concurrency | first delta p50 ms | p95 ms | p99 ms | full answer p50 ms | p95 ms | p99 ms | req/s | errors |")
print("|---|---|---|---|---|---|---|---|---|")
for c in (1, 20):
    rs = runs(c)
    print(f"| {c} | {med(rs,'ttft_ms','p50'):.3f} | {med(rs,'ttft_ms','p95'):.3f} | {med(rs,'ttft_ms','p99'):.3f} | "
          f"{med(rs,'total_ms','p50'):.3f} | {med(rs,'total_ms','p95'):.3f} | {med(rs,'total_ms','p99'):.3f} | "
          f"{statistics.median(r['rps'] for r in rs):.0f} | {sum(r['errors'] for r in rs)} |")
print(f"\nmodel-sim calls during all rounds (the first request's miss): {calls}\n")
PY
