"""Each merge method against its formula, including the limits (one model, identical models, τ = 1,
density 1, all deltas zero), on small tensors."""

from __future__ import annotations

import pytest
import torch

from fuselab.merge.methods.dare import dare_linear, dare_ties
from fuselab.merge.methods.linear import linear
from fuselab.merge.methods.masks import magnitude_mask, majority_sign, topk_mask
from fuselab.merge.methods.sce import sce
from fuselab.merge.methods.task_arithmetic import task_arithmetic
from fuselab.merge.methods.ties import ties
from fuselab.merge.methods.varm import varm
from fuselab.merge.registry import get_merge_method, merge_method_names
from fuselab.utils.errors import ConfigError
from helpers.merge_formulas import (
    ref_linear,
    ref_sce,
    ref_task_arithmetic,
    ref_ties,
    ref_varm_element,
    ref_varm_matrix,
    topk_keep,
)


def close(a, b, tol=1e-6):
    torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)


@pytest.fixture
def models():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(12, 9, generator=g)
    ws = [base + 0.1 * torch.randn(12, 9, generator=g) for _ in range(3)]
    return base, ws


def deltas_of(base, ws):
    return [w - base for w in ws]


# -- registry ---------------------------------------------------------------------------------------------


def test_registry_lists_methods_and_refuses_unknown():
    assert merge_method_names() == [
        "dare_linear",
        "dare_ties",
        "linear",
        "sce",
        "task_arithmetic",
        "ties",
        "varm",
    ]
    with pytest.raises(
        ConfigError, match=r"unknown merge method 'slerp'; valid methods: dare_linear, .*varm"
    ):
        get_merge_method("slerp")


# -- masks --------------------------------------------------------------------------------------------------


def test_magnitude_mask_matches_sorting_with_ties():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-5, 6, (40, 7), generator=g).float()  # many ties
    for density in (0.0, 0.1, 0.33, 0.5, 0.9, 1.0):
        k = x.numel() if density >= 1 else (0 if density <= 0 else max(1, int(density * x.numel())))
        want = topk_keep(x.abs(), k) if k else torch.zeros_like(x, dtype=torch.bool)
        assert torch.equal(magnitude_mask(x, density), want), density


def test_topk_mask_edges():
    x = torch.tensor([3.0, 1.0, 3.0, 2.0])
    assert topk_mask(x, 0).sum() == 0
    assert topk_mask(x, 9).all()
    assert topk_mask(x, 1).tolist() == [True, False, False, False]  # tie: lower index wins


def test_majority_sign_sum_versus_count():
    d = [torch.tensor([1.0, -0.1]), torch.tensor([-0.2, -0.1]), torch.tensor([-0.2, 5.0])]
    assert majority_sign(d, "sum").tolist() == [True, True]  # sums 0.6 and 4.8
    assert majority_sign(d, "count").tolist() == [False, False]  # votes 1 vs 2
    assert majority_sign(d, "sum", weights=[1.0, 1.0, -1.0]).tolist() == [True, False]  # 1.0 and -5.2


# -- linear and task arithmetic ------------------------------------------------------------------------------


def test_linear_formula(models):
    _, ws = models
    close(linear(ws, weight=[0.2, 0.3, 0.5]), ref_linear(ws, [0.2, 0.3, 0.5]))
    close(linear(ws, weight=[1, 2, 3], normalize=False), ref_linear(ws, [1, 2, 3], normalize=False))
    close(linear(ws[:1], weight=[0.7]), ws[0])  # one model
    close(linear([ws[0]] * 3, weight=[1, 1, 1]), ws[0])  # identical models
    with pytest.raises(ConfigError, match="sum to zero"):
        linear(ws[:2], weight=[1, -1])


