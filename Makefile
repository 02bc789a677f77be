# Two commands are the whole set-up: `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv test demo clean

# torch first: the CPU build where no CUDA GPU is present (torchvision is never installed).
$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(PY) -m pip install -q torch==2.13.0; \
	else \
		$(PY) -m pip install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu || $(PY) -m pip install -q torch==2.13.0; \
	fi
	$(PY) -m pip install -q -r requirements.txt
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -q tests

demo: venv
	$(PY) -m colintern.demo --out outputs/demo

clean:
	rm -rf outputs .pytest_cache
