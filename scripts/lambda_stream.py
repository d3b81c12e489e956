#!/usr/bin/env python3
"""chat-stream under a Lambda Runtime API: how its streamed answers reach
the Runtime API, measured where Lambda reads them.

A minimal Runtime API (this script; Python, so the receiving side is
Linux's TCP stack, as it is for Lambda's own Runtime API inside the
environment) hands a chat-stream binary Function URL events and times
every chunk of its streamed response as it arrives. For each binary
given (`--bin`, twice to compare builds; the runs alternate), three
kinds of invocation:

- `hit`: a question answered from the cache (the instance's copy): from
  the event's delivery (`/next` answered) to the response's last byte.
- `paced`: a miss against model-sim pacing its tokens `--gap-ms` apart
  (its first 20 ms after the request): the time to the first delta, the
  gaps between the deltas' arrivals (they should be the sim's), and the
  time from the last delta to the response's end.
- `health`: `GET /health`, and `bad`: a `POST /chat` refused with 400
  (both JSON answers): delivery to last byte.

Use: lambda_stream.py --bin PATH [--bin PATH] [-n N] [--gap-ms MS]
(model-sim and redis-server are started here; target/release/model-sim
by default). Prints a Markdown table and one JSON line per binary."""

import argparse
import json
import os
import queue
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from http.server import ThreadingHTTPServer

from benchstats import free_port, wait_port
from runtime_api import RuntimeHandler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "ck_local_example_key_do_not_use_in_production"
KEY_HASH = "92d6376288da154534b93448f4e79fc1e9bd83f3cf398ad65f74212a4626523c"


class RuntimeApi:
    """The Runtime API endpoints a runtime polls: `/next` hands out queued
    events; `/response` reads the (chunked) response, timing each chunk."""

    def __init__(self):
        self.events = queue.Queue()
        self.results = queue.Queue()
        api = self

        class H(RuntimeHandler):
            def do_GET(self):
                if not self.path.endswith("/invocation/next"):
                    self.send_error(404)
                    return
                rid, event = api.events.get()
                self.send_event(rid, event, "chat-stream")
                api.delivered = time.perf_counter()

            def do_POST(self):
                chunks = self.read_body()
                end = time.perf_counter()
                self.accepted()
                api.results.put({"path": self.path, "chunks": chunks, "end": end,
                                 "delivered": api.delivered})

        self.srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.port = self.srv.server_address[1]
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()

    def invoke(self, rid, event, limit=30.0):
        self.events.put((rid, event))
        r = self.results.get(timeout=limit)
        if "/error" in r["path"]:
            raise SystemExit(f"invocation {rid} failed: {r['chunks']}")
        return r


def url_event(method, path, body=None):
    e = json.load(open(os.path.join(ROOT, "events", "chat-valid.json")))
    e["rawPath"] = path
    e["requestContext"]["http"]["method"] = method
    e["requestContext"]["http"]["path"] = path
    e["headers"]["authorization"] = f"Bearer {KEY}"
    if body is None:
        e.pop("body", None)
    else:
        e["body"] = json.dumps(body)
    return e


