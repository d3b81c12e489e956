#!/usr/bin/env bash
# Prints the fault matrix: every model-sim fault driven through a real
# chat-stream, with what the client saw, the upstream attempts, the time to
# the outcome and a duplicate-text check. Part of `make bench`.
#
# chat-stream settings for the run (also printed): first-token and idle
# timeouts 1 s, 2 retries with 100 ms base backoff, breaker threshold high
# enough not to trip during the matrix.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release}
SIM_PORT=${SIM_PORT:-4120}
OUT=$(mktemp -d)
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$OUT"' EXIT
. scripts/bench-lib.sh

"$BIN/model-sim" --addr "127.0.0.1:$SIM_PORT" --ttft-ms 50 --tps 100 --tokens 12 >"$OUT/sim.log" 2>&1 &
pids+=($!)
wait_for "$SIM_PORT"

common=(ANTHROPIC_API_KEY=fault-matrix MODEL_ALLOWLIST='*' LOG_LEVEL=warn AUTH_MODE=dev
  UPSTREAM_FIRST_TOKEN_TIMEOUT_MS=1000 UPSTREAM_IDLE_TIMEOUT_MS=1000
  UPSTREAM_MAX_RETRIES=2 UPSTREAM_RETRY_BASE_MS=100 BREAKER_FAILURES=1000 RATE_LIMIT_RPM=0 MAX_STREAMS_PER_USER=0)
start_chat() { # port base_url extra...
  local port=$1 base=$2; shift 2
  env -u TABLE_NAME -u TURN_QUEUE_URL "${common[@]}" ANTHROPIC_BASE_URL="$base" "$@" "$BIN/chat-stream" --bind-addr "127.0.0.1:$port" >>"$OUT/chat.log" 2>&1 &
  pids+=($!)
  wait_for "$port"
}
main=$(free_port); dead=$(free_port); fb=$(free_port); closed=$(free_port)
start_chat "$main" "http://127.0.0.1:$SIM_PORT"
start_chat "$dead" "http://127.0.0.1:$closed" UPSTREAM_PREWARM=false
start_chat "$fb" "http://127.0.0.1:$SIM_PORT" MODEL_FALLBACKS=fm-backup

echo "### Fault matrix ($(date -u +%Y-%m-%d))"
echo
echo "chat-stream: first-token and idle timeouts 1 s, UPSTREAM_MAX_RETRIES=2, backoff base 100 ms (full jitter), no fallback unless the row says so. model-sim: first token after 50 ms, 100 tokens/s, 12 tokens."
echo
"$BIN/chat-bench" faults --chat "http://127.0.0.1:$main" --dead-chat "http://127.0.0.1:$dead" --fallback-chat "http://127.0.0.1:$fb"
