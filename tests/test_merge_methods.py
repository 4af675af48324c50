"""Each merge method against its formula, including the limits (one model, identical models, τ = 1,
density 1, all deltas zero, t = 0 and 1, colinear vectors, gamma 0), on small tensors."""

from __future__ import annotations

import pytest
import torch

from fuselab.merge import run_merge
from fuselab.merge.engine import validate_parameters
from fuselab.merge.methods.breadcrumbs import breadcrumbs, breadcrumbs_ties
from fuselab.merge.methods.dare import dare_linear, dare_ties
from fuselab.merge.methods.della import check_epsilon, della, della_linear, keep_probabilities, magprune_mask
from fuselab.merge.methods.linear import linear
from fuselab.merge.methods.masks import magnitude_band_mask, magnitude_mask, majority_sign, topk_mask
from fuselab.merge.methods.model_stock import model_stock
from fuselab.merge.methods.multislerp import multislerp
from fuselab.merge.methods.passthrough import passthrough
from fuselab.merge.methods.sce import sce
from fuselab.merge.methods.slerp import nuslerp, slerp
from fuselab.merge.methods.task_arithmetic import task_arithmetic
from fuselab.merge.methods.ties import ties
from fuselab.merge.methods.varm import varm
from fuselab.merge.recipe import MergeRecipe
from fuselab.merge.registry import MERGEKIT_ONLY, get_merge_method, merge_method_names
from fuselab.utils.errors import ConfigError
from helpers.merge_formulas import (
    band_keep,
    magprune_probabilities,
    ref_breadcrumbs,
    ref_linear,
    ref_model_stock,
    ref_multislerp,
    ref_nuslerp,
    ref_sce,
    ref_slerp,
    ref_task_arithmetic,
    ref_ties,
    ref_varm_element,
    ref_varm_matrix,
    topk_keep,
)

# mergekit 0.1.5's registry (mergekit/merge_methods/registry.py), every name a mergekit recipe can use.
MERGEKIT_METHODS = [
    "arcee_fusion",
    "breadcrumbs",
    "breadcrumbs_ties",
    "dare_linear",
    "dare_ties",
    "della",
    "della_linear",
    "karcher",
    "linear",
    "model_stock",
    "multislerp",
    "nearswap",
    "nuslerp",
    "passthrough",
    "ram",
    "ramplus_tl",
    "sce",
    "slerp",
    "task_arithmetic",
    "ties",
]


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
    assert merge_method_names() == sorted([*(set(MERGEKIT_METHODS) - set(MERGEKIT_ONLY)), "varm"])
    with pytest.raises(
        ConfigError, match=r"unknown merge method 'slerpy'; valid methods: breadcrumbs, .*varm"
    ):
        get_merge_method("slerpy")


# Each mergekit method's parameters (mergekit 0.1.5: `spec.parameters` of every registered method), and the
# ones mergekit accepts but never uses for that method (task_arithmetic sparsifies nothing and elects no sign,
# dare_linear elects no sign), which fuselab accepts with a warning instead of implementing.
MERGEKIT_PARAMETERS = {
    "breadcrumbs": ["int8_mask", "normalize", "rescale", "lambda", "weight", "density", "gamma"],
    "breadcrumbs_ties": ["int8_mask", "normalize", "rescale", "lambda", "weight", "density", "gamma"],
    "dare_linear": ["int8_mask", "normalize", "rescale", "lambda", "weight", "density"],
    "dare_ties": ["int8_mask", "normalize", "rescale", "lambda", "weight", "density"],
    "della": ["int8_mask", "normalize", "rescale", "lambda", "weight", "density", "epsilon"],
    "della_linear": ["int8_mask", "normalize", "rescale", "lambda", "weight", "density", "epsilon"],
    "linear": ["weight", "normalize"],
    "model_stock": ["filter_wise"],
    "multislerp": ["weight", "normalize_weights", "eps"],
    "nuslerp": ["weight", "nuslerp_row_wise", "nuslerp_flatten"],
    "passthrough": ["scale"],
    "sce": ["int8_mask", "select_topk"],
    "slerp": ["t"],
    "task_arithmetic": ["int8_mask", "normalize", "rescale", "lambda", "weight", "density"],
    "ties": ["int8_mask", "normalize", "rescale", "lambda", "weight", "density"],
}
UNUSED_BY_MERGEKIT = {"task_arithmetic": {"int8_mask", "rescale", "density"}, "dare_linear": {"int8_mask"}}
MERGEKIT_VALUES = {
    "int8_mask": False,
    "normalize": True,
    "rescale": True,
    "lambda": 0.9,
    "weight": 0.5,
    "density": 0.5,
    "gamma": 0.01,
    "epsilon": 0.1,
    "filter_wise": True,
    "normalize_weights": True,
    "eps": 1e-8,
    "nuslerp_row_wise": True,
    "nuslerp_flatten": False,
    "scale": 0.5,
    "select_topk": 0.1,
    "t": [0.0, 1.0],
}


