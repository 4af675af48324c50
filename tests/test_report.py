"""The fuse report's pieces that a reader sees first: the verdict line and the smoothed loss curves."""

from __future__ import annotations

import pytest

from fuselab.evaluate.nll import paired_difference
from fuselab.pipelines.report import compare_with_baseline, running_mean, verdict_line


def test_running_mean_is_trailing_and_shorter_at_the_start():
    assert running_mean([4.0, 2.0, 6.0, 0.0, 3.0], 2) == [4.0, 3.0, 4.0, 3.0, 1.5]
    assert running_mean([1.0, 2.0, 3.0], 1) == [1.0, 2.0, 3.0]
    assert running_mean([1.0, 2.0, 3.0], 10) == pytest.approx([1.0, 1.5, 2.0])
    assert running_mean([], 3) == []


def _v(fused: float, base: float) -> dict[str, object]:
    """A comparison from evaluations without per-text figures (the sign alone decides)."""
    f = {"nll": fused * 100, "tokens": 100}
    b = {"nll": base * 100, "tokens": 100}
    return compare_with_baseline(f, b)


def _score(per_text: list[float], tokens: list[int]) -> dict[str, object]:
    return {
        "nll": sum(per_text),
        "tokens": sum(tokens),
        "per_text_nll": per_text,
        "per_text_tokens": tokens,
    }


def test_verdict_names_each_domain_with_sign_and_relative_size():
    line = verdict_line({"chat": _v(2.5, 2.6), "code": _v(0.27, 0.26)}, "pivot-sft")
    assert line.startswith("**Verdict: fused beats SFT on chat**")
    assert "better on chat (-0.1000 NLL/token, -3.85%)" in line
    assert "not better on code (+0.0100 NLL/token, +3.85%)" in line
    assert "standard error" not in line  # no per-text figures, no ± and no claim about it
    assert verdict_line({"code": _v(0.2, 0.3)}, "b").startswith("**Verdict: fused beats SFT**")
    assert verdict_line({"code": _v(0.3, 0.2)}, "b").startswith("**Verdict: fused does not beat SFT**")


def test_paired_difference_is_a_ratio_with_its_delta_method_standard_error():
    tokens = [10, 20, 30, 40]
    a = _score([5.0, 9.0, 16.0, 18.0], tokens)
    b = _score([6.0, 10.0, 15.0, 21.0], tokens)
    delta, se = paired_difference(a, b)
    # by hand: d = (-1, -1, 1, -3), D = -4/100; z = d - D t = (-0.6, -0.2, 2.2, -1.4);
    # Σz² = 0.36 + 0.04 + 4.84 + 1.96 = 7.2; se = sqrt(4/3 · 7.2) / 100
    assert delta == pytest.approx(-0.04)
    assert se == pytest.approx((4 / 3 * 7.2) ** 0.5 / 100)
    # the same gap on every text (in proportion to its tokens) has no spread over texts
    flat = paired_difference(_score([2.0, 4.0], [10, 20]), _score([1.0, 2.0], [10, 20]))
    assert flat[1] == pytest.approx(0)
    # missing or mismatched per-text figures: the difference without an error
    assert paired_difference({"nll": 3.0, "tokens": 10}, b)[1] is None
    assert paired_difference(_score([1.0, 2.0], [1, 2]), _score([1.0, 2.0], [2, 1]))[1] is None
    assert paired_difference(_score([1.0], [3]), _score([2.0], [3])) == (pytest.approx(-1 / 3), None)


def test_a_difference_counts_only_beyond_twice_its_standard_error():
    tokens = [100] * 10
    base = _score([30.0] * 10, tokens)
    noisy = _score([29.0, 31.0] * 5, tokens)  # mean equal, spread over texts
    v = compare_with_baseline(noisy, base)
    assert v["outcome"] == "within noise" and not v["beats_baseline"]
    better = compare_with_baseline(_score([29.0, 28.8] * 5, tokens), base)
    assert better["outcome"] == "better" and better["beats_baseline"]
    assert better["delta"] == pytest.approx(-0.011) and better["se"] < 0.011 / 2
    worse = compare_with_baseline(_score([31.0, 31.2] * 5, tokens), base)
    assert worse["outcome"] == "worse" and not worse["beats_baseline"]
    small = compare_with_baseline(_score([29.9, 30.05] * 5, tokens), base)  # negative, inside 2 se
    assert small["delta"] < 0 and small["outcome"] == "within noise"
    line = verdict_line({"chat": small, "code": better}, "pivot-sft")
    assert line.startswith("**Verdict: fused beats SFT on code**")
    assert f"within noise on chat ({small['delta']:+.4f} ± {small['se']:.4f} NLL/token" in line
    assert "twice that" in line


def test_verdict_says_why_there_is_no_comparison():
    assert "baseline: false" in verdict_line({}, None)
    assert "no held-out data" in verdict_line({}, "pivot-sft")
