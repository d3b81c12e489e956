# The project's front door. Every target installs what it needs on a fresh
# Debian machine with Rust and Python 3: Python tools go into .venv, Rust
# targets through rustup. Nothing is assumed to be installed already.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

VENV     := $(CURDIR)/.venv
TOOLS    := $(VENV)/.installed
# LiteLLM for make bench-peers, in a venv of its own, every package pinned
# with its hash (never an unpinned install: a release of that package was
# compromised).
BENCH_VENV := $(CURDIR)/.bench-venv
# The npm packages of the JavaScript client tests, exactly as locked.
NODE_DEPS := tests/clients/node_modules/.installed tests/web/node_modules/.installed
export PATH := $(VENV)/bin:$(PATH)
export SAM_CLI_TELEMETRY := 0
export CARGO_TERM_COLOR ?= never

ENV      ?= default
PARAMS   ?=
REGION   ?= $(or $(AWS_REGION),$(AWS_DEFAULT_REGION),us-east-1)
ARM      := aarch64-unknown-linux-gnu

.PHONY: bench-peers bench-lambda profile fuzz bench-jwt bench-limits bench-obs bench-stop node-deps help run test test-template test-artifact smoke bench-coldstart lint fmt build sam-build deploy bench tools rust-arm64 services clean

help:
	@echo "make run      build and start the local stack: Redis, moto (table + queues), model-sim, chat-stream, db-writer poller"
	@echo "make test     lint (fmt, clippy, sam validate --lint) and all tests"
	@echo "make build    arm64 Lambda bootstraps in target/lambda/ (cargo lambda)"
	@echo "make bench    latency benchmarks; see BENCHMARKS.md (also bench-peers, bench-lambda, bench-coldstart, profile)"
	@echo "make deploy   sam build + sam deploy (ENV=default|prod, PARAMS='Key=Value ...' merged with samconfig)"
	@echo "make smoke    check a deployed stack: URL=<ChatUrl> KEY=<api key> [ORIGIN=<allowed origin>]"

# --- tools ------------------------------------------------------------------

$(TOOLS): requirements-dev.txt
	@command -v python3 >/dev/null || { echo "python3 is required (apt-get install python3 python3-venv)"; exit 1; }
	@test -x $(VENV)/bin/pip || python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	@touch $@

tools: $(TOOLS)

$(BENCH_VENV)/.installed: bench/litellm-requirements.txt
	@test -x $(BENCH_VENV)/bin/pip || python3 -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install --quiet --disable-pip-version-check --require-hashes -r bench/litellm-requirements.txt
	@touch $@

tests/clients/node_modules/.installed: tests/clients/package-lock.json
	scripts/ensure-node.sh
	cd tests/clients && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

# The browser test: playwright-core (no browser download) and Debian's chromium.
tests/web/node_modules/.installed: tests/web/package-lock.json
	scripts/ensure-node.sh
	scripts/ensure-chromium.sh
	cd tests/web && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

node-deps: $(NODE_DEPS)

rust-arm64:
	@rustup target list --installed | grep -qx $(ARM) || rustup target add $(ARM)

# --- local run --------------------------------------------------------------

run: $(TOOLS)
	cargo build -p chat-stream -p model-sim -p db-writer -p cache-warmer -p oidc-sim
	BIN=target/debug scripts/run-local.sh

# --- quality gates ----------------------------------------------------------

fmt:
	cargo fmt --all

lint: $(TOOLS)
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets --locked -- -D warnings
	sam validate --lint --region $(REGION)
	pyflakes $$(git ls-files '*.py')

# The services it starts (moto, Redis) are stopped when it ends, however
# it ends; those it found running are left running.
test: lint test-template $(NODE_DEPS)
	@set -eo pipefail; \
	export SERVICES_RUN=target/test-services; \
	trap 'scripts/services.sh stop' EXIT; \
	env=$$(scripts/services.sh start) || { echo "the local services did not start (see above); no tests run" >&2; exit 1; }; \
	eval "$$env"; \
	mkdir -p target/test-logs; rm -f target/test-logs/*.log; \
	cargo nextest run --workspace --locked --no-fail-fast --success-output final --failure-output final \
		2>&1 | tee target/test-logs/nextest.log; \
	$(MAKE) --no-print-directory test-artifact; \
	scripts/log-scan.sh target/test-logs

# (--workspace: the same feature set as the main test run, so its test
# binaries are reused, not built again for two packages.)
# The arm64 bootstraps that SAM uploads, from `make build`, run under
# qemu-user against the local Lambda Runtime API: the same answers as the
# x86 build (the tests marked ignored in the plain run).
test-artifact: build
	scripts/ensure-qemu.sh
	@env=$$(scripts/services.sh start) || { echo "the local services did not start (see above)" >&2; exit 1; }; \
	eval "$$env"; \
	mkdir -p target/test-logs; set -o pipefail; \
	cargo nextest run --workspace --locked --run-ignored only -E 'test(/arm64/)' \
		--success-output final 2>&1 | tee target/test-logs/artifact.log

# template.yaml rendered by the SAM translator for the parameter sets we
# ship, cfn-lint on every render, and what a working deploy needs.
test-template: $(TOOLS)
	$(VENV)/bin/pytest tests/template -q -p no:cacheprovider

# --- build and deploy -------------------------------------------------------

build: $(TOOLS) rust-arm64
	cargo lambda build --release --arm64 --locked -p chat-stream -p db-writer -p cache-warmer
	@for f in target/lambda/*/bootstrap; do \
		printf '%s: ' "$$f"; file -b "$$f" 2>/dev/null | cut -d, -f1-2 || true; \
		ls -l "$$f" | awk '{print "  " $$5 " bytes"}'; \
	done

