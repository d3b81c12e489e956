#!/usr/bin/env bash
# Two chat-stream builds side by side, rounds interleaved (A B, A B, ...):
# added time to first token (model-sim direct vs via chat-stream, a miss
# every time) and cache hits (the whole answer), at concurrency 1 and 20;
# then BENCH_STREAMS slow streams at once (a second sim at 2 tokens/s, as
# in make bench-peers): peak RSS and CPU per stream.
# chat-stream as make bench's "limits + breakers + live streams in Redis"
# row (API-key auth, Redis for limits, breakers, cache and live streams),
# pinned to CPU 0; client, sim and Redis on CPU 1 (unless BENCH_PIN=0).
#
# Use: scripts/bench-compare.sh LABEL_A=PATH_A LABEL_B=PATH_B
# e.g. the build of an older commit against this one (see BENCHMARKS.md).
# Knobs: BENCH_REQUESTS (2000 per row), BENCH_ROUNDS (3), BENCH_STREAMS
# (1000; 0 skips the phase), BENCH_H2_PER_CONN (0: each slow stream its
# own HTTP/1.1 connection; N: h2c from the client, N streams per
# connection), BENCH_PIN (1; 0 shares both cores between
# every process). A PATH may be a script that sets the environment and
# execs chat-stream, to compare settings of one build.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${BIN:-target/release}  # model-sim and chat-bench
VENV=${VENV:-.venv}
REQ=${BENCH_REQUESTS:-2000}
ROUNDS=${BENCH_ROUNDS:-3}
STREAMS=${BENCH_STREAMS:-1000}
OUT=$(mktemp -d)
pids=()
svc=()
trap 'stop_chat; for p in "${svc[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$OUT"' EXIT
. scripts/bench-lib.sh