def mergekit_recipe(name: str, parameters: dict | None = None) -> MergeRecipe:
    count = {"slerp": 1, "nuslerp": 2, "passthrough": 1}.get(name, 3)
    return MergeRecipe.model_validate(
        {
            "merge_method": name,
            "base_model": "base",
            "models": [{"model": f"m{i}"} for i in range(count)],
            "parameters": parameters,
        }
    )


@pytest.mark.parametrize("name", MERGEKIT_METHODS)
def test_every_mergekit_method_is_supported_or_refused_with_an_alternative(name, tmp_path, monkeypatch):
    if name not in MERGEKIT_ONLY:
        method = get_merge_method(name)
        assert method.reference.startswith("https://")  # registered, with a source to cite
        ours = {p.name for p in method.params}
        assert set(MERGEKIT_PARAMETERS[name]) - ours == UNUSED_BY_MERGEKIT.get(name, set())
        # every mergekit parameter of the method, at the top level as mergekit allows, passes validation
        params = {p: MERGEKIT_VALUES[p] for p in MERGEKIT_PARAMETERS[name]}
        recipe = mergekit_recipe(name, params)
        validate_parameters(method, recipe, list(range(len(recipe.models))))
        return
    import fuselab.modeling.resolve as resolve_module

    def no_resolution(*args, **kwargs):
        raise AssertionError("a model was resolved before the method was refused")

    monkeypatch.setattr(resolve_module, "resolve_model", no_resolution)
    with pytest.raises(ConfigError) as err:  # a whole recipe is refused before any model is opened
        run_merge(mergekit_recipe(name), tmp_path / "out", show_progress=False)
    msg = str(err.value)
    assert f"merge_method `{name}`" in msg and "does not implement" in msg  # names the key and its value
    alternative = msg.split("use `")[1].split("`")[0]
    assert alternative in merge_method_names()  # the suggested method exists
    assert not (tmp_path / "out").exists()


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


# -- SLERP, NuSLERP, Multi-SLERP ---------------------------------------------------------------------------


def test_slerp_formula_and_limits(models):
    base, ws = models
    far = torch.randn(12, 9, generator=torch.Generator().manual_seed(5))
    for other in (ws[0], far):
        for t in (0.25, 0.5, 0.9):
            close(slerp([other], base=base, t=t), ref_slerp(base, other, t), tol=1e-5)
        assert torch.equal(slerp([other], base=base, t=0.0), base)  # t = 0: the base, exactly
        assert torch.equal(slerp([other], base=base, t=1.0), other)  # t = 1: the other model, exactly
    # colinear (cos = 1, and antipodal cos = −1): linear interpolation, no 0/0
    close(slerp([3 * base], base=base, t=0.5), 2 * base)
    close(slerp([-base], base=base, t=0.25), 0.5 * base)
    close(slerp([base], base=base, t=0.7), base)  # identical models
    # slerp keeps the norm between two equal-norm vectors; linear interpolation shrinks it
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    close(slerp([b], base=a, t=0.5), torch.tensor([0.5**0.5, 0.5**0.5]))
    # a zero vector: its norm counts as 1, so cos = 0 and the coefficients are cos / sin of t·90°
    close(slerp([b], base=torch.zeros(2), t=1 / 3), torch.tensor([0.0, 0.5]))


