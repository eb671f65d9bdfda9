# Two commands on a fresh Debian/Ubuntu machine: `make demo` and `make test`.
# Each sets up what is missing (system packages via apt-get when root, a virtual
# environment with corral and its dependencies) and then runs.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
EVAL   ?= ../shared/eval
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: setup system demo test bench redteam lint format clean

setup: system $(STAMP)

system:
	@bash scripts/setup-system.sh

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "corral setup: installing corral and its dependencies into $(VENV)"
	@$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	@$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@rm -f $(VENV)/.installed-*
	@touch $@

demo: setup
	@$(BIN)/corral demo

test: setup
	@bash scripts/setup-system.sh --test
	@$(BIN)/ruff check src tests bench examples
	@$(BIN)/mypy
	@$(BIN)/python -m pytest -q

bench: setup
	@$(BIN)/python bench/gate_bench.py --eval $(EVAL)
	@$(BIN)/python bench/tool_bench.py
	@$(BIN)/python bench/sandbox_bench.py
	@$(BIN)/python bench/egress_bench.py
	@$(BIN)/python bench/watch_bench.py
	@$(BIN)/python bench/audit_bench.py --eval $(EVAL) --quiet
	@$(BIN)/python bench/serve_bench.py
	@$(BIN)/python bench/pool_bench.py

redteam: setup
	@bash scripts/setup-system.sh --test
	@$(BIN)/corral redteam --eval $(EVAL) -o build/redteam.json
	@$(BIN)/corral redteam --benign --eval $(EVAL) -o build/benign.json

lint: setup
	@$(BIN)/ruff check src tests bench examples
	@$(BIN)/mypy

format: setup
	@$(BIN)/ruff check --fix src tests bench
	@$(BIN)/ruff format src tests bench

clean:
	rm -rf $(VENV) build .mypy_cache .ruff_cache .pytest_cache
