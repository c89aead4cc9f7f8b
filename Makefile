# tlsrelay — every target creates .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= examples/tlsrelay.yaml

.PHONY: run test lint fmt clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/tlsrelay run --config $(CONFIG)

test: $(STAMP)
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check services tests
	$(BIN)/ruff format --check services tests
	$(BIN)/mypy

fmt: $(STAMP)
	$(BIN)/ruff format services tests
	$(BIN)/ruff check --fix services tests

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
