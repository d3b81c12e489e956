"""Shared by the benchmark scripts: chat-bench JSON lines in, medians out
(the report steps); free ports and waiting for a listener (the runs)."""

import json
import os
import socket
import statistics
import time


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_port(port, timeout=30.0):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.01)
    raise RuntimeError(f"port {port} never opened")


def load(path):
    """The chat-bench JSON lines of one configuration (all rounds), or None
    when it did not run."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip().startswith("{")]


def med(rs, *keys):
    """Median over the rounds of r[k1][k2]..."""
    vals = []
    for r in rs:
        v = r
        for k in keys:
            v = v[k]
        vals.append(v)
    return statistics.median(vals)
