"""The lm-evaluation-harness bridge: scores equal log-likelihoods computed by hand, on stock and pruned models."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import yaml
from transformers import AutoConfig

from fuselab.cli import main
from fuselab.prune.blocks import Block, BlockMasker, inspect_blocks
from fuselab.prune.export import export_pruned
from fuselab.utils.errors import ConfigError, FuselabError
from helpers.models import save_model
from helpers.prune import llama_config, strong_model
from helpers.tokenizers import byte_level_bpe

pytest.importorskip("lm_eval")

from fuselab.evaluate import harness, harness_data

DOCS = [
    {"question": "Paris is the capital of", "choices": ["France", "the moon", "cheese"], "label": 0},
    {"question": "Two plus two is", "choices": ["four", "five", "a fish"], "label": 0},
    {"question": "The quick brown fox", "choices": ["jumps", "sleeps all day long", "is"], "label": 1},
    {"question": "Hello, how are", "choices": ["you", "we today", "they"], "label": 2},
]


@pytest.fixture
def task_dir(tmp_path):
    """A tiny multiple-choice task with local data, written as a user would (datasets' JSON loader)."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    data = folder / "tiny.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    task = {
        "task": "tiny_mc",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(tmp_path / "hf-datasets")},
        "output_type": "multiple_choice",
        "test_split": "test",
        "doc_to_text": "{{question}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{label}}",
        "target_delimiter": " ",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
    }
    (folder / "tiny_mc.yaml").write_text(yaml.safe_dump(task))
    return folder


def hand_logliks(model, tok, docs=DOCS) -> list[list[float]]:
    """log p(" " + choice | question) from the model's full-sequence logits, summed over the choice's tokens."""
    out = []
    for d in docs:
        ctx = tok(d["question"])["input_ids"]
        row = []
        for c in d["choices"]:
            ids = tok(d["question"] + " " + c)["input_ids"]
            assert ids[: len(ctx)] == ctx
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
            row.append(sum(float(logp[t - 1, ids[t]]) for t in range(len(ctx), len(ids))))
        out.append(row)
    return out


def flat(rows: list[list[float]]) -> list[float]:
    return [v for r in rows for v in r]


def expected_accuracy(logliks, docs=DOCS) -> tuple[float, float]:
    acc = [max(range(len(r)), key=r.__getitem__) == d["label"] for r, d in zip(logliks, docs)]
    norm = []
    for r, d in zip(logliks, docs):
        scaled = [ll / len((" " + c).encode()) for ll, c in zip(r, d["choices"])]
        norm.append(max(range(len(r)), key=scaled.__getitem__) == d["label"])
    return sum(acc) / len(acc), sum(norm) / len(norm)


def sample_logliks(result, task="tiny_mc") -> list[list[float]]:
    samples = sorted(result.samples[task], key=lambda s: s["doc_id"])
    return [[float(r[0][0]) for r in s["resps"]] for s in samples]


def test_bridge_scores_equal_hand_computed_logliks(task_dir):
    model, tok = strong_model(llama_config(), seed=5), byte_level_bpe()
    result = harness.run_lm_eval(model, tok, ["tiny_mc"], [task_dir], log_samples=True)
    want = hand_logliks(model, tok)
    got = sample_logliks(result)
    assert flat(got) == pytest.approx(flat(want), rel=1e-4, abs=1e-3)
    acc, acc_norm = expected_accuracy(want)
    score = result.tasks["tiny_mc"]
    assert score.metrics["acc"] == pytest.approx(acc) and score.metrics["acc_norm"] == pytest.approx(acc_norm)
    assert score.headline_metric == "acc_norm" and result.mean == pytest.approx(acc_norm)
    assert score.num_samples == len(DOCS)


def test_pruned_checkpoint_through_the_bridge_and_cli(tmp_path, task_dir, capsys):
    model, tok = strong_model(llama_config(), seed=5), byte_level_bpe()
    src = save_model(model, tmp_path / "src", tok)
    layout = inspect_blocks(model)
    removed = {Block("attn", 1), Block("mlp", 2)}  # single blocks: a partial (non-stock) checkpoint
    dense = hand_logliks(model, tok)
    BlockMasker(model, layout).set_removed(removed)
    pruned = hand_logliks(model, tok)
    assert flat(pruned) != pytest.approx(flat(dense), abs=1e-2), "the removal must change the scores"
    out = tmp_path / "pruned"
    out.mkdir()
    info = export_pruned(src, out, AutoConfig.from_pretrained(src), layout, removed, decilm="never")
    assert info.format == "fuselab"

    result = harness.evaluate_checkpoint(out, ["tiny_mc"], [task_dir], log_samples=True)
    assert flat(sample_logliks(result)) == pytest.approx(flat(pruned), rel=1e-4, abs=1e-3)

    report = tmp_path / "report.json"
    rc = main(
        [
            "prune-eval",
            str(out),
            "--lm-eval",
            "tiny_mc",
            "--include-path",
            str(task_dir),
            "--json",
            str(report),
        ]
    )
    assert rc == 0
    acc, acc_norm = expected_accuracy(pruned)
    task = json.loads(report.read_text())["lm_eval"]["tasks"]["tiny_mc"]
    assert task["metrics"]["acc"] == pytest.approx(acc) and task["headline"] == pytest.approx(acc_norm)
    assert "| tiny_mc | acc_norm |" in capsys.readouterr().out


def test_bundled_tasks_run_and_their_data_are_current(tmp_path):
    for name, build in harness_data.BUILDERS.items():
        shipped = (harness_data.TASKS_DIR / name).read_text(encoding="utf-8")
        assert shipped == harness_data.render(build()), (
            f"{name} is stale: python -m fuselab.evaluate.harness_data"
        )
    rows = harness_data.chat_reply_rows()
    assert len(rows) == 90 and all(len(set(r["choices"])) == 4 for r in rows)
    assert {r["label"] for r in rows} == {0, 1, 2, 3}
    code = harness_data.code_body_rows()
    assert len(code) == 33 and all(r["choices"][r["label"]].startswith("    ") for r in code)

    config = llama_config()
    config.max_position_embeddings = 2048  # the code bodies are long in a 300-token vocabulary
    model = save_model(strong_model(config, seed=1), tmp_path / "m")
    result = harness.evaluate_checkpoint(model, ["fuselab_zero_shot"], limit=3)
    assert set(result.tasks) >= {"fuselab_chat_reply", "fuselab_code_body"}
    assert result.tasks["fuselab_chat_reply"].num_samples == 3


def test_clear_errors(tmp_path, task_dir, monkeypatch, capsys):
    model, tok = strong_model(llama_config()), byte_level_bpe()
    with pytest.raises(ConfigError, match="unknown lm-eval task.*tiny_mc"):
        harness.run_lm_eval(model, tok, ["no_such_task"], [task_dir])
    with pytest.raises(ConfigError, match="does not exist"):
        harness.run_lm_eval(model, tok, ["tiny_mc"], [tmp_path / "missing"])
    path = save_model(model, tmp_path / "m", tok)
    assert main(["prune-eval", str(path)]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if lm-eval were not installed
    with pytest.raises(FuselabError, match=r"fuselab\[lmeval\]"):
        harness.require_lm_eval()
    assert main(["prune-eval", str(path), "--lm-eval", "tiny_mc"]) == 2
    assert "pip install 'fuselab[lmeval]'" in capsys.readouterr().err
