"""Which process am I, under ``accelerate launch``: rank, world size and the GPU that is mine.

The teacher-side stages (top-k extraction, WRPO sampling) scale out as data parallelism: every process runs
the same command, takes the units of work (shards) that :meth:`Ranks.owns` gives it, and writes them to the
shared work folder. The launcher is accelerate's (``accelerate launch --num_processes N``, which goes through
torch.distributed.run); the rank comes from accelerate's :class:`~accelerate.PartialState`, never from a
launcher of our own.

Coordination is through the files, not through collectives: a rank that finished waits for the others by
watching their shards appear (:func:`wait_for`). A barrier would time out (gloo and NCCL default to 30
minutes) exactly when the work is uneven, which is what a resumed run is (one rank may have nothing left to
do while another has hours). A rank that dies does not leave the others waiting forever: the launcher's
elastic agent stops every worker of the group when one fails.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ranks:
    """This process's place among the processes of one launch."""

    index: int = 0
    count: int = 1
    local_index: int = 0

    @property
    def is_main(self) -> bool:
        return self.index == 0

    @property
    def distributed(self) -> bool:
        return self.count > 1

    def owns(self, unit: int) -> bool:
        """Round robin: unit ``n`` belongs to rank ``n mod count``. Units are planned length-sorted, so
        neighbours cost about the same and round robin spreads the long ones as evenly as the short ones;
        the rule needs nothing but the plan, so every rank agrees on it without talking, and a rerun with the
        same number of processes gives each rank the same units back (its own unfinished ones included)."""
        return unit % self.count == self.index


def current_ranks() -> Ranks:
    """The ranks of this launch: one process unless the launcher says more (``WORLD_SIZE`` > 1, which
    torch.distributed.run sets), then accelerate's :class:`~accelerate.PartialState` (which also sets up the
    process group the training stages use later in the same process)."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return Ranks()
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # As accelerate's own AcceleratorState decides: gloo on the CPU when asked (ACCELERATE_USE_CPU) and, since
    # the teacher side may run there, also where there is no GPU at all (else accelerate sees one process).
    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    if state.num_processes <= 1:
        raise RuntimeError(
            f"the launcher started {os.environ['WORLD_SIZE']} processes but accelerate sees one; launch with "
            "`accelerate launch --num_processes N` (set ACCELERATE_USE_CPU=true on a machine without GPUs)"
        )
    return Ranks(state.process_index, state.num_processes, state.local_process_index)


def rank_device(device: str, ranks: Ranks) -> str:
    """``cuda`` means this rank's own GPU (``cuda:<local rank>``) when there are several processes; an explicit
    ``cuda:N`` or ``cpu`` is kept as written."""
    if ranks.distributed and device == "cuda":
        return f"cuda:{ranks.local_index}"
    return device


def wait_for(
    done: Callable[[], bool],
    *,
    what: Callable[[], str],
    poll_s: float = 1.0,
    report_every_s: float = 60.0,
    timeout_s: float | None = None,
) -> None:
    """Poll ``done()`` until it holds; log ``what()`` (what is still missing) every ``report_every_s``.

    ``timeout_s``: give up with a :class:`TimeoutError` (None: wait as long as the launcher keeps the group;
    ``FUSELAB_RANK_WAIT_S`` sets it from the environment, for launchers that do not stop a group whose
    member died)."""
    if timeout_s is None and os.environ.get("FUSELAB_RANK_WAIT_S"):
        timeout_s = float(os.environ["FUSELAB_RANK_WAIT_S"])
    start = last = time.monotonic()
    while not done():
        now = time.monotonic()
        if timeout_s is not None and now - start > timeout_s:
            raise TimeoutError(
                f"waited {timeout_s:.0f} s for the other processes; still missing: {what()}. Rerun the same "
                "command to resume: finished work is kept"
            )
        if now - last >= report_every_s:
            log.info("waiting for the other processes: %s", what())
            last = now
        time.sleep(poll_s)
