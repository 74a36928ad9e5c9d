# Two commands a new user needs: `make demo` runs the system, `make test` passes the tests.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint typecheck bench clean

$(BIN)/meshgate: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

demo: $(BIN)/meshgate
	$(BIN)/python examples/demo.py

test: $(BIN)/meshgate
	$(BIN)/python -m pytest

lint: $(BIN)/meshgate
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(BIN)/meshgate
	$(BIN)/mypy

bench: $(BIN)/meshgate
	$(BIN)/python bench/gateway.py

clean:
	rm -rf $(VENV) build dist .pytest_cache .mypy_cache .ruff_cache
