"""What this machine computes fast: native bf16 or not, and how many cores this process may use.

bf16 is only worth it where the hardware has it: CUDA devices with bf16 support, and CPUs whose torch kernels
use AVX512-BF16 or AMX. Elsewhere torch emulates it, and on an AVX2-only AMD EPYC a bf16 matmul ran about 60
times slower than float32 (issue 13: a 512×576×1536 product took 3.1 s against 52 ms), so a recipe that forced
bf16 never finished. Every ``dtype: auto`` / ``bf16: auto`` in fuselab resolves here:

- CUDA: bf16 when ``torch.cuda.is_bf16_supported()``, else float32;
- CPU: bf16 when the CPU reports ``avx512_bf16`` or ``amx_bf16`` **and** a short timing probe (a bf16 and a
  float32 matmul of the same shape, 0.056 s measured on a 2-core Zen 4) confirms bf16 is not slower; float32
  otherwise. The flags alone are not trusted: a hypervisor can report them while the kernels torch ships do
  not use them.

An explicit ``bfloat16`` on a CPU without native bf16 still runs, with one warning that gives the measured
slowdown. ``fuselab info --hardware`` prints all of this and what each stage will use.

Cores: :func:`usable_cores` counts the CPUs this process may run on (its affinity mask) capped by a cgroup CPU
quota (containers), and :func:`configure_threads` sets torch's intra-op threads to that number, so two cores
are two threads even on a 64-core host with a 2-core container quota.
"""

from __future__ import annotations

import functools
import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fuselab.utils.errors import ConfigError

log = logging.getLogger(__name__)

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
# bf16 counts as native when its matmul is no slower than float32's by this factor (measured ~0.3x where
# native, ~60x where emulated; the margin absorbs timing noise on a loaded machine).
NATIVE_RATIO = 1.25


@dataclass(frozen=True)
class CpuInfo:
    model: str
    flags: frozenset[str]
    torch_capability: str  # what torch's CPU kernels dispatch to (DEFAULT, AVX2, AVX512, ...)


@functools.lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    """The CPU model name and flags (``/proc/cpuinfo``; empty where unavailable) and torch's capability."""
    model, flags = "unknown", frozenset()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model == "unknown":
            model = value.strip()
        elif key == "flags" and not flags:
            flags = frozenset(value.split())
    try:
        import torch

        capability = str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # torch too old to tell
        capability = "unknown"
    return CpuInfo(model=model, flags=flags, torch_capability=capability)


def matmul_ratio(shape: tuple[int, int, int] = (256, 576, 1536), repeats: int = 3) -> float:
    """Time of a bf16 matmul over the time of the same float32 matmul on the CPU (best of ``repeats``)."""
    import torch

    m, k, n = shape
    a, b = torch.randn(m, k), torch.randn(k, n)
    times = {}
    for dtype in (torch.float32, torch.bfloat16):
        x, y = a.to(dtype), b.to(dtype)
        x @ y  # warm-up (kernel selection)
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            x @ y
            best = min(best, time.perf_counter() - t)
            if best > 0.5:  # emulated bf16 is slow enough to tell at once
                break
        times[dtype] = best
    return times[torch.bfloat16] / max(times[torch.float32], 1e-9)


@functools.lru_cache(maxsize=1)
def cpu_bf16() -> tuple[bool, float | None]:
    """(native, measured bf16/float32 time ratio or None when not probed) for this process's CPU."""
    forced = os.environ.get("FUSELAB_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1", None
    info = cpu_info()
    if not any(f in info.flags for f in BF16_CPU_FLAGS):
        return False, None
    ratio = matmul_ratio()
    return ratio <= NATIVE_RATIO, ratio


def cuda_bf16() -> bool:
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def device_type(device: Any) -> str:
    return str(getattr(device, "type", device) or "cpu").split(":", 1)[0]


def check_device(device: str, what: str) -> None:
    """Refuse, before any work, a device this machine does not have (``extract.device: cuda`` without CUDA
    would otherwise fail inside the first forward pass, after the models were loaded)."""
    import torch

    kind = device_type(device)
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"{what}: {device} was asked for, but no CUDA GPU is visible to torch on this machine; set "
                f"{what}: cpu (or run where a GPU is)"
            )
        index = str(device).partition(":")[2]
        if index.isdigit() and int(index) >= torch.cuda.device_count():
            raise ConfigError(
                f"{what}: {device} was asked for, but only {torch.cuda.device_count()} GPU(s) are visible; "
                f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}"
            )
    elif kind not in ("cpu", "auto", "mps"):
        raise ConfigError(f"{what}: unknown device {device!r}; use cpu, cuda or cuda:N")