sam-build: $(TOOLS) rust-arm64
	sam build --config-env $(ENV)

# PARAMS is merged with the environment's parameter_overrides from
# samconfig.toml (sam itself would replace them), and CodeSha256 (the
# bootstraps and the parameters) makes a parameter change publish a new
# version behind the live alias.
deploy: sam-build
	sam deploy --config-env $(ENV) --region $(REGION) \
		--parameter-overrides $$($(VENV)/bin/python scripts/deploy_params.py $(ENV) '$(PARAMS)' .aws-sam/build)

# The check to run right after a deploy: make smoke URL=<ChatUrl> KEY=<api key> [ORIGIN=<allowed origin>]
smoke:
	@test -n "$(URL)" || { echo "usage: make smoke URL=https://....lambda-url.REGION.on.aws/ KEY=... [ORIGIN=https://your.app]"; exit 2; }
	python3 scripts/smoke.py URL='$(URL)' KEY='$(KEY)' ORIGIN='$(ORIGIN)'

# --- benchmarks -------------------------------------------------------------

# Cold start of each function, native release builds and (make build) the
# arm64 bootstraps under qemu: scripts/bench-coldstart.sh
bench-coldstart: $(TOOLS) build
	cargo build --release -p chat-stream -p db-writer -p cache-warmer -p model-sim
	scripts/ensure-qemu.sh
	scripts/bench-coldstart.sh

bench: $(TOOLS)
	cargo build --release -p chat-stream -p model-sim -p chat-bench
	scripts/bench.sh

# chat-stream next to LiteLLM, a bare relay and the template default, in
# one interleaved run; then 1,000 slow streams. See BENCHMARKS.md.
bench-peers: $(TOOLS) $(BENCH_VENV)/.installed
	cargo build --release --locked -p chat-stream -p model-sim -p chat-bench
	scripts/bench-peers.sh

# chat-stream under a local Lambda Runtime API: how its responses reach it
# (delivery to last byte for a hit and /health, token gaps of a paced
# answer). LAMBDA_BASE=PATH adds another build, alternated with this one.
bench-lambda: $(TOOLS)
	cargo build --release -p chat-stream -p model-sim -p chat-bench
	python3 scripts/lambda_stream.py $(if $(LAMBDA_BASE),--bin $(LAMBDA_BASE)) --bin target/release/chat-stream $(LAMBDA_ARGS)

# Where a request's CPU and system calls go, per process (misses at c=20 by
# default; PROFILE_ARGS='--mode hit', '--bin PATH', '-c N', '-n N').
profile:
	cargo build --release -p chat-stream -p model-sim -p chat-bench
	python3 scripts/request_profile.py $(PROFILE_ARGS)

# What JWT sign-in costs per request, per algorithm (first and cached).
bench-jwt:
	cargo build --release -p chat-bench
	target/release/chat-bench jwt

# Every fuzz target under AFL++ (FUZZ_SECONDS per target, default 60).
fuzz:
	scripts/fuzz.sh

# What fleet-wide limits in the table (no Redis) cost per request (moto,
# on a table of its own: moto's queries slow down as a table fills).
bench-limits: $(TOOLS)
	cargo build --release -p chat-bench
	eval "$$(scripts/services.sh start)" && \
		eval "$$($(VENV)/bin/python scripts/local_aws.py ensure --prefix bench$$(date +%s) --format env)" && \
		target/release/chat-bench limits --requests 100

# How fast DELETE /chat/streams/{id} stops the model call, through Redis
# and through the table (moto).
# What the logs, X-Ray and metrics cost a request and init (BENCHMARKS.md
# "Instrumentation"); no services needed.
bench-obs:
	cargo build --release -p chat-stream -p model-sim -p chat-bench
	target/release/chat-bench obs --rounds 10 --requests 300 --binary target/release/chat-stream

bench-stop: $(TOOLS)
	cargo build --release -p chat-bench
	eval "$$(scripts/services.sh start)" && \
		eval "$$($(VENV)/bin/python scripts/local_aws.py ensure --prefix stop$$(date +%s) --format env)" && \
		target/release/chat-bench stop --runs 20

services: $(TOOLS)
	@scripts/services.sh start

clean:
	scripts/services.sh stop
	cargo clean
	rm -rf $(VENV) .aws-sam
