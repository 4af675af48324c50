# fuselab developer entry points. Everything installs into .venv/ at the repository root.
#
#   make demo   set up, fetch the real small models and run the built-in job (fuselab fuse configs/demo.yaml)
#   make test   set up and run the test suite (CPU only)
#
# Setup installs the committed lock of tested versions (requirements/lock.txt, pip constraints), torch 2.13.0
# (CPU build) first. `make test-latest` runs the suite against the newest releases pip resolves instead (in
# .venv-latest); `make lock` does that and, if the suite passes, freezes those versions into the lock.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fuselab-installed
LOCK   := requirements/lock.txt
LATEST := .venv-latest
TORCH  := torch==2.13.0
# pytest arguments of test-latest (e.g. make test-latest LATEST_ARGS="-m slow")
LATEST_ARGS ?= -m "not slow"

export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup test test-slow test-latest lock lint format demo demo-merge bench-fuse bench-quality bench-merge bench-fusion bench-prune bench-wrpo demo-wrpo clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# pip itself comes from the lock; torch goes in next, pinned to the CPU build on disk, so nothing later pulls a
# CUDA build; then fuselab with every dependency (and its build backend) at the locked version.
$(STAMP): pyproject.toml $(LOCK) | $(PY)
	$(PY) -m pip install -q -c $(LOCK) pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -c $(LOCK) --build-constraint $(LOCK) -e ".[test]"
	touch $@

setup: $(STAMP)

# FUSELAB_LOCK_CHECK=error: tests/test_environment.py fails if a locked package is installed at another version.
test: setup
	FUSELAB_LOCK_CHECK=error $(VENV)/bin/pytest -m "not slow" -q

test-slow: setup
	FUSELAB_LOCK_CHECK=error $(VENV)/bin/pytest -m slow -q

# The suite against the newest releases pip resolves today, in a fresh .venv-latest (torch stays 2.13.0 CPU).
# Differences from the lock are listed first and are warnings in the run, not errors.
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip
	$(LATEST)/bin/python -m pip install -q $(TORCH)
	$(LATEST)/bin/python -m pip install -q --upgrade -e ".[test,bench]"
	$(LATEST)/bin/python scripts/lock.py diff --python $(LATEST)/bin/python
	FUSELAB_LOCK_CHECK=warn $(LATEST)/bin/pytest $(LATEST_ARGS) -q

# Adopt the newest releases: the lock is rewritten only after the suite passed on them.
lock: test-latest
	$(LATEST)/bin/python scripts/lock.py write --python $(LATEST)/bin/python --extras test,bench

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
	$(PY) -m pip install -q -c $(LOCK) -e ".[bench]"
	OMP_NUM_THREADS=1 $(PY) benchmarks/wrpo_vs_dpo.py

demo-wrpo: setup
	$(VENV)/bin/fuselab models fetch smollm2-135m-instruct qwen2.5-coder-0.5b-instruct
	OMP_NUM_THREADS=1 $(PY) examples/wrpo_demo.py

bench-prune: setup
	$(PY) -m pip install -q -c $(LOCK) -e ".[lmeval]"
	OMP_NUM_THREADS=1 $(PY) benchmarks/prune_search.py --threads 1 --plain-rounds 2 --lm-eval

bench-fuse: setup
	$(PY) benchmarks/fuse_pipeline.py --recipe configs/demo.yaml

# Does fusion beat SFT-only training? Every arm against SFT on the same code data, 3 seeds (about an hour or more).
bench-quality: setup
	$(VENV)/bin/fuselab models fetch smollm2-135m-instruct qwen2.5-coder-0.5b-instruct
	$(PY) benchmarks/fusion_quality.py --json benchmarks/results/fusion_quality.json

bench-fusion: setup
	$(PY) benchmarks/fusion_align.py
	$(PY) benchmarks/fusion_extract.py
	$(PY) benchmarks/fusion_train_step.py

clean:
	rm -rf $(VENV) $(LATEST) build dist src/*.egg-info .pytest_cache .ruff_cache
