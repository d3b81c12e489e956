#!/usr/bin/env python3
"""make profile: where a request's CPU and system calls go, per process.

Runs chat-stream (every feature on, as `make bench-peers`' first row: API
key, limits, slots and breakers in Redis, the Redis cache with coalescing
and live stream copy; one runtime thread) against model-sim (answers at
once, 16 tokens) and a Redis of its own, then N requests at concurrency C
with chat-bench, and prints for each process (chat-stream, Redis, the sim,
the load generator) its CPU time per request, and, where `perf` may count
tracepoints, chat-stream's and Redis's system calls per request by name.

Use: scripts/request_profile.py [--bin PATH] [--mode miss|hit] [-c C] [-n N]
(`miss`: unique questions at temperature 0, each looked up, missed and
answered by the model; `hit`: one question, answered from the cache).
Two builds side by side: run it once per `--bin`. A build with symbols
for `perf record`: `cargo build --profile profiling -p chat-stream`.
"""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from benchstats import free_port, wait_port

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
BIN = os.path.join(ROOT, "target", "release")
SYSCALLS = ["writev", "write", "sendto", "recvfrom", "read", "epoll_wait", "getrandom", "futex"]


def ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def redis_calls(port):
    """Calls so far per Redis command (INFO commandstats)."""
    r = subprocess.run(["redis-cli", "-p", str(port), "INFO", "commandstats"], capture_output=True, text=True)
    calls = {}
    for line in r.stdout.splitlines():
        if line.startswith("cmdstat_"):
            name, _, rest = line.partition(":")
            fields = dict(kv.split("=", 1) for kv in rest.split(",") if "=" in kv)
            calls[name.removeprefix("cmdstat_")] = int(fields.get("calls", 0))
    return calls


