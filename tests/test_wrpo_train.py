"""``fuselab wrpo train`` on a tiny model: step-0 loss, the α schedule under max_steps, the reference cache,
the live reference, the checkpoint and card, and a two-process ``accelerate launch`` run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from fuselab.cli import main as cli_main
from fuselab.wrpo.config import TrainConfig
from fuselab.wrpo.data import TokenizeOptions, WRPOCollator, tokenize_rows
from fuselab.wrpo.forward import forward_logps
from fuselab.wrpo.refcache import cached_ref_logps
from fuselab.wrpo.sampling import load_tokenizer
from fuselab.wrpo.train import run_train
from helpers.distributed import accelerate_launch
from helpers.wrpo import preference_rows, tiny_chat_model, write_jsonl

HELPERS = Path(__file__).parent / "helpers"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("wrpo-train")
    tiny_chat_model(root / "m")
    write_jsonl(root / "data.jsonl", preference_rows(16))
    return root


def _cfg(root: Path, cache: Path, **over) -> TrainConfig:
    d = {
        "model": str(root / "m"),
        "data": {"path": str(root / "data.jsonl"), "max_length": 128, "max_prompt_length": 64},
        "loss": {"beta": 0.1, "alpha": 0.4},
        "reference": {"cache_dir": str(cache)},
        "training": {
            "learning_rate": 1e-3,
            "max_steps": 4,
            "per_device_train_batch_size": 2,
            "gradient_accumulation_steps": 2,
            "warmup_ratio": 0.0,
        },
    }
    for k, v in over.items():
        d[k] = {**d.get(k, {}), **v} if isinstance(v, dict) else v
    return TrainConfig.model_validate(d)


def _train_logs(out: Path) -> list[dict]:
    return [e for e in json.loads((out / "log_history.json").read_text()) if "loss" in e]


def test_train_writes_a_loadable_checkpoint_and_follows_the_schedule(setup, cache, tmp_path):
    out = tmp_path / "out"
    result = run_train(_cfg(setup, cache), out)
    assert result.steps == 4  # max_steps, although 16 rows x 1 epoch would give 4 anyway at 2x2 per update
    logs = _train_logs(out)
    assert logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 0
    # α from the real number of optimiser updates T = 4, read at completed updates 0..3: 0.4·s/4
    assert [e["alpha"] for e in logs] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    for key in (
        "rewards/source_chosen",
        "rewards/target_chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "sigmoid_neg_z",
    ):
        assert key in logs[-1]
    model = AutoModelForCausalLM.from_pretrained(out)
    before = AutoModelForCausalLM.from_pretrained(setup / "m")
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), before.parameters()))
    card = (out / "README.md").read_text()
    assert "WRPO" in card and "β = 0.1" in card and "optimizer_steps" in card
    assert (out / "fuselab_wrpo_train.yaml").is_file() and (out / "tokenizer.json").is_file()
    assert not (out.parent / f".{out.name}.work").exists()


def test_max_steps_shorter_than_the_epoch_still_ramps_alpha(setup, cache, tmp_path):
    cfg = _cfg(
        setup, cache, training={"max_steps": 2, "gradient_accumulation_steps": 1, "num_train_epochs": 3}
    )
    run_train(cfg, tmp_path / "out")
    assert [e["alpha"] for e in _train_logs(tmp_path / "out")] == pytest.approx([0.0, 0.2])


def test_reference_cache_matches_live_reference(setup, cache, tmp_path):
    tok = load_tokenizer(setup / "m")
    examples, _ = tokenize_rows(preference_rows(5), tok, TokenizeOptions(128, 64))
    model = AutoModelForCausalLM.from_pretrained(setup / "m")
    calls = []

    def load():
        calls.append(1)
        return model

    kw = dict(
        load_model=load, pad_token_id=tok.pad_token_id, batch_size=2, dtype="float32", bf16=False, cache=cache
    )
    first, key, hit = cached_ref_logps(examples, setup / "m", **kw)
    again, key2, hit2 = cached_ref_logps(examples, setup / "m", **kw)
    assert (hit, hit2, key == key2, len(calls)) == (False, True, True, 1)
    assert torch.equal(first, again)
    with torch.no_grad():
        live = forward_logps(model, WRPOCollator(tok.pad_token_id)(examples))
    torch.testing.assert_close(first, live, atol=1e-4, rtol=1e-5)
    # different data -> different key
    _, key3, hit3 = cached_ref_logps(examples[:4], setup / "m", **kw)
    assert key3 != key and not hit3


def test_live_and_precomputed_reference_train_the_same(setup, cache, tmp_path):
    run_train(_cfg(setup, cache, training={"max_steps": 2}), tmp_path / "pre")
    run_train(_cfg(setup, cache, reference={"mode": "live"}, training={"max_steps": 2}), tmp_path / "live")
    pre, live = _train_logs(tmp_path / "pre"), _train_logs(tmp_path / "live")
    assert [e["loss"] for e in pre] == pytest.approx([e["loss"] for e in live], abs=1e-4)


def test_static_alpha_one_is_dpo_on_source_pair_and_skips_the_target_response(setup, cache, tmp_path):
    cfg = _cfg(setup, cache, loss={"alpha": 1.0, "alpha_schedule": "constant"}, training={"max_steps": 1})
    run_train(cfg, tmp_path / "out")
    summary = json.loads((tmp_path / "out" / "wrpo_summary.json").read_text())
    assert summary["columns_forwarded"] == "ws,l"
    log = _train_logs(tmp_path / "out")[0]
    assert log["alpha"] == 1.0 and log["loss"] == pytest.approx(math.log(2), abs=1e-4)


def test_eval_share_reports_implicit_reward_accuracy(setup, cache, tmp_path):
    cfg = _cfg(setup, cache, data={"eval_share": 0.25})
    r = run_train(cfg, tmp_path / "out")
    assert r.metrics["eval_examples"] == 4 and r.metrics["train_examples"] == 12
    assert r.metrics["before_eval_loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert 0.0 <= r.metrics["after_eval_rewards/accuracies"] <= 1.0


def test_training_lowers_the_loss_on_its_data(setup, cache, tmp_path):
    write_jsonl(tmp_path / "four.jsonl", preference_rows(16)[:4])
    cfg = _cfg(
        setup,
        cache,
        data={"limit": 4, "eval_path": str(tmp_path / "four.jsonl")},
        loss={"beta": 0.5},
        training={
            "max_steps": -1,
            "num_train_epochs": 6,
            "gradient_accumulation_steps": 1,
            "learning_rate": 3e-3,
        },
    )
    r = run_train(cfg, tmp_path / "out")
    assert r.steps == 12
    assert r.metrics["after_eval_loss"] < r.metrics["before_eval_loss"] - 0.02
    assert r.metrics["after_eval_rewards/accuracies"] > r.metrics["before_eval_rewards/accuracies"]


def test_cli_refuses_existing_output_and_bad_recipe(setup, cache, tmp_path, capsys):
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "x").write_text("x")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {setup / 'm'}\ndata: {{path: {setup / 'data.jsonl'}}}\n")
    assert cli_main(["wrpo", "train", str(recipe), str(tmp_path / "exists")]) == 2
    assert "already exists" in capsys.readouterr().err
    recipe.write_text("model: m\ndata: {path: d.jsonl, max_length: 10, max_prompt_length: 20}\n")
    assert cli_main(["wrpo", "train", str(recipe), str(tmp_path / "o")]) == 2
    assert "max_prompt_length must be smaller" in capsys.readouterr().err


def test_two_process_accelerate_launch(setup, cache, tmp_path):
    cfg = _cfg(setup, cache, training={"max_steps": 3, "gradient_accumulation_steps": 1})
    (tmp_path / "cfg.json").write_text(cfg.model_dump_json())
    rec = tmp_path / "rec"
    rec.mkdir()
    # Run a copy: a script's folder goes first on sys.path, and tests/helpers/tokenizers.py would shadow the
    # tokenizers package there.
    script = tmp_path / "wrpo_ddp.py"
    script.write_text((HELPERS / "wrpo_ddp.py").read_text())
    r = accelerate_launch(
        [script, tmp_path / "cfg.json", tmp_path / "out", rec], port=29533, env={"FUSELAB_CACHE": str(cache)}
    )
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((rec / f"rank{k}.json").read_text()) for k in (0, 1)]
    assert all(x["world"] == 2 and x["steps"] == 3 for x in ranks)
    a, b = set(ranks[0]["seen"]), set(ranks[1]["seen"])
    assert len(ranks[0]["seen"]) == len(ranks[1]["seen"]) == 6  # 3 steps x 2 per device
    assert not a & b  # the two ranks saw different examples
    summary = json.loads((tmp_path / "out" / "wrpo_summary.json").read_text())
    assert summary["world_size"] == 2
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")
