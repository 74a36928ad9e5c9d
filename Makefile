# `make up` runs the reference shop, `make test` passes the tests.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: up demo test lint typecheck bench clean

.venv/bin/meshgate: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

up: .venv/bin/meshgate
	$(BIN)/meshgate up examples/shop/meshgate.yaml

demo: .venv/bin/meshgate
	$(BIN)/python examples/demo.py

test: .venv/bin/meshgate
	rm -f .coverage .coverage.*
	$(BIN)/python -m coverage run -m pytest
	$(BIN)/python -m coverage combine --quiet
	$(BIN)/python -m coverage report

lint: .venv/bin/meshgate
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: .venv/bin/meshgate
	$(BIN)/mypy

bench: .venv/bin/meshgate
	$(BIN)/python bench/gateway.py

clean:
	rm -rf $(VENV) build dist .pytest_cache .mypy_cache .ruff_cache