def test_task_arithmetic_formula(models):
    base, ws = models
    d = deltas_of(base, ws)
    close(base + task_arithmetic(d, weight=[0.3, 0.3, 0.3]), ref_task_arithmetic(base, ws, [0.3] * 3))
    close(
        base + task_arithmetic(d, weight=[1, 2, 1], normalize=True, lambda_=0.5),
        ref_task_arithmetic(base, ws, [1, 2, 1], normalize=True, lam=0.5),
    )
    zero = [torch.zeros_like(base)] * 3
    assert torch.equal(task_arithmetic(zero, weight=[1, 1, 1]), torch.zeros_like(base))


# -- TIES ----------------------------------------------------------------------------------------------------


def test_ties_hand_computed():
    d1 = torch.tensor([0.5, -0.2, 0.1, 0.0])
    d2 = torch.tensor([-0.1, -0.3, 0.4, 0.2])
    # trim to 2 entries each: d1 -> [0.5, -0.2, 0, 0], d2 -> [0, -0.3, 0.4, 0]
    # elected signs from the sum [0.5, -0.5, 0.4, 0]: [+, -, +, +]; agreeing weights [1, 2, 1, 0 -> 1]
    out = ties([d1, d2], weight=[1.0, 1.0], density=[0.5, 0.5])
    close(out, torch.tensor([0.5, -0.25, 0.4, 0.0]))


def test_ties_against_reference(models):
    base, ws = models
    for dens, weights, norm in (
        ([0.6, 0.6, 0.6], [0.2, 0.2, 0.2], True),
        ([0.3, 0.9, 0.5], [1.0, 0.5, 2.0], False),
    ):
        got = base + ties(deltas_of(base, ws), weight=weights, density=dens, normalize=norm, lambda_=0.8)
        close(got, ref_ties(base, ws, weights, dens, normalize=norm, lam=0.8))


def test_ties_rescale_restores_l1_norm():
    d = torch.tensor([4.0, -1.0, 0.5, 0.5])
    # keep half: [4, -1, 0, 0] (L1 5 of 6) -> scaled by 6/5
    close(ties([d], weight=[1.0], density=[0.5], rescale=True), torch.tensor([4.8, -1.2, 0.0, 0.0]))


def test_ties_limits(models):
    base, ws = models
    d = deltas_of(base, ws)
    # density 1 and identical models: the normalised merge gives the (shared) delta back
    close(ties([d[0]] * 3, weight=[1, 1, 1], density=[1, 1, 1]), d[0])
    # one model, density 1: the delta itself
    close(ties(d[:1], weight=[0.4], density=[1.0]), d[0])
    zero = [torch.zeros_like(base)] * 2
    assert torch.equal(ties(zero, weight=[1, 1], density=[0.5, 0.5]), torch.zeros_like(base))


# -- DARE ----------------------------------------------------------------------------------------------------


def test_dare_density_one_is_task_arithmetic(models):
    base, ws = models
    d = deltas_of(base, ws)
    close(
        dare_linear(d, weight=[0.5, 0.3, 0.2], density=[1, 1, 1]),
        task_arithmetic(d, weight=[0.5, 0.3, 0.2]),
    )
    close(
        dare_ties(d, weight=[1, 1, 1], density=[1, 1, 1], normalize=True),
        ties(d, weight=[1, 1, 1], density=[1, 1, 1]),
    )