def native_bf16(device: Any = "cpu") -> bool:
    """Whether bf16 is native on ``device`` (``cpu``, ``cuda``, ``cuda:N`` or a torch device)."""
    if device_type(device) == "cuda":
        return cuda_bf16()
    if device_type(device) == "cpu":
        return cpu_bf16()[0]
    return False


_WARNED: set[str] = set()


def warn_slow_bf16(device: Any, what: str) -> None:
    """One warning per process and device when bf16 is asked for where it is emulated."""
    key = device_type(device)
    if key != "cpu" or native_bf16(device) or key in _WARNED:
        return
    _WARNED.add(key)
    if os.environ.get("FUSELAB_CPU_BF16") == "0":
        msg = (
            f"{what}: bfloat16 asked for, but FUSELAB_CPU_BF16=0 marks bf16 as not native on this CPU "
            f"({cpu_info().model}); it runs, possibly much slower than float32. Use `auto` (float32 here)."
        )
    else:
        ratio = cpu_bf16()[1]
        if ratio is None:
            ratio = matmul_ratio()
        msg = (
            f"{what}: bfloat16 on this CPU ({cpu_info().model}) is emulated, not native: a bf16 matmul takes "
            f"{ratio:.1f}x the float32 time here. Use `auto` (float32 on this machine) unless you need bf16 "
            "numerics."
        )
    warnings.warn(msg, RuntimeWarning, stacklevel=3)
    log.warning(msg)


DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")


def resolve_dtype(name: str, device: Any = "cpu", *, what: str = "dtype") -> Any:
    """The torch dtype for a recipe's ``dtype``: ``auto`` is bfloat16 where it is native, else float32."""
    import torch

    from fuselab.utils.errors import ConfigError

    if name == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise ConfigError(f"unknown dtype {name!r}; valid: {', '.join(DTYPE_NAMES)}")
    if name == "bfloat16":
        warn_slow_bf16(device, what)
    return table[name]


def resolve_bf16(flag: bool | str, device: Any = "cpu", *, what: str = "bf16") -> bool:
    """A recipe's ``bf16`` (mixed-precision autocast): ``auto`` is on where bf16 is native."""
    if flag == "auto":
        return native_bf16(device)
    if flag is True:
        warn_slow_bf16(device, what)
    return bool(flag)


def usable_cores() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2/v1 CPU quota when one is set."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        cores = min(cores, max(1, int(quota + 0.5)))
    return max(1, cores)


def _cgroup_quota() -> float | None:
    try:
        text = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if text and text[0] != "max":
            return int(text[0]) / int(text[1])
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        if quota > 0 and period > 0:
            return quota / period
    except (OSError, ValueError):
        pass
    return None


def threads_per_process() -> int:
    """:func:`usable_cores` shared by the processes of this machine under ``torchrun``/``accelerate launch``
    (``LOCAL_WORLD_SIZE``), so that N processes on N·k cores run k threads each, not N·k each."""
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, usable_cores() // local)


def configure_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads to ``threads`` (default: ``FUSELAB_THREADS``, else
    :func:`threads_per_process`)."""
    import torch

    n = threads or int(os.environ.get("FUSELAB_THREADS", "0") or 0) or threads_per_process()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def describe(devices: tuple[str, ...] = ("cpu", "cuda")) -> dict[str, Any]:
    """What ``fuselab info --hardware`` prints: the detection and the precision every stage will use."""
    import torch

    info = cpu_info()
    native, ratio = cpu_bf16()
    out: dict[str, Any] = {
        "cpu": info.model,
        "cpu bf16 flags": sorted(f for f in BF16_CPU_FLAGS if f in info.flags),
        "torch cpu capability": info.torch_capability,
        "cpu bf16": "native" if native else "emulated (slow)",
        "bf16/float32 matmul time": round(ratio, 2) if ratio is not None else None,
        "usable cores": usable_cores(),
        "torch threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    if torch.cuda.is_available():
        out["cuda bf16"] = cuda_bf16()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = str(resolve_dtype("auto", device)).removeprefix("torch.")
    autocast = resolve_bf16("auto", device)
    out["stages (dtype auto / bf16 auto)"] = {
        "extract (teacher forward)": f"{dtype} on {device}",
        "train (fusion, WRPO)": f"float32 weights, bf16 autocast {'on' if autocast else 'off'}",
        "evaluate (held-out NLL)": f"{dtype} on {device}",
        "WRPO sampling": f"{dtype} on {device}",
        "prune search": f"{dtype} on {device}",
        "merge": "float32 arithmetic, output in the recipe's dtype",
    }
    return out
