#!/usr/bin/env python3
"""make bench-peers: chat-stream next to what our users could deploy
instead, in one interleaved run on this machine, against the same model-sim
and the same Redis. Run by scripts/bench-peers.sh (which builds and
installs what it needs); prints Markdown.

Rows (each started fresh in every round, in turn):
- chat-stream with every feature on: API-key auth, fleet limits and
  breakers in Redis, the Redis cache with coalescing and live stream copy,
  persistence (history buffer in Redis, turns to SQS; table and queue in
  moto).
- chat-stream as the template deploys it by default: the DynamoDB cache
  and limits in the table, no Redis (DynamoDB and SQS are moto here, a
  Python server on the same cores: labelled as such).
- LiteLLM proxy (its version from bench/litellm.in), 1 worker, Redis cache
  on, no master key, no database.
- bare-relay: axum + reqwest, parses and re-frames SSE, one Redis GET on
  temperature 0, nothing else (the floor).
- model-sim direct: the baseline "added" figures are taken against.

Phases: (1) latency and hits, `--rounds` rounds, rows interleaved; (2) a
stampede: 50 identical requests at once against a slow sim, the model
calls counted by the sim; (3) 1,000 slow streams (sim at 2 tokens/s)
through chat-stream and the bare relay, each with HTTP/1.1 to the model
(a connection per stream, what a plain-http endpoint gets by default) and
with HTTP/2 (h2c, prior knowledge: one connection for every stream, what
the real APIs negotiate over TLS), and with HTTP/2 from the clients too
(h2c, 100 streams per connection, as a proxy in front multiplexes them;
by default each client is its own HTTP/1.1 connection): peak RSS, CPU per
stream, RSS after; each variant once per round, interleaved, the median
reported.

chat-stream and the bare relay run on one runtime thread each
(`TOKIO_WORKER_THREADS`, from BENCH_WORKERS, default 1): as chat-stream
runs in Lambda (a current-thread runtime, one request per environment)
and as LiteLLM runs here (one worker, one event loop).

All processes share both cores (no pinning): the load generator runs on
the same cores, as the goals say. Each row's start-up time is from spawn
to its first complete answer; its peak RSS is VmHWM (LiteLLM: summed over
its process tree); the machine's 1-minute load average is recorded at
each row's start.
"""

import argparse
import http.client
import json
import os
import resource
import secrets
import signal
import statistics
import subprocess
import tempfile
import time

from benchstats import free_port, wait_port

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
BIN = os.path.join(ROOT, "target", "release")
VENV = os.path.join(ROOT, ".venv")
BENCH_VENV = os.path.join(ROOT, ".bench-venv")
# Streams per client connection in the multiplexed slow-streams rows (at
# most 200: hyper's default per-connection limit, which the bare relay's
# axum::serve keeps).
MUX = 100


def answer_once(port, path, body, headers):
    """One complete request; True when it answered 200 with a body."""
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        c.request("POST", path, body=json.dumps(body), headers={"content-type": "application/json", **headers})
        r = c.getresponse()
        data = r.read()
        c.close()
        return r.status == 200 and len(data) > 0
    except OSError:
        return False


def proc_tree(pid):
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            kids = open(f"/proc/{p}/task/{p}/children").read().split()
        except OSError:
            kids = []
        todo.extend(int(k) for k in kids)
    return out


def status_kib(pid, field):
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_s(pid):
    try:
        rest = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError):
        return 0.0


def loadavg():
    return float(open("/proc/loadavg").read().split()[0])


class Procs:
    def __init__(self, out):
        self.out = out
        self.all = []

    def start(self, name, argv, env=None):
        log = open(os.path.join(self.out, f"{name}.log"), "ab")
        merged = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}
        p = subprocess.Popen(argv, env=merged, stdout=log, stderr=subprocess.STDOUT,
                             cwd=ROOT, start_new_session=True)
        self.all.append(p)
        return p

    def stop(self, p):
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    def stop_all(self):
        for p in self.all:
            self.stop(p)


BEARER = {}


