# The two Quickstart commands: `make run` and `make test`. Everything lives in .venv.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
ARGS   ?=

JS      = clients/js

.PHONY: run test lint bench clean chat chromium redis curl

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# The modules setup.py compiles with mypyc: an edit rebuilds them (a stale compiled module
# would shadow the edited source; the tests refuse to run against one).
COMPILED := $(shell grep -o '"broker/[a-z_/]*\.py"' setup.py | tr -d '"')

$(VENV)/.installed-run: pyproject.toml setup.py $(COMPILED) | $(BIN)/python
	@echo "installing; mypyc compiles the hot modules (~1.5 min; BROKER_PURE_PYTHON=1 skips it)"
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml setup.py $(COMPILED) | $(BIN)/python
	@echo "installing; mypyc compiles the hot modules (~1.5 min; BROKER_PURE_PYTHON=1 skips it)"
	$(BIN)/pip install -q -e '.[test]'
	touch $@ $(VENV)/.installed-run

## run: install the broker and serve on ws://127.0.0.1:8765/ (ARGS="--config config/broker.toml")
run: $(VENV)/.installed-run
	$(BIN)/broker serve $(ARGS)

# The JS client's packages, from its lockfile; without Node its tests skip.
$(JS)/node_modules/.installed: $(JS)/package.json $(JS)/package-lock.json
	@if command -v npm >/dev/null; then npm ci --prefix $(JS) --no-audit --no-fund && touch $@; \
	else echo "npm not found: the JS client's tests will be skipped"; fi

# Debian's chromium for the browser test (tests/test_browser.py), installed only when missing.
chromium:
	@test -x /usr/bin/chromium || \
	  (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium)

# Debian's redis-server for the cluster tests (tests/test_cluster.py start their own on a free
# port), installed only when missing.
redis:
	@command -v redis-server >/dev/null || \
	  (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server)

# curl for the server API's one-liner (docs/api.md, run by tests/test_api_examples.py),
# installed only when missing.
curl:
	@command -v curl >/dev/null || \
	  (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q curl)

## test: install what the tests need and run them
test: $(VENV)/.installed-test $(JS)/node_modules/.installed bench/loadgen/node_modules chromium redis curl
	$(BIN)/python -m pytest $(ARGS)

## lint: ruff and mypy, as CI runs them
lint: $(VENV)/.installed-test $(JS)/node_modules/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	@if command -v npm >/dev/null; then echo "tsc (JS client, chat page)"; npm --prefix $(JS) run --silent check; fi

## chat: the broker (config/chat.toml: rooms keep history and presence) plus a static server for the chat page
## (ARGS="--port 9000" adds flags, which override the file; ARGS="--config other.toml" replaces it: the last --config wins)
chat: $(VENV)/.installed-run
	@echo "chat: open http://127.0.0.1:8000/examples/chat/ in two tabs (Ctrl-C stops both)"
	$(BIN)/python -m http.server --bind 127.0.0.1 8000 & trap 'kill $$! 2>/dev/null' EXIT INT TERM; \
	  $(BIN)/broker serve --config config/chat.toml $(ARGS)

## bench: install the Node load generator and run the benchmarks (ARGS="--compare --repeat 3")
bench: $(VENV)/.installed-run bench/loadgen/node_modules $(JS)/node_modules/.installed $(BIN)/py-spy
	bench/run $(ARGS)

# py-spy, for bench/run --profile
$(BIN)/py-spy: | $(BIN)/python
	$(BIN)/pip install -q py-spy

# The load generator's packages; tests/test_bench.py runs every scenario briefly (skipped without
# Node).
bench/loadgen/node_modules: bench/loadgen/package-lock.json
	@if command -v npm >/dev/null; then cd bench/loadgen && npm ci --no-audit --no-fund && touch node_modules; \
	else echo "npm not found: the benchmark harness test will be skipped"; fi

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