@pytest.mark.parametrize(("row_wise", "flatten"), [(False, True), (False, False), (True, False)])
def test_nuslerp_against_reference(models, row_wise, flatten):
    base, ws = models
    d0, d1 = ws[0] - base, ws[1] - base
    got = nuslerp([d0, d1], weight=[1.0, 3.0], nuslerp_row_wise=row_wise, nuslerp_flatten=flatten)
    close(got, ref_nuslerp(d0, d1, 0.75, row_wise, flatten), tol=1e-5)
    # t from the weights: all weight on one model gives it back
    close(nuslerp([d0, d1], weight=[0.0, 2.0], nuslerp_flatten=flatten, nuslerp_row_wise=row_wise), d1)
    close(nuslerp([d0, d1], weight=[2.0, 0.0], nuslerp_flatten=flatten, nuslerp_row_wise=row_wise), d0)
    # weights summing to ~0: t = 1/2; colinear vectors: the linear interpolation
    close(nuslerp([d0, 2 * d0], weight=[1.0, -1.0]), 1.5 * d0)


def test_multislerp_against_reference_and_limits(models):
    base, ws = models
    d = deltas_of(base, ws)
    for xs in (ws, d):
        close(multislerp(xs, weight=[0.2, 0.3, 0.5]), ref_multislerp(xs, [0.2, 0.3, 0.5]), tol=1e-5)
    close(multislerp(d[:1], weight=[0.3]), d[0])  # one model: itself
    close(multislerp([d[0]] * 3, weight=[1, 2, 3]), d[0], tol=1e-5)  # identical models
    close(
        multislerp([d[0], 2 * d[0]], weight=[1, 1]), 1.5 * d[0], tol=1e-5
    )  # colinear: mean norm, same direction
    # two antipodal vectors with balancing weights fall back to the weighted sum; three are an error
    close(multislerp([d[0], -d[0]], weight=[1, 1]), torch.zeros_like(d[0]))
    with pytest.raises(ConfigError, match="cancel out"):
        multislerp([d[0], -d[0], d[0], -d[0]], weight=[1, 1, 1, 1])
    with pytest.raises(ConfigError, match="sum to zero"):
        multislerp(d[:2], weight=[1, -1])


# -- Model Stock -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_against_reference(models, filter_wise):
    base, ws = models
    got = base + model_stock(deltas_of(base, ws), filter_wise=filter_wise)
    close(got, ref_model_stock(base, ws, filter_wise), tol=1e-5)
    b1, w1 = base[0], [w[0] for w in ws]  # a 1-D tensor is one vector either way
    close(b1 + model_stock([w - b1 for w in w1], filter_wise=filter_wise), ref_model_stock(b1, w1), tol=1e-5)


def test_model_stock_limits(models):
    base, ws = models
    d = deltas_of(base, ws)
    close(model_stock([d[0], d[0]]), d[0])  # identical: cos 1, t 1, the fine-tune itself
    close(model_stock([d[0], 3 * d[0]]), 2 * d[0])  # colinear: t = 1, their average
    a = torch.zeros(4, 4)
    a[0, 0] = 1.0
    b = torch.zeros(4, 4)
    b[1, 1] = 1.0
    assert torch.equal(model_stock([a, b]), torch.zeros(4, 4))  # orthogonal: t = 0, the base
    zero = [torch.zeros_like(base)] * 2
    assert torch.equal(model_stock(zero), torch.zeros_like(base))
    # N = 2 with cos 1/2: t = 2·(1/2)/(1 + 1/2) = 2/3 of the average
    u, v = torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.75**0.5])
    close(model_stock([u, v]), (2 / 3) * (u + v) / 2)


