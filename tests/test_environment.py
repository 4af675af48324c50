"""The environment the suite runs in, against the committed lock of tested versions (requirements/lock.txt).

``make test`` installs the lock and sets ``FUSELAB_LOCK_CHECK=error``: a locked package at another version fails
the run, so a green suite always means "green on the locked versions". ``make test-latest`` sets ``warn``: the
differences are listed as a warning and the rest of the suite says whether the newest releases work.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import pytest

from fuselab.utils.lockfile import (
    LOCK_PATH,
    canonical_name,
    compare_with_lock,
    freeze_lines,
    installed_versions,
    read_lock,
)

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python >= 3.11")


def _lock_problem(message: str) -> None:
    """An error under ``make test`` (FUSELAB_LOCK_CHECK=error), a warning under ``make test-latest`` (warn)."""
    mode = os.environ.get("FUSELAB_LOCK_CHECK", "warn")
    assert mode in ("error", "warn"), f"FUSELAB_LOCK_CHECK must be `error` or `warn`, got {mode!r}"
    if mode == "error":
        pytest.fail(message)
    warnings.warn(message, stacklevel=2)


def _lock() -> dict[str, str] | None:
    if not (ROOT / LOCK_PATH).is_file():
        _lock_problem(f"{LOCK_PATH} is missing: `make lock` writes it")
        return None
    return read_lock(ROOT / LOCK_PATH)


def test_installed_versions_match_the_lock():
    lock = _lock()
    if lock is None:
        return
    comparison = compare_with_lock(lock, installed_versions())
    if comparison.different or comparison.matching == 0:
        _lock_problem(
            f"{len(comparison.different)} installed package(s) differ from {LOCK_PATH}, {comparison.matching} "
            f"match (`make test` installs the lock; `make lock` adopts new versions):\n{comparison.describe()}"
        )


def _requirement_names(requirements: list[str]) -> set[str]:
    return {canonical_name(re.match(r"[A-Za-z0-9._-]+", r).group(0)) for r in requirements}


def test_the_lock_pins_every_declared_dependency():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = pyproject["project"]
    declared = _requirement_names(project["dependencies"])
    for extra in ("test", "lmeval", "bench"):
        declared |= _requirement_names(project["optional-dependencies"][extra])
    declared |= _requirement_names(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    )
    lock = _lock()
    if lock is not None and declared - lock.keys():
        _lock_problem(
            f"{sorted(declared - lock.keys())} are declared in pyproject.toml but not locked: `make lock`"
        )


def test_lock_lines_from_pip_freeze(tmp_path):
    frozen = "Jinja2==3.1.6\ntorch==2.13.0+cpu\n-e git+https://x/fuselab#egg=fuselab\nfuselab==0.1.0\nrouge_score==0.1.2\n"
    assert freeze_lines(frozen) == ["jinja2==3.1.6", "rouge-score==0.1.2", "torch==2.13.0"]
    with pytest.raises(ValueError, match="not `name==version`"):
        freeze_lines("torch @ file:///opt/wheels/torch.whl\n")
    lock = tmp_path / "lock.txt"
    lock.write_text("# comment\njinja2==3.1.6  # why\n\ntorch==2.13.0\n")
    assert read_lock(lock) == {"jinja2": "3.1.6", "torch": "2.13.0"}
    lock.write_text("torch>=2.4\n")
    with pytest.raises(ValueError, match="lock.txt:1: expected `name==version`"):
        read_lock(lock)


def test_comparison_ignores_local_labels_and_uninstalled_extras():
    lock = {"torch": "2.13.0", "transformers": "5.24.0", "trl": "1.16.0"}
    got = compare_with_lock(lock, {"torch": "2.13.0+cpu", "transformers": "5.23.0", "ipython": "9.0"})
    assert got.different == {"transformers": ("5.24.0", "5.23.0")} and got.unlocked == {"ipython": "9.0"}
    assert got.matching == 1 and not got.ok
    assert "transformers: locked 5.24.0, installed 5.23.0" in got.describe()
