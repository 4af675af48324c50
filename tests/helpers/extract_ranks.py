"""Run by ``accelerate launch`` in tests/test_fusion_distributed.py: ``fuselab fusion extract`` on every rank,
recording which shards each rank computed.

Usage: python extract_ranks.py RECORD_DIR FUSELAB-ARGS... Every shard a rank writes is appended to
RECORD_DIR/rank<R>.txt as ``<store folder> <shard>``. With ``KILL_RANK=R`` in the environment, rank R is
killed with SIGKILL right after its first shard is on disk (a crash the process cannot clean up after).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from fuselab.cli import main
from fuselab.fusion import extract as extract_mod
from fuselab.fusion import store as store_mod


def main_() -> None:
    record_dir = Path(sys.argv[1])
    rank = int(os.environ.get("RANK", "0"))
    kill = os.environ.get("KILL_RANK") == str(rank)
    real = store_mod.write_shard_files

    def recording(root, name, *args, **kwargs):
        entry = real(root, name, *args, **kwargs)
        with open(record_dir / f"rank{rank}.txt", "a") as f:
            f.write(f"{Path(root).name} {name}\n")
        if kill:
            os.kill(os.getpid(), signal.SIGKILL)
        return entry

    store_mod.write_shard_files = recording  # what rank 0's TopKStoreWriter calls
    extract_mod.write_shard_files = recording  # what the other ranks call
    sys.exit(main(sys.argv[2:]))


if __name__ == "__main__":
    main_()
