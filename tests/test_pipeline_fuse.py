"""``fuselab fuse``: the whole FuseChat pipeline on tiny models with three tokenizer families."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from fuselab.cli import main
from fuselab.data.conversations import load_conversations
from fuselab.data.render import SplitReport, encode, render_to_fit
from fuselab.evaluate.nll import assistant_nll
from fuselab.modeling.tokenizers import load_tokenizer
from fuselab.pipelines.config import FuseRecipe, load_recipe
from fuselab.pipelines.fuse import FusePipeline
from fuselab.utils.config import validate_config
from fuselab.utils.errors import ConfigError, OutputExistsError
from helpers.fusion import fusion_models, fusion_recipe, write_conversations


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuse")
    paths = fusion_models(root / "models")
    data = write_conversations(root / "train.jsonl")
    return paths, data


def _recipe(setup, root: Path, **overrides) -> dict:
    paths, data = setup
    r = fusion_recipe(paths, data)
    r["output"] = str(root / "out")
    r["evaluate"] = {
        "heldout": {"chat": [str(data)], "code": [{"path": str(data), "limit": 3}]},
        "prompts": ["Say hello."],
        "max_new_tokens": 4,
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(r.get(key), dict):
            r[key].update(value)
        else:
            r[key] = value
    return r


def _write(root: Path, recipe: dict) -> Path:
    path = root / "recipe.yaml"
    path.write_text("# fuselab fuse recipe.yaml\n" + yaml.safe_dump(recipe))
    return path


def _pipeline(recipe: dict, **kw) -> FusePipeline:
    return FusePipeline(validate_config(FuseRecipe, recipe), show_progress=False, **kw)


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_assistant_nll_equals_the_full_forward(setup):
    paths, data = setup
    tok = load_tokenizer(paths["src_b"])
    texts = render_to_fit(
        load_conversations([data]), load_tokenizer(paths["pivot"]), [tok], 96, SplitReport()
    )
    score = assistant_nll(paths["src_b"], texts, batch_tokens=128, show_progress=False)
    model = AutoModelForCausalLM.from_pretrained(paths["src_b"], dtype=torch.float32)
    total, count, per_text, per_text_tokens = 0.0, 0, [], []
    for t in texts:
        e = encode(tok, t)
        ids = torch.from_numpy(e.ids)[None].long()
        with torch.no_grad():
            logp = model(input_ids=ids).logits[0].float().log_softmax(-1)
        pos = torch.from_numpy(e.predicting_positions()).long()
        per_text.append(-float(logp[pos, ids[0, pos + 1]].sum()))
        per_text_tokens.append(len(pos))
        total += per_text[-1]
        count += len(pos)
    assert len(set(per_text_tokens)) > 1  # texts of different lengths: the length order is exercised
    assert score.tokens == count
    assert score.nll == pytest.approx(total, rel=1e-5)
    # per text, in the order of the texts (they are scored in length order)
    assert len(score.per_text_nll) == len(texts) == len(per_text) and sum(score.per_text_tokens) == count
    assert score.per_text_nll == pytest.approx(per_text, rel=1e-5)
    assert list(score.per_text_tokens) == per_text_tokens
    assert score.bytes == sum(t.supervised_bytes for t in texts)
    assert score.per_byte == pytest.approx(total / score.bytes, rel=1e-5)


def test_pipeline_end_to_end_then_cached(setup, tmp_path):
    recipe = _recipe(setup, tmp_path)
    path = _write(tmp_path, recipe)
    assert main(["fuse", str(path), "--no-progress"]) == 0
    out = tmp_path / "out"
    for name in (
        "report.md",
        "README.md",
        "results.json",
        "fuselab_fuse.yaml",
        "loss_curves.png",
        "heldout_nll.png",
    ):
        assert (out / name).stat().st_size > 0, name
    assert (out / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"
    # The fused model is the SCE merge of the two pairwise targets and loads with stock transformers.
    pipe = _pipeline(recipe)
    merged_dir = pipe.merged_dir()
    fused = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 20, 33]])
    assert torch.equal(fused(input_ids=ids).logits, ref(input_ids=ids).logits)
    card = (merged_dir / "README.md").read_text()
    assert "sce" in card
    # Every model of the comparison has a held-out score; the report's verdict is computed from them.
    results = json.loads((out / "results.json").read_text())
    names = set(results["heldout"])
    assert names == {"pivot", "pivot-sft", "pivot+src_a", "pivot+src_b", "pivot-fused-sce", "src_a", "src_b"}
    v = results["fused_vs_baseline"]["chat"]
    fused_nll = results["heldout"]["pivot-fused-sce"]["chat"]["per_token"]
    base_nll = results["heldout"]["pivot-sft"]["chat"]["per_token"]
    assert v["delta"] == pytest.approx(fused_nll - base_nll)
    assert v["se"] is not None and v["se"] > 0
    expected = (
        "better" if v["delta"] < -2 * v["se"] else "worse" if v["delta"] > 2 * v["se"] else "within noise"
    )
    assert v["outcome"] == expected and v["beats_baseline"] == (expected == "better")
    # Training moved the pivot: every trained model is better than the untouched pivot on the training texts.
    for n in ("pivot-sft", "pivot+src_a", "pivot-fused-sce"):
        assert results["heldout"][n]["chat"]["per_token"] < results["heldout"]["pivot"]["chat"]["per_token"]
    # The SFT baseline is trained with λ = 1 on the same steps: no fusion loss, same number of steps.
    sft_log = json.loads((pipe.train_dir("pivot-sft") / "training_log.json").read_text())
    tgt_log = json.loads((pipe.train_dir("pivot+src_a") / "training_log.json").read_text())
    assert sft_log["steps"] == tgt_log["steps"] == 4
    assert all(h.get("fusion_loss", 0.0) == 0.0 for h in sft_log["log_history"] if "loss" in h)
    assert "SFT baseline" in (pipe.train_dir("pivot-sft") / "README.md").read_text()
    report = (out / "report.md").read_text()
    verdict = report.splitlines()[2]
    assert verdict.startswith("**Verdict:") and "on chat (" in verdict and "on code (" in verdict
    for section in ("SFT-only baseline", "Held-out NLL", "loss_curves.png", "Answers", "Say hello."):
        assert section in report
    # the target diagnostics, per source and domain (here one training file: its stem is the domain)
    assert "mean q(gold)" in report and "| `pivot+src_a` | `src_a` | train |" in report
    # A rerun finds every stage cached and changes nothing.
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    result = _pipeline(recipe).run()
    assert not any(result.ran.values()), result.ran
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_dry_run_writes_nothing(setup, tmp_path, capsys):
    recipe = _recipe(setup, tmp_path)
    path = _write(tmp_path, recipe)
    before = _tree(tmp_path)
    assert main(["fuse", str(path), "--dry-run", "--no-progress"]) == 0
    assert _tree(tmp_path) == before
    printed = capsys.readouterr().out
    for stage in ("extract", "align", "train", "merge", "evaluate", "report"):
        assert stage in printed
    assert "nothing was written" in printed and "to run:" in printed


def test_interrupted_training_resumes_without_redoing_finished_work(setup, tmp_path, monkeypatch):
    from fuselab.fusion import extract as extract_mod
    from fuselab.fusion import train as train_mod

    recipe = _recipe(setup, tmp_path, evaluate={"prompts": []})
    real_train = train_mod.train
    calls: list[str] = []

    def crash_on_second(targets, out, *a, **kw):
        calls.append(Path(out).name)
        if len(calls) == 2:
            raise KeyboardInterrupt("power cut")
        return real_train(targets, out, *a, **kw)

    monkeypatch.setattr(train_mod, "train", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        _pipeline(recipe).run()
    pipe = _pipeline(recipe)
    first, second = pipe.trained()[:2]
    assert (pipe.train_dir(first) / "config.json").exists()
    assert not pipe.train_dir(second).exists()  # nothing that looks complete
    assert not (tmp_path / "out").exists()

    def no_extraction(*a, **kw):
        raise AssertionError("extraction must not run again")

    monkeypatch.setattr(extract_mod, "extract", no_extraction)
    calls.clear()
    monkeypatch.setattr(
        train_mod, "train", lambda t, o, *a, **kw: (calls.append(Path(o).name), real_train(t, o, *a, **kw))[1]
    )
    result = _pipeline(recipe).run()
    assert result.skipped["train"] == [first] and result.ran["train"] == pipe.trained()[1:]
    assert result.skipped["extract"] == ["pivot", "src_a", "src_b"]
    assert (tmp_path / "out" / "model" / "config.json").exists()


def test_from_stage_reruns_that_stage_and_later_ones(setup, tmp_path):
    recipe = _recipe(setup, tmp_path, baseline=False, evaluate={"prompts": [], "sources": False})
    _pipeline(recipe).run()
    result = _pipeline(recipe).run("merge")
    assert result.ran["merge"] == ["pivot-fused-sce"] and result.ran["report"] == ["report"]
    assert result.ran["train"] == [] and result.ran["extract"] == []
    assert set(result.ran["evaluate"]) == {"pivot", "pivot+src_a", "pivot+src_b", "pivot-fused-sce"}


def test_multi_mode_has_one_target_and_no_merge(setup, tmp_path):
    recipe = _recipe(
        setup, tmp_path, fuse={"mode": "multi"}, baseline=False, evaluate={"prompts": [], "sources": False}
    )
    pipe = _pipeline(recipe)
    result = pipe.run()
    assert result.ran["train"] == ["pivot+multi"] and result.ran["merge"] == []
    fused = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model", dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(pipe.train_dir("pivot+multi"), dtype=torch.float32)
    for (n, a), (_, b) in zip(fused.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), n
    assert json.loads((tmp_path / "out" / "results.json").read_text())["fused_model"] == "pivot+multi"


def test_recipe_errors_name_the_problem(setup, tmp_path):
    with pytest.raises(ConfigError, match="unknown merge method 'slerpy'.*valid:.*sce"):
        validate_config(FuseRecipe, _recipe(setup, tmp_path, merge={"method": "slerpy"}))
    with pytest.raises(ConfigError, match="no parameter.*density.*valid: select_topk"):
        validate_config(
            FuseRecipe, _recipe(setup, tmp_path, merge={"method": "sce", "parameters": {"density": 0.5}})
        )
    with pytest.raises(ConfigError, match="evaluat"):
        validate_config(FuseRecipe, _recipe(setup, tmp_path, evaluate={"heldout_sets": {}}))
    with pytest.raises(ConfigError, match="valid: extract, align, train, merge, evaluate, report"):
        _pipeline(_recipe(setup, tmp_path)).run("finetune")
    foreign = tmp_path / "out"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="not written by `fuselab fuse`"):
        _pipeline(_recipe(setup, tmp_path)).run()
    assert (foreign / "notes.txt").read_text() == "mine"


def test_demo_recipe_is_valid_and_uses_the_real_models():
    recipe = load_recipe(Path(__file__).parents[1] / "configs" / "demo.yaml")
    assert recipe.pivot == "smollm2-135m-instruct"
    assert set(recipe.sources) == {"qwen2.5-coder-0.5b-instruct", "gemma-3-270m"}
    assert set(recipe.evaluate.heldout) == {"chat", "code"} and recipe.baseline
    assert 0 < recipe.train.lam < 1 and os.path.basename(recipe.output) == "fuse-demo"


def test_dry_run_fetches_nothing(setup, tmp_path, cache):
    from fuselab.utils.errors import ModelNotFoundError

    recipe = _recipe(setup, tmp_path, pivot="smollm2-135m-instruct")
    with pytest.raises(ModelNotFoundError, match="fuselab models fetch"):
        _pipeline(recipe, dry_run=True)
    assert not cache.exists() or not any(cache.rglob("*.safetensors"))


def test_data_items_take_their_own_limits(tmp_path):
    from fuselab.fusion.config import DataConfig
    from fuselab.fusion.workspace import load_data_items

    data = write_conversations(tmp_path / "c.jsonl")
    cfg = validate_config(DataConfig, {"train": [{"path": str(data), "limit": 2}, "bundled:code.heldout"]})
    convs = load_data_items(cfg.train)
    ids = [c.id for c in convs]
    assert len(convs) == 2 + 33 and ids[:2] == [c.id for c in load_conversations([data])[:2]]
    with pytest.raises(ConfigError, match="limit"):
        validate_config(DataConfig, {"train": [{"path": str(data), "limit": 0}]})
    with pytest.raises(ConfigError, match="path"):
        validate_config(DataConfig, {"train": [{"file": str(data)}]})


@pytest.mark.parametrize(
    ("section", "change"),
    [
        ("extract", {"dtype": "bfloat16"}),
        ("extract", {"backend": "vllm"}),
        ("extract", {"device": "cuda"}),
        ("extract", {"k": 4}),
        ("align", {"vocab": "exact"}),
        ("align", {"chain_rule": False}),
        ("align", {"dropped_mass": "tail"}),
        ("fuse", {"score": "own"}),
        ("fuse", {"include_pivot": False}),
        ("fuse", {"function": "avgce"}),
        ("train", {"loss": "alm"}),
        ("train", {"alm_temperature": 2.0}),
        ("train", {"tail": "renormalize"}),
    ],
)
def test_every_setting_that_changes_an_output_changes_its_key(setup, tmp_path, section, change):
    """Issue 12: a float32 recipe silently reused a store a bf16 run had written; every stage key covers what
    determines its output (nothing is computed here: keys only)."""
    base = _pipeline(_recipe(setup, tmp_path), dry_run=True)
    changed = _pipeline(_recipe(setup, tmp_path, **{section: change}), dry_run=True)
    target = base.target_names()[0]

    def keys(p: FusePipeline) -> dict[str, str]:
        return {
            "store": p.ws.store_dir(p.ws.sources[0]).name,
            "targets": p.ws.targets_dir(target).name,
            "model": p.train_dir(target).name,
        }

    before, after = keys(base), keys(changed)
    expected = {
        "extract": {"store", "targets", "model"},
        "align": {"targets", "model"},
        "fuse": {"targets", "model"},
    }
    assert {k for k in before if before[k] != after[k]} == expected.get(section, {"model"})


@pytest.mark.parametrize(
    "change", [{"save_steps": 3}, {"save_minutes": 0.5}, {"save_total_limit": 5}, {"learning_rate": 1e-4}]
)
def test_when_to_checkpoint_is_not_part_of_a_trained_model_key(setup, tmp_path, change):
    """The checkpoint cadence changes no weight: a recipe that only checkpoints more often reuses the trained
    models; a setting that changes the training (the learning rate, the control) does not."""
    base = _pipeline(_recipe(setup, tmp_path), dry_run=True)
    changed = _pipeline(_recipe(setup, tmp_path, train=change), dry_run=True)
    for name in base.trained():
        same = base.train_dir(name) == changed.train_dir(name)
        assert same == ("learning_rate" not in change), (name, change)


def test_the_precision_that_runs_is_in_every_key(setup, tmp_path, monkeypatch):
    """A float32 rerun (FUSELAB_CPU_BF16=0, or another machine) in a work folder that a bf16 run filled must
    not reuse its stores, trained models or evaluations: `auto` enters the keys as it resolves."""
    from fuselab.utils import hardware

    def keys(native: bool) -> dict[str, str]:
        monkeypatch.setattr(hardware, "native_bf16", lambda device="cpu": native)
        p = _pipeline(
            _recipe(setup, tmp_path, extract={"dtype": "auto"}, train={"bf16": "auto"}), dry_run=True
        )
        target = p.target_names()[0]
        folder = p.ws.paths[p.pivot]
        return {
            "store": p.ws.store_dir(p.ws.sources[0]).name,
            "target": p.train_dir(target).name,
            "baseline": p.train_dir(p.baseline_name()).name,
            "eval": p.eval_path(p.pivot, folder).name,
        }

    bf16, fp32 = keys(True), keys(False)
    assert all(bf16[k] != fp32[k] for k in bf16), (bf16, fp32)
    assert keys(True) == bf16  # and nothing else moves them
