#!/usr/bin/env bash
# Starts the local stack in the foreground: Redis and moto (with the
# template's table and queues), model-sim (unless ANTHROPIC_API_KEY is set,
# then the real API is used), chat-stream, db-writer as the local poller
# of the turn queue, and cache-warmer on a local timer (WARM_EVERY_SECS,
# default 60). Ctrl-C stops everything this script started.
#
# AUTH_MODE: dev (default here: callers name themselves with x-dev-user),
# api_key (make a key with: TABLE_NAME=local-ChatTable target/debug/chat-stream
# keys create --user me, with the env from scripts/services.sh start), jwt
# or api_key,jwt: tokens from oidc-sim, the local OIDC issuer this script
# starts on OIDC_PORT (sign in through its /authorize page, or mint one:
# curl -s -X POST http://127.0.0.1:4400/mint -d '{"sub":"me"}' -H 'content-type: application/json').
#
# Knobs: PORT (3000), SIM_PORT (4010), OIDC_PORT (4400), SIM_TTFT_MS (300),
# SIM_TPS (30), SIM_TOKENS (120), BIN (target/debug).
set -euo pipefail
cd "$(dirname "$0")/.."

PORT=${PORT:-3000}
SIM_PORT=${SIM_PORT:-4010}
OIDC_PORT=${OIDC_PORT:-4400}
WEB_PORT=${WEB_PORT:-5173}
BIN=${BIN:-target/debug}
pids=()

started_services=()
cleanup() {
  trap - EXIT INT TERM
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  # Stop the local stack's services this run started (not ones that were
  # already running before it).
  for s in "${started_services[@]}"; do
    [ -f ".run/$s.pid" ] && kill "$(cat ".run/$s.pid")" 2>/dev/null && rm -f ".run/$s.pid"
  done
  echo "stopped."
}
trap cleanup EXIT
trap 'exit 0' INT TERM

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for() { # port name pid
  for _ in $(seq 1 100); do
    listening "$1" && return 0
    kill -0 "$3" 2>/dev/null || { echo "$2 exited during start-up" >&2; exit 1; }
    sleep 0.1
  done
  echo "$2 did not start listening on port $1" >&2
  exit 1
}

# The local stack: Redis (shared rate limits and breakers) and moto.
listening "${REDIS_PORT:-6379}" || started_services+=(redis)
listening "${MOTO_PORT:-5005}" || started_services+=(moto)
# (eval "$(...)" would hide a failure: keep the status.)
svc_env=$(scripts/services.sh start)
eval "$svc_env"

for p in "$PORT" "$OIDC_PORT" "$WEB_PORT" $([ -z "${ANTHROPIC_API_KEY:-}" ] && echo "$SIM_PORT"); do
  if listening "$p"; then
    echo "port $p is already in use; choose another: make run PORT=... SIM_PORT=..." >&2
    exit 1
  fi
done

if [ -z "${ANTHROPIC_API_KEY:-}" ]; then
  "$BIN/model-sim" --addr "127.0.0.1:$SIM_PORT" \
    --ttft-ms "${SIM_TTFT_MS:-300}" --tps "${SIM_TPS:-30}" --tokens "${SIM_TOKENS:-120}" &
  pids+=($!)
  wait_for "$SIM_PORT" model-sim "$!"
  export ANTHROPIC_BASE_URL="http://127.0.0.1:$SIM_PORT"
  export ANTHROPIC_API_KEY="local-model-sim"
  # The sim speaks the OpenAI-compatible format too: "model": "openai:gpt-sim".
  export OPENAI_BASE_URL="http://127.0.0.1:$SIM_PORT/v1"
  # ...and Bedrock's ConverseStream: "model": "bedrock:anthropic.claude-sim-v1:0"
  # (the AWS SDK signs with the local stack's test credentials).
  export BEDROCK_ENABLED=true BEDROCK_REGION=us-east-1
  export AWS_ENDPOINT_URL_BEDROCK_RUNTIME="http://127.0.0.1:$SIM_PORT"
  export AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-testing}" AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-testing}"
  # Any model name, so model-sim's knobs work: "model": "claude-sim+ttft=800,fault=drop-mid@5".
  export MODEL_ALLOWLIST="${MODEL_ALLOWLIST:-*}"
  model="model-sim at $ANTHROPIC_BASE_URL"
else
  model="the Anthropic API (ANTHROPIC_API_KEY is set)"
fi

# The local OIDC issuer (what Cognito is in AWS): tokens for AUTH_MODE=jwt.
"$BIN/oidc-sim" --addr "127.0.0.1:$OIDC_PORT" --audience chat-stream &
pids+=($!)
wait_for "$OIDC_PORT" oidc-sim "$!"
export JWT_ISSUER="${JWT_ISSUER:-http://127.0.0.1:$OIDC_PORT}" JWT_AUDIENCE="${JWT_AUDIENCE:-chat-stream}"

