"""Shared by the benchmark scripts' report steps: chat-bench JSON lines in,
medians out."""

import json
import os
import statistics


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
