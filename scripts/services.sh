#!/usr/bin/env bash
# Starts the local stand-ins the tests and `make run` need, if they are not
# already answering, and prints the environment that points at them
# (use: eval "$(scripts/services.sh start)").
#
#   moto server (DynamoDB, SQS, Secrets Manager) on MOTO_PORT (5005), with
#   the table and queues of template.yaml created in it
#   (scripts/local_aws.py, names prefixed LOCAL_PREFIX, default "local")
#   Redis on REDIS_PORT (6379), installed from Debian's packages if missing
#
# `scripts/services.sh stop` stops what this script started. SERVICES_RUN
# (default .run) is where it keeps their pids: `make test` uses its own, so
# it stops only what it started, never the services of a `make run`.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${SERVICES_RUN:-.run}
MOTO_PORT=${MOTO_PORT:-5005}
REDIS_PORT=${REDIS_PORT:-6379}
VENV=${VENV:-.venv}
mkdir -p "$RUN"

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

start_moto() {
  if ! listening "$MOTO_PORT"; then
    "$VENV/bin/moto_server" -H 127.0.0.1 -p "$MOTO_PORT" >"$RUN/moto.log" 2>&1 &
    echo $! >"$RUN/moto.pid"
    for _ in $(seq 1 100); do listening "$MOTO_PORT" && break; sleep 0.1; done
    listening "$MOTO_PORT" || { echo "moto did not start; see $RUN/moto.log" >&2; exit 1; }
  fi
}

ensure_redis_installed() {
  command -v redis-server >/dev/null && return 0
  echo "installing redis-server (Debian package)" >&2
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server) >&2
  else
    (sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server) >&2
  fi
}

start_redis() {
  ensure_redis_installed
  if ! listening "$REDIS_PORT"; then
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
      --daemonize yes --pidfile "$PWD/$RUN/redis.pid" --logfile "$PWD/$RUN/redis.log"
    for _ in $(seq 1 100); do listening "$REDIS_PORT" && break; sleep 0.1; done
    listening "$REDIS_PORT" || { echo "redis did not start; see $RUN/redis.log" >&2; exit 1; }
  fi
}

case "${1:-start}" in
  start)
    start_moto
    start_redis
    export AWS_ENDPOINT_URL=http://127.0.0.1:$MOTO_PORT
    export AWS_ACCESS_KEY_ID=${AWS_ACCESS_KEY_ID:-testing}
    export AWS_SECRET_ACCESS_KEY=${AWS_SECRET_ACCESS_KEY:-testing}
    export AWS_REGION=${AWS_REGION:-us-east-1}
    resources=$("$VENV/bin/python" scripts/local_aws.py ensure --prefix "${LOCAL_PREFIX:-local}") || {
      echo "could not create the table and queues in the moto on port $MOTO_PORT; if that moto was not started by this script, stop it or set MOTO_PORT" >&2
      exit 1
    }
    cat <<ENV
export AWS_ENDPOINT_URL=$AWS_ENDPOINT_URL
export AWS_ACCESS_KEY_ID=$AWS_ACCESS_KEY_ID
export AWS_SECRET_ACCESS_KEY=$AWS_SECRET_ACCESS_KEY
export AWS_REGION=$AWS_REGION
export REDIS_URL=redis://127.0.0.1:$REDIS_PORT
$resources
ENV
    ;;
  stop)
    for f in "$RUN"/*.pid; do
      [ -f "$f" ] || continue
      kill "$(cat "$f")" 2>/dev/null || true
      rm -f "$f"
    done
    ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
