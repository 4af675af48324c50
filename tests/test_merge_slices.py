"""mergekit's ``slices``: layer stacking with passthrough (frankenmerges), per-slice merges with gradients over
each slice's layers, the output config's layer count, and the errors of bad slice recipes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from fuselab.merge import run_merge
from fuselab.utils.errors import ConfigError, IncompatibleModelsError
from helpers.merge_formulas import ref_linear, ref_slerp
from helpers.merge_models import make_family, state
from helpers.models import perturbed, random_model, save_model, tiny_qwen2_config

INPUT_IDS = torch.tensor([[1, 5, 17, 42, 99, 250, 3, 7]])
LAYER = "model.layers.{}."


@pytest.fixture(scope="module")
def deep(tmp_path_factory) -> dict[str, Path]:
    """A 4-layer tiny Llama base and two fine-tunes."""
    return make_family(tmp_path_factory.mktemp("deep"), fine_tunes=2, layers=4)


def src(path: Path, first: int, end: int, **params) -> dict:
    return {"model": str(path), "layer_range": [first, end], **({"parameters": params} if params else {})}


def layer_map(sd: dict[str, torch.Tensor], layer: int) -> dict[str, torch.Tensor]:
    prefix = LAYER.format(layer)
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def test_passthrough_stacks_layers_of_two_models(deep, tmp_path):
    recipe = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [src(deep["ft0"], 0, 3)]},
            {"sources": [src(deep["ft1"], 1, 4, scale=[{"filter": "o_proj", "value": 0.0}, {"value": 1.0}])]},
        ],
        "dtype": "float32",
    }
    out = tmp_path / "franken"
    result = run_merge(recipe, out, show_progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 6
    got, a, b = state(out), state(deep["ft0"]), state(deep["ft1"])
    per_layer = len(layer_map(a, 0))
    assert result.num_tensors == 6 * per_layer + 2  # six layers, the embedding and the final norm
    for o, (sd, i) in enumerate([(a, 0), (a, 1), (a, 2), (b, 1), (b, 2), (b, 3)]):
        for suffix, want in layer_map(sd, i).items():
            if o >= 3 and "o_proj" in suffix:
                want = torch.zeros_like(want)  # scaled by 0 through the filtered parameter
            assert torch.equal(got[LAYER.format(o) + suffix], want), (o, suffix)
    assert torch.equal(got["model.embed_tokens.weight"], a["model.embed_tokens.weight"])  # first slice
    assert torch.equal(got["model.norm.weight"], b["model.norm.weight"])  # last slice
    # the stacked model loads with stock transformers and runs
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert len(model.model.layers) == 6
    with torch.no_grad():
        assert torch.isfinite(model(INPUT_IDS).logits).all()


def test_slerp_over_slices_with_a_filtered_gradient(deep, tmp_path):
    """The most common SLERP recipe: both models over the same layers, `t` a gradient for attention."""
    t = [{"filter": "self_attn", "value": [0.0, 1.0]}, {"value": 0.5}]
    recipe = {
        "merge_method": "slerp",
        "base_model": str(deep["base"]),
        "slices": [{"sources": [src(deep["base"], 0, 4), src(deep["ft0"], 0, 4)]}],
        "parameters": {"t": t},
    }
    run_merge(recipe, tmp_path / "s", show_progress=False)
    got, base, ft = state(tmp_path / "s"), state(deep["base"]), state(deep["ft0"])
    for k, v in got.items():
        i = int(k.split(".")[2]) if k.startswith("model.layers.") else None
        tk = i / 3 if (i is not None and "self_attn" in k) else 0.5
        torch.testing.assert_close(v, ref_slerp(base[k], ft[k], tk), rtol=1e-5, atol=1e-6, msg=k)
    # one slice over every layer is the `models:` recipe
    whole = {**recipe, "models": [{"model": str(deep["base"])}, {"model": str(deep["ft0"])}]}
    del whole["slices"]
    run_merge(whole, tmp_path / "w", show_progress=False)
    other = state(tmp_path / "w")
    assert all(torch.equal(got[k], other[k]) for k in got)


def test_linear_slices_of_different_layer_ranges_and_per_source_parameters(deep, tmp_path):
    recipe = {
        "merge_method": "linear",
        "slices": [
            {"sources": [src(deep["ft0"], 0, 2, weight=1.0), src(deep["ft1"], 2, 4, weight=3.0)]},
            {"sources": [src(deep["ft0"], 3, 4), src(deep["ft1"], 0, 1)], "parameters": {"weight": 1.0}},
        ],
    }
    run_merge(recipe, tmp_path / "m", show_progress=False)
    got, a, b = state(tmp_path / "m"), state(deep["ft0"]), state(deep["ft1"])
    assert json.loads((tmp_path / "m" / "config.json").read_text())["num_hidden_layers"] == 3
    for o, (i, j, w) in enumerate([(0, 2, [1.0, 3.0]), (1, 3, [1.0, 3.0]), (3, 0, [1.0, 1.0])]):
        for suffix, x in layer_map(a, i).items():
            want = ref_linear([x, layer_map(b, j)[suffix]], w)
            torch.testing.assert_close(got[LAYER.format(o) + suffix], want, msg=(o, suffix))
    k = "model.embed_tokens.weight"
    torch.testing.assert_close(got[k], ref_linear([a[k], b[k]], [1.0, 3.0]))  # the first slice's parameters


def test_per_layer_config_lists_follow_the_layers(tmp_path):
    cfg = tiny_qwen2_config(layers=3)
    cfg.layer_types = ["sliding_attention", "full_attention", "full_attention"]
    base = random_model(cfg, seed=1)
    save_model(base, tmp_path / "a")
    save_model(perturbed(base, seed=2), tmp_path / "b")
    recipe = {
        "merge_method": "passthrough",
        "slices": [{"sources": [src(tmp_path / "a", 0, 2)]}, {"sources": [src(tmp_path / "b", 0, 3)]}],
    }
    run_merge(recipe, tmp_path / "out", show_progress=False)
    out = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out["num_hidden_layers"] == 5
    assert out["layer_types"] == ["sliding_attention", "full_attention", *cfg.layer_types]
    assert AutoConfig.from_pretrained(tmp_path / "out").num_hidden_layers == 5


@pytest.mark.parametrize(
    ("slices", "extra", "error", "message"),
    [
        ([{"sources": ["ft0:0:9"]}], {}, ConfigError, r"layer_range \[0, 9\) goes past the 4 layers"),
        (
            [{"sources": ["ft0:0:2", "ft1:0:2"]}],
            {},
            ConfigError,
            "passthrough merges exactly 1 model.*got 2.*one source",
        ),
        (
            [{"sources": ["ft0:0:2", "ft1:0:3"]}],
            {},
            ConfigError,
            "every source of a slice needs the same number of layers",
        ),
        ([{"sources": ["ft0:2:2"]}], {}, ConfigError, r"layer_range \[2, 2\] must be \[first, end\)"),
        ([{"sources": ["ft0:0:2"], "residual_weight": 0.5}], {}, ConfigError, "never used by mergekit"),
        (
            [{"sources": ["ft0:0:2", "ft1:0:2"]}],
            {"merge_method": "slerp", "base_model": "base", "parameters": {"t": 0.5}},
            ConfigError,
            "slerp needs the base model .* among the slice's sources",
        ),
        (
            [{"sources": ["ft0:0:2"], "parameters": {"scael": 1.0}}],
            {},
            ConfigError,
            r"slices\[0\].parameters: unknown parameter `scael` for passthrough",
        ),
    ],
)
def test_bad_slices(deep, tmp_path, slices, extra, error, message):
    def source(spec: str) -> dict:
        name, first, end = spec.split(":")
        return src(deep[name], int(first), int(end))

    recipe = {"merge_method": "passthrough", **extra}
    if "base_model" in recipe:
        recipe["base_model"] = str(deep[recipe["base_model"]])
    recipe["slices"] = [{**sl, "sources": [source(s) for s in sl["sources"]]} for sl in slices]
    with pytest.raises(error, match=message):
        run_merge(recipe, tmp_path / "o", show_progress=False)
    assert not (tmp_path / "o").exists()


def test_whole_models_of_different_depths_point_to_slices(deep, tmp_path):
    shallow = make_family(tmp_path, fine_tunes=0, layers=2)["base"]
    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in (deep["ft0"], shallow)],
    }
    with pytest.raises(IncompatibleModelsError, match="`num_hidden_layers` differs.*with `slices`"):
        run_merge(recipe, tmp_path / "o", show_progress=False)