def perf_ok():
    if not shutil.which("perf"):
        return False
    r = subprocess.run(["perf", "stat", "-e", "syscalls:sys_enter_writev", "true"], capture_output=True)
    return r.returncode == 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(BIN, "chat-stream"))
    ap.add_argument("--mode", choices=["miss", "hit"], default="miss")
    ap.add_argument("-c", type=int, default=20)
    ap.add_argument("-n", type=int, default=4000)
    ap.add_argument("--record", metavar="FILE", help="also `perf record` chat-stream (DWARF call graphs) into FILE "
                    "(for `perf report -i FILE`; use a build with symbols)")
    a = ap.parse_args()
    out = tempfile.mkdtemp(prefix="profile-")
    procs = []

    def start(name, argv, env=None):
        log = open(os.path.join(out, f"{name}.log"), "w")
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        procs.append(p)
        return p

    try:
        rport, sport, port = free_port(), free_port(), free_port()
        redis = start("redis", ["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no"])
        sim = start("sim", [os.path.join(BIN, "model-sim"), "--addr", f"127.0.0.1:{sport}", "--ttft-ms", "0",
                            "--tps", "0", "--tokens", "16"])
        wait_port(rport)
        wait_port(sport)
        env = {k: v for k, v in os.environ.items() if k not in ("TABLE_NAME", "TURN_QUEUE_URL", "AWS_ENDPOINT_URL")}
        env.update({"ANTHROPIC_API_KEY": "bench", "ANTHROPIC_BASE_URL": f"http://127.0.0.1:{sport}",
                    "LOG_LEVEL": "info", "AUTH_MODE": "api_key", "TOKIO_WORKER_THREADS": "1",
                    "API_KEY_HASHES": hashlib.sha256(b"bench").hexdigest() + ":bench-user",
                    "RATE_LIMIT_RPM": "1000000", "RATE_LIMIT_TPM": "1000000000", "MAX_STREAMS_PER_USER": "10000",
                    "REDIS_URL": f"redis://127.0.0.1:{rport}", "CACHE_BACKEND": "redis"})
        chat = start("chat-stream", [a.bin, "--bind-addr", f"127.0.0.1:{port}"], env)
        wait_port(port)
        which = ["--temperature", "0"] if a.mode == "miss" else ["--repeat", "--message", "profile hit question"]

        def bench(n, warmup):
            argv = [os.path.join(BIN, "chat-bench"), "--url", f"http://127.0.0.1:{port}/chat", "--api", "chat",
                    "--concurrency", str(a.c), "--requests", str(n), "--warmup", str(warmup), "--json", *which]
            p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            _, err = p.communicate()
            lines = [line for line in err.splitlines() if line.startswith("{")]
            if p.returncode != 0 or not lines:
                raise RuntimeError(f"chat-bench failed: {err[-500:]}")
            return json.loads(lines[-1])

        bench(500, 50)  # warm: connections, scripts loaded, allocator grown
        counters = []
        if perf_ok():
            for name, p in (("chat-stream", chat), ("redis", redis)):
                ev = ",".join(f"syscalls:sys_enter_{s}" for s in SYSCALLS)
                path = os.path.join(out, f"perf-{name}.txt")
                counters.append((name, path, subprocess.Popen(
                    ["perf", "stat", "-x", ",", "-e", ev, "-p", str(p.pid), "-o", path],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
        if a.record:
            counters.append((None, None, subprocess.Popen(
                ["perf", "record", "--call-graph", "dwarf,16384", "-F", "500", "-o", a.record, "-p", str(chat.pid)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
        if counters:
            time.sleep(0.5)
        calls0 = redis_calls(rport)
        before = {k: ticks(p.pid) for k, p in (("chat-stream", chat), ("redis", redis), ("model-sim", sim))}
        r0 = os.times()
        result = bench(a.n, 0)
        r1 = os.times()
        after = {k: ticks(p.pid) for k, p in (("chat-stream", chat), ("redis", redis), ("model-sim", sim))}
        calls1 = redis_calls(rport)
        for _, _, c in counters:
            c.send_signal(2)
            c.wait()
        tck = os.sysconf("SC_CLK_TCK")
        print(f"# make profile ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, {'misses' if a.mode == 'miss' else 'hits'}, concurrency "
              f"{a.c}, {a.n} requests; chat-stream {a.bin} on 1 runtime thread)\n")
        print(f"TTFT p50 {result['ttft_ms']['p50']:.3f} ms, whole answer p50 {result['total_ms']['p50']:.3f} ms, "
              f"{result['rps']:.0f} requests/s, {result['errors']} errors\n")
        print("| process | CPU us per request |")
        print("|---|---|")
        for k in before:
            print(f"| {k} | {(after[k] - before[k]) / tck / a.n * 1e6:.0f} |")
        bench_cpu = (r1.children_user + r1.children_system) - (r0.children_user + r0.children_system)
        print(f"| chat-bench (load generator) | {bench_cpu / a.n * 1e6:.0f} |")
        per = {k: (v - calls0.get(k, 0)) / a.n for k, v in calls1.items() if k != "info"}
        per = {k: v for k, v in sorted(per.items(), key=lambda kv: -kv[1]) if v >= 0.005}
        print(f"\nRedis commands per request (INFO commandstats): {sum(per.values()):.2f}, "
              + ", ".join(f"{k} {v:.2f}" for k, v in per.items()))
        if any(name for name, _, _ in counters):
            print("\nSystem calls per request (perf stat, tracepoints):\n")
            print("| process | " + " | ".join(SYSCALLS) + " |")
            print("|---|" + "---|" * len(SYSCALLS))
            for name, path, _ in counters:
                if name is None:
                    continue
                got = {}
                for line in open(path):
                    parts = line.strip().split(",")
                    if len(parts) > 2 and parts[2].startswith("syscalls:sys_enter_"):
                        try:
                            got[parts[2].removeprefix("syscalls:sys_enter_")] = int(parts[0])
                        except ValueError:
                            pass
                print(f"| {name} | " + " | ".join(f"{got.get(s, 0) / a.n:.2f}" for s in SYSCALLS) + " |")
        elif not a.record:
            print("\n(perf cannot count tracepoints here: no system-call counts)")
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
