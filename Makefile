# Two entry points that work on a fresh machine with Python 3.11+ and make
# (and `make bench`: the benchmark suite with the peer engines, prints JSON):
#   make demo   - create .venv, install bus_guard, run the live demo
#   make test   - the same plus the dev extra, then lint and the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test lint venv dev clean bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

venv: $(BIN)/python
	$(BIN)/python -m pip install -q -e .

dev: $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[dev]'

demo: venv
	$(BIN)/bus-guard demo

lint: dev
	$(BIN)/ruff check bus_guard tests bench
	$(BIN)/ruff format --check bus_guard tests bench
	$(BIN)/mypy --strict bus_guard tests

test: lint
	$(BIN)/python -m pytest -q

bench: $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[dev,bench]'
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) build *.egg-info
