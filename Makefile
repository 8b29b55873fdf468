# Two entry points a newcomer needs: `make demo` (install, train, preempt, resume) and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.*
LINT_PATHS := kempnerforge launch bench tests examples

.PHONY: install demo test test-slow test-fast lint bench bench-smoke clean

# CPU machines get the CPU build of torch first (a bare `torch` from PyPI is a multi-GB CUDA build);
# a machine with an NVIDIA driver gets the default (CUDA) build.
$(BIN)/python:
	$(PY) -m venv $(VENV)
	if command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q torch numpy; \
	else $(BIN)/pip install -q '$(TORCH_SPEC)' numpy; fi

install: $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'

demo: install
	$(BIN)/python -m kempnerforge.demo

test: install
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)
	$(BIN)/python -m pytest -q tests

test-slow: install
	$(BIN)/python -m pytest -q tests --runslow -m "slow"

test-fast: install
	$(BIN)/python -m pytest -q tests -m "not slurm and not distributed and not slow and not bench"

lint: install
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)

bench: install
	$(BIN)/python bench/checkpoint_bench.py

bench-smoke: install
	$(BIN)/python bench/checkpoint_bench.py --smoke

clean:
	rm -rf runs .pytest_cache .ruff_cache