[ $# -eq 2 ] || { echo "usage: $0 LABEL_A=PATH_A LABEL_B=PATH_B" >&2; exit 2; }
RPORT=$(free_port); SIM_PORT=$(free_port); DRIP_PORT=$(free_port); PORT=$(free_port)
start_redis "$RPORT"
start_sim "$SIM_PORT" --ttft-ms 0 --tps 0 --tokens 16
start_sim "$DRIP_PORT" --ttft-ms 500 --tps 2 --tokens 16
wait_for "$RPORT"; wait_for "$SIM_PORT"; wait_for "$DRIP_PORT"
# Each slow stream holds two sockets in chat-stream.
[ "$STREAMS" -eq 0 ] || ulimit -n $((STREAMS * 2 + 1000)) 2>/dev/null || ulimit -n "$(ulimit -Hn)" || true

# chat-stream as the rows below run it, against the sim at $1.
run_chat() { # LABEL BIN SIM_PORT
  env -u TABLE_NAME -u TURN_QUEUE_URL ANTHROPIC_API_KEY=bench ANTHROPIC_BASE_URL="http://127.0.0.1:$3" LOG_LEVEL=info \
    AUTH_MODE=api_key API_KEY_HASHES="$(printf %s bench | sha256sum | cut -d' ' -f1):bench-user" \
    RATE_LIMIT_RPM=1000000 RATE_LIMIT_TPM=1000000000 MAX_STREAMS_PER_USER=10000 REDIS_URL="redis://127.0.0.1:$RPORT" \
    "${on_chat[@]}" "$2" --bind-addr "127.0.0.1:$PORT" >>"$OUT/chat-$1.log" 2>&1 &
  pids+=($!)
  wait_for "$PORT"
}

# utime + stime of a process, in clock ticks.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

for _ in $(seq 1 "$ROUNDS"); do
  for spec in "$@"; do
    label=${spec%%=*}; bin=${spec#*=}
    redis-cli -p "$RPORT" flushall >/dev/null
    run_chat "$label" "$bin" "$SIM_PORT"
    for c in 1 20; do
      "${on_rest[@]}" "$BIN/chat-bench" --url "http://127.0.0.1:$SIM_PORT/v1/messages" --api anthropic \
        --concurrency "$c" --requests "$REQ" --warmup 200 --label direct --json >/dev/null 2>>"$OUT/$label-direct-$c.jsonl"
      # Unique questions at temperature 0: each is looked up and misses
      # (and takes the coalescing lease), as in make bench-peers.
      c0=$(cpu_ticks "${pids[0]}"); r0=$(cpu_ticks "${svc[0]}")
      "${on_rest[@]}" "$BIN/chat-bench" --url "http://127.0.0.1:$PORT/chat" --api chat --temperature 0 \
        --concurrency "$c" --requests "$REQ" --warmup 200 --label miss --json >/dev/null 2>>"$OUT/$label-miss-$c.jsonl"
      # CPU per miss (warm-up included), chat-stream's and Redis's.
      echo "$(( $(cpu_ticks "${pids[0]}") - c0 )) $(( $(cpu_ticks "${svc[0]}") - r0 ))" >>"$OUT/$label-cpu-$c.txt"
      "${on_rest[@]}" "$BIN/chat-bench" --url "http://127.0.0.1:$PORT/chat" --api chat --repeat \
        --concurrency "$c" --requests "$REQ" --warmup 200 --label hit --json >/dev/null 2>>"$OUT/$label-hit-$c.jsonl"
    done
    stop_chat
    if [ "$STREAMS" -gt 0 ]; then
      redis-cli -p "$RPORT" flushall >/dev/null
      run_chat "$label" "$bin" "$DRIP_PORT"
      sleep 1
      "${on_rest[@]}" "$BIN/chat-bench" streams --url "http://127.0.0.1:$PORT/chat" --pid "${pids[0]}" \
        --streams "$STREAMS" --ramp-ms 1000 --settle-ms 3000 --clk-tck "$(getconf CLK_TCK)" --label "$label" --h2-per-conn "${BENCH_H2_PER_CONN:-0}" \
        2>&1 >/dev/null | grep '^{' >>"$OUT/$label-streams.jsonl" || true
      stop_chat
    fi
  done
done

layout="chat-stream pinned to CPU 0, the rest on CPU 1"
[ ${#on_chat[@]} -gt 0 ] || layout="every process on every core"
python3 - "$OUT" "$REQ" "$ROUNDS" "$(nproc)" "$layout" "$(getconf CLK_TCK)" "$@" <<'PY'
import os, sys, datetime, statistics
sys.path.insert(0, "scripts")
from benchstats import load, med
out, req, rounds, cores, layout, tck = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5], int(sys.argv[6])
labels = [s.split("=", 1)[0] for s in sys.argv[7:]]
r = lambda label, kind, c: load(os.path.join(out, f"{label}-{kind}-{c}.jsonl"))
print(f"# bench-compare ({datetime.date.today()}, {cores} cores, {req} requests per row after 200 warm-up, "
      f"median of {rounds} interleaved rounds; {layout})\n")
print("| build | added TTFT p50 ms, c=1 | added TTFT p50 ms, c=20 | hit, answer (done) p50 ms, c=1 | hit, body end p50 ms, c=1 | hit p50 ms, c=20 | hits/s, c=20 | errors |")
print("|---|---|---|---|---|---|---|---|")
for l in labels:
    add = [med(r(l, "miss", c), "ttft_ms", "p50") - med(r(l, "direct", c), "ttft_ms", "p50") for c in (1, 20)]
    hit1, hit20 = med(r(l, "hit", 1), "done_ms", "p50"), med(r(l, "hit", 20), "done_ms", "p50")
    end1 = med(r(l, "hit", 1), "total_ms", "p50")
    errs = sum(x["errors"] for k in ("miss", "hit") for c in (1, 20) for x in r(l, k, c))
    print(f"| {l} | {add[0]:.3f} | {add[1]:.3f} | {hit1:.3f} | {end1:.3f} | {hit20:.3f} | {med(r(l, 'hit', 20), 'rps'):.0f} | {errs} |")
print("\nCPU per miss (the whole miss run, warm-up included; /proc/PID/stat, median of the rounds):\n")
print("| build | chat-stream us, c=1 | Redis us, c=1 | chat-stream us, c=20 | Redis us, c=20 |")
print("|---|---|---|---|---|")
for l in labels:
    cols = []
    for c in (1, 20):
        rows = [tuple(map(int, line.split())) for line in open(os.path.join(out, f"{l}-cpu-{c}.txt"))]
        per = lambda i: statistics.median(x[i] for x in rows) / tck / (int(req) + 200) * 1e6
        cols += [f"{per(0):.0f}", f"{per(1):.0f}"]
    print(f"| {l} | " + " | ".join(cols) + " |")
streams = {l: load(os.path.join(out, f"{l}-streams.jsonl")) for l in labels}
if any(streams.values()):
    n = next(s for s in streams.values() if s)[0]["streams"]
    mux = next(s for s in streams.values() if s)[0].get("h2_per_conn", 0)
    clients = f"h2c clients, {mux} streams per connection" if mux else "a client connection (HTTP/1.1) each"
    print(f"\n{n} slow streams at once (sim: 500 ms to first token, 2 tokens/s, 16 tokens; {clients}; "
          "median of the rounds):\n")
    print("| build | errors | most open at once | peak RSS MiB | per stream KiB | RSS 3 s after MiB | CPU ms per stream |")
    print("|---|---|---|---|---|---|---|")
    for l in labels:
        s = streams[l]
        if not s:
            print(f"| {l} | did not run | | | | | |")
            continue
        print(f"| {l} | {sum(x['errors'] for x in s)} | {min(x['peak_open'] for x in s)} | {med(s, 'rss_peak_mib'):.1f} | "
              f"{med(s, 'rss_per_stream_kib'):.1f} | {med(s, 'rss_after_mib'):.1f} | {med(s, 'cpu_ms_per_stream'):.3f} |")
PY
