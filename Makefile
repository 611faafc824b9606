# One-word entry points. `make demo` and `make test` are the two commands of the README.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-fast lint format bench clean

setup: $(STAMP)  ## create .venv and install the project with the pinned constraints (idempotent)

$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U pip wheel setuptools
	$(BIN)/python -m pip install -c requirements/constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: setup  ## the main job on the embedded default (SynthTalk, tiny preset, local Ray, sqlite MLflow)
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/demo.sh

test: setup  ## the whole test suite (real Ray, DeepSpeed, MLflow, DVC, run small)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup  ## everything but the slow end-to-end tests
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -m "not slow and not services" $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: setup  ## every benchmark; results in bench/results/*.json and docs/benchmarks.md
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
