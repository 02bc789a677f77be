# Two commands are the whole set-up: `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv browser ocr test demo ablate itr-demo teacher-mining gpu-suite clean

# torch first (torch==2.13.0: the CPU build on a machine without CUDA; torchvision is never installed),
# so that nothing in requirements.txt pulls another torch build. FAISS likewise: faiss-cpu only where no faiss is
# importable, so reinstalling never puts the CPU build back over a user's faiss-gpu (same `faiss` module). Triton
# too (a CUDA torch brings its own): on a CPU machine the tests run the fused MaxSim kernel in its interpreter.
# Then the package itself, editable and without its dependencies (requirements.txt is the tested lock of them):
# `colintern-train`, `colintern-search`, ... land in .venv/bin (pyproject.toml).
$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -c "import faiss" 2>/dev/null || $(PY) -m pip install -q faiss-cpu==1.15.1
	$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install -q triton==3.9.0
	$(PY) -m pip install -q --no-deps -e .
	touch $@

venv: $(VENV)/.installed

# Debian's chromium, for the test of search.py serve's web page in headless Chromium (tests/test_serve.py). Installed
# as root with apt where it is missing; where that cannot be done the test is skipped, saying why.
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium) \
	  >/dev/null 2>&1; } || echo "chromium is not installed: the web page's browser test will be skipped"

# Debian's Tesseract, for eval.py --baseline's OCR of pages without text (tests/test_baselines.py), the same way.
ocr:
	@command -v tesseract >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	  tesseract-ocr tesseract-ocr-eng) >/dev/null 2>&1; } || echo "tesseract is not installed: the OCR test will be skipped"

# ruff and mypy (both configured in pyproject.toml) first: a lint or type error fails the suite before the tests.
test: venv browser ocr
	$(PY) -m ruff check .
	$(PY) -m mypy
	$(PY) -m pytest -q tests

demo: venv
	$(PY) -m colintern.scripts.demo --out outputs/demo

# The seed-002 single-vector grid (pooling x attention, 2 seeds) on the tiny model and synthetic pages, on a CPU.
ablate: venv
	$(PY) -m colintern.scripts.ablate --out outputs/ablate

# Seed 004 on the tiny model and generated scenes, on a CPU: single-stage against two-stage at equal steps, evaluated
# after every epoch, with the comparison and efficiency tables (about 5 minutes on 2 cores).
itr-demo: venv
	$(PY) -m colintern.itr.demo --out outputs/itr_demo

# Seed 002's "negatives from another model": InternVL teachers mine (mine.py --teacher) for a tiny Qwen2.5-VL student:
# the demo's epoch-2 checkpoint, and a stronger one (the same trained 2 epochs more on the demo's mined triples).
# After a shared in-batch epoch, epoch 2 with a teacher's negatives against in-batch alone, 8 seeds, paired (about
# an hour on 2 cores; docs/BENCHMARKS.md, "A teacher of another family"; runs make demo first when needed).
TEACHER_LONGER := outputs/bench/teacher_mining/teacher_longer
teacher-mining: venv
	test -f outputs/demo/train/colintern_heads_epoch2.pt || $(MAKE) demo
	test -f $(TEACHER_LONGER)/colintern_heads_epoch4.pt || $(PY) train.py --model_id outputs/demo/tiny \
	    --resume_ckpt outputs/demo/train/colintern_heads_epoch2.pt --train_jsonl outputs/demo/mine/mined_triples.jsonl \
	    --num_negs 1 --lora --lora_r 16 --batch_size 16 --lr 1e-3 --epochs 2 --device cpu --save_every 0 \
	    --num_workers 1 --out_dir $(TEACHER_LONGER)
	PYTHONPATH=$(CURDIR) $(PY) bench/teacher_mining.py --data outputs/demo/synthetic --student qwen2_5_vl \
	    --teacher outputs/demo/train/colintern_heads_epoch2.pt $(TEACHER_LONGER)/colintern_heads_epoch4.pt \
	    --seeds 0 1 2 3 4 5 6 7 --out outputs/bench/teacher_mining

# On a machine with a CUDA GPU, with that machine's own python (torch, transformers, peft, accelerate; no venv
# needed): the one prepared measurement, about 8 minutes, results in outputs/bench/gpu_suite/ (docs/BENCHMARKS.md).
gpu-suite:
	PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} $(PYTHON) bench/gpu_suite.py --out outputs/bench/gpu_suite

clean:
	rm -rf outputs .pytest_cache
