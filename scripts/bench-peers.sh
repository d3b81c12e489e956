#!/usr/bin/env bash
# make bench-peers: chat-stream next to LiteLLM, a bare relay and its own
# template default, in one interleaved run (see scripts/peers.py for what
# each row is and how it is measured). Needs the release builds of
# chat-stream, model-sim, chat-bench and bare-relay (the Makefile builds
# them), the dev venv (moto) and the bench venv (LiteLLM, pinned with
# hashes). Knobs: BENCH_ROUNDS (2), BENCH_STREAMS (1000).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v redis-server >/dev/null || { echo "redis-server is required (apt-get install redis-server)" >&2; exit 1; }
exec python3 scripts/peers.py "$@"
