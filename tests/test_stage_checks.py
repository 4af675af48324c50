"""Issue 16, continued: what a stage used to find out late or blame on the wrong thing is found early and
named (a damaged top-k shard, token ids beyond the embedding, NaN weights, recipe values of `fuselab fuse`,
row numbers), each with the file and the fix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file, save_file

from fuselab.cli import main
from fuselab.data.conversations import DataError, load_conversations
from fuselab.fusion.extract import ExtractSettings, extract
from fuselab.fusion.store import StoreError, TopKStore
from fuselab.pipelines.config import FuseRecipe
from fuselab.prune.calibration import read_rows
from fuselab.utils.config import validate_config
from fuselab.utils.errors import ConfigError, IncompatibleModelsError, NonFiniteError
from helpers.fusion import fusion_models, fusion_recipe, write_conversations
from helpers.models import save_model
from helpers.prune import llama_config, strong_model
from helpers.tokenizers import byte_level_bpe

SETTINGS = ExtractSettings(k=4, batch_tokens=256, shard_tokens=40)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checks")
    paths = fusion_models(root / "models")
    paths["data"] = write_conversations(root / "chat.jsonl")
    return paths


def _texts(tiny):
    from fuselab.data.render import SplitReport, render_to_fit
    from fuselab.modeling.tokenizers import load_tokenizer

    tok = load_tokenizer(tiny["pivot"])
    return render_to_fit(load_conversations([tiny["data"]]), tok, [tok], 96, SplitReport())


def _npy_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.npy"))}


def _with_nan(src: Path, dst: Path, tensor: str) -> Path:
    shutil.copytree(src, dst)
    weights = load_file(dst / "model.safetensors")
    weights[tensor] = weights[tensor].clone()
    weights[tensor].view(-1)[3] = float("nan")
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


# -- 1. a damaged cache shard ------------------------------------------------------------------------------


def test_a_half_written_shard_is_extracted_again_not_reported_as_already_extracted(tiny, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(fusion_recipe(tiny, tiny["data"])))
    args = ["fusion", "extract", str(recipe), "--workdir", str(tmp_path / "w"), "--no-progress"]
    assert main(args) == 0
    store = next((tmp_path / "w" / "topk").glob("pivot-*"))
    clean = _npy_bytes(store)
    logp = store / "shard-00001" / "logp.npy"
    logp.write_bytes(logp.read_bytes()[: logp.stat().st_size // 2])  # a half logp.npy
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "pivot: already extracted" not in out and "resumed" in out  # only the damaged shard ran again
    assert _npy_bytes(store) == clean
    assert "src_a: already extracted" in out


@pytest.mark.parametrize("cut", ["half", "header", "one_byte"])
def test_opening_a_store_with_a_damaged_shard_names_the_file_and_the_fix(tiny, tmp_path, cut):
    extract(tiny["pivot"], _texts(tiny), tmp_path / "s", SETTINGS, show_progress=False)
    f = tmp_path / "s" / "shard-00000" / "ids.npy"
    data = f.read_bytes()
    f.write_bytes({"half": data[: len(data) // 2], "header": data[:20], "one_byte": data[:-1]}[cut])
    with pytest.raises(StoreError, match=rf"{f}.*(truncated|header).*rerun"):
        TopKStore(tmp_path / "s")


def test_a_shard_that_disagrees_with_the_manifest_is_refused(tiny, tmp_path):
    extract(tiny["pivot"], _texts(tiny), tmp_path / "s", SETTINGS, show_progress=False)
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    manifest["shards"][0]["tokens"] += 1
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match=r"shard-00000.*manifest"):
        TopKStore(tmp_path / "s")


# -- 2. token ids beyond the embedding ---------------------------------------------------------------------


def test_extraction_refuses_a_tokenizer_larger_than_the_embedding_before_the_forward(tiny, tmp_path):
    bad = Path(shutil.copytree(tiny["pivot"], tmp_path / "bad"))
    for f in ("tokenizer.json", "tokenizer_config.json"):  # src_a's tokenizer: 360 ids for 300 rows
        shutil.copy(tiny["src_a"] / f, bad / f)
    with pytest.raises(
        IncompatibleModelsError, match=rf"{bad}: .*token ids up to 3\d\d.* 300 rows.*tokenizer"
    ):
        extract(bad, _texts(tiny), tmp_path / "s", SETTINGS, show_progress=False)


def test_extraction_refuses_a_config_vocab_size_that_disagrees_with_the_weights(tiny, tmp_path):
    bad = Path(shutil.copytree(tiny["pivot"], tmp_path / "bad"))
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "vocab_size": 320}))
    with pytest.raises(IncompatibleModelsError, match=r"vocab_size 320.* 300 rows.*set `vocab_size` to 300"):
        extract(bad, _texts(tiny), tmp_path / "s", SETTINGS, show_progress=False)


# -- 3. NaN weights are NaN weights ------------------------------------------------------------------------


def test_extraction_names_a_nan_weight_instead_of_blaming_the_architecture(tiny, tmp_path):
    tensor = "model.layers.1.mlp.down_proj.weight"
    bad = _with_nan(tiny["pivot"], tmp_path / "bad", tensor)
    with pytest.raises(NonFiniteError, match=rf"{bad} has NaN/inf in tensor `{tensor}`") as err:
        extract(bad, _texts(tiny), tmp_path / "s", SETTINGS, show_progress=False)
    assert "vllm" not in str(err.value)


def test_prune_names_a_nan_weight_instead_of_blaming_the_block_layout(tmp_path, capsys):
    save_model(strong_model(llama_config()), tmp_path / "good", byte_level_bpe())
    tensor = "model.layers.2.self_attn.o_proj.weight"
    bad = _with_nan(tmp_path / "good", tmp_path / "model", tensor)
    (tmp_path / "cal.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "model": str(bad),
                "output": str(tmp_path / "out"),
                "stop": {"num_blocks": 2},
                "calibration": {"files": [str(tmp_path / "cal.txt")], "seqlen": 16, "num_chunks": 2},
            }
        )
    )
    assert main(["prune", str(recipe), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{bad} has NaN/inf in tensor `{tensor}`" in err and "layout" not in err
    assert not (tmp_path / "out").exists()


# -- 4. `fuselab fuse`: merge parameters, held-out files, scheduler names, at load ---------------------------


def _fuse_recipe(tiny, tmp_path: Path, **overrides) -> dict:
    r = fusion_recipe(tiny, tiny["data"])
    r["output"] = str(tmp_path / "out")
    r["evaluate"] = {"heldout": {"chat": [str(tiny["data"])]}, "prompts": [], "sources": False}
    r.update(overrides)
    return r


@pytest.mark.parametrize(
    ("merge", "message"),
    [
        ({"method": "ties", "parameters": {"density": 1.5, "weight": 1}}, r"merge.*`density` must be <= 1"),
        ({"method": "ties", "parameters": {"density": 0.5}}, r"merge: ties needs `weight`; set it under"),
        ({"method": "sce", "parameters": {"select_topk": "all"}}, r"`select_topk` must be a number"),
        ({"method": "slerp", "parameters": {"t": 0.5}}, r"slerp merges exactly 1 model.*2 pairwise targets"),
        ({"method": "slerp"}, r"slerp needs `t`"),
        ({"method": "sce", "dtype": "fp33"}, r"merge.dtype.*fp33.*float32"),
    ],
)
def test_merge_parameters_are_checked_against_the_method_at_load(tiny, tmp_path, merge, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(FuseRecipe, _fuse_recipe(tiny, tmp_path, merge=merge))
    ok = {"density": 0.5, "weight": 1.0}
    ok = validate_config(FuseRecipe, _fuse_recipe(tiny, tmp_path, merge={"method": "ties", "parameters": ok}))
    assert ok.merge.parameters == {"density": 0.5, "weight": 1.0}
    # a method named without parameters starts from none, not from SCE's default select_topk
    plain = validate_config(FuseRecipe, _fuse_recipe(tiny, tmp_path, merge={"method": "model_stock"}))
    assert plain.merge.parameters == {}


def test_missing_heldout_files_are_refused_at_load(tiny, tmp_path):
    missing = tmp_path / "nope.jsonl"
    recipe = _fuse_recipe(tiny, tmp_path)
    recipe["evaluate"]["heldout"] = {
        "chat": [str(tiny["data"])],
        "code": [{"path": str(missing), "limit": 2}],
    }
    with pytest.raises(ConfigError, match=rf"evaluate.heldout.*code.*{missing} does not exist"):
        validate_config(FuseRecipe, recipe)
    recipe["evaluate"]["heldout"] = {"chat": ["bundled:chat.heldoot"]}
    with pytest.raises(ConfigError, match=r"chat.heldoot.*available: .*chat.heldout.jsonl"):
        validate_config(FuseRecipe, recipe)


def test_unreadable_heldout_files_stop_fuse_before_extraction(tiny, tmp_path, monkeypatch):
    from fuselab.fusion.workspace import Workspace
    from fuselab.pipelines.fuse import FusePipeline

    bad = tmp_path / "heldout.jsonl"
    bad.write_bytes(b'{"messages": "caf\xe9"}\n')
    recipe = _fuse_recipe(tiny, tmp_path)
    recipe["evaluate"]["heldout"] = {"chat": [str(bad)]}
    pipe = FusePipeline(validate_config(FuseRecipe, recipe), workdir=tmp_path / "w", show_progress=False)

    def no_extraction(self, names=None):
        raise AssertionError("the extraction started before the held-out files were read")

    monkeypatch.setattr(Workspace, "extract", no_extraction)
    with pytest.raises(DataError, match=rf"{bad} line 1: not UTF-8"):
        pipe.run()
    assert not (tmp_path / "w" / "topk").exists()


def test_scheduler_names_are_checked_at_load(tiny, tmp_path):
    recipe = _fuse_recipe(tiny, tmp_path)
    recipe["train"]["lr_scheduler"] = "cosinus"
    with pytest.raises(ConfigError, match=r"train.lr_scheduler.*'cosinus'.*valid: linear, cosine, "):
        validate_config(FuseRecipe, recipe)
    recipe["train"]["lr_scheduler"] = "constant_with_warmup"
    assert validate_config(FuseRecipe, recipe).train.lr_scheduler == "constant_with_warmup"


# -- 5. row numbers count from 1 ---------------------------------------------------------------------------


def test_calibration_rows_and_lines_count_from_one(tmp_path):
    tok = byte_level_bpe()
    f = tmp_path / "cal.jsonl"
    f.write_text('{"text": "a"}\n\n{"text": "b"}\n{"text": \n')
    with pytest.raises(ConfigError, match=rf"{f} line 4: not valid JSON"):
        read_rows(str(f), tok)
    f.write_text('{"text": "a"}\n\n{"id": 3}\n')
    with pytest.raises(ConfigError, match=rf"{f} row 2 \(line 3\): a row has neither"):
        read_rows(str(f), tok)


def test_conversation_messages_count_from_one(tmp_path):
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    f = tmp_path / "d.jsonl"
    bad = {"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]}
    f.write_text(json.dumps(good) + "\n\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl row 2 \(line 3\): message 2 has role 'robot'"):
        load_conversations(f)
    f.write_text(json.dumps({"messages": ["hi", "there"]}) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl row 1: message 1 is not an object"):
        load_conversations(f)


def test_wrpo_scheduler_names_are_checked_at_load():
    from fuselab.wrpo.config import SFTConfig, TrainingConfig

    for model in (SFTConfig, TrainingConfig):
        with pytest.raises(ConfigError, match=r"lr_scheduler_type.*'cosinus'.*valid: linear, cosine, "):
            validate_config(model, {"lr_scheduler_type": "cosinus"})
        assert validate_config(model, {"lr_scheduler_type": "linear"}).lr_scheduler_type == "linear"


def test_prune_eval_names_a_nan_weight_instead_of_reporting_an_infinite_perplexity(tmp_path, capsys):
    save_model(strong_model(llama_config()), tmp_path / "good", byte_level_bpe())
    tensor = "model.layers.1.mlp.down_proj.weight"
    bad = _with_nan(tmp_path / "good", tmp_path / "model", tensor)
    (tmp_path / "cal.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    args = ["prune-eval", str(bad), "--data", str(tmp_path / "cal.txt"), "--seqlen", "16"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{bad} has NaN/inf in tensor `{tensor}`" in err
    assert (
        main(["prune-eval", str(tmp_path / "good"), "--data", str(tmp_path / "cal.txt"), "--seqlen", "16"])
        == 0
    )
