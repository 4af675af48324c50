"""Calibration reading, the recipe, and ``fuselab prune`` / ``fuselab prune-eval`` end to end."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

import fuselab.prune.search as search_mod
from fuselab.cli import main
from fuselab.prune.calibration import calibration_chunks, read_rows
from fuselab.prune.config import validate_recipe_file
from fuselab.prune.loading import load_pruned_model
from fuselab.utils.errors import ConfigError
from helpers.models import save_model
from helpers.prune import llama_config, strong_model
from helpers.tokenizers import byte_level_bpe

TEXT = "The quick brown fox jumps over the lazy dog. Paris is the capital of France. " * 40


@pytest.fixture
def tok():
    return byte_level_bpe()


def test_rows_from_txt_text_and_messages(tmp_path, tok):
    (tmp_path / "a.txt").write_text("plain text")
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"text": "row one"}) + "\n" + json.dumps({"messages": [{"role": "user", "content": "hi"}]})
    )
    assert read_rows(str(tmp_path / "a.txt"), tok) == ["plain text"]
    rows = read_rows(str(tmp_path / "b.jsonl"), tok)
    assert rows == ["row one", "<|im_start|>user\nhi<|im_end|>\n"]
    (tmp_path / "c.json").write_text(json.dumps([{"id": 1}]))
    with pytest.raises(ConfigError, match="neither a `text`"):
        read_rows(str(tmp_path / "c.json"), tok)


def test_chunks_join_tokenize_once_and_drop_the_remainder(tmp_path, tok):
    (tmp_path / "a.txt").write_text(TEXT)
    (tmp_path / "b.txt").write_text("Hello, how are you today?")
    chunks = calibration_chunks([str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], tok, 32, 3)
    ids = tok(TEXT + "\n\n" + "Hello, how are you today?")["input_ids"]
    assert chunks.shape == (3, 32) and chunks.flatten().tolist() == ids[:96]
    with pytest.raises(ConfigError, match="chunk"):
        calibration_chunks([str(tmp_path / "b.txt")], tok, 32, 3)


def test_bundled_calibration_and_row_sampling(tok):
    a = calibration_chunks(["bundled:chat.train.jsonl"], tok, 64, 2, num_rows=50, seed=1)
    b = calibration_chunks(["bundled:chat.train.jsonl"], tok, 64, 2, num_rows=50, seed=2)
    assert a.shape == (2, 64) and not torch.equal(a, b)


def test_shipped_recipe_validates():
    recipe = validate_recipe_file(Path(__file__).parents[1] / "configs/prune/smollm2-20pct.yaml")
    assert recipe.stop.target_ratio == 0.2


def test_recipe_errors(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text(
        yaml.safe_dump({"model": "x", "stop": {"num_blocks": 3}, "calibration": {"files": ["a"]}, "oops": 1})
    )
    with pytest.raises(ConfigError, match="oops: unknown key"):
        validate_recipe_file(bad)
    bad.write_text(
        yaml.safe_dump(
            {"model": "x", "method": "shortgpt", "stop": {"num_blocks": 3}, "calibration": {"files": ["a"]}}
        )
    )
    with pytest.raises(ConfigError, match="must be even"):
        validate_recipe_file(bad)


def _setup(tmp_path: Path, method: str = "blockpruner", **stop) -> Path:
    model = strong_model(llama_config(intermediate=256))
    save_model(model, tmp_path / "model")
    (tmp_path / "cal.txt").write_text(TEXT)
    recipe = {
        "model": str(tmp_path / "model"),
        "output": str(tmp_path / "out"),
        "method": method,
        "stop": stop or {"num_blocks": 3},
        "calibration": {"files": [str(tmp_path / "cal.txt")], "seqlen": 16, "num_chunks": 3},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_prune_command_end_to_end(tmp_path, capsys):
    recipe = _setup(tmp_path)
    assert main(["prune", str(recipe), "--no-progress"]) == 0
    out = tmp_path / "out"
    search = json.loads((out / "search.json").read_text())
    assert len(search["rounds"]) == 3 and search["export"]["format"] in ("decilm", "fuselab", "stock")
    assert search["verification"]["generation_with_cache_matches"]
    assert (out / "trajectory.csv").read_text().count("\n") == 4
    assert {"README.md", "fuselab_prune.yaml", "config.json", "model.safetensors"} <= {
        p.name for p in out.iterdir()
    }
    assert not (tmp_path / "out.search-state").exists()
    assert "removed" in capsys.readouterr().out
    load_pruned_model(out)
    assert (
        main(
            [
                "prune-eval",
                str(out),
                "--data",
                str(tmp_path / "cal.txt"),
                "--seqlen",
                "16",
                "--max-chunks",
                "3",
            ]
        )
        == 0
    )
    ppl = float(re.search(r"perplexity ([0-9.]+)", capsys.readouterr().out).group(1))
    assert ppl == pytest.approx(search["final"]["ppl"], rel=1e-4)  # the calibration chunks again
    assert main(["prune", str(recipe)]) == 2  # the output exists


def test_prune_command_resumes_an_interrupted_search(tmp_path, monkeypatch):
    recipe = _setup(tmp_path)
    real = search_mod.score_round
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(search_mod, "score_round", flaky)
    assert main(["prune", str(recipe), "--no-progress"]) == 130
    state = json.loads((tmp_path / "out.search-state" / "state.json").read_text())
    assert len(state["rounds"]) == 2 and not (tmp_path / "out").exists()
    monkeypatch.setattr(search_mod, "score_round", real)
    assert main(["prune", str(recipe), "--no-progress"]) == 0
    resumed = json.loads((tmp_path / "out" / "search.json").read_text())["removed"]
    assert main(["prune", str(recipe), str(tmp_path / "fresh"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "fresh" / "search.json").read_text())["removed"] == resumed


def test_shortgpt_and_layer_search_commands(tmp_path):
    recipe = _setup(tmp_path, "shortgpt", target_ratio=0.2)
    assert main(["prune", str(recipe), "--no-progress"]) == 0
    search = json.loads((tmp_path / "out" / "search.json").read_text())
    assert search["export"]["format"] == "stock" and len(search["block_influence"]) == 4
    assert main(["prune", str(recipe), str(tmp_path / "ls"), "--no-progress"]) == 0


@pytest.mark.parametrize(
    ("stop", "expected"),
    [
        ({"num_blocks": 99}, "stop.num_blocks is 99, but the model has 4 layers = 8 blocks"),
        ({"num_blocks": 8}, "Use stop.num_blocks <= 7"),
        (
            {"target_ratio": 0.99},
            "stop.target_ratio 0.99 cannot be reached: the model has 4 layers = 8 blocks",
        ),
    ],
)
def test_prune_refuses_a_stop_rule_the_model_cannot_meet(tmp_path, capsys, stop, expected):
    # It used to run out of candidates and write a 0-layer "stock checkpoint" with exit status 0.
    recipe = _setup(tmp_path, **stop)
    assert main(["prune", str(recipe), "--no-progress"]) == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.search-state").exists()


def test_prune_attention_only_counts_attention_blocks(tmp_path, capsys):
    recipe = _setup(tmp_path, num_blocks=5)
    data = yaml.safe_load(recipe.read_text())
    recipe.write_text(yaml.safe_dump({**data, "block_types": "attn"}))
    assert main(["prune", str(recipe), "--no-progress"]) == 2
    assert "4 of them attn blocks (block_types: attn)" in capsys.readouterr().err


def test_prune_eval_loads_fuselabs_own_decilm_export_without_the_remote_code_prompt(
    tmp_path, monkeypatch, capsys
):
    # The export's config.json names configuration_decilm.py in auto_map, so transformers asked "Do you
    # wish to run the custom code? [y/N]" on every load and unattended prune-eval jobs hung.
    import builtins
    import contextlib
    import shutil

    from fuselab.prune.loading import load_pruned_tokenizer
    from fuselab.utils.errors import FuselabError

    recipe = _setup(tmp_path)
    assert main(["prune", str(recipe), "--no-progress"]) == 0
    out = tmp_path / "out"
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "nemotron-nas" and "auto_map" in config  # the remote-code case
    prompts: list[str] = []

    def no_prompt(text: str = "") -> str:
        prompts.append(text)
        return "n"

    monkeypatch.setattr(builtins, "input", no_prompt)
    args = [
        "prune-eval",
        str(out),
        "--data",
        str(tmp_path / "cal.txt"),
        "--seqlen",
        "16",
        "--max-chunks",
        "2",
    ]
    assert main(args) == 0
    assert prompts == [] and "perplexity" in capsys.readouterr().out
    # Only fuselab's own exports: the same folder without fuselab's provenance is arbitrary remote code.
    other = tmp_path / "other"
    shutil.copytree(out, other)
    del config["fuselab_block_pruning"]
    (other / "config.json").write_text(json.dumps(config))
    with contextlib.suppress(FuselabError):  # answering "n" may or may not end the load
        load_pruned_tokenizer(other)
    assert prompts, "a checkpoint fuselab did not write must still ask before running its code"
