"""Tokenisation, the truncation rule, the collator, prompt reading, selection and recipes of the WRPO stage."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest
import torch

from fuselab.utils.errors import ConfigError
from fuselab.wrpo.config import (
    BuildConfig,
    PromptsConfig,
    SelectionConfig,
    TrainConfig,
    validate_recipe_file,
)
from fuselab.wrpo.data import TokenizeOptions, WRPOCollator, tokenize_rows, truncate
from fuselab.wrpo.prompts import load_prompts, split_sft
from fuselab.wrpo.selection import Sample, select_triplet
from helpers.tokenizers import byte_level_bpe
from helpers.wrpo import preference_rows, write_jsonl

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "wrpo"


# ------------------------------------------------------------------------------------------- truncation


def _lens(p, rs, max_length=2048, max_prompt=1800):
    p2, r2, flags = truncate(list(range(p)), [list(range(n)) for n in rs], max_length, max_prompt)
    return len(p2), [len(r) for r in r2], flags


def test_one_long_response_does_not_cut_the_others():
    # spec §9.1: the reference code cuts all three to 248 tokens here
    assert _lens(200, [1900, 500, 400]) == (200, [1848, 500, 400], [True, False, False])
    assert _lens(1000, [1100, 300, 250]) == (1000, [1048, 300, 250], [True, False, False])
    assert _lens(300, [600, 400, 350]) == (300, [600, 400, 350], [False, False, False])


def test_long_prompt_keeps_its_tail_then_responses_share_the_rest():
    p2, r2, flags = truncate(list(range(1900)), [list(range(400)), list(range(100))], 2048, 1800)
    assert p2 == list(range(100, 1900))
    assert [len(r) for r in r2] == [248, 100] and flags == [True, False]
    with pytest.raises(ConfigError, match="max_prompt_length"):
        truncate([1], [[1]], 10, 10)


def test_tokenize_rows_appends_eos_once_and_counts_truncation():
    tok = byte_level_bpe()
    rows = preference_rows(3, long_ws=True)
    rows[0]["chosen"] = [{"role": "assistant", "content": "hello<|im_end|>"}]
    ex, stats = tokenize_rows(rows, tok, TokenizeOptions(max_length=80, max_prompt_length=48))
    eos = tok.eos_token_id
    assert ex[0]["wt_ids"][-1] == eos and ex[0]["wt_ids"][-2] != eos  # already ended with EOS: not doubled
    for e in ex:
        assert e["l_ids"][-1] == eos
        assert len(e["prompt_ids"]) + max(len(e[f"{c}_ids"]) for c in ("ws", "wt", "l")) <= 80
        assert (
            e["prompt_ids"]
            == tok.apply_chat_template(
                rows[int(e["id"][1:])]["prompt"], add_generation_prompt=True, tokenize=True
            )["input_ids"]
        )
    assert stats.truncated == {"ws": 3, "wt": 0, "l": 0}
    # the long y_ws was cut, the others kept whole
    assert all(e["truncated"] == [True, False, False] for e in ex)
    ex2, stats2 = tokenize_rows(rows, tok, TokenizeOptions(80, 48, drop_truncated="source"))
    assert ex2 == [] and stats2.dropped_truncated == 3


def test_tokenize_rows_rejects_rows_without_the_three_responses():
    tok = byte_level_bpe()
    row = preference_rows(1)[0]
    del row["source_chosen"]
    with pytest.raises(ConfigError, match="source_chosen"):
        tokenize_rows([row], tok, TokenizeOptions())


# ---------------------------------------------------------------------------------------------- collator


def test_collator_blocks_padding_and_masks():
    feats = [
        {
            "index": 0,
            "prompt_ids": [5, 6],
            "ws_ids": [7, 8, 9],
            "wt_ids": [10],
            "l_ids": [11, 12],
            "ref_logps": [1, 2, 3],
        },
        {
            "index": 1,
            "prompt_ids": [5],
            "ws_ids": [13],
            "wt_ids": [14, 15],
            "l_ids": [16],
            "ref_logps": [4, 5, 6],
        },
    ]
    b = WRPOCollator(pad_token_id=0)(feats)
    assert b["input_ids"].tolist() == [
        [5, 6, 7, 8, 9],  # ws block
        [5, 13, 0, 0, 0],
        [5, 6, 10, 0, 0],  # wt block
        [5, 14, 15, 0, 0],
        [5, 6, 11, 12, 0],  # l block
        [5, 16, 0, 0, 0],
    ]
    assert b["attention_mask"].tolist() == [[int(t != 0) for t in row] for row in b["input_ids"].tolist()]
    assert b["completion_mask"].tolist() == [
        [0, 0, 1, 1, 1],
        [0, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 1, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 1, 0, 0, 0],
    ]
    assert b["ref_logps"].tolist() == [[1, 2, 3], [4, 5, 6]]
    two = WRPOCollator(0, columns=("l", "ws"), pad_to_multiple_of=8)(feats)
    assert two["input_ids"].shape == (4, 8)
    assert two["input_ids"][2].tolist()[:4] == [5, 6, 11, 12]  # order stays ws, wt, l


# ------------------------------------------------------------------------------------------------ prompts


def test_prompt_file_messages_minus_final_assistant_turn(tmp_path):
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"id": "a", "prompt": "Say hi"},
            {
                "messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
                "test": "x",
            },
            {"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]},
        ],
    )
    rows = load_prompts(PromptsConfig(path=str(path)))
    assert [r.id for r in rows] == ["a", "1", "2"]
    assert rows[0].messages == [{"role": "user", "content": "Say hi"}]
    assert rows[1].messages == [{"role": "user", "content": "Q"}] and rows[1].row["test"] == "x"
    assert rows[2].messages[0]["role"] == "system"
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "assistant", "content": "A"}]}])
    with pytest.raises(ConfigError, match="end with a user turn"):
        load_prompts(PromptsConfig(path=str(bad)))


def test_bundled_code_prompts_carry_tests_and_split_is_deterministic():
    rows = load_prompts(PromptsConfig(bundled="code:train", limit=9, shuffle_seed=1))
    assert len(rows) == 9 and all(r.row["test"] and r.row["entry_point"] for r in rows)
    assert all(r.messages[-1]["role"] == "user" for r in rows)
    sft, rest = split_sft(rows, 1 / 3, seed=0)
    assert len(sft) == 3 and len(rest) == 6 and not {r.id for r in sft} & {r.id for r in rest}
    assert split_sft(rows, 1 / 3, seed=0)[0] == sft


# ---------------------------------------------------------------------------------------------- selection


def _s(scores, model="m"):
    return [Sample(f"text{i}" + "x" * (5 - i), s, model, i) for i, s in enumerate(scores)]


def test_selection_best_worst_and_ties():
    counts: Counter[str] = Counter()
    t = select_triplet(_s([0.2, 0.9, 0.9]), _s([0.5, 0.1, 0.8, 0.1]), SelectionConfig(), counts)
    assert (t.ws.index, t.wt.index, t.l.index) == (1, 2, 1)  # earliest of tied best / worst
    assert counts["source_best_tied"] == 1 and counts["target_worst_tied"] == 1 and counts["kept"] == 1
    t = select_triplet(_s([0.9, 0.9]), _s([0.5, 0.5, 0.1]), SelectionConfig(tie_break="shortest"), counts)
    assert t.ws.index == 1 and t.wt.index == 1 and t.l.index == 2  # shortest text among ties


def test_selection_all_equal_and_nan():
    counts: Counter[str] = Counter()
    assert select_triplet(_s([1.0]), _s([0.3, 0.3, 0.3]), SelectionConfig(), counts) is None
    assert counts["dropped_target_all_equal"] == 1
    t = select_triplet(_s([1.0]), _s([0.3, 0.3, 0.3]), SelectionConfig(all_equal="keep"), counts)
    assert t.wt.index == 0 and t.l.index == 2
    assert select_triplet(_s([1.0]), _s([math.nan, 0.3]), SelectionConfig(), counts) is None
    assert counts["dropped_too_few_scored"] == 1 and counts["unscored_samples"] == 1
    t = select_triplet(_s([0.1]), _s([0.3, 0.9]), SelectionConfig(min_source_margin=0.5), counts)
    assert t is None and counts["dropped_source_worse"] == 1


# ------------------------------------------------------------------------------------------------ recipes


def test_shipped_recipes_validate():
    paths = sorted(CONFIGS.glob("*.yaml"))
    assert paths
    kinds = {type(validate_recipe_file(p)) for p in paths}
    assert kinds == {BuildConfig, TrainConfig}


def test_recipe_errors_are_readable(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("# fuselab wrpo train r.yaml out\nmodel: m\ndata: {path: d.jsonl}\nloss: {betta: 0.1}\n")
    with pytest.raises(ConfigError, match=r"loss.betta: unknown key \(valid keys here: alpha"):
        validate_recipe_file(p)
    p.write_text(
        "# fuselab wrpo train r.yaml out\nmodel: m\ndata: {path: d.jsonl}\ntraining: {extra: {lr: 1}}\n"
    )
    with pytest.raises(ConfigError, match="not TrainingArguments: lr"):
        validate_recipe_file(p)
    p.write_text(
        "# fuselab wrpo build r.yaml out\nprompts: {bundled: code:train}\ntarget: t\nsources: [{model: s}]\n"
        "scorer: {type: executon}\n"
    )
    with pytest.raises(ConfigError, match="unknown scorer 'executon'; valid scorers: execution, llm_judge"):
        validate_recipe_file(p)
    p.write_text(
        "# fuselab wrpo build r.yaml out\nprompts: {bundled: code:train}\ntarget: t\nsources: [{model: s}]\n"
        "scorer: {type: execution, timeout: 3}\n"
    )
    with pytest.raises(ConfigError, match="timeout: unknown key"):
        validate_recipe_file(p)


def test_collator_output_feeds_ref_logps_as_float32():
    feats = [
        {
            "index": 0,
            "prompt_ids": [1],
            "ws_ids": [2],
            "wt_ids": [3],
            "l_ids": [4],
            "ref_logps": [-1.5, -2.0, -3.0],
        }
    ]
    assert WRPOCollator(0)(feats)["ref_logps"].dtype == torch.float32
