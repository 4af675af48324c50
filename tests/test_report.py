"""The fuse report's pieces that a reader sees first: the verdict line and the smoothed loss curves."""

from __future__ import annotations

import pytest

from fuselab.pipelines.report import running_mean, verdict_line


def test_running_mean_is_trailing_and_shorter_at_the_start():
    assert running_mean([4.0, 2.0, 6.0, 0.0, 3.0], 2) == [4.0, 3.0, 4.0, 3.0, 1.5]
    assert running_mean([1.0, 2.0, 3.0], 1) == [1.0, 2.0, 3.0]
    assert running_mean([1.0, 2.0, 3.0], 10) == pytest.approx([1.0, 1.5, 2.0])
    assert running_mean([], 3) == []


def _v(fused: float, base: float) -> dict[str, float]:
    return {"fused": fused, "baseline": base, "delta": fused - base, "beats_baseline": fused < base}


def test_verdict_names_each_domain_with_sign_and_relative_size():
    line = verdict_line({"chat": _v(2.5, 2.6), "code": _v(0.27, 0.26)}, "pivot-sft")
    assert line.startswith("**Verdict: mixed**")
    assert "better on chat (-0.1000 NLL/token, -3.85%)" in line
    assert "not better on code (+0.0100 NLL/token, +3.85%)" in line
    assert verdict_line({"code": _v(0.2, 0.3)}, "b").startswith("**Verdict: fused beats SFT**")
    assert verdict_line({"code": _v(0.3, 0.2)}, "b").startswith("**Verdict: fused does not beat SFT**")


def test_verdict_says_why_there_is_no_comparison():
    assert "baseline: false" in verdict_line({}, None)
    assert "no held-out data" in verdict_line({}, "pivot-sft")
