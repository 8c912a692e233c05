# make demo: the embedded default job, dense vs top-k 1%, on a local Ray.
# make test: ruff (lint and format check), then the test suite;
# make test-integrations: the examples and framework integrations, run for real;
# make test-faults: the long fault and recovery tests.
# Each creates .venv and installs the project first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-integrations test-faults

$(BIN)/raytopk: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

demo: $(BIN)/raytopk
	$(BIN)/raytopk bench --config jobs/mnist5k_topk.yaml --checkpoint-dir runs --output runs/demo.json --restart

test: $(BIN)/raytopk
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -m "not faults and not integrations"

test-integrations: $(BIN)/raytopk
	$(BIN)/python -m pytest -q -m integrations

test-faults: $(BIN)/raytopk
	$(BIN)/python -m pytest -q -m faults
