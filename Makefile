# fuselab developer entry points. Everything installs into .venv/ at the repository root.
#
#   make demo   set up, fetch the real small models and run the built-in job (fuselab fuse configs/demo.yaml)
#   make test   set up and run the test suite (CPU only)

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fuselab-installed

export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup test test-slow lint format demo demo-merge bench-fuse bench-merge bench-fusion bench-prune bench-wrpo demo-wrpo clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch goes in first, pinned to the CPU build on disk, so nothing later pulls a CUDA build.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $@

setup: $(STAMP)

test: setup
	$(VENV)/bin/pytest -m "not slow" -q

test-slow: setup
	$(VENV)/bin/pytest -m slow -q

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

demo: setup
	$(VENV)/bin/fuselab models fetch smollm2-135m-instruct qwen2.5-coder-0.5b-instruct gemma-3-270m
	$(VENV)/bin/fuselab fuse configs/demo.yaml

demo-merge: setup
	$(VENV)/bin/fuselab models fetch smollm2-135m-instruct
	$(PY) examples/merge_demo.py

bench-merge: setup
	$(PY) benchmarks/merge_vs_mergekit.py

bench-wrpo: setup
	$(PY) -m pip install -q -e ".[bench]"
	OMP_NUM_THREADS=1 $(PY) benchmarks/wrpo_vs_dpo.py

demo-wrpo: setup
	$(VENV)/bin/fuselab models fetch smollm2-135m-instruct qwen2.5-coder-0.5b-instruct
	OMP_NUM_THREADS=1 $(PY) examples/wrpo_demo.py

bench-prune: setup
	$(PY) -m pip install -q -e ".[lmeval]"
	OMP_NUM_THREADS=1 $(PY) benchmarks/prune_search.py --threads 1 --plain-rounds 2 --lm-eval

bench-fuse: setup
	$(PY) benchmarks/fuse_pipeline.py --recipe configs/demo.yaml

bench-fusion: setup
	$(PY) benchmarks/fusion_align.py
	$(PY) benchmarks/fusion_extract.py
	$(PY) benchmarks/fusion_train_step.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
