# Every target sets up what it needs: a fresh clone runs `make test` or `make demo` directly.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: venv test test-fast demo lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip==25.3
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

## Run the whole test suite (slow integration tests included).
test: $(STAMP)
	$(PY) -m pytest -q --durations=15

## Unit tests only.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

## The main job: start the service (Ray head, MLflow, API), submit a small sweep on the shapes
## data over REST, follow it, print the leaderboard and the MLflow UI command, stop the service.
demo: $(STAMP)
	$(VENV)/bin/fgd demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) benchmarks/fgd_loss.py

clean:
	rm -rf $(VENV) .pytest_cache benchmarks/results
