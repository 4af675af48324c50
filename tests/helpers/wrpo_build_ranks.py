"""Run by ``accelerate launch`` in tests/test_wrpo_distributed.py: ``fuselab wrpo build`` on every rank,
recording which pieces each rank wrote.

Usage: python wrpo_build_ranks.py RECORD_DIR FUSELAB-ARGS... Every piece of samples or scores a rank writes is
appended to RECORD_DIR/rank<R>.txt as ``<model folder> <kind> <piece>``. With ``KILL_RANK=R`` in the
environment, rank R is killed with SIGKILL right after its first piece is on disk.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from fuselab.cli import main
from fuselab.wrpo import build as build_mod


def main_() -> None:
    record_dir = Path(sys.argv[1])
    rank = int(os.environ.get("RANK", "0"))
    kill = os.environ.get("KILL_RANK") == str(rank)
    real = build_mod._write_piece

    def recording(path, rows):
        real(path, rows)
        if path.suffix != ".jsonl":  # a rank's "finished" file
            return
        kind = path.parent.name.split("-")[0]  # samples | scores
        with open(record_dir / f"rank{rank}.txt", "a") as f:
            f.write(f"{path.parent.parent.name} {kind} {path.stem}\n")
        if kill:
            os.kill(os.getpid(), signal.SIGKILL)

    build_mod._write_piece = recording
    sys.exit(main(sys.argv[2:]))


if __name__ == "__main__":
    main_()
