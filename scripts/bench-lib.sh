# Shared by the benchmark scripts (sourced, not run).
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
# wait_for PORT: up to 20 s for something to listen there.
wait_for() { for _ in $(seq 1 200); do listening "$1" && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; exit 1; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
can_pin() { command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; }
# Prefixes that pin chat-stream to CPU 0 and everything else to CPU 1,
# when the machine has two CPUs and taskset (BENCH_PIN=0: no pinning, every
# process on every core, as make bench-peers runs).
on_chat=(); on_rest=()
if [ "${BENCH_PIN:-1}" = 1 ] && can_pin; then on_chat=(taskset -c 0); on_rest=(taskset -c 1); fi

# Services of a benchmark's own, pinned with the rest (need OUT, VENV, BIN;
# their pids go into svc, killed by the caller's trap).
start_redis() { # PORT
  "${on_rest[@]}" redis-server --port "$1" --bind 127.0.0.1 --save "" --appendonly no >"$OUT/redis-$1.log" 2>&1 &
  svc+=($!)
}
start_sim() { # PORT FLAGS...
  local port=$1; shift
  "${on_rest[@]}" "$BIN/model-sim" --addr "127.0.0.1:$port" "$@" >"$OUT/sim-$port.log" 2>&1 &
  svc+=($!)
}
# A fresh moto (its memory grows over long runs) as every AWS client's
# endpoint; MOTO_PID is its pid.
start_moto() { # PORT
  "${on_rest[@]}" "$VENV/bin/moto_server" -H 127.0.0.1 -p "$1" >"$OUT/moto.log" 2>&1 &
  svc+=($!)
  MOTO_PID=$!
  export AWS_ENDPOINT_URL="http://127.0.0.1:$1" AWS_REGION=us-east-1
  export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing
}
# Stops the chat-streams a benchmark started (pids).
stop_chat() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; pids=(); }
