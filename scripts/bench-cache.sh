#!/usr/bin/env bash
# Cache benchmarks (part of make bench; also runs alone).
#
# 1. Cache hits, per backend (Redis; DynamoDB in moto): every request asks
#    the same question at temperature 0, so after the first all are
#    answered from the cache. Reports the time to the first delta and to
#    the end of the whole answer (model-sim answers 16 tokens when it is
#    called), and requests/s, at concurrency 1 and 20. chat-stream with
#    API-key auth, pinned to CPU 0; client, Redis, moto and model-sim on
#    CPU 1. The DynamoDB rows measure moto (a Python server on the client's
#    CPU), not DynamoDB: read them as an upper bound of our own overhead.
# 2. Stampede: 50 identical requests at once against an empty cache, the
#    model taking ~1 s to answer; reports model calls per stampede with
#    coalescing on and off, and each side's time to first delta.
#
# Knobs: BENCH_REQUESTS (2000 per row), BENCH_ROUNDS (3).
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=target/release
VENV=${VENV:-.venv}
REQ=${BENCH_REQUESTS:-2000}
ROUNDS=${BENCH_ROUNDS:-3}
OUT=$(mktemp -d)
pids=()
svc=()
trap 'stop_chat; for p in "${svc[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$OUT"' EXIT
. scripts/bench-lib.sh

RPORT=$(free_port); MPORT=$(free_port); SIM_PORT=$(free_port); SLOW_PORT=$(free_port); PORT=$(free_port)
start_redis "$RPORT"
start_moto "$MPORT"
start_sim "$SIM_PORT" --ttft-ms 0 --tps 0 --tokens 16
# The stampede's model: 300 ms to the first token, then 50 tokens at 60/s.
start_sim "$SLOW_PORT" --ttft-ms 300 --tps 60 --tokens 50
wait_for "$RPORT"; wait_for "$MPORT"; wait_for "$SIM_PORT"; wait_for "$SLOW_PORT"
eval "$("$VENV/bin/python" scripts/local_aws.py ensure --prefix benchcache)"
CACHE_TABLE=$TABLE_NAME

# chat-bench sends x-api-key: bench; only its hash is configured.
common=(ANTHROPIC_API_KEY=bench LOG_LEVEL=info RATE_LIMIT_RPM=1000000 RATE_LIMIT_TPM=1000000000 MAX_STREAMS_PER_USER=10000
  AUTH_MODE=api_key API_KEY_HASHES="$(printf %s bench | sha256sum | cut -d' ' -f1):bench-user")

start_chat() { # SIM_PORT ENV...
  local sim=$1; shift
  env -u TABLE_NAME -u TURN_QUEUE_URL "${common[@]}" ANTHROPIC_BASE_URL="http://127.0.0.1:$sim" "$@" \
    "${on_chat[@]}" "$BIN/chat-stream" --bind-addr "127.0.0.1:$PORT" >>"$OUT/chat.log" 2>&1 &
  pids+=($!)
  wait_for "$PORT"
}
# CPU seconds a process has used (user + system), from /proc.
cpu_secs() { python3 -c 'import os,sys; f=open(f"/proc/{sys.argv[1]}/stat").read().rsplit(")",1)[1].split(); print((int(f[11])+int(f[12]))/os.sysconf("SC_CLK_TCK"))' "$1"; }
sim_calls() { curl -s "http://127.0.0.1:$1/sim/stats" | python3 -c 'import json,sys; print(json.load(sys.stdin)["calls"])'; }

declare -A calls_before calls_after
# Each backend as deployed (after the first read, a hit is the instance's
# own copy: CACHE_LOCAL_MB, default 8) and with those copies off, so every
# hit reads the shared cache.
for backend in redis dynamodb redis-shared dynamodb-shared; do
  calls_before[$backend]=$(sim_calls "$SIM_PORT")
  [ "${backend%-shared}" = "$backend" ] && local_mb=8 || local_mb=0
  redis-cli -p "$RPORT" flushall >/dev/null
  if [ "${backend%-shared}" = redis ]; then
    start_chat "$SIM_PORT" REDIS_URL="redis://127.0.0.1:$RPORT" CACHE_LOCAL_MB=$local_mb
  else
    # No Redis at all: the DynamoDB backend alone, as deployed without a VPC.
    start_chat "$SIM_PORT" CACHE_BACKEND=dynamodb CACHE_TABLE_NAME="$CACHE_TABLE" CACHE_LOCAL_MB=$local_mb
  fi
  chat_pid=${pids[-1]}
  cpu0=$(cpu_secs "$chat_pid"); moto0=$(cpu_secs "$MOTO_PID"); t0=$(date +%s.%N)
  for _ in $(seq 1 "$ROUNDS"); do
    for c in 1 20; do
      "${on_rest[@]}" "$BIN/chat-bench" --url "http://127.0.0.1:$PORT/chat" --api chat --repeat \
        --concurrency "$c" --requests "$REQ" --warmup 200 --label hit --json >/dev/null 2>>"$OUT/$backend-$c.jsonl"
    done
  done
  echo "$(python3 -c "import sys; print(round(float(sys.argv[1])-float(sys.argv[2]),1))" "$(date +%s.%N)" "$t0") \
$(python3 -c "import sys; print(round(float(sys.argv[1])-float(sys.argv[2]),1))" "$(cpu_secs "$chat_pid")" "$cpu0") \
$(python3 -c "import sys; print(round(float(sys.argv[1])-float(sys.argv[2]),1))" "$(cpu_secs "$MOTO_PID")" "$moto0")" >"$OUT/$backend.cpu"
  stop_chat
  calls_after[$backend]=$(sim_calls "$SIM_PORT")
