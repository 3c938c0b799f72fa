# The two commands a newcomer runs: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint install clean bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

## Import sample_data/ into the embedded sandbox and print the report's location and counts.
DEMO_FILES := sample_data/registry.csv sample_data/providers.csv sample_data/visits.csv \
	sample_data/documents.csv sample_data/tasks.csv

# Exit code 1 means "some rows were rejected": the samples plant bad rows on purpose.
demo: $(STAMP)
	@$(BIN)/clinik-etl load $(DEMO_FILES) --state .clinik-etl/demo-state.sqlite --report-dir reports/demo \
		|| { rc=$$?; [ $$rc -eq 1 ] && echo "(exit code 1: the samples' planted bad rows were rejected, as intended)"; \
		     [ $$rc -eq 1 ]; }

## Lint, type-check and run the test suite, spread over the machine's cores (pytest-xdist).
# worksteal: an idle worker takes tests queued on a busy one, so one long test does not hold up the end.
test: $(STAMP) lint
	$(BIN)/python -m pytest -q -n auto --maxprocesses=4 --dist worksteal

lint: $(STAMP)
	$(BIN)/ruff check etl schemas tests sample_data
	$(BIN)/mypy

## Benchmarks (not tests): a table and bench/results.json, e.g. make bench ARGS="--rows 200000".
# The project's bytecode compiled first: with PYTHONDONTWRITEBYTECODE set (as on some CI images) every
# child process would compile the edited modules again at its start, a tenth of a second of each figure.
bench: $(STAMP)
	$(BIN)/python -m compileall -q etl schemas bench
	$(BIN)/python -m bench $(ARGS)

clean:
	rm -rf $(VENV) .clinik-etl reports .pytest_cache .mypy_cache .ruff_cache