def test_dare_is_seeded_and_unbiased():
    d = torch.full((400, 250), 0.01)

    def run(seed):
        return dare_linear([d], weight=[1.0], density=[0.3], generator=torch.Generator().manual_seed(seed))

    a, b, c = run(7), run(7), run(8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    kept = (a != 0).float().mean().item()
    assert abs(kept - 0.3) < 0.01
    close(a[a != 0], torch.full_like(a[a != 0], 0.01 / 0.3))  # rescaled by 1/density
    assert abs(a.mean().item() - 0.01) < 0.0005  # unbiased in expectation
    no_rescale = dare_linear(
        [d], weight=[1.0], density=[0.3], rescale=False, generator=torch.Generator().manual_seed(7)
    )
    close(no_rescale[no_rescale != 0], torch.full_like(no_rescale[no_rescale != 0], 0.01))


# -- SCE -----------------------------------------------------------------------------------------------------


def test_sce_hand_computed():
    d1 = torch.tensor([1.0, 0.0, -2.0, 0.5])
    d2 = torch.tensor([1.0, 2.0, 2.0, 0.5])
    # variances [0, 1, 4, 0]; two non-zero; τ = 0.5 keeps one entry: index 2
    # deltas mode: masked d1 = [0,0,-2,0], d2 = [0,0,2,0]; energies equal -> η = 1/2 each;
    # sum at index 2 is 0 -> elected +, so only d2 agrees -> merged [0, 0, 2, 0]
    close(sce([d1, d2], select_topk=0.5), torch.tensor([0.0, 0.0, 2.0, 0.0]))
    # weights mode: η from the masked deltas (1/2 each); election on full deltas: sums [2, 2, 0, 1] -> all +
    # index 0: both agree -> 1; index 1: only d2 (d1 is 0) -> 2; index 2: only d2 -> 2; index 3: both -> 0.5
    close(sce([d1, d2], select_topk=0.5, select_applies_to="weights"), torch.tensor([1.0, 2.0, 2.0, 0.5]))


@pytest.mark.parametrize("tau", [1.0, 0.5, 0.1])
@pytest.mark.parametrize("mode", ["deltas", "weights"])
def test_sce_against_reference(models, tau, mode):
    base, ws = models
    got = base + sce(deltas_of(base, ws), select_topk=tau, select_applies_to=mode)
    close(got, ref_sce(base, ws, tau, mode), tol=1e-5)


def test_sce_limits(models):
    base, ws = models
    d = deltas_of(base, ws)
    # identical models: the variance is zero everywhere, so τ < 1 selects nothing (deltas mode -> base)
    assert torch.equal(sce([d[0]] * 3, select_topk=0.1), torch.zeros_like(base))
    close(sce([d[0]] * 3, select_topk=0.1, select_applies_to="weights"), d[0])
    close(sce([d[0]] * 3, select_topk=1.0), d[0])
    close(sce(d[:1], select_topk=1.0), d[0])  # one model
    zero = [torch.zeros_like(base)] * 3
    assert torch.equal(sce(zero, select_topk=0.3), torch.zeros_like(base))
    assert torch.equal(sce(d, select_topk=0.0), torch.zeros_like(base))


# -- VaRM ----------------------------------------------------------------------------------------------------


def test_varm_matrix_and_element(models):
    base, ws = models
    d = deltas_of(base, ws)
    close(base + varm(d), ref_varm_matrix(base, ws), tol=1e-5)
    close(base + varm(d, granularity="element"), ref_varm_element(base, ws), tol=1e-5)


def test_varm_weights_follow_variation():
    # target 1 changed this matrix three times as much (in mean square) as target 2
    d1 = torch.full((4, 4), 3.0**0.5)
    d2 = torch.full((4, 4), 1.0)
    close(varm([d1, d2]), 0.75 * d1 + 0.25 * d2)


def test_varm_limits(models):
    base, ws = models
    d = deltas_of(base, ws)
    for gran in ("matrix", "element"):
        close(varm([d[0]] * 3, granularity=gran), d[0])
        close(varm(d[:1], granularity=gran), d[0])
        zero = [torch.zeros_like(base)] * 2
        assert torch.equal(varm(zero, granularity=gran), torch.zeros_like(base))
    stat = torch.tensor([3.0, 1.0, 4.0], dtype=torch.float64)  # Σδ² per target and the element count
    close(varm(d[:2], granularity="layer", group_stat=stat), 0.75 * d[0] + 0.25 * d[1])
    with pytest.raises(ValueError, match="group_stat"):
        varm(d, granularity="layer")