done

# Stampedes: a fresh Redis keyspace each time, so the first request misses.
for mode in on off; do
  for _ in $(seq 1 "$ROUNDS"); do
    redis-cli -p "$RPORT" flushall >/dev/null
    before=$(sim_calls "$SLOW_PORT")
    start_chat "$SLOW_PORT" REDIS_URL="redis://127.0.0.1:$RPORT" COALESCE_ENABLED=$([ $mode = on ] && echo true || echo false)
    "${on_rest[@]}" "$BIN/chat-bench" --url "http://127.0.0.1:$PORT/chat" --api chat --repeat \
      --concurrency 50 --requests 50 --warmup 0 --label stampede --json >/dev/null 2>>"$OUT/stampede-$mode.jsonl"
    stop_chat
    echo $(( $(sim_calls "$SLOW_PORT") - before )) >>"$OUT/stampede-$mode.calls"
  done
done

calls=""
for b in redis dynamodb redis-shared dynamodb-shared; do calls+="$b=$(( calls_after[$b] - calls_before[$b] )) "; done
python3 - "$OUT" "$REQ" "$ROUNDS" "$(nproc)" "$calls" <<'PY'
import os, statistics, sys, datetime
sys.path.insert(0, "scripts")
from benchstats import load, med
out, req, rounds, cores = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
calls = dict(kv.split("=") for kv in sys.argv[5].split())
backends = (("redis", "Redis (as deployed: the instance's copy after the first read)"),
            ("redis-shared", "Redis, no instance copies (CACHE_LOCAL_MB=0)"),
            ("dynamodb", "DynamoDB (moto; as deployed: the instance's copy after the first read)"),
            ("dynamodb-shared", "DynamoDB (moto), no instance copies (CACHE_LOCAL_MB=0)"))
print(f"### Cache hits ({datetime.date.today()}, {cores} cores, {req} requests per row after 200 warm-up, median of {rounds} rounds)\n")
print("| backend | concurrency | first delta p50 ms | p95 ms | p99 ms | full answer p50 ms | p95 ms | p99 ms | req/s | errors |")
print("|---|---|---|---|---|---|---|---|---|---|")
for backend, label in backends:
    for c in (1, 20):
        rs = load(os.path.join(out, f"{backend}-{c}.jsonl"))
        print(f"| {label} | {c} | {med(rs,'ttft_ms','p50'):.3f} | {med(rs,'ttft_ms','p95'):.3f} | {med(rs,'ttft_ms','p99'):.3f} | "
              f"{med(rs,'total_ms','p50'):.3f} | {med(rs,'total_ms','p95'):.3f} | {med(rs,'total_ms','p99'):.3f} | "
              f"{statistics.median(r['rps'] for r in rs):.0f} | {sum(r['errors'] for r in rs)} |")
print("\nmodel-sim calls during all rounds (the first request's miss; the table keeps its entry between rows): "
      + ", ".join(f"{b} {calls[b]}" for b, _ in backends) + "\n")
print("Where the time went (all rounds of a backend): wall seconds, CPU seconds used by chat-stream (CPU 0) and by moto (CPU 1, shared with the client):\n")
print("| backend | wall s | chat-stream CPU s | moto CPU s |")
print("|---|---|---|---|")
for backend, label in backends:
    wall, chat, moto = open(os.path.join(out, f"{backend}.cpu")).read().split()
    print(f"| {label} | {wall} | {chat} | {moto} |")
print()
print(f"### Stampede: 50 identical requests at once, empty cache ({rounds} rounds; the model takes 300 ms to the first token, then 50 tokens at 60/s)\n")
print("| coalescing | model calls per stampede (each round) | first delta p50 ms | p99 ms | full answer p50 ms | p99 ms | errors |")
print("|---|---|---|---|---|---|---|")
for mode in ("on", "off"):
    rs = load(os.path.join(out, f"stampede-{mode}.jsonl"))
    calls = open(os.path.join(out, f"stampede-{mode}.calls")).read().split()
    print(f"| {mode} | {', '.join(calls)} | {med(rs,'ttft_ms','p50'):.1f} | {med(rs,'ttft_ms','p99'):.1f} | "
          f"{med(rs,'total_ms','p50'):.1f} | {med(rs,'total_ms','p99'):.1f} | {sum(r['errors'] for r in rs)} |")
print()
PY
