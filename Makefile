# `make run` and `make test` set everything up on a machine with nothing but Python 3.11+.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: install run test lint fmt check bench clean

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(INSTALLED)

install: $(INSTALLED)

run: $(INSTALLED)
	$(BIN)/python -m shared.devstack

test: $(INSTALLED)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# BENCH_ARGS=--help for the options; --update-readme rewrites README's figures.
bench: $(INSTALLED)
	$(BIN)/python -m load.bench $(BENCH_ARGS)

lint: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

fmt: $(INSTALLED)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

check: lint test

clean:
	rm -rf $(VENV) .run .mypy_cache .ruff_cache .pytest_cache
