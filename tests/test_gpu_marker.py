"""The ``gpu`` tests skip cleanly, with their reason, where there is no CUDA GPU (as in CI), and the marker is
registered (``--strict-markers`` would otherwise refuse the module)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).parent


def test_gpu_tests_skip_cleanly_without_cuda():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # hides any GPU, so this holds on a GPU machine too
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "gpu",
        str(TESTS / "test_gpu.py"),
        "-p",
        "no:cacheprovider",
        "-rs",
        "-q",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=TESTS.parent, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "6 skipped" in proc.stdout and "passed" not in proc.stdout and "error" not in proc.stdout.lower()
    assert "needs a CUDA GPU" in proc.stdout
