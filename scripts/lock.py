"""Write or compare fuselab's lock of tested versions (requirements/lock.txt) from a virtual environment.

    python scripts/lock.py diff  --python .venv-latest/bin/python   # what the newest releases change
    python scripts/lock.py write --python .venv-latest/bin/python   # freeze that environment into the lock

``make test-latest`` builds ``.venv-latest`` with the newest releases pip resolves and runs the suite there;
``make lock`` runs ``make test-latest`` and then ``write``, so the lock only ever holds versions the suite passed
with. The lock is a plain pip constraints file (``pip install -c requirements/lock.txt ...``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from fuselab.utils.lockfile import LOCK_PATH, canonical_name, freeze_lines, read_lock  # noqa: E402

HEADER = """\
# fuselab's lock: the exact versions the test suite passed with. `make test`, `make demo` and `.ci/run`
# install them as pip constraints (pip install -c requirements/lock.txt ...), after torch 2.13.0 (CPU build).
# Frozen from {python} on {platform}, {date}, with `pip install -e .[{extras}]`.
# Refresh with `make lock` (a fresh .venv-latest with the newest releases, the suite run there, then frozen);
# `make test-latest` alone only checks the newest releases. Do not edit by hand.
"""


def _run(python: str, *args: str) -> str:
    return subprocess.run([python, *args], check=True, capture_output=True, text=True).stdout


def frozen(python: str) -> list[str]:
    return freeze_lines(_run(python, "-m", "pip", "freeze", "--all", "--exclude-editable"))


def write(python: str, lock: Path, extras: str) -> None:
    info = _run(
        python,
        "-c",
        "import platform, sys; print(f'Python {platform.python_version()}'); "
        "print(f'{platform.system()} {platform.machine()}')",
    ).splitlines()
    text = HEADER.format(python=info[0], platform=info[1], date=dt.date.today().isoformat(), extras=extras)
    text += "\n".join(frozen(python)) + "\n"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=lock.parent, delete=False, suffix=".tmp") as f:
        f.write(text)
    Path(f.name).replace(lock)
    print(f"wrote {lock} ({len(text.splitlines())} lines)")


def diff(python: str, lock: Path) -> int:
    old = read_lock(lock) if lock.is_file() else {}
    new = {}
    for line in frozen(python):
        name, version = line.split("==")
        new[canonical_name(name)] = version
    changes = []
    for name in sorted(old.keys() | new.keys()):
        a, b = old.get(name), new.get(name)
        if a != b:
            changes.append(f"  {name}: {a or '(not locked)'} -> {b or '(not installed)'}")
    print(
        f"{len(changes)} difference(s) between {lock} and {python}:"
        if changes
        else f"{python} matches {lock}"
    )
    print("\n".join(changes))
    return len(changes)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("action", choices=("write", "diff"))
    parser.add_argument("--python", required=True, help="the interpreter of the environment to freeze")
    parser.add_argument("--lock", type=Path, default=ROOT / LOCK_PATH)
    parser.add_argument(
        "--extras", default="test,bench", help="the extras that environment was installed with"
    )
    args = parser.parse_args()
    if args.action == "write":
        write(args.python, args.lock, args.extras)
    else:
        diff(args.python, args.lock)


if __name__ == "__main__":
    main()