export AUTH_MODE="${AUTH_MODE:-dev}"
# The chat page is served from its own origin, as it is deployed (S3 +
# CloudFront in front of a Function URL), so CORS works here as there.
export CORS_ALLOW_ORIGINS="${CORS_ALLOW_ORIGINS:-http://127.0.0.1:$WEB_PORT,http://localhost:$WEB_PORT}"
"$BIN/chat-stream" --bind-addr "127.0.0.1:$PORT" &
pids+=($!)
wait_for "$PORT" chat-stream "$!"

# The page: web/ with a config.js for this stack, on its own origin.
rm -rf .run/web && mkdir -p .run/web && cp web/*.html web/*.js web/*.css .run/web/
case "$AUTH_MODE" in
  dev) page_auth=dev ;;
  *jwt*) page_auth=jwt ;;
  *) page_auth=none ;;
esac
cat > .run/web/config.js <<CFG
window.CHAT_CONFIG = {api: "http://127.0.0.1:$PORT", auth: "$page_auth", issuer: "$JWT_ISSUER", clientId: "chat-web"};
CFG
python3 -m http.server "$WEB_PORT" --bind 127.0.0.1 --directory .run/web >/dev/null 2>&1 &
pids+=($!)
wait_for "$WEB_PORT" "the page's web server" "$!"

# The event source mapping's stand-in: batches from the queue into the table.
POLL_BATCHING_WINDOW_MS="${POLL_BATCHING_WINDOW_MS:-500}" "$BIN/db-writer" &
pids+=($!)

# The EventBridge schedule's stand-in: refreshes popular answers.
"$BIN/cache-warmer" --every "${WARM_EVERY_SECS:-60}" &
pids+=($!)

cat <<MSG

Chat page: http://127.0.0.1:$WEB_PORT/ $(case "$page_auth" in dev) echo "(AUTH_MODE=dev: type any user name; make run AUTH_MODE=jwt signs in through the local issuer)";; jwt) echo "(sign in through the local issuer: any user name)";; *) echo "(AUTH_MODE=$AUTH_MODE: a page cannot hold an API key; use AUTH_MODE=jwt or api_key,jwt)";; esac)
chat-stream is up at http://127.0.0.1:$PORT (model: $model)
Auth: AUTH_MODE=$AUTH_MODE$([ "$AUTH_MODE" = dev ] && echo " (local only: x-dev-user names the caller, no key needed)")
OIDC issuer (local stand-in for Cognito): $JWT_ISSUER; with make run AUTH_MODE=jwt, sign in there or mint a token:
  TOKEN=\$(curl -s -X POST $JWT_ISSUER/mint -H 'content-type: application/json' -d '{"sub":"alice"}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
  curl -N http://127.0.0.1:$PORT/chat -H "authorization: Bearer \$TOKEN" -H 'content-type: application/json' -d '{"message": "hi"}'
OpenAI-compatible: base URL http://127.0.0.1:$PORT/v1 (POST /v1/chat/completions, GET /v1/models)
Turns: queue $TURN_QUEUE_URL -> db-writer (local poller) -> table $TABLE_NAME
Cache: Redis; identical in-flight questions share one model call; cache-warmer every ${WARM_EVERY_SECS:-60}s

  # temperature 0 is cached: ask twice, the second is a hit (x-cache: hit)
  curl -N -i http://127.0.0.1:$PORT/chat -H 'content-type: application/json' \
    -H 'x-dev-user: alice' -d '{"message": "What is a cache?", "temperature": 0}'

  # resume a broken stream: stream_id from the meta event, the last id you got
  curl -N http://127.0.0.1:$PORT/chat/streams/STREAM_ID -H 'x-dev-user: alice' -H 'Last-Event-ID: 3'

  curl -N http://127.0.0.1:$PORT/chat -H 'content-type: application/json' \\
    -H 'x-dev-user: alice' -d '{"message": "Why does streaming make chat feel fast?"}'

  # continue it: "conversation_id" from the meta event
  curl -N http://127.0.0.1:$PORT/chat -H 'content-type: application/json' \\
    -H 'x-dev-user: alice' -d '{"message": "Say that shorter", "conversation_id": "ID"}'

  curl http://127.0.0.1:$PORT/conversations -H 'x-dev-user: alice'

  curl http://127.0.0.1:$PORT/health

  # with model-sim: its knobs ride on the model name
  curl -N http://127.0.0.1:$PORT/chat -H 'content-type: application/json' \
    -d '{"message": "hi", "model": "claude-sim+ttft=1500,tps=5,fault=drop-mid@8"}'

Logs follow (one JSON line per request). Ctrl-C stops everything.

MSG

# Stop everything as soon as either process ends.
wait -n "${pids[@]}"
