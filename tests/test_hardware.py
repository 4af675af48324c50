"""Precision chosen by the hardware (issue 13): bf16 only where native, float32 elsewhere; cores and threads."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import yaml

from fuselab.utils import hardware as hw

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cpu(monkeypatch):
    """Mock the CPU: ``cpu(flags, ratio)`` sets /proc/cpuinfo's flags and the bf16/float32 matmul time ratio."""
    monkeypatch.delenv("FUSELAB_CPU_BF16", raising=False)
    probes = []
    real_info = hw.cpu_info

    def set_cpu(flags: set[str], ratio: float) -> list:
        real_info.cache_clear()
        hw.cpu_bf16.cache_clear()
        hw._WARNED.clear()
        info = hw.CpuInfo(model="Test CPU", flags=frozenset(flags), torch_capability="AVX512")
        monkeypatch.setattr(hw, "cpu_info", lambda: info)
        monkeypatch.setattr(hw, "matmul_ratio", lambda *a, **k: probes.append(1) or ratio)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        return probes

    yield set_cpu
    hw.cpu_bf16.cache_clear()
    real_info.cache_clear()
    hw._WARNED.clear()


@pytest.mark.parametrize(
    ("flags", "ratio", "native", "probed"),
    [
        ({"avx2"}, 60.0, False, False),  # AVX2 only: never bf16, no probe needed
        ({"avx512f", "avx512_bf16"}, 0.35, True, True),  # AVX512-BF16 confirmed by the probe
        ({"amx_bf16", "amx_tile"}, 0.2, True, True),  # AMX
        (
            {"avx512_bf16"},
            40.0,
            False,
            True,
        ),  # the flag is there but torch's kernels emulate: the probe says no
    ],
)
def test_cpu_bf16_is_native_only_where_flags_and_the_probe_agree(cpu, flags, ratio, native, probed):
    probes = cpu(flags, ratio)
    assert hw.native_bf16("cpu") is native
    assert bool(probes) is probed
    assert hw.resolve_dtype("auto", "cpu") == (torch.bfloat16 if native else torch.float32)
    assert hw.resolve_bf16("auto", "cpu") is native


@pytest.mark.parametrize("bf16_supported", [True, False])
def test_cuda_uses_bf16_where_the_device_supports_it(monkeypatch, bf16_supported):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_supported)
    assert hw.resolve_dtype("auto", "cuda:0") == (torch.bfloat16 if bf16_supported else torch.float32)
    assert hw.resolve_bf16("auto", "cuda") is bf16_supported
    from fuselab.fusion.extract import resolve_dtype as extract_dtype

    assert extract_dtype("auto", "cuda") == (torch.bfloat16 if bf16_supported else torch.float32)


def test_an_explicit_bf16_on_a_cpu_without_it_runs_but_warns_once_with_the_slowdown(cpu):
    cpu({"avx2"}, 57.5)
    with pytest.warns(RuntimeWarning, match=r"emulated.*57\.5x the float32 time"):
        assert hw.resolve_dtype("bfloat16", "cpu", what="extract.dtype") == torch.bfloat16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert hw.resolve_dtype("bfloat16", "cpu") == torch.bfloat16  # once per process
        assert hw.resolve_bf16(True, "cpu") is True
    cpu({"avx512_bf16"}, 0.4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert hw.resolve_dtype("bfloat16", "cpu") == torch.bfloat16  # native: no warning


def test_unknown_dtypes_are_refused_with_the_valid_names():
    from fuselab.utils.errors import ConfigError

    with pytest.raises(ConfigError, match="valid: auto, float32, bfloat16, float16"):
        hw.resolve_dtype("fp8", "cpu")


def test_cores_follow_the_affinity_mask_and_the_cgroup_quota(monkeypatch):
    monkeypatch.setattr(hw.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr(hw, "_cgroup_quota", lambda: None)
    assert hw.usable_cores() == 16
    monkeypatch.setattr(hw, "_cgroup_quota", lambda: 2.0)  # a 2-core container on a 16-core host
    assert hw.usable_cores() == 2
    monkeypatch.setattr(hw, "_cgroup_quota", lambda: 0.5)
    assert hw.usable_cores() == 1
    monkeypatch.setattr(hw, "_cgroup_quota", lambda: 8.0)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two processes under accelerate launch share the 8
    assert hw.threads_per_process() == 4
    before = torch.get_num_threads()
    try:
        assert hw.configure_threads() == 4 and torch.get_num_threads() == 4
        monkeypatch.setenv("FUSELAB_THREADS", "3")
        assert hw.configure_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_every_command_and_recipe_defaults_to_auto_precision():
    from fuselab.fusion.config import ExtractConfig, TrainConfig
    from fuselab.pipelines.config import EvaluateStage
    from fuselab.prune.config import PruneRecipe
    from fuselab.wrpo.config import SamplingConfig, TrainingConfig

    assert ExtractConfig().dtype == "auto" and TrainConfig().bf16 == "auto"
    assert EvaluateStage().dtype == "auto"
    assert PruneRecipe.model_fields["dtype"].default == "auto"
    assert SamplingConfig.model_fields["dtype"].default == "auto"
    assert TrainingConfig.model_fields["bf16"].default == "auto"
    # and no shipped recipe forces a compute precision (merge `dtype` is the output format, not compute)
    forced = []
    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        if "merge" in path.parts:
            continue

        def walk(node, where, name):
            if isinstance(node, dict):
                for key, value in node.items():
                    weights = where == ["training"] and key == "dtype"  # WRPO's master weights: float32
                    if key in ("dtype", "bf16") and value != "auto" and not weights:
                        forced.append(f"{name}: {'.'.join([*where, key])} = {value}")
                    walk(value, [*where, key], name)

        walk(yaml.safe_load(path.read_text()), [], path.name)
    assert not forced, forced


def test_info_hardware_prints_the_detection_and_each_stage(cpu, capsys):
    from fuselab.cli import main

    cpu({"avx2"}, 60.0)
    assert main(["info", "--hardware"]) == 0
    out = capsys.readouterr().out
    assert "cpu bf16: emulated (slow)" in out and "extract (teacher forward): float32 on cpu" in out
    assert "usable cores" in out
