# The two commands a newcomer runs: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

## Import sample_data/ into the embedded sandbox and print the report's location and counts.
# Exit code 1 means "some rows were rejected": the sample plants 28 bad rows on purpose.
demo: $(STAMP)
	@$(BIN)/clinik-etl load sample_data/registry.csv --state .clinik-etl/demo-state.sqlite --report-dir reports/demo \
		|| { rc=$$?; [ $$rc -eq 1 ] && echo "(exit code 1: the sample's planted bad rows were rejected, as intended)"; \
		     [ $$rc -eq 1 ]; }

## Lint, type-check and run the test suite.
test: $(STAMP) lint
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check etl schemas tests sample_data
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .clinik-etl reports .pytest_cache .mypy_cache .ruff_cache
