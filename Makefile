# `make run` and `make test` set everything up on a machine with nothing but Python 3.11+.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: install run test lint fmt check bench lock clean

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# The compose specification's JSON schema, for tests/test_deployment.py: PyPI's last
	# docker-compose release ships it; only the schema is taken from it, nothing installed.
	$(BIN)/python -m pip download --quiet --no-deps --dest $(VENV)/schemas docker-compose==1.29.2
	$(BIN)/python -m zipfile -e $(VENV)/schemas/docker_compose-1.29.2-py2.py3-none-any.whl $(VENV)/schemas
	touch $(INSTALLED)

install: $(INSTALLED)

run: $(INSTALLED)
	$(BIN)/python -m devtools.stack

# The tests of the contract, recovery and ownership once more on a Redis Cluster of the run's
# own (3 primaries with a replica each), where a redis-server 7 or newer is on PATH; where
# not, they are skipped, saying why. CLUSTER_TESTS= leaves them out.
CLUSTER_TESTS ?= tests/test_cluster.py tests/test_operations.py tests/test_wallets.py \
	tests/test_transfers.py tests/test_recovery.py tests/test_ownership.py tests/test_wakes.py \
	tests/test_errors.py tests/test_inspect.py tests/test_page.py tests/test_worker.py \
	tests/test_handing_on.py tests/test_resends.py tests/test_hostile.py \
	tests/test_dead_letters.py tests/test_holds.py

test: $(INSTALLED)
	$(BIN)/python -m pytest $(PYTEST_ARGS)
	$(if $(strip $(CLUSTER_TESTS)),TEST_REDIS_CLUSTER=1 $(BIN)/python -m pytest $(CLUSTER_TESTS))

# BENCH_ARGS=--help for the options; --update-docs rewrites the tables in docs/benchmarks.md.
bench: $(INSTALLED)
	$(BIN)/python -m load.bench $(BENCH_ARGS)

# The images' pinned dependencies, with hashes, from pyproject.toml's runtime dependencies.
lock: $(INSTALLED)
	$(BIN)/pip-compile --quiet --generate-hashes --strip-extras --no-header \
		--no-emit-index-url --no-emit-find-links \
		--output-file requirements.lock pyproject.toml

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
