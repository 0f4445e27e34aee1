# Quick start (Debian 12 or 13, as root):  make demo   |   make test
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install system demo test lint unit integration bench soak clean proto

install: system $(VENV)/.installed

system:
	bash scripts/setup-system.sh

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/python -m stapes.server.images.busybox_vm
	touch $@

lint: install
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/mypy

unit: install
	$(BIN)/pytest -q tests/unit

integration: install
	$(BIN)/pytest -q tests/integration

# Three workers, a test file each at a time: every test runs its own servers on their own ports and state
# directories, and most of a live-move test is waiting, so three files share the 2 cores well (18.6 min for
# the whole suite here, against 20.7-23.4 with two).
test: lint
	$(BIN)/pytest -q -n 3 --dist loadfile --durations=15 tests

demo: install
	bash scripts/demo.sh

bench: install
	$(BIN)/python bench/lifecycle.py

# Load: 20 concurrent moves, 200 concurrent API clients; memory, descriptors and latency before and after.
soak: install
	$(BIN)/python bench/soak.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .mypy_cache .ruff_cache

# Regenerate the migration messages after editing migrate.proto (the generated files are committed).
proto: install
	cd src/stapes/server/migration && ../../../../$(BIN)/python -m grpc_tools.protoc -I. --python_out=. \
		--pyi_out=. migrate.proto
