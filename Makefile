# The two commands: `make demo` and `make test`. Each creates .venv and installs the project when missing.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test test-fast unit lint coverage bench clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/avgk demo

# ruff (style and bug patterns), the layer contracts (import-linter: avgk's layers import only downwards,
# avgk never imports ray or pipelines), then mypy --strict over avgk and pipelines (what it checks and how:
# [tool.ruff], [tool.importlinter] and [tool.mypy] in pyproject.toml).
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports --no-cache
	$(VENV)/bin/mypy

# The checks, then two processes, one test file each at a time, the longest first (module fixtures such as a file's
# Ray cluster stay in one process; tests/helpers/scheduling.py, with tests/durations.json, deals the files and keeps
# the files sharing a trained run together). Per-test seconds go to .test-durations.xml:
# `python -m tests.helpers.durations` sums them per file (BENCHMARKS.md, "Test suite budget").
test: lint
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile --durations=40 --junitxml=.test-durations.xml

test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m "not slow"

# The inner loop: unit tests only (no Ray cluster, no mlflow server, no wheel build), two processes.
# CI always runs the whole suite (make test).
unit: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile -m "not slow" -p no:cacheprovider tests/unit

# The whole suite with line coverage of avgk/ and pipelines/ ([tool.coverage] in pyproject.toml):
# coverage.json and a summary table; slower than make test (every process traces its lines).
coverage: $(STAMP)
	rm -f .coverage .coverage.*
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile --cov --cov-report=term:skip-covered --cov-report=json
	@echo "line coverage per file: coverage.json"

bench: $(STAMP)
	for f in benchmarks/bench_*.py; do $(VENV)/bin/python $$f || exit 1; done

clean:
	rm -rf runs data/smoke data/synthetic .pytest_cache
