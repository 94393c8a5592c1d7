# The two Quickstart commands: `make run` and `make test`. Everything lives in .venv.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
ARGS   ?=

.PHONY: run test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	touch $@ $(VENV)/.installed-run

## run: install the broker and serve on ws://127.0.0.1:8765/ (ARGS="--config config/broker.toml")
run: $(VENV)/.installed-run
	$(BIN)/broker serve $(ARGS)

## test: install what the tests need and run them
test: $(VENV)/.installed-test
	$(BIN)/python -m pytest $(ARGS)

## lint: ruff and mypy, as CI runs them
lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

## bench: install the Node load generator and run the benchmarks (ARGS="--compare --repeat 3")
bench: $(VENV)/.installed-run bench/loadgen/node_modules
	bench/run $(ARGS)

bench/loadgen/node_modules: bench/loadgen/package-lock.json
	cd bench/loadgen && npm ci --no-audit --no-fund
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