def delta_times(r):
    """The arrival time of each `delta` event in the body (an event counts
    when the chunk completing it arrives), and whether `done` came."""
    buf, out, done = b"", [], False
    body_started = False
    for at, data in r["chunks"]:
        if not body_started:
            # The streaming prelude ends with 8 NUL bytes.
            buf += data
            i = buf.find(b"\0" * 8)
            if i < 0:
                continue
            buf, body_started = buf[i + 8:], True
        else:
            buf += data
        while b"\n\n" in buf:
            ev, buf = buf.split(b"\n\n", 1)
            if b"event: delta" in ev:
                out.append(at)
            elif b"event: done" in ev:
                done = True
    return out, done


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", action="append", required=True)
    ap.add_argument("-n", type=int, default=40, help="invocations of each kind per binary")
    ap.add_argument("--gap-ms", type=float, default=20.0, help="model-sim's time between tokens")
    ap.add_argument("--tokens", type=int, default=12)
    ap.add_argument("--sim", default=os.path.join(ROOT, "target/release/model-sim"))
    a = ap.parse_args()

    procs, logs = [], []
    out = tempfile.mkdtemp(prefix="lambda-stream-")
    try:
        sim_port, redis_port = free_port(), free_port()
        procs.append(subprocess.Popen([a.sim, "--addr", f"127.0.0.1:{sim_port}", "--ttft-ms", "20", "--tps",
                                       str(1000.0 / a.gap_ms), "--tokens", str(a.tokens)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        procs.append(subprocess.Popen(["redis-server", "--port", str(redis_port), "--save", "", "--appendonly", "no"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_port(sim_port)
        wait_port(redis_port)
        rows = {}
        apis = []
        for i, b in enumerate(a.bin):
            api = RuntimeApi()
            env = {
                "PATH": os.environ.get("PATH", ""),
                "AWS_LAMBDA_RUNTIME_API": f"127.0.0.1:{api.port}",
                "AWS_LAMBDA_FUNCTION_NAME": "chat-stream",
                "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "1024",
                "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
                "AWS_LAMBDA_LOG_GROUP_NAME": "/aws/lambda/chat-stream",
                "AWS_LAMBDA_LOG_STREAM_NAME": "local",
                "AWS_REGION": "us-east-1",
                "ANTHROPIC_BASE_URL": f"http://127.0.0.1:{sim_port}",
                "ANTHROPIC_API_KEY": "bench",
                "API_KEY_HASHES": f"{KEY_HASH}:example-user",
                "REDIS_URL": f"redis://127.0.0.1:{redis_port}",
                "RATE_LIMIT_RPM": "1000000",
                "LOG_LEVEL": "warn",
            }
            log = open(os.path.join(out, f"function-{i}.log"), "w")
            procs.append(subprocess.Popen([b], env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log))
            logs.append(log.name)
            apis.append(api)
            rows[i] = {"hit": [], "health": [], "bad": [], "first": [], "gaps": [], "gap_max": [], "end_after_last": [], "paced_total": []}
        seq = 0
        hit_q = {"message": "what is cached here?", "temperature": 0}
        for i, api in enumerate(apis):
            # The first miss fills the cache (and the instance's copy).
            try:
                api.invoke(f"warm-{i}", url_event("POST", "/chat", hit_q), limit=20)
            except queue.Empty:
                raise SystemExit(f"{a.bin[i]} did not answer; its log:\n" + open(logs[i]).read()[-3000:])
        for rnd in range(a.n):
            for i, api in enumerate(apis):
                seq += 1
                r = api.invoke(f"h-{seq}", url_event("POST", "/chat", hit_q))
                rows[i]["hit"].append((r["end"] - r["delivered"]) * 1e3)
                seq += 1
                r = api.invoke(f"g-{seq}", url_event("GET", "/health"))
                rows[i]["health"].append((r["end"] - r["delivered"]) * 1e3)
                seq += 1
                r = api.invoke(f"b-{seq}", url_event("POST", "/chat", {"message": ""}))
                rows[i]["bad"].append((r["end"] - r["delivered"]) * 1e3)
                seq += 1
                r = api.invoke(f"p-{seq}", url_event("POST", "/chat", {"message": f"paced {rnd} {i} {seq}",
                                                                       "temperature": 0}))
                ds, done = delta_times(r)
                if not done or len(ds) < 2:
                    raise SystemExit(f"paced answer incomplete: {len(ds)} deltas, done={done}")
                rows[i]["first"].append((ds[0] - r["delivered"]) * 1e3)
                gaps = [(y - x) * 1e3 for x, y in zip(ds, ds[1:])]
                rows[i]["gaps"].extend(gaps)
                rows[i]["gap_max"].append(max(gaps))
                rows[i]["end_after_last"].append((r["end"] - ds[-1]) * 1e3)
                rows[i]["paced_total"].append((r["end"] - r["delivered"]) * 1e3)
        print(f"chat-stream under a local Runtime API; {a.n} invocations of each kind per binary, alternated; "
              f"model-sim: {a.tokens} tokens {a.gap_ms:g} ms apart, ttft 20 ms; medians (p95)\n")
        print("| binary | hit: delivery -> last byte ms | health: delivery -> last byte ms | 400 (empty message): delivery -> last byte ms | paced: delivery -> first delta ms | paced: gap between deltas ms | "
              "paced: largest gap per answer ms | paced: last delta -> end ms | paced: delivery -> end ms |")
        print("|---|---|---|---|---|---|---|---|---|")

        def f(v):
            v = sorted(v)
            return f"{statistics.median(v):.2f} ({v[min(len(v) - 1, int(len(v) * 0.95))]:.2f})"

        for i, b in enumerate(a.bin):
            r = rows[i]
            print(f"| {b} | {f(r['hit'])} | {f(r['health'])} | {f(r['bad'])} | {f(r['first'])} | {f(r['gaps'])} | {f(r['gap_max'])} | "
                  f"{f(r['end_after_last'])} | {f(r['paced_total'])} |")
        for i, b in enumerate(a.bin):
            r = rows[i]
            print(json.dumps({"bin": b, **{k: round(statistics.median(v), 3) for k, v in r.items()}}))
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