# -- Model Breadcrumbs ----------------------------------------------------------------------------------------------


def test_breadcrumb_band_mask_matches_sorting_with_ties():
    g = torch.Generator().manual_seed(2)
    x = torch.randint(-6, 7, (30, 7), generator=g).float()  # many ties
    for skip, keep in ((0, 50), (10, 100), (20, 0), (0, 210), (205, 40), (3, 1)):
        order = torch.sort(-x.abs().reshape(-1), stable=True).indices
        want = torch.zeros(x.numel(), dtype=torch.bool)
        want[order[skip : skip + keep]] = True
        assert torch.equal(magnitude_band_mask(x, skip, keep), want.reshape(x.shape)), (skip, keep)


def test_breadcrumbs_against_reference(models):
    base, ws = models
    d = deltas_of(base, ws)
    kw = dict(weight=[0.5, 1.0, 0.7], density=[0.6, 0.5, 0.9], gamma=[0.05, 0.1, 0.0])
    close(base + breadcrumbs(d, **kw), ref_breadcrumbs(base, ws, kw["weight"], kw["density"], kw["gamma"]))
    close(
        base + breadcrumbs(d, **kw, normalize=True, lambda_=0.5),
        ref_breadcrumbs(base, ws, kw["weight"], kw["density"], kw["gamma"], normalize=True, lam=0.5),
    )
    close(
        base + breadcrumbs_ties(d, **kw, normalize=True),
        ref_breadcrumbs(base, ws, kw["weight"], kw["density"], kw["gamma"], ties=True, normalize=True),
    )


def test_breadcrumbs_limits(models):
    base, ws = models
    d = deltas_of(base, ws)
    # gamma 0 is TIES' trim; density 1 keeps everything whatever gamma (as mergekit)
    close(
        breadcrumbs_ties(d, weight=[1, 1, 1], density=[0.4] * 3, gamma=[0.0] * 3, normalize=True),
        ties(d, weight=[1, 1, 1], density=[0.4] * 3),
    )
    close(
        breadcrumbs(d, weight=[1, 1, 1], density=[1] * 3, gamma=[0.5] * 3),
        task_arithmetic(d, weight=[1, 1, 1]),
    )
    # the kept band: of 10 entries keep 5 after dropping the largest 2 (gamma 0.2)
    x = torch.arange(1.0, 11.0)
    out = breadcrumbs([x], weight=[1.0], density=[0.5], gamma=[0.2])
    assert out.tolist() == [0, 0, 0, 4, 5, 6, 7, 8, 0, 0]
    assert torch.equal(out != 0, band_keep(x, 0.5, 0.2))
    # gamma larger than what is left to drop: the `density` smallest entries remain (mergekit's rule)
    out = breadcrumbs([x], weight=[1.0], density=[0.5], gamma=[0.9])
    assert out.tolist() == [1, 2, 3, 4, 5, 0, 0, 0, 0, 0]
    # rescale: the kept entries carry the L1 norm of the whole delta (55 / 30)
    close(breadcrumbs([x], weight=[1.0], density=[0.5], gamma=[0.2], rescale=True).sum(), torch.tensor(55.0))
    close(
        breadcrumbs([d[0]] * 2, weight=[1, 1], density=[0.5] * 2, gamma=[0.1] * 2, normalize=True),
        d[0] * band_keep(d[0], 0.5, 0.1),
    )


# -- DELLA -------------------------------------------------------------------------------------------------------


def test_della_probabilities_follow_the_magnitude_rank():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 11, generator=g)
    x[1, 3] = x[1, 4]  # a tie: the lower index ranks lower
    got = keep_probabilities(x.abs(), 0.5, 0.2)
    close(got, magprune_probabilities(x, 0.5, 0.2).float())
    assert got.min() == pytest.approx(0.3) and got.max() == pytest.approx(0.7)
    close(got.mean(1), torch.full((5,), 0.5))  # the mean keep rate of every row is the density
    assert keep_probabilities(torch.ones(4, 1), 0.4, 0.1).eq(0.4).all()  # one entry per row: the density


