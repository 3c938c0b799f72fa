# The two commands a newcomer runs: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint install bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

## Import sample_data/ into the embedded sandbox and print the report's location and counts.
demo: $(STAMP)
	$(BIN)/clinik-etl load sample_data/registry.csv --state .clinik-etl/demo-state.sqlite --report-dir reports/demo

## Lint, type-check and run the test suite.
test: $(STAMP) lint
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check etl schemas tests bench
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m bench $(ARGS)

clean:
	rm -rf $(VENV) .clinik-etl reports .pytest_cache .mypy_cache .ruff_cache
