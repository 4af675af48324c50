"""Test-wide settings: offline, deterministic and quiet.

Tests that touch the fuselab cache use the ``cache`` fixture (a private FUSELAB_CACHE); the slow tests use
the user's cache on purpose, so that the real models are fetched and converted once per machine.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("FUSELAB_PROGRESS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `dtype: auto` / `bf16: auto` resolve to float32 in the tests whatever the CPU, so that results do not depend on
# the machine (tests of the detection itself mock it, tests/test_hardware.py).
os.environ["FUSELAB_CPU_BF16"] = "0"


def pytest_report_header(config):
    """The versions that decide most behaviour, and how the environment compares with the committed lock."""
    import torch
    import transformers

    from fuselab.utils.lockfile import LOCK_PATH, compare_with_lock, installed_versions, read_lock

    lock = Path(__file__).resolve().parents[1] / LOCK_PATH
    line = f"fuselab: torch {torch.__version__}, transformers {transformers.__version__}"
    if lock.is_file():
        got = compare_with_lock(read_lock(lock), installed_versions())
        line += f"; {got.matching} packages as in {LOCK_PATH}, {len(got.different)} differ, {len(got.unlocked)} unlocked"
    return line


@pytest.fixture(autouse=True)
def _seed():
    import numpy as np
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A private, empty fuselab cache (FUSELAB_CACHE) for this test."""
    root = tmp_path / "fuselab-cache"
    monkeypatch.setenv("FUSELAB_CACHE", str(root))
    return root
