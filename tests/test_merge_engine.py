"""The streaming merge engine end to end on tiny random models: outputs load with stock transformers and
give the logits of a model merged in memory by the formula; every bad input gets its error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from fuselab.cli import main
from fuselab.merge import MergeRecipe, run_merge
from fuselab.utils.config import validate_config
from fuselab.utils.errors import (
    ConfigError,
    FuselabError,
    IncompatibleModelsError,
    NonFiniteError,
    OutputExistsError,
)
from helpers.merge_formulas import (
    ref_breadcrumbs,
    ref_linear,
    ref_model_stock,
    ref_multislerp,
    ref_nuslerp,
    ref_sce,
    ref_slerp,
    ref_task_arithmetic,
    ref_ties,
    ref_varm_matrix,
)
from helpers.merge_models import make_family, state
from helpers.models import perturbed, random_model, save_model, tiny_llama_config, tiny_qwen2_config

INPUT_IDS = torch.tensor([[1, 5, 17, 42, 99, 250, 3, 7, 8, 120]])


@pytest.fixture(scope="session")
def family(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama base and three 'fine-tunes' of it (float32, tied embeddings)."""
    return make_family(tmp_path_factory.mktemp("family"))


def logits_of_state(config_dir: Path, sd: dict[str, torch.Tensor]) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(config_dir, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    with torch.no_grad():
        return model(INPUT_IDS).logits


def logits_of_dir(path: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        return model(INPUT_IDS).logits


def recipe(method: str, family, models, base=True, params=None, **extra) -> dict:
    data = {"merge_method": method, "models": models, **extra}
    if base:
        data["base_model"] = str(family["base"])
    if params:
        data["parameters"] = params
    return data


def fts(family, **params):
    return [{"model": str(family[f"ft{i}"]), **({"parameters": params} if params else {})} for i in range(3)]


# -- each method end to end against the formula -----------------------------------------------------------------

FORMULAS = {
    "linear": (
        lambda fam: recipe(
            "linear",
            fam,
            [
                {"model": str(fam[f"ft{i}"]), "parameters": {"weight": w}}
                for i, w in enumerate([0.5, 0.3, 0.2])
            ],
            base=False,
        ),
        lambda b, ws: ref_linear(ws, [0.5, 0.3, 0.2]),
    ),
    "task_arithmetic": (
        lambda fam: recipe("task_arithmetic", fam, fts(fam, weight=0.3), params={"lambda": 0.9}),
        lambda b, ws: ref_task_arithmetic(b, ws, [0.3] * 3, lam=0.9),
    ),
    "ties": (
        lambda fam: recipe("ties", fam, fts(fam, weight=0.3, density=0.6), params={"normalize": True}),
        lambda b, ws: ref_ties(b, ws, [0.3] * 3, [0.6] * 3),
    ),
    "sce": (
        lambda fam: recipe("sce", fam, fts(fam), params={"select_topk": 0.3}),
        lambda b, ws: ref_sce(b, ws, 0.3),
    ),
    "sce_fusechat": (
        lambda fam: recipe("sce", fam, fts(fam), params={"select_topk": 0.3, "select_applies_to": "weights"}),
        lambda b, ws: ref_sce(b, ws, 0.3, "weights"),
    ),
    "varm": (
        lambda fam: recipe("varm", fam, fts(fam)),
        lambda b, ws: ref_varm_matrix(b, ws),
    ),
    "slerp": (  # the base is one of the two models, as in mergekit's recipes
        lambda fam: recipe(
            "slerp", fam, [{"model": str(fam["base"])}, {"model": str(fam["ft0"])}], params={"t": 0.3}
        ),
        lambda b, ws: ref_slerp(b, ws[0], 0.3),
    ),
    "nuslerp": (
        lambda fam: recipe(
            "nuslerp",
            fam,
            [{"model": str(fam[f"ft{i}"]), "parameters": {"weight": w}} for i, w in ((0, 1.0), (1, 3.0))],
        ),
        lambda b, ws: b + ref_nuslerp(ws[0] - b, ws[1] - b, 0.75),
    ),
    "nuslerp_rows_no_base": (
        lambda fam: recipe(
            "nuslerp",
            fam,
            [{"model": str(fam[f"ft{i}"]), "parameters": {"weight": 0.5}} for i in (0, 1)],
            base=False,
            params={"nuslerp_flatten": False},
        ),
        lambda b, ws: ref_nuslerp(ws[0], ws[1], 0.5, flatten=False),
    ),
    "multislerp": (
        lambda fam: recipe("multislerp", fam, fts(fam, weight=1.0)),
        lambda b, ws: b + ref_multislerp([w - b for w in ws], [1.0] * 3),
    ),
    "model_stock": (
        lambda fam: recipe("model_stock", fam, fts(fam)),
        lambda b, ws: ref_model_stock(b, ws),
    ),
    "breadcrumbs": (
        lambda fam: recipe("breadcrumbs", fam, fts(fam, weight=0.4, density=0.7, gamma=0.05)),
        lambda b, ws: ref_breadcrumbs(b, ws, [0.4] * 3, [0.7] * 3, [0.05] * 3),
    ),
    "breadcrumbs_ties": (
        lambda fam: recipe(
            "breadcrumbs_ties", fam, fts(fam, weight=0.4, density=0.7, gamma=0.05), params={"normalize": True}
        ),
        lambda b, ws: ref_breadcrumbs(b, ws, [0.4] * 3, [0.7] * 3, [0.05] * 3, ties=True, normalize=True),
    ),
}


@pytest.mark.parametrize("case", sorted(FORMULAS))
def test_merge_matches_formula(family, tmp_path, case):
    make_recipe, formula = FORMULAS[case]
    out = tmp_path / "merged"
    result = run_merge(make_recipe(family), out, show_progress=False)
    assert result.num_tensors == len(state(family["base"]))
    base_sd = state(family["base"])
    ft_sds = [state(family[f"ft{i}"]) for i in range(3)]
    want = {k: formula(base_sd[k], [sd[k] for sd in ft_sds]) for k in base_sd}
    got = state(out)
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    torch.testing.assert_close(
        logits_of_dir(out), logits_of_state(family["base"], want), rtol=1e-4, atol=1e-5
    )
    # provenance
    card = (out / "README.md").read_text()
    assert result.method in card and str(family["ft0"]) in card
    resolved = yaml.safe_load((out / "fuselab_merge.yaml").read_text())
    assert resolved["merge_method"] == result.method and resolved["seed"] == 0
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    assert not list(tmp_path.glob(".merged.*"))  # no temporary folder left


def test_resolved_recipe_reproduces_the_merge(family, tmp_path):
    run_merge(FORMULAS["ties"][0](family), tmp_path / "a", show_progress=False)
    run_merge(tmp_path / "a" / "fuselab_merge.yaml", tmp_path / "b", show_progress=False)
    a, b = state(tmp_path / "a"), state(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_varm_layer_granularity(family, tmp_path):
    run_merge(
        recipe("varm", family, fts(family), params={"granularity": "layer"}),
        tmp_path / "m",
        show_progress=False,
    )
    base_sd = state(family["base"])
    ft_sds = [state(family[f"ft{i}"]) for i in range(3)]

    def group(name):
        return name.split(".")[2] if name.startswith("model.layers.") else name

    sq: dict[str, list[float]] = {}
    n: dict[str, int] = {}
    for k, b in base_sd.items():
        g = group(k)
        sq.setdefault(g, [0.0, 0.0, 0.0])
        n[g] = n.get(g, 0) + b.numel()
        for i, sd in enumerate(ft_sds):
            sq[g][i] += float(((sd[k] - b).double() ** 2).sum())
    got = state(tmp_path / "m")
    for k in base_sd:
        v = torch.tensor(sq[group(k)]) / n[group(k)]
        w = v / v.sum()
        want = sum(float(w[i]) * ft_sds[i][k] for i in range(3))
        torch.testing.assert_close(got[k], want, rtol=1e-5, atol=1e-6)


def assert_seeded(r: dict, tmp_path: Path) -> dict[str, torch.Tensor]:
    """The same seed gives the same merge, another seed another one; returns the first merge."""
    run_merge(r, tmp_path / "a", show_progress=False)
    run_merge(r, tmp_path / "b", show_progress=False)
    run_merge(r, tmp_path / "c", seed=1, show_progress=False)
    a, b, c = state(tmp_path / "a"), state(tmp_path / "b"), state(tmp_path / "c")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    return a


def test_dare_is_seeded(family, tmp_path):
    a = assert_seeded(recipe("dare_ties", family, fts(family, weight=0.5, density=0.5)), tmp_path)
    base = state(family["base"])
    w = "model.layers.0.mlp.up_proj.weight"
    changed = (a[w] != base[w]).float().mean().item()
    assert 0.5 < changed < 0.95  # dropped entries keep the base value where no kept delta survives


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_is_seeded_and_checked_before_reading(family, tmp_path, monkeypatch, method):
    assert_seeded(recipe(method, family, fts(family, weight=0.5, density=0.5, epsilon=0.2)), tmp_path)
    from fuselab.modeling.checkpoint import Checkpoint

    def no_reads(*args, **kwargs):
        raise AssertionError("a tensor was read before the parameters were checked")

    monkeypatch.setattr(Checkpoint, "read", no_reads)
    bad = recipe(method, family, fts(family, weight=0.5, density=0.9, epsilon=0.2))
    with pytest.raises(ConfigError, match=r"density ± epsilon must lie inside \(0, 1\).*below 0.1"):
        run_merge(bad, tmp_path / "d", show_progress=False)


# -- layout, dtypes, sharding, ties ---------------------------------------------------------------------------------


def test_sharded_output_and_bf16(family, tmp_path):
    bf_dir = tmp_path / "bf16"
    for name in ("base", "ft0", "ft1"):
        m = AutoModelForCausalLM.from_pretrained(family[name], dtype=torch.bfloat16)
        save_model(m, bf_dir / name)
    fam = {"base": bf_dir / "base", "ft0": bf_dir / "ft0", "ft1": bf_dir / "ft1"}
    r = recipe(
        "task_arithmetic",
        fam,
        [
            {"model": str(fam["ft0"]), "parameters": {"weight": 0.5}},
            {"model": str(fam["ft1"]), "parameters": {"weight": 0.5}},
        ],
    )
    out = tmp_path / "out"
    res = run_merge(r, out, out_shard_size="16KB", show_progress=False)
    assert len(res.files) > 2 and (out / "model.safetensors.index.json").is_file()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(res.files)
    for f in res.files:
        assert all(t.dtype == torch.bfloat16 for t in load_file(out / f).values())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    # the same merge written as float32 in one file agrees with the sharded bf16 one after rounding
    run_merge({**r, "out_dtype": "float32"}, tmp_path / "f32", show_progress=False)
    merged32 = state(tmp_path / "f32")
    sharded = {}
    for f in res.files:
        sharded.update(load_file(out / f))
    for k, v in merged32.items():
        assert v.dtype == torch.float32
        assert torch.equal(sharded[k], v.to(torch.bfloat16))


def test_untied_base_with_tied_and_bin_inputs(tmp_path):
    base = random_model(tiny_qwen2_config(tie=False), seed=3)
    save_model(base, tmp_path / "base")
    ft = perturbed(base, seed=4)
    save_model(ft, tmp_path / "ft_untied")
    # a tied variant stores no lm_head; its head is its input embedding
    tied_cfg = tiny_qwen2_config(tie=True)
    tied = random_model(tied_cfg, seed=5)
    save_model(tied, tmp_path / "ft_tied")
    # and a pickled .bin checkpoint is read with the safe loader
    ft.save_pretrained(tmp_path / "ft_bin", safe_serialization=False)
    shutil.copy(tmp_path / "ft_untied" / "tokenizer.json", tmp_path / "ft_bin")
    r = {
        "merge_method": "linear",
        "base_model": str(tmp_path / "base"),
        "models": [
            {"model": str(tmp_path / "ft_tied"), "parameters": {"weight": 1.0}},
            {"model": str(tmp_path / "ft_bin"), "parameters": {"weight": 1.0}},
        ],
    }
    out = tmp_path / "out"
    run_merge(r, out, show_progress=False)
    got = state(out)
    tied_sd = state(tmp_path / "ft_tied")
    assert "lm_head.weight" not in tied_sd
    want_head = (tied_sd["model.embed_tokens.weight"] + ft.state_dict()["lm_head.weight"]) / 2
    torch.testing.assert_close(got["lm_head.weight"], want_head)
    assert AutoModelForCausalLM.from_pretrained(out).config.tie_word_embeddings is False


def test_gradients_and_filters(family, tmp_path):
    a, b = str(family["ft0"]), str(family["ft1"])
    r = {
        "merge_method": "linear",
        "models": [
            {"model": a, "parameters": {"weight": [0.0, 1.0]}},
            {"model": b, "parameters": {"weight": [1.0, 0.0]}},
        ],
    }
    run_merge(r, tmp_path / "g", show_progress=False)
    got, sa, sb = state(tmp_path / "g"), state(family["ft0"]), state(family["ft1"])
    assert torch.equal(
        got["model.layers.0.self_attn.q_proj.weight"], sb["model.layers.0.self_attn.q_proj.weight"]
    )
    assert torch.equal(
        got["model.layers.1.self_attn.q_proj.weight"], sa["model.layers.1.self_attn.q_proj.weight"]
    )
    assert torch.equal(
        got["model.embed_tokens.weight"], sb["model.embed_tokens.weight"]
    )  # t = 0 outside layers
    r = {
        "merge_method": "linear",
        "models": [
            {"model": a, "parameters": {"weight": [{"filter": "mlp", "value": 1.0}, {"value": 0.0}]}},
            {"model": b, "parameters": {"weight": [{"filter": "mlp", "value": 0.0}, {"value": 1.0}]}},
        ],
    }
    run_merge(r, tmp_path / "f", show_progress=False)
    got = state(tmp_path / "f")
    for k in got:
        assert torch.equal(got[k], (sa if "mlp" in k else sb)[k]), k


def test_cli_merge_and_list(family, tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(FORMULAS["sce"][0](family)))
    assert main(["merge", str(path), str(tmp_path / "out"), "--no-progress"]) == 0
    assert "merged" in capsys.readouterr().out
    assert main(["merge", str(path), str(tmp_path / "out"), "--no-progress"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["merge", str(path), str(tmp_path / "out"), "--no-progress", "--force"]) == 0
    assert main(["merge", "--list-methods"]) == 0
    listing = capsys.readouterr().out
    assert "sce:" in listing and "select_applies_to" in listing and "granularity" in listing


# -- bad input --------------------------------------------------------------------------------------------------


def _variant_with(family, tmp_path, name, edit) -> Path:
    d = tmp_path / name
    shutil.copytree(family["ft0"], d)
    sd = load_file(d / "model.safetensors")
    edit(sd)
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    return d


def _two(family, other) -> dict:
    return recipe(
        "task_arithmetic",
        family,
        [{"model": str(family["ft1"])}, {"model": str(other)}],
        params={"weight": 0.5},
    )


def test_refuses_different_architecture_and_vocabulary(family, tmp_path):
    save_model(random_model(tiny_qwen2_config()), tmp_path / "qwen")
    with pytest.raises(IncompatibleModelsError, match="is a Qwen2ForCausalLM but .* is a LlamaForCausalLM"):
        run_merge(_two(family, tmp_path / "qwen"), tmp_path / "o", show_progress=False)
    save_model(random_model(tiny_llama_config(vocab_size=320)), tmp_path / "bigvocab")
    with pytest.raises(
        IncompatibleModelsError, match=r"`vocab_size` differs: 320 .* but 300 .*different vocabularies"
    ):
        run_merge(_two(family, tmp_path / "bigvocab"), tmp_path / "o", show_progress=False)
    assert not (tmp_path / "o").exists()


def test_refuses_different_tensors_and_shapes(family, tmp_path):
    gone = _variant_with(family, tmp_path, "gone", lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(IncompatibleModelsError, match="has no tensor `model.layers.1.mlp.up_proj.weight`"):
        run_merge(_two(family, gone), tmp_path / "o", show_progress=False)
    extra = _variant_with(
        family, tmp_path, "extra", lambda sd: sd.update({"model.extra.weight": torch.ones(2)})
    )
    with pytest.raises(IncompatibleModelsError, match="has tensor `model.extra.weight`"):
        run_merge(_two(family, extra), tmp_path / "o", show_progress=False)
    shape = _variant_with(
        family, tmp_path, "shape", lambda sd: sd.update({"model.norm.weight": torch.ones(33)})
    )
    with pytest.raises(
        IncompatibleModelsError, match=r"tensor `model.norm.weight` has shape \[33\] .* but \[32\]"
    ):
        run_merge(_two(family, shape), tmp_path / "o", show_progress=False)
    rows = _variant_with(
        family, tmp_path, "rows", lambda sd: sd.update({"model.embed_tokens.weight": torch.zeros(310, 32)})
    )
    with pytest.raises(  # the input disagrees with itself: named before any comparison with the others
        IncompatibleModelsError, match=r"config.json says vocab_size 300, but its embedding .* has 310 rows"
    ):
        run_merge(_two(family, rows), tmp_path / "o", show_progress=False)


def test_refuses_nan_inputs_and_outputs(family, tmp_path):
    def poison(sd):
        sd["model.layers.0.mlp.down_proj.weight"][3, 4] = float("nan")

    bad = _variant_with(family, tmp_path, "nan", poison)
    with pytest.raises(
        NonFiniteError, match=r"tensor `model.layers.0.mlp.down_proj.weight` of .*nan.* holds 1 NaN/inf"
    ):
        run_merge(_two(family, bad), tmp_path / "o", show_progress=False)
    r = recipe(
        "task_arithmetic", family, fts(family, weight=1.0), params={"lambda": 1e7}, out_dtype="float16"
    )
    with pytest.raises(NonFiniteError, match="after conversion to torch.float16"):
        run_merge(r, tmp_path / "o", show_progress=False)
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.*"))


def test_existing_output_and_interrupted_merge(family, tmp_path, monkeypatch):
    r = FORMULAS["task_arithmetic"][0](family)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(OutputExistsError, match="--force"):
        run_merge(r, out, show_progress=False)
    with pytest.raises(OutputExistsError, match="not written by fuselab"):  # --force replaces only our own
        run_merge(r, out, force=True, show_progress=False)
    (out / ".fuselab-output.json").write_text("{}")  # as an earlier fuselab output
    # a crash half way leaves the old folder untouched and no half-written merge
    import dataclasses

    from fuselab.merge import registry

    method = registry.get_merge_method("task_arithmetic")
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("simulated crash")
        return method.func(*args, **kwargs)

    monkeypatch.setitem(registry._REGISTRY, "task_arithmetic", dataclasses.replace(method, func=flaky))
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_merge(r, out, force=True, show_progress=False)
    assert (out / "keep.txt").is_file() and not (out / "config.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    monkeypatch.undo()
    run_merge(r, out, force=True, show_progress=False)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_missing_tokenizer_is_an_error(family, tmp_path):
    d = tmp_path / "notok"
    d.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(family["ft0"] / f, d / f)
    r = recipe("linear", family, [{"model": str(d), "parameters": {"weight": 1.0}}], base=False)
    with pytest.raises(FuselabError, match="has no tokenizer files"):
        run_merge(r, tmp_path / "o", show_progress=False)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"merge_method": "slerpy"}, "unknown merge method 'slerpy'; valid methods"),
        ({"merge_method": "karcher"}, "merge_method `karcher` is a mergekit method .* use `multislerp`"),
        (
            {"merge_method": "slerp", "parameters": {"t": 0.5}},
            "slerp merges exactly 1 model.* besides the base",
        ),
        ({"merge_method": "slerp"}, "slerp needs `t`"),
        ({"modles": []}, r"modles: unknown key \(valid keys here: .*models"),
        (
            {"parameters": {"normalise": True}},
            "unknown parameter `normalise` for ties; its parameters: weight, density",
        ),
        ({"parameters": {"density": 1.5}}, r"density` must be <= 1.0"),
        ({"parameters": {"normalize": "yes"}}, "`normalize` must be true or false"),
        (
            {"slices": [{"sources": [{"model": "x", "layer_range": [0, 2]}]}]},
            "give exactly one of `models`.*not both",
        ),
        ({"models": [], "slices": [{"sources": []}]}, r"sources: List should have at least 1 item"),
        ({"modules": {"text": {}}}, "`modules` is not supported: .*use `slices`"),
        ({"tokenizer": {"source": "base", "tokens": {"x": {}}}}, "`tokenizer.tokens` .* is not supported"),
        ({"base_model": None}, "ties works from a base model and needs `base_model`"),
        ({"chat_template": "chatmlx"}, r"chat_template must be a built-in name \(alpaca, chatml"),
    ],
)
def test_recipe_errors(family, tmp_path, change, message):
    r = {**FORMULAS["ties"][0](family), **change}
    with pytest.raises(ConfigError, match=message):
        run_merge(r, tmp_path / "o", show_progress=False)


def test_parameter_placement_errors(family, tmp_path):
    r = recipe("ties", family, fts(family, weight=0.3, normalize=True))
    with pytest.raises(ConfigError, match="`normalize` applies to the whole merge"):
        run_merge(r, tmp_path / "o", show_progress=False)
    r = recipe("ties", family, fts(family, density=0.3))
    with pytest.raises(ConfigError, match="ties needs `weight`"):
        run_merge(r, tmp_path / "o", show_progress=False)


def test_chat_template_override(family, tmp_path):
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    run_merge({**FORMULAS["varm"][0](family), "chat_template": template}, tmp_path / "m", show_progress=False)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "[user] hi\n"


def test_mergekit_recipe_is_accepted_unchanged():
    # FuseChat's own mergekit config (fusechat-sce.yml shape) validates as-is
    text = """
models:
  - model: a
  - model: b
merge_method: sce
base_model: base
parameters:
  select_topk: 0.1
dtype: bfloat16
tokenizer_source: base
"""
    r = MergeRecipe.model_validate(yaml.safe_load(text))
    assert r.merge_method == "sce" and r.output_dtype_name() == "bfloat16" and r.tokenizer_ref == "base"


# Every key of a mergekit 0.1.5 recipe (mergekit/config.py: MergeConfiguration, OutputSliceDefinition,
# InputSliceDefinition, InputModelDefinition; mergekit/tokenizer/config.py: TokenizerConfig) with a value a
# mergekit user would write: None where fuselab accepts it, else (text naming the key, what to do instead).
_MODELS = {"models": [{"model": "a", "parameters": {"weight": 0.5}}, {"model": "b"}]}
_SLICE = {"sources": [{"model": "a", "layer_range": [0, 2]}]}
MERGEKIT_RECIPE_KEYS = [
    ("merge_method", {"merge_method": "linear"}, None),
    ("base_model", {"base_model": "base"}, None),
    ("models", _MODELS, None),
    ("models[].parameters", {"models": [{"model": "a", "parameters": {"weight": [0.1, 0.9]}}]}, None),
    ("slices", {"models": [], "slices": [_SLICE]}, None),
    ("slices[].base_model", {"models": [], "slices": [{**_SLICE, "base_model": "a"}]}, None),
    ("slices[].parameters", {"models": [], "slices": [{**_SLICE, "parameters": {"weight": 1.0}}]}, None),
    (
        "slices[].sources[].parameters",
        {"models": [], "slices": [{"sources": [{**_SLICE["sources"][0], "parameters": {"weight": 1.0}}]}]},
        None,
    ),
    (
        "slices[].residual_weight",
        {"models": [], "slices": [{**_SLICE, "residual_weight": 0.5}]},
        ("`residual_weight`", "remove it"),
    ),
    ("modules", {"modules": {"text_decoder": {"slices": [_SLICE]}}}, ("`modules`", "use `slices`")),
    ("parameters", {"parameters": {"normalize": True}}, None),
    ("dtype", {"dtype": "bfloat16"}, None),
    ("out_dtype", {"out_dtype": "float16"}, None),
    ("tokenizer_source", {"tokenizer_source": "union"}, None),
    ("tokenizer.source", {"tokenizer": {"source": "base"}}, None),
    ("tokenizer.pad_to_multiple_of", {"tokenizer": {"source": "union", "pad_to_multiple_of": 64}}, None),
    (
        "tokenizer.tokens",
        {"tokenizer": {"source": "union", "tokens": {"<|im_start|>": {"source": "a"}}}},
        ("`tokenizer.tokens`", "remove it"),
    ),
    ("chat_template", {"chat_template": "chatml"}, None),
]


@pytest.mark.parametrize(
    ("key", "change", "refusal"), MERGEKIT_RECIPE_KEYS, ids=[k for k, _, _ in MERGEKIT_RECIPE_KEYS]
)
def test_every_mergekit_recipe_key_is_supported_or_refused_with_an_alternative(key, change, refusal):
    data = {"merge_method": "linear", **_MODELS, **change}
    if refusal is None:
        MergeRecipe.model_validate(data)
        return
    with pytest.raises(ConfigError) as err:
        validate_config(MergeRecipe, data, "recipe")
    assert all(part in str(err.value) for part in refusal), str(err.value)


def test_streaming_holds_at_most_two_tensors_per_input(family, tmp_path, monkeypatch):
    """Memory follows the largest tensor, not the model: at any moment only the tensor being merged and the
    one being prefetched are alive, per input, whatever the number of tensors."""
    import threading
    import weakref

    from fuselab.modeling.checkpoint import Checkpoint

    real_read = Checkpoint.read
    lock = threading.Lock()
    live = {"now": 0, "max": 0, "reads": 0}

    def release():
        with lock:
            live["now"] -= 1

    def counting_read(self, *args, **kwargs):
        t = real_read(self, *args, **kwargs)
        with lock:
            live["now"] += 1
            live["reads"] += 1
            live["max"] = max(live["max"], live["now"])
        weakref.finalize(t, release)
        return t

    monkeypatch.setattr(Checkpoint, "read", counting_read)
    result = run_merge(FORMULAS["ties"][0](family), tmp_path / "m", show_progress=False)
    inputs = 4  # base + three models
    assert live["reads"] == inputs * result.num_tensors
    assert live["max"] <= 2 * inputs < result.num_tensors


def test_recipe_is_checked_before_models_are_resolved(tmp_path, monkeypatch):
    import fuselab.modeling.resolve as resolve_module

    def no_resolution(*args, **kwargs):
        raise AssertionError("a model was resolved before the recipe was validated")

    monkeypatch.setattr(resolve_module, "resolve_model", no_resolution)
    r = {
        "merge_method": "ties",
        "base_model": "smollm2-135m-instruct",
        "models": [{"model": "some/where", "parameters": {"weight": 1.0, "densty": 0.5}}],
    }
    with pytest.raises(ConfigError, match="unknown parameter `densty`"):
        run_merge(r, tmp_path / "o", show_progress=False)
