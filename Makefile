# One command sets everything up: `make test` creates .venv, installs, and runs the suite.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: install test test-all lint format demo bench bench-prepare docs docs-serve clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Torch first and pinned: on this machine the CPU build comes from local disk in seconds;
# an unpinned torch pulled by a dependency would drag in a multi-GB CUDA build.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev,eval,docs]"
	touch $(STAMP)

install: $(STAMP)

test: install
	$(BIN)/python -m pytest -q

test-all: install
	$(BIN)/python -m pytest -q -m ""

lint: install
	$(BIN)/ruff check llm_lightning tests scripts benchmarks
	$(BIN)/ruff format --check llm_lightning tests scripts benchmarks

format: install
	$(BIN)/ruff check --fix llm_lightning tests scripts benchmarks
	$(BIN)/ruff format llm_lightning tests scripts benchmarks

demo: install
	$(BIN)/python -m llm_lightning.tools.demo

bench: install
	bash scripts/bench.sh

bench-prepare: install
	$(BIN)/llm-lightning bench-prepare

# The documentation site (docs/, mkdocs.yml) in strict mode: a broken link, anchor or nav entry fails.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

docs-serve: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache demo_run site
