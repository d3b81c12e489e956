# Shared by the benchmark scripts (sourced, not run).
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
# wait_for PORT: up to 20 s for something to listen there.
wait_for() { for _ in $(seq 1 200); do listening "$1" && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; exit 1; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
can_pin() { command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; }
# Prefixes that pin chat-stream to CPU 0 and everything else to CPU 1,
# when the machine has two CPUs and taskset.
on_chat=(); on_rest=()
if can_pin; then on_chat=(taskset -c 0); on_rest=(taskset -c 1); fi
