# dist_trainer: `make run` trains the default job, `make test` runs the test suite.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# CPU machines get the CPU build of torch (a CUDA build is several GB); GPU machines the default.
TORCH_SPEC ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch,torch==2.13.0)
ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help setup run test test-fast test-gpu ui format lint bench bench-gpu bench-comm clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

setup: $(VENV)/.installed ## create .venv and install the project (CPU torch without a GPU)

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[dev,hf]"
	touch $@

run: setup ## train the default job: 2 workers on local Ray, MLflow in sqlite:///mlflow.db (ARGS=overrides)
	$(VENV)/bin/dist-trainer train $(ARGS)

test: setup ## the whole test suite (what CI runs)
	$(VENV)/bin/pytest

test-fast: setup ## only the tests that need no Ray cluster
	$(VENV)/bin/pytest -m "not ray and not slow"

test-gpu: setup ## the GPU tests (skipped without CUDA): NCCL loop, precisions, compile, NVML, Ray on GPU
	$(VENV)/bin/pytest -m gpu

ui: setup ## MLflow UI on http://127.0.0.1:5000 over mlflow.db
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

format: setup ## ruff format + fixable lint
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

lint: setup ## ruff check and format check
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: setup ## launch time and throughput: dist-trainer vs plain PyTorch DDP
	$(PY) scripts/bench_launch.py

bench-gpu: setup ## one GPU: plain DDP vs dist-trainer (fp32/bf16, batch 256/8192), DataLoader workers
	$(PY) scripts/bench_gpu.py $(ARGS)

bench-comm: setup ## all-reduce sweep on the training worker set-up
	$(VENV)/bin/dist-trainer bench-comm $(ARGS)

clean: ## remove local runs, outputs and Ray storage (keeps .venv)
	rm -rf mlflow.db mlruns mlartifacts outputs multirun .ray_storage bench_out
