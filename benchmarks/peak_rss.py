"""Run a command as a child of a tiny launcher and report its peak resident memory.

On Linux a child's ``ru_maxrss`` starts from its parent's resident size at fork, so a benchmark that forks
from a process holding a model would over-report; the launcher is a bare interpreter, which keeps the figure
the child's own.
"""

from __future__ import annotations

import json
import subprocess
import sys

_LAUNCHER = (
    "import resource, subprocess, sys\n"
    "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
    "sys.stderr.write(p.stderr[-4000:])\n"
    "sys.stdout.write(p.stdout)\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    "sys.exit(p.returncode)\n"
)


def run_json_with_peak(cmd: list[str]) -> dict:
    """Run ``cmd`` (whose last stdout line is a JSON object); return that object plus ``peak_mib``."""
    proc = subprocess.run([sys.executable, "-S", "-c", _LAUNCHER, *cmd], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-2])
    result["peak_mib"] = int(lines[-1]) / 1024
    return result