def bench(out, label, args):
    """One chat-bench run; its JSON line, or None (errors are in the log)."""
    if label in BEARER:
        args = [*args, "--bearer", BEARER[label]]
    r = subprocess.run([os.path.join(BIN, "chat-bench"), *args, "--json", "--label", label],
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    line = next((l for l in r.stderr.splitlines() if l.startswith("{")), None)
    with open(os.path.join(out, "chat-bench.log"), "a") as f:
        f.write(f"## {label} {' '.join(args)}\n{r.stderr}\n")
    return json.loads(line) if line else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=int(os.environ.get("BENCH_ROUNDS", "2")))
    ap.add_argument("--streams", type=int, default=int(os.environ.get("BENCH_STREAMS", "1000")))
    ap.add_argument("--workers", default=os.environ.get("BENCH_WORKERS", "1"),
                    help="runtime threads of chat-stream and the bare relay (TOKIO_WORKER_THREADS)")
    ap.add_argument("--no-litellm", action="store_true")
    a = ap.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 65536) if hard != resource.RLIM_INFINITY else 65536
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]

    out = tempfile.mkdtemp(prefix="bench-peers-")
    procs = Procs(out)
    try:
        run(a, out, procs, nofile)
    finally:
        procs.stop_all()


def run(a, out, procs, nofile):
    key_hash = subprocess.run(["sha256sum"], input=b"bench", capture_output=True).stdout.split()[0].decode()
    litellm_version = open(os.path.join(ROOT, "bench", "litellm.in")).read().split("==")[1].split()[0]
    use_litellm = not a.no_litellm and os.path.exists(os.path.join(BENCH_VENV, "bin", "litellm"))

    rport = free_port()
    procs.start("redis", ["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
    wait_port(rport)
    redis_url = f"redis://127.0.0.1:{rport}"
    moto = {"proc": None, "env": {}}

    def fresh_moto():
        """A new moto with the template's table and queue: moto slows as
        its queue fills (nothing drains it here), so each row that
        persists gets its own."""
        if moto["proc"] is not None:
            procs.stop(moto["proc"])
        port = free_port()
        moto["proc"] = procs.start("moto", [os.path.join(VENV, "bin", "moto_server"), "-H", "127.0.0.1", "-p", str(port)])
        wait_port(port)
        aws = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_REGION": "us-east-1",
               "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
        ensured = subprocess.run([os.path.join(VENV, "bin", "python"), "scripts/local_aws.py", "ensure", "--prefix",
                                  "peers", "--format", "json"], env={**os.environ, **aws}, capture_output=True,
                                 text=True, cwd=ROOT, check=True)
        t = json.loads(ensured.stdout)
        moto["env"] = {**aws, "TABLE_NAME": t["TABLE_NAME"], "TURN_QUEUE_URL": t["TURN_QUEUE_URL"]}
        return moto["env"]

    def redis_flush():
        subprocess.run(["redis-cli", "-p", str(rport), "flushall"], capture_output=True)

    common = {"ANTHROPIC_API_KEY": "bench", "LOG_LEVEL": "info", "AUTH_MODE": "api_key",
              "TOKIO_WORKER_THREADS": a.workers,
              "API_KEY_HASHES": f"{key_hash}:bench-user",
              # Limits high enough never to refuse: checked on every request, never hit.
              "RATE_LIMIT_RPM": "1000000", "RATE_LIMIT_TPM": "1000000000", "MAX_STREAMS_PER_USER": "10000"}
    # (None: not set at all in the child's environment)
    no_aws = {"TABLE_NAME": None, "TURN_QUEUE_URL": None, "AWS_ENDPOINT_URL": None}

    def chat_full(sim, port):
        env = {**common, **no_aws, "ANTHROPIC_BASE_URL": sim, "REDIS_URL": redis_url, "CACHE_BACKEND": "redis"}
        return [os.path.join(BIN, "chat-stream"), "--bind-addr", f"127.0.0.1:{port}"], env

    def chat_persist(sim, port):
        env = {**common, **fresh_moto(), "ANTHROPIC_BASE_URL": sim, "REDIS_URL": redis_url, "CACHE_BACKEND": "redis"}
        return [os.path.join(BIN, "chat-stream"), "--bind-addr", f"127.0.0.1:{port}"], env

    def chat_default(sim, port):
        env = {**common, **fresh_moto(), "ANTHROPIC_BASE_URL": sim, "CACHE_BACKEND": "dynamodb",
               "CACHE_ENABLED": "true", "REDIS_URL": None}
        return [os.path.join(BIN, "chat-stream"), "--bind-addr", f"127.0.0.1:{port}"], env

    def litellm(sim, port):
        cfg = os.path.join(out, f"litellm-{port}.yaml")
        with open(cfg, "w") as f:
            f.write(f"""model_list:
  - model_name: claude-sonnet-4-5
    litellm_params:
      model: anthropic/claude-sonnet-4-5
      api_base: {sim}
      api_key: bench
litellm_settings:
  cache: true
  cache_params:
    type: redis
    host: 127.0.0.1
    port: {rport}
""")
        env = {"LITELLM_MASTER_KEY": master_key, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY": "False", "LITELLM_LOG": "ERROR",
               "DISABLE_SCHEMA_UPDATE": "true"}
        return [os.path.join(BENCH_VENV, "bin", "litellm"), "--config", cfg, "--host", "127.0.0.1", "--port", str(port),
                "--num_workers", "1"], env

    def bare(sim, port):
        return [os.path.join(BIN, "bare-relay"), "--addr", f"127.0.0.1:{port}", "--upstream", sim,
                "--redis", redis_url], {"TOKIO_WORKER_THREADS": a.workers}

    def over_h2c(start):
        """The same row, speaking HTTP/2 to the model from the first byte."""
        def h2c(sim, port):
            argv, env = start(sim, port)
            if start is bare:
                return [*argv, "--http2-prior-knowledge", "true"], env
            return argv, {**env, "UPSTREAM_HTTP2_PRIOR_KNOWLEDGE": "true"}
        return h2c

    # (key, label, how to start it, path, chat-bench api, TTFT concurrencies, hit concurrencies)
    rows = [("full", "chat-stream, every feature on (API key, limits + slots + breakers in Redis, Redis cache, "
                     "coalescing, live stream copy); persistence off", chat_full, "/chat", "chat", (1, 20, 100), (1, 20)),
            ("persist", "the same + persistence (turns to SQS, history buffer in Redis; SQS in moto)", chat_persist,
             "/chat", "chat", (1,), (1,)),
            ("default", "chat-stream, template default (DynamoDB cache, limits in the table, persistence; all moto)",
             chat_default, "/chat", "chat", (1,), (1,))]
    if use_litellm:
        rows.append(("litellm", f"LiteLLM {litellm_version} (1 worker, Redis cache)", litellm, "/v1/chat/completions",
                     "openai", (1, 20, 100), (1, 20)))
    rows.append(("bare", "bare relay (axum + reqwest, no features)", bare, "/chat", "chat", (1, 20, 100), (1, 20)))

    # LiteLLM refuses to start without a master key: every request to it
    # carries this one (our rows check an API key too).
    master_key = "sk-" + secrets.token_hex(32)
    BEARER["litellm"] = master_key

    def ready(port, path, api, i):
        if api == "openai":
            body = {"model": "claude-sonnet-4-5", "max_tokens": 16, "stream": True,
                    "messages": [{"role": "user", "content": f"ready {i} {time.time()}"}]}
        else:
            body = {"message": f"ready {i} {time.time()}", "max_tokens": 16}
        headers = {"authorization": f"Bearer {master_key}"} if api == "openai" else {"x-api-key": "bench"}
        return answer_once(port, path, body, headers)

    def start_row(key, start, sim_url, path, api, tag):
        port = free_port()
        argv, env = start(sim_url, port)
        t0 = time.perf_counter()
        p = procs.start(f"{key}-{tag}", argv, env)
        i = 0
        while True:
            if p.poll() is not None:
                raise RuntimeError(f"{key} exited at start; see {out}/{key}-{tag}.log")
            if ready(port, path, api, i):
                break
            i += 1
            if time.perf_counter() - t0 > 120:
                raise RuntimeError(f"{key} not ready after 120 s; see {out}/{key}-{tag}.log")
            time.sleep(0.005)
        return p, port, time.perf_counter() - t0

    def sim(name, *flags):
        port = free_port()
        procs.start(name, [os.path.join(BIN, "model-sim"), "--addr", f"127.0.0.1:{port}", *flags])
        wait_port(port)
        return port

    def sim_calls(port):
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        c.request("GET", "/sim/stats")
        v = json.loads(c.getresponse().read())
        c.close()
        return v["calls"]

    # --- phase 1: latency and cache hits --------------------------------------
    fast = sim("sim-fast", "--ttft-ms", "0", "--tps", "0", "--tokens", "16")
    fast_url = f"http://127.0.0.1:{fast}"
    res = {}  # (key, metric) -> [json per round]
    meta = {}  # key -> list of dicts per round

    def req_for(key, c):
        if key == "litellm":
            return {1: 100, 20: 300, 100: 400}[c]
        if key == "persist":
            return {1: 300, 20: 300}[c]
        if key == "default":
            return {1: 60}[c]
        return {1: 500, 20: 2000, 100: 2000}[c]

    profile = {}  # (key, kind) -> {command: calls per request}

    def redis_profile(key, url, api, n=200):
        """The commands each request sends to Redis, by command, on the miss
        and the hit path, from Redis's MONITOR (commands run inside a script
        are left out: one EVALSHA is one round trip). The work after each
        answer (it runs on tasks) is waited for before the count ends."""
        for kind, extra in (("miss", ["--temperature", "0"]),
                            ("hit", ["--repeat", "--message", f"profile hit {time.time()}"])):
            if kind == "hit":
                bench(out, key, ["--url", url, "--api", api, "--concurrency", "1", "--requests", "1", "--warmup", "0",
                                 *extra])
            time.sleep(0.5)
            mon_path = os.path.join(out, f"monitor-{key}-{kind}.txt")
            with open(mon_path, "w") as f:
                mon = subprocess.Popen(["redis-cli", "-p", str(rport), "monitor"], stdout=f)
                time.sleep(0.3)
                bench(out, key, ["--url", url, "--api", api, "--concurrency", "1", "--requests", str(n), "--warmup",
                                 "0", *extra])
                time.sleep(1.0)
                mon.terminate()
                mon.wait()
            counts = {}
            for line in open(mon_path, errors="replace"):
                if "] \"" not in line or "[0 lua]" in line:
                    continue
                cmd = line.split("] \"", 1)[1].split("\"", 1)[0].lower()
                counts[cmd] = counts.get(cmd, 0) + 1
            profile[(key, kind)] = {c: v / n for c, v in counts.items()}

    def warm(key, c):
        return 5 if key == "default" else max(50, c)

    for rnd in range(a.rounds):
        for c in (1, 20, 100):
            r = bench(out, "direct", ["--url", f"{fast_url}/v1/messages", "--api", "anthropic", "--concurrency", str(c),
                                      "--requests", str(req_for("direct", c)), "--warmup", str(max(50, c))])
            res.setdefault(("direct", f"ttft{c}"), []).append(r)
        for key, label, start, path, api, ttft_cs, hit_cs in rows:
            redis_flush()
            load0 = loadavg()
            p, port, startup = start_row(key, start, fast_url, path, api, f"r{rnd}")
            cpu0 = cpu_s(p.pid)
            url = f"http://127.0.0.1:{port}{path}"
            for c in ttft_cs:
                # The baseline right before the row, at the same
                # concurrency: the sim's own TTFT drifts within a round.
                d = bench(out, "direct", ["--url", f"{fast_url}/v1/messages", "--api", "anthropic", "--concurrency",
                                          str(c), "--requests", str(req_for("direct", c)), "--warmup", str(max(50, c))])
                res.setdefault((f"direct@{key}", f"ttft{c}"), []).append(d)
                r = bench(out, key, ["--url", url, "--api", api, "--concurrency", str(c), "--requests",
                                     str(req_for(key, c)), "--warmup", str(warm(key, c)), "--temperature", "0"])
                res.setdefault((key, f"ttft{c}"), []).append(r)
            for c in hit_cs:
                r = bench(out, key, ["--url", url, "--api", api, "--concurrency", str(c), "--requests",
                                     str(req_for(key, c)), "--warmup", str(warm(key, c)), "--repeat", "--message",
                                     f"peers hit question round {rnd} c {c}"])
                res.setdefault((key, f"hit{c}"), []).append(r)
            if rnd == 0 and key in ("full", "persist", "bare"):
                redis_profile(key, url, api)
            tree = proc_tree(p.pid)
            rss = sum(status_kib(t, "VmHWM") for t in tree) / 1024
            cpu = sum(cpu_s(t) for t in tree) - cpu0
            meta.setdefault(key, []).append({"startup_s": startup, "rss_mib": rss, "cpu_s": cpu, "load0": load0,
                                             "load1": loadavg(), "procs": len(tree)})
            procs.stop(p)

    # --- phase 2: stampede -------------------------------------------------------
    slow = sim("sim-slow", "--ttft-ms", "400", "--tps", "80", "--tokens", "32")
    slow_url = f"http://127.0.0.1:{slow}"
    stampede = {}
    for key, label, start, path, api, *_ in rows:
        if key == "persist":
            continue
        redis_flush()
        p, port, _ = start_row(key, start, slow_url, path, api, "stampede")
        before = sim_calls(slow)
        r = bench(out, key, ["--url", f"http://127.0.0.1:{port}{path}", "--api", api, "--concurrency", "50",
                             "--requests", "50", "--warmup", "0", "--repeat", "--message",
                             f"peers stampede question {time.time()}"])
        stampede[key] = {"calls": sim_calls(slow) - before, "ok": r["ok"] if r else 0,
                         "errors": r["errors"] if r else 50,
                         "ttft_p50": r["ttft_ms"]["p50"] if r else float("nan")}
        procs.stop(p)

    # --- phase 3: many slow streams ---------------------------------------------
    drip = sim("sim-drip", "--ttft-ms", "500", "--tps", "2", "--tokens", "16")
    drip_url = f"http://127.0.0.1:{drip}"
    streams = {}
    variants = []
    for key, label, start, path, api, *_ in rows:
        if key in ("full", "bare"):
            variants.append((key, f"{label}; HTTP/1.1 to the model", start, path, api, 0))
            variants.append((f"{key}-h2c", f"{label}; HTTP/2 to the model (h2c)", over_h2c(start), path, api, 0))
            variants.append((f"{key}-h2c-mux", f"{label}; HTTP/2 to the model (h2c); clients multiplexed "
                             f"(h2c, {MUX} streams per connection, as a proxy in front would)", over_h2c(start),
                             path, api, MUX))
    # Peak RSS moves by about a MiB from run to run: each variant runs once
    # per round, interleaved, and the table gives the median and the rounds.
    for rnd in range(a.rounds):
        for key, label, start, path, api, mux in variants:
            redis_flush()
            p, port, _ = start_row(key, start, drip_url, path, api, "streams")
            time.sleep(1.0)
            r = subprocess.run([os.path.join(BIN, "chat-bench"), "streams", "--url", f"http://127.0.0.1:{port}{path}",
                                "--pid", str(p.pid), "--streams", str(a.streams), "--ramp-ms", "1000", "--settle-ms",
                                "3000", "--clk-tck", str(os.sysconf("SC_CLK_TCK")), "--label", key,
                                "--h2-per-conn", str(mux)],
                               capture_output=True, text=True, cwd=ROOT)
            with open(os.path.join(out, "chat-bench.log"), "a") as f:
                f.write(f"## streams {key} round {rnd + 1}\n{r.stderr}\n")
            line = next((l for l in r.stderr.splitlines() if l.startswith("{")), None)
            streams.setdefault(key, (label, []))[1].append(json.loads(line) if line else None)
            procs.stop(p)

    report(a, rows, res, meta, stampede, streams, profile, litellm_version, use_litellm, nofile, out)


def med(rs, *keys):
    vals = []
    for r in rs:
        if r is None:
            continue
        v = r
        for k in keys:
            v = v[k]
        vals.append(v)
    return statistics.median(vals) if vals else float("nan")


def paired(rs, base, *keys):
    """Median over the rounds of (row - the baseline run just before it)."""
    diffs = []
    for r, b in zip(rs, base):
        if r is None or b is None:
            continue
        v, w = r, b
        for k in keys:
            v, w = v[k], w[k]
        diffs.append(v - w)
    return statistics.median(diffs) if diffs else float("nan")


def errs(rs):
    return sum(r["errors"] if r else 1 for r in rs)


def report(a, rows, res, meta, stampede, streams, profile, litellm_version, use_litellm, nofile, out):
    import datetime
    print(f"# make bench-peers ({datetime.date.today()}, {os.cpu_count()} cores shared by every process, "
          f"median of {a.rounds} interleaved rounds; chat-stream and the bare relay on {a.workers} runtime "
          f"thread(s) each, TOKIO_WORKER_THREADS={a.workers} (BENCH_WORKERS); LiteLLM 1 worker)\n")
    print("model-sim answers at once (ttft 0, 16 tokens, no pacing), so \"added\" is each row's TTFT minus "
          "model-sim direct's measured just before it (same concurrency, same round), the median of those "
          "differences over the rounds; the direct row is its run at each round's start. Unique questions at temperature 0 (every request looks the cache "
          "up and misses). Requests per row: 500 (c=1), 2000 (c=20, c=100); LiteLLM 100 / 300 / 400; with persistence 300 (c=1); the template default 60 (c=1; moto, a Python server, is the bottleneck there).\n")
    label = {k: l for k, l, *_ in rows}
    label["direct"] = "model-sim direct (baseline)"
    keys = ["direct"] + [k for k, *_ in rows]
    print("### Added time to first token (ms)\n")
    print("| row | c=1 p50 | p95 | p99 | c=20 p50 | p95 | p99 | c=100 p50 | p95 | p99 | errors |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    added = {}
    for k in keys:
        cells = []
        e = 0
        for c in (1, 20, 100):
            if (k, f"ttft{c}") not in res:
                cells += ["-", "-", "-"]
                continue
            for q in ("p50", "p95", "p99"):
                v = med(res[(k, f"ttft{c}")], "ttft_ms", q)
                x = v if k == "direct" else paired(res[(k, f"ttft{c}")], res[(f"direct@{k}", f"ttft{c}")],
                                                   "ttft_ms", q)
                added[(k, c, q)] = x
                cells.append(f"{x:.3f}" if k != "direct" else f"({v:.3f})")
            e += errs(res[(k, f"ttft{c}")])
        print(f"| {label[k]} | " + " | ".join(cells) + f" | {e} |")
    print("\n(The direct row shows model-sim's own TTFT in brackets; the others are added to it. \"-\": not run: "
          "moto, a Python server on the same two cores, cannot keep up with the turns at that concurrency.)\n")
    if use_litellm:
        print("### Ratios in this run (added TTFT, LiteLLM / row)\n")
        print("| row | c=1 p50 | c=20 p50 | c=100 p50 | c=20 p99 |")
        print("|---|---|---|---|---|")
        for k in keys[1:]:
            if k == "litellm":
                continue
            cells = []
            for c, q in ((1, "p50"), (20, "p50"), (100, "p50"), (20, "p99")):
                ours = added.get((k, c, q))
                theirs = added.get(("litellm", c, q))
                if ours is None or theirs is None:
                    cells.append("-")
                else:
                    cells.append(f"{theirs / ours:.0f}x" if ours > 0 else "n/a (ours <= 0)")
            print(f"| {label[k]} | " + " | ".join(cells) + " |")
        print()
    print("### Cache hits (the same question at temperature 0; the first is the miss in the warm-up)\n")
    print("\"answer\" = request sent to the answer's last event (`done` / `[DONE]`): the client has the whole "
          "answer. \"body end\" = the response's end (chat-stream keeps a persisted turn's body open until it is "
          "durable: a moto SQS send here). hits/s counts complete responses.\n")
    print("| row | c=1 answer p50 ms | p95 | p99 | c=1 body end p50 ms | c=20 answer p50 ms | c=20 hits/s | errors |")
    print("|---|---|---|---|---|---|---|---|")
    for k in keys[1:]:
        h1, h20 = res.get((k, "hit1")), res.get((k, "hit20"))
        c20 = (f"{med(h20, 'done_ms', 'p50'):.3f} | {med(h20, 'rps'):.0f}" if h20 else "- | -")
        print(f"| {label[k]} | {med(h1, 'done_ms', 'p50'):.3f} | {med(h1, 'done_ms', 'p95'):.3f} | "
              f"{med(h1, 'done_ms', 'p99'):.3f} | {med(h1, 'total_ms', 'p50'):.3f} | {c20} | "
              f"{errs(h1) + (errs(h20) if h20 else 0)} |")
    print()
    if profile:
        print("### Redis round trips per request (Redis MONITOR, 200 requests each, c=1, first round)\n")
        print("Every command a request sends (a script counts once), including the work after its answer (cache "
              "store, lease, history buffer, token settle, stream slot, popularity, live copy).\n")
        print("| row | path | commands per request | by command |")
        print("|---|---|---|---|")
        for (k, kind), cmds in profile.items():
            total = sum(cmds.values())
            detail = ", ".join(f"{c} {v:.2f}" for c, v in sorted(cmds.items(), key=lambda x: -x[1]) if v >= 0.01)
            print(f"| {label[k]} | {kind} | {total:.2f} | {detail} |")
        print()
    print("### Each row's process: start-up, memory, CPU, machine load\n")
    print("| row | start-up to first answer s (median) | peak RSS MiB (max of rounds) | CPU s in phase 1 (median) | "
          "load avg at start of each round | processes |")
    print("|---|---|---|---|---|---|")
    for k in keys[1:]:
        m = meta[k]
        print(f"| {label[k]} | {statistics.median(x['startup_s'] for x in m):.3f} | "
              f"{max(x['rss_mib'] for x in m):.1f} | {statistics.median(x['cpu_s'] for x in m):.1f} | "
              f"{', '.join('%.2f' % x['load0'] for x in m)} | {m[0]['procs']} |")
    print()
    print("### Stampede: 50 identical requests at once (sim: 400 ms to first token, 80 tokens/s)\n")
    print("| row | model calls | answered | errors | TTFT p50 ms |")
    print("|---|---|---|---|---|")
    for k in keys[1:]:
        if k not in stampede:
            continue
        s = stampede[k]
        print(f"| {label[k]} | {s['calls']} | {s['ok']} | {s['errors']} | {s['ttft_p50']:.1f} |")
    print()
    print(f"### {a.streams} slow streams at once (sim: 500 ms to first token, 2 tokens/s, 16 tokens; "
          f"open-files limit {nofile})\n")
    print(f"Median of {a.rounds} interleaved rounds (every round's peak in brackets); errors summed, "
          "most open at once: the lowest round.\n")
    print("| row | errors | most open at once | RSS before MiB | peak RSS MiB | per stream KiB | RSS 3 s after MiB | "
          "CPU ms per stream | wall s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for k, (row_label, runs) in streams.items():
        if not runs or any(s is None for s in runs):
            print(f"| {row_label} | run failed (see the log) | | | | | | | |")
            continue
        def mid(f):
            return statistics.median(s[f] for s in runs)
        peaks = ", ".join(f"{s['rss_peak_mib']:.1f}" for s in runs)
        print(f"| {row_label} | {sum(s['errors'] for s in runs)} | {min(s['peak_open'] for s in runs)} | "
              f"{mid('rss_base_mib'):.1f} | {mid('rss_peak_mib'):.1f} ({peaks}) | "
              f"{mid('rss_per_stream_kib'):.1f} | {mid('rss_after_mib'):.1f} | {mid('cpu_ms_per_stream'):.3f} | "
              f"{mid('wall_s'):.1f} |")
    print()
    print(f"LiteLLM: {'version ' + litellm_version + ', installed with --require-hashes from bench/litellm-requirements.txt; `litellm --num_workers 1`, cache on (type redis, same Redis), a master key (sent by the client as a bearer token, as our rows send an API key), no database, LITELLM_LOCAL_MODEL_COST_MAP=True' if use_litellm else 'not run (--no-litellm)'}.")
    print(f"Raw chat-bench output and every process's log: {out}")


if __name__ == "__main__":
    main()