def test_della_keeps_large_entries_more_often_and_is_seeded():
    row = torch.linspace(0.01, 1.0, 100)
    d = row.repeat(4000, 1)  # every row the same: 4000 draws per rank

    def mask(seed):
        return magprune_mask(d, 0.5, 0.3, torch.Generator().manual_seed(seed))

    a, b, c = mask(7), mask(7), mask(8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    rate = a.float().mean(0)
    want = torch.linspace(0.2, 0.8, 100)
    assert (rate - want).abs().max() < 0.03  # 4000 draws: 3σ of a rate ≈ 0.024
    # along the second axis for >2-D tensors (mergekit's dim 1); a 1-D tensor is one row
    cube = torch.arange(1.0, 25.0).reshape(2, 3, 4)
    probs = magprune_probabilities(cube.movedim(1, -1).reshape(-1, 3), 0.5, 0.2)
    m = torch.stack(
        [magprune_mask(cube, 0.5, 0.2, torch.Generator().manual_seed(s)) for s in range(3000)]
    ).float()
    close(m.mean(0), probs.reshape(2, 4, 3).movedim(-1, 1).float(), tol=0.04)


def test_della_merge_formula_and_limits(models):
    base, ws = models
    d = deltas_of(base, ws)
    kw = dict(weight=[0.5, 1.0, 0.7], density=[0.5, 0.6, 0.4], epsilon=[0.1, 0.2, 0.3])
    out = della_linear(d, **kw, generator=torch.Generator().manual_seed(0))
    # the same draws, recomputed: masks in model order from one generator, L1 rescale, weighted sum
    g = torch.Generator().manual_seed(0)
    want = torch.zeros_like(base)
    for dk, w, p, e in zip(d, kw["weight"], kw["density"], kw["epsilon"]):
        m = magprune_mask(dk, p, e, g)
        kept = dk * m
        want += w * kept * (dk.abs().sum() / kept.abs().sum())
    close(out, want, tol=1e-5)
    # density 1: no pruning (della is TIES without trim, della_linear task arithmetic)
    close(
        della(d, weight=[1, 1, 1], density=[1] * 3, epsilon=[0.15] * 3),
        ties(d, weight=[1, 1, 1], density=[1] * 3),
    )
    close(
        della_linear(d, weight=[0.2] * 3, density=[1] * 3, epsilon=[0.1] * 3),
        task_arithmetic(d, weight=[0.2] * 3),
    )
    # epsilon 0: every entry kept with probability density, like DARE (with mergekit's L1 rescale)
    u = della_linear(
        [torch.ones(200, 50)],
        weight=[1.0],
        density=[0.3],
        epsilon=[0.0],
        rescale=False,
        generator=torch.Generator().manual_seed(1),
    )
    assert abs(float((u != 0).float().mean()) - 0.3) < 0.02
    assert torch.equal(
        della_linear([d[0]], weight=[1.0], density=[0.0], epsilon=[0.0]), torch.zeros_like(base)
    )


def test_della_epsilon_must_keep_probabilities_inside_0_1():
    ok = {"density": [0.5, 1.0], "epsilon": [0.4, 0.9]}  # density 1 does not prune, any epsilon is fine
    assert check_epsilon(ok, ["a", "b"]) is None
    msg = check_epsilon({"density": [0.5, 0.8], "epsilon": [0.1, 0.2]}, ["a", "b"])
    assert msg is not None and msg.startswith("b:") and "below 0.2" in msg


# -- passthrough ---------------------------------------------------------------------------------------------------


def test_passthrough(models):
    _, ws = models
    assert passthrough([ws[0]], scale=[None]) is ws[0]  # no copy
    close(passthrough([ws[0]], scale=[0.5]), 0.5 * ws[0])
    assert torch.equal(passthrough([ws[0]], scale=[0.0]), torch.zeros_like(ws[0]))
