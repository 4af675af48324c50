"""Rough disk and time estimates for ``fuselab fuse --dry-run``.

Time is FLOPs over a measured rate: a short float32 matmul probe of this machine, scaled by how much of the
matmul rate a small transformer's forward pass reaches on it (``EFFICIENCY_*``; on the demo, 2 idle CPU cores,
the estimates came within 0.6-1.4x of each stage's measured time). A forward costs 2·P FLOPs per token, a training step
6·P (forward + backward). The LM head counts only at the positions that need logits. These are estimates to
decide whether to start, not promises: disk figures are exact to within padding, times to within ~2x.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

EFFICIENCY_CPU = 0.6
EFFICIENCY_GPU = 0.25
STORED_BYTES_PER_K = 6  # int32 id + float16 log-prob
STORED_BYTES_FIXED = 2  # float16 gold NLL


@dataclass(frozen=True)
class ModelCost:
    """What the estimates need from a model: all its parameters, and those of its LM head."""

    parameters: int
    head_parameters: int

    @property
    def body(self) -> int:
        return max(self.parameters - self.head_parameters, 0)


def model_cost(path) -> ModelCost:
    from fuselab.modeling.inspect import describe_checkpoint

    info = describe_checkpoint(path)
    head = (info.hidden_size or 0) * (info.vocab_size or 0)
    return ModelCost(parameters=info.num_parameters, head_parameters=head)


_RATE: dict[str, float] = {}


def flops_per_second(device: str = "cpu", dtype: str = "auto") -> float:
    """Effective FLOP/s of transformer work on ``device`` in the precision that will really run (``auto``
    resolved by :mod:`fuselab.utils.hardware`), from a ~0.2 s matmul probe (cached)."""
    from fuselab.utils.hardware import resolve_dtype

    torch_dtype = resolve_dtype(dtype, device, what="estimate")
    key = f"{device}/{torch_dtype}"
    if key in _RATE:
        return _RATE[key]
    import torch

    n = 1536
    a = torch.randn(n, n, device=device, dtype=torch_dtype)
    b = torch.randn(n, n, device=device, dtype=torch_dtype)
    a @ b  # warm-up
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < 0.2:
        a @ b
        reps += 1
    if device != "cpu":
        torch.cuda.synchronize()
    rate = 2 * n**3 * reps / (time.perf_counter() - start)
    _RATE[key] = rate * (EFFICIENCY_CPU if device == "cpu" else EFFICIENCY_GPU)
    return _RATE[key]


def forward_seconds(cost: ModelCost, tokens: int, scored: int, rate: float) -> float:
    return (2 * cost.body * tokens + 2 * cost.head_parameters * scored) / rate


def train_seconds(cost: ModelCost, tokens: int, rate: float) -> float:
    return 6 * cost.parameters * tokens / rate


def generate_seconds(cost: ModelCost, new_tokens: int, rate: float) -> float:
    """Greedy decoding: one small forward per token, dominated by overheads and weight reads on a CPU."""
    return new_tokens * (2 * cost.parameters / rate * 4 + 0.03)


def load_seconds(cost: ModelCost) -> float:
    """Reading a float32 copy of the weights and building the model (measured: ~3 s for 135M on a CPU)."""
    return 1.0 + cost.parameters * 4 / 300e6


def store_bytes(scored: int, k: int) -> int:
    return scored * (k * STORED_BYTES_PER_K + STORED_BYTES_FIXED)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def human_seconds(s: float) -> str:
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"
