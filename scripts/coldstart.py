#!/usr/bin/env python3
"""Cold start of a Lambda function binary, measured from outside.

A minimal Lambda Runtime API (this script) times, for each run of a fresh
process: exec -> the first GET .../invocation/next (init done), and exec
-> the first invocation's response complete. It also reads the binary's
own init breakdown from its log (settings, providers, clients, pre-warm).

Use: coldstart.py NAME EVENT_FILE RUNS -- COMMAND... (env passed through;
AWS_LAMBDA_RUNTIME_API is set here). Prints one JSON line."""

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from http.server import ThreadingHTTPServer

from runtime_api import RuntimeHandler


def run_once(cmd, event, env):
    marks = {}
    done = threading.Event()

    class H(RuntimeHandler):
        def do_GET(self):
            if self.path.endswith("/invocation/next"):
                if "next" in marks:
                    done.wait(30)  # the second poll waits; the run is over
                    self.send_response(500)
                    self.send_header("content-length", "0")
                    self.end_headers()
                    return
                marks["next"] = time.perf_counter()
                self.send_event("cold-1", event)

        def do_POST(self):
            # The response (streamed with chunked encoding, or whole).
            self.read_body()
            if "/response" in self.path:
                marks["response"] = time.perf_counter()
            elif "/error" in self.path:
                marks["error"] = time.perf_counter()
            self.accepted()
            done.set()

    class Quiet(ThreadingHTTPServer):
        def handle_error(self, request, client_address):
            pass  # the function is killed mid-poll at the end of a run

    srv = Quiet(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    e = dict(env)
    for k, v in {
        "AWS_LAMBDA_FUNCTION_NAME": "f",
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "1024",
        "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
        "AWS_LAMBDA_LOG_GROUP_NAME": "/aws/lambda/f",
        "AWS_LAMBDA_LOG_STREAM_NAME": "local",
        "AWS_REGION": "us-east-1",
    }.items():
        e.setdefault(k, v)
    e["AWS_LAMBDA_RUNTIME_API"] = f"127.0.0.1:{srv.server_address[1]}"
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    done.wait(60)
    p.kill()
    out = p.communicate()[0].decode(errors="replace")
    srv.shutdown()
    if "error" in marks or "response" not in marks:
        raise SystemExit(f"the invocation failed: {out[-2000:]}")
    init = {}
    for line in out.splitlines():
        try:
            v = json.loads(line)
        except ValueError:
            continue
        for k in ("settings_ms", "providers_ms", "clients_ms", "prewarm_ms"):
            if k in v:
                init[k] = v[k]
    return (marks["next"] - t0) * 1e3, (marks["response"] - t0) * 1e3, init


def main():
    name, event_file, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
    cmd = sys.argv[sys.argv.index("--") + 1:]
    event = json.load(open(event_file))
    first, resp, inits = [], [], []
    run_once(cmd, event, os.environ)  # warm the page cache
    for _ in range(runs):
        a, b, i = run_once(cmd, event, os.environ)
        first.append(a)
        resp.append(b)
        inits.append(i)
    keys = sorted({k for i in inits for k in i})
    print(json.dumps({
        "name": name,
        "runs": runs,
        "first_poll_ms": {"p50": round(statistics.median(first), 2), "min": round(min(first), 2), "max": round(max(first), 2)},
        "first_response_ms": {"p50": round(statistics.median(resp), 2), "min": round(min(resp), 2), "max": round(max(resp), 2)},
        "init_ms_p50": {k: round(statistics.median(i.get(k, 0) for i in inits), 3) for k in keys},
    }))


if __name__ == "__main__":
    main()
