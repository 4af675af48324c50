"""The committed lock of tested versions (``requirements/lock.txt``) and how an environment compares with it.

The lock is a pip constraints file (``name==version`` lines, ``#`` comments), so ``pip install -c`` reads it
without any other tool. ``make test``, ``make demo`` and ``.ci/run`` install from it; ``make test-latest`` runs
the suite against the newest releases instead, and ``make lock`` freezes that environment into the lock once
the suite has passed there. The test suite compares the running environment with the lock
(``tests/test_environment.py``): a locked package at another version is an error under ``make test`` and a
warning under ``make test-latest``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

LOCK_PATH = Path("requirements") / "lock.txt"
_LINE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)")


def canonical_name(name: str) -> str:
    """PEP 503 normalised project name (``Jinja2`` and ``jinja2``, ``rouge_score`` and ``rouge-score`` agree)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def public_version(version: str) -> str:
    """The version without its local label: ``2.13.0+cpu`` is locked as ``2.13.0``, the build pip chooses."""
    return version.split("+", 1)[0]


def read_lock(path: str | Path) -> dict[str, str]:
    """``{canonical name: version}`` of a lock / constraints file; anything but ``name==version`` is an error."""
    pins: dict[str, str] = {}
    for number, raw in enumerate(Path(path).read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = _LINE.match(line)
        if not m:
            raise ValueError(f"{path}:{number}: expected `name==version`, got {raw!r}")
        pins[canonical_name(m.group(1))] = m.group(2)
    return pins


def installed_versions(exclude: tuple[str, ...] = ("fuselab",)) -> dict[str, str]:
    """``{canonical name: version}`` of every distribution importable in this interpreter."""
    found: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name and canonical_name(name) not in exclude:
            found.setdefault(canonical_name(name), dist.version)
    return found


@dataclass
class LockComparison:
    """How an environment differs from the lock."""

    different: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (locked, installed)
    unlocked: dict[str, str] = field(default_factory=dict)  # installed but not in the lock
    matching: int = 0

    @property
    def ok(self) -> bool:
        return not self.different

    def describe(self, limit: int = 40) -> str:
        lines = [f"{n}: locked {a}, installed {b}" for n, (a, b) in sorted(self.different.items())]
        lines += [f"{n}: installed {v}, not in the lock" for n, v in sorted(self.unlocked.items())]
        more = f"\n... and {len(lines) - limit} more" if len(lines) > limit else ""
        return "\n".join(lines[:limit]) + more


def compare_with_lock(lock: dict[str, str], installed: dict[str, str]) -> LockComparison:
    """Locked packages installed at another version, and installed packages the lock does not name.

    A locked package that is not installed is fine: the lock covers every extra, an environment only some.
    """
    result = LockComparison()
    for name, version in installed.items():
        if name not in lock:
            result.unlocked[name] = version
        elif public_version(version) != public_version(lock[name]):
            result.different[name] = (lock[name], version)
        else:
            result.matching += 1
    return result


def freeze_lines(freeze_output: str, exclude: tuple[str, ...] = ("fuselab",)) -> list[str]:
    """``pip freeze`` output as lock lines: sorted, local labels dropped, ``exclude`` (fuselab itself) left out."""
    lines = []
    for raw in freeze_output.splitlines():
        m = _LINE.match(raw.strip())
        if not m:
            if raw.strip() and not raw.startswith("#") and not raw.startswith("-e "):
                raise ValueError(f"pip freeze gave a line that is not `name==version`: {raw!r}")
            continue
        name, version = m.group(1), public_version(m.group(2))
        if canonical_name(name) not in exclude:
            lines.append(f"{canonical_name(name)}=={version}")
    return sorted(set(lines))
