#!/usr/bin/env bash
# Cold start of each function: exec -> first /next poll (init done) and
# exec -> first response, for the release build natively and (as an
# indication only: emulated) the arm64 bootstrap under qemu-user. Also the
# binary's own init breakdown from its log. Needs `make build` for the
# arm64 rows. db-writer's first response includes its writes to moto (a
# Python server here): moto's time, not DynamoDB's.
#
# Knobs: COLD_RUNS (20).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
BIN=target/release
RUNS=${COLD_RUNS:-20}
OUT=$(mktemp -d)
svc=()
trap 'for p in "${svc[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$OUT"' EXIT
. scripts/bench-lib.sh

SIM_PORT=$(free_port); RPORT=$(free_port); MPORT=$(free_port)
start_sim "$SIM_PORT" --ttft-ms 0 --tps 0 --tokens 16
start_redis "$RPORT"
start_moto "$MPORT"
wait_for "$SIM_PORT"; wait_for "$RPORT"; wait_for "$MPORT"
eval "$("$VENV/bin/python" scripts/local_aws.py ensure --prefix coldstart)"

qemu=(qemu-aarch64 -L /usr/aarch64-linux-gnu)
chat_env=(ANTHROPIC_BASE_URL="http://127.0.0.1:$SIM_PORT" ANTHROPIC_API_KEY=bench LOG_LEVEL=info
  API_KEY_HASHES=92d6376288da154534b93448f4e79fc1e9bd83f3cf398ad65f74212a4626523c:example-user)
cold() { # NAME EVENT ENV... -- COMMAND...
  local name=$1 event=$2; shift 2
  local envs=()
  while [ "$1" != "--" ]; do envs+=("$1"); shift; done
  shift
  env -i PATH="$PATH" "${envs[@]}" python3 scripts/coldstart.py "$name" "events/$event" "$RUNS" -- "$@" >>"$OUT/rows.jsonl"
}

for arch in native arm64-qemu; do
  if [ $arch = native ]; then run=(); dir=$BIN; suffix=""; else
    [ -f target/lambda/chat-stream/bootstrap ] || { echo "no arm64 bootstraps: run make build" >&2; continue; }
    run=("${qemu[@]}"); dir=target/lambda; suffix=/bootstrap; fi
  cs=$dir/chat-stream$suffix; dw=$dir/db-writer$suffix; cw=$dir/cache-warmer$suffix
  cold "chat-stream $arch, pre-warm off" health.json "${chat_env[@]}" UPSTREAM_PREWARM=false -- "${run[@]}" "$cs"
  cold "chat-stream $arch, pre-warm on (local sim)" health.json "${chat_env[@]}" -- "${run[@]}" "$cs"
  cold "chat-stream $arch, + Redis, table, queue (moto)" health.json "${chat_env[@]}" UPSTREAM_PREWARM=false \
    REDIS_URL="redis://127.0.0.1:$RPORT" TABLE_NAME="$TABLE_NAME" TURN_QUEUE_URL="$TURN_QUEUE_URL" \
    AWS_ENDPOINT_URL="$AWS_ENDPOINT_URL" AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing -- "${run[@]}" "$cs"
  cold "db-writer $arch (writes to moto)" sqs-turns-valid.json TABLE_NAME="$TABLE_NAME" LOG_LEVEL=info \
    AWS_ENDPOINT_URL="$AWS_ENDPOINT_URL" AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing -- "${run[@]}" "$dw"
  cold "cache-warmer $arch (Redis, nothing to warm)" cache-warmer-schedule.json "${chat_env[@]}" UPSTREAM_PREWARM=false \
    REDIS_URL="redis://127.0.0.1:$RPORT" -- "${run[@]}" "$cw"
done

python3 - "$OUT/rows.jsonl" "$RUNS" <<'PY'
import json, sys, datetime
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"# cold start ({datetime.date.today()}, {sys.argv[2]} runs each after one warm-up, medians; min-max)\n")
print("| function | exec -> first /next ms | exec -> first response ms | init breakdown ms (settings / providers / clients / pre-warm) |")
print("|---|---|---|---|")
for r in rows:
    i = r["init_ms_p50"]
    parts = " / ".join(f"{i.get(k, 0):.2f}" for k in ("settings_ms", "providers_ms", "clients_ms", "prewarm_ms"))
    f, g = r["first_poll_ms"], r["first_response_ms"]
    print(f"| {r['name']} | {f['p50']:.1f} ({f['min']:.1f}-{f['max']:.1f}) | {g['p50']:.1f} ({g['min']:.1f}-{g['max']:.1f}) | {parts} |")
PY
