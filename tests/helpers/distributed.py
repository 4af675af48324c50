"""Launch a script on two CPU processes with ``accelerate launch``, as users run multi-process training.

``accelerate launch --cpu`` would start a single process (accelerate's simple launcher); ``--multi_gpu`` goes
through torch.distributed.run, and with ``ACCELERATE_USE_CPU`` the Trainer's Accelerator uses gloo on the CPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path


def accelerate_launch(
    script_and_args: Sequence[str], *, port: int, env: dict[str, str] | None = None, timeout: int = 300
) -> subprocess.CompletedProcess:
    full_env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "ACCELERATE_USE_CPU": "true",
        "FUSELAB_PROGRESS": "0",
        **(env or {}),
    }
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(port), *map(str, script_and_args),
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout)


def recorded(record: Path, ranks: int = 2) -> dict[int, list[tuple[str, ...]]]:
    """What each rank's recording helper wrote (``rank<r>.txt`` under ``record``): one tuple per line."""
    out = {}
    for rank in range(ranks):
        f = record / f"rank{rank}.txt"
        out[rank] = [tuple(line.split()) for line in f.read_text().splitlines()] if f.exists() else []
    return out


def fuselab_exe() -> str:
    """The installed ``fuselab`` console script, as users launch it."""
    import shutil

    exe = shutil.which("fuselab") or str(Path(sys.executable).with_name("fuselab"))
    assert Path(exe).exists(), "the fuselab console script is not installed in this environment"
    return exe


def launch_cli(
    cli: Sequence[object], record: Path | None, helper: Path, *, port: int, env: dict[str, str]
) -> subprocess.CompletedProcess:
    """``accelerate launch`` of ``fuselab CLI...`` on two processes: the installed console script, or (given a
    ``record`` folder) the recording ``helper`` script, which writes there who computed what."""
    if record is None:
        return accelerate_launch([fuselab_exe(), *cli], port=port, env=env)
    import shutil

    record.mkdir(exist_ok=True)
    script = record / helper.name  # run from a folder of its own: tests/helpers/tokenizers.py would shadow
    shutil.copy(helper, script)  # the tokenizers package for a script started from tests/helpers
    return accelerate_launch([script, record, *cli], port=port, env=env)
