"""The output vocabulary (``tokenizer_source``: union, a model, base) with embedding rows rebuilt as mergekit
does where vocabularies differ, and chat templates chosen by name, file or ``auto``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fuselab.merge import run_merge
from fuselab.merge.chat_templates import CHAT_TEMPLATES
from fuselab.utils.errors import FuselabError, IncompatibleModelsError
from helpers.merge_models import make_family, model_with_words, state, word_tokenizer
from helpers.models import random_model, save_model, tiny_llama_config

EMBED = "model.embed_tokens.weight"
BASE_WORDS = ["<unk>", "a", "b", "c", "d"]
X_WORDS = ["<unk>", "b", "a", "e", "f"]  # reordered, lacks c and d, has e and f
Y_WORDS = ["<unk>", "a", "e", "g"]
TEMPLATE_1 = "{% for m in messages %}1:{{ m['content'] }}{% endfor %}"
TEMPLATE_2 = "{% for m in messages %}2:{{ m['content'] }}{% endfor %}"


@pytest.fixture(scope="module")
def words(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("words")
    base = random_model(tiny_llama_config(vocab_size=len(BASE_WORDS)), seed=0)
    paths = {"base": save_model(base, root / "base", tokenizer=word_tokenizer(BASE_WORDS, TEMPLATE_2))}
    paths["x"] = model_with_words(paths["base"], X_WORDS, root / "x", seed=1, chat_template=TEMPLATE_1)
    paths["y"] = model_with_words(paths["base"], Y_WORDS, root / "y", seed=2, chat_template=TEMPLATE_1)
    return paths


def rows_by_word(path: Path, vocab: list[str]) -> dict[str, torch.Tensor]:
    emb = state(path)[EMBED]
    return {w: emb[i] for i, w in enumerate(vocab)}


def expected_rows(inputs: dict[str, list[str]], paths: dict[str, Path], out_words: list[str], base: str):
    """mergekit's rule for every input and output token: its own row; if it lacks the token, the only model
    that has it, else the base's, else the mean of the models that have it."""
    own = {name: rows_by_word(paths[name], vocab) for name, vocab in inputs.items()}
    rows = {name: [] for name in inputs}
    for w in out_words:
        holders = [n for n in inputs if w in own[n]]
        if len(holders) == 1:
            default = own[holders[0]][w]
        elif base in holders:
            default = own[base][w]
        else:
            default = sum(own[n][w] for n in holders) / len(holders)
        for n in inputs:
            rows[n].append(own[n].get(w, default))
    return {n: torch.stack(r) for n, r in rows.items()}


def task_arithmetic(words, *models, **extra) -> dict:
    return {
        "merge_method": "task_arithmetic",
        "base_model": str(words["base"]),
        "models": [{"model": str(words[m]), "parameters": {"weight": 1.0}} for m in models],
        **extra,
    }


def test_union_vocabulary_rebuilds_rows_as_mergekit(words, tmp_path):
    out = tmp_path / "union"
    run_merge(task_arithmetic(words, "x", "y", tokenizer_source="union"), out, show_progress=False)
    union = [*BASE_WORDS, "e", "f", "g"]  # the base's, then what the others add, in input order
    tok = AutoTokenizer.from_pretrained(out)
    assert [tok.convert_ids_to_tokens(i) for i in range(len(union))] == union
    assert json.loads((out / "config.json").read_text())["vocab_size"] == len(union)
    r = expected_rows({"base": BASE_WORDS, "x": X_WORDS, "y": Y_WORDS}, words, union, "base")
    want = r["base"] + (r["x"] - r["base"]) + (r["y"] - r["base"])
    torch.testing.assert_close(state(out)[EMBED], want)
    # the other tensors merge as usual, and the model loads with its new vocabulary (tied head included)
    k = "model.layers.0.mlp.up_proj.weight"
    b, x, y = state(words["base"])[k], state(words["x"])[k], state(words["y"])[k]
    torch.testing.assert_close(state(out)[k], x + y - b)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.get_output_embeddings().weight.shape[0] == len(union)


def test_one_models_vocabulary_and_padding(words, tmp_path):
    out = tmp_path / "x"
    recipe = task_arithmetic(words, "x", tokenizer={"source": str(words["x"]), "pad_to_multiple_of": 4})
    run_merge(recipe, out, show_progress=False)
    assert (out / "tokenizer.json").read_bytes() == (words["x"] / "tokenizer.json").read_bytes()
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 8  # 5 tokens padded to 8 rows
    r = expected_rows({"base": BASE_WORDS, "x": X_WORDS}, words, X_WORDS, "base")
    got = state(out)[EMBED]
    torch.testing.assert_close(got[:5], r["x"])  # base + (x − base), in x's token order
    torch.testing.assert_close(got[5:], r["x"].mean(0).expand(3, -1))  # padding rows: the mean row


def test_same_vocabulary_needs_no_tokenizer_and_keeps_rows(tmp_path, monkeypatch):
    fam = make_family(tmp_path, fine_tunes=2)
    import transformers

    def no_loading(*args, **kwargs):
        raise AssertionError("tokenizers were loaded although every input has the same files")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_loading)
    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(fam[f"ft{i}"]), "parameters": {"weight": 1.0}} for i in range(2)],
        "tokenizer_source": "union",
    }
    run_merge(recipe, tmp_path / "o", show_progress=False)
    a, b = state(fam["ft0"]), state(fam["ft1"])
    torch.testing.assert_close(state(tmp_path / "o")[EMBED], (a[EMBED] + b[EMBED]) / 2)


def test_different_vocabularies_without_a_tokenizer_source_are_refused(words, tmp_path):
    with pytest.raises(IncompatibleModelsError, match="different vocabularies.*`tokenizer_source: union`"):
        run_merge(task_arithmetic(words, "y"), tmp_path / "o", show_progress=False)


def test_union_needs_every_tokenizer(words, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        (bare / f).write_bytes((words["y"] / f).read_bytes())
    recipe = task_arithmetic(words, "x", tokenizer_source="union")
    recipe["models"].append({"model": str(bare), "parameters": {"weight": 1.0}})
    with pytest.raises(FuselabError, match="has no tokenizer files; `tokenizer_source: union` aligns"):
        run_merge(recipe, tmp_path / "o", show_progress=False)


@pytest.mark.parametrize("choice", ["chatml", "file", "auto", "text"])
def test_chat_template_by_name_file_or_auto(words, tmp_path, choice):
    f = tmp_path / "t.jinja"
    f.write_text(TEMPLATE_2)
    value = {"chatml": "chatml", "file": str(f), "auto": "auto", "text": TEMPLATE_2}[choice]
    run_merge(
        task_arithmetic(words, "x", "y", tokenizer_source="union", chat_template=value),
        tmp_path / "m",
        show_progress=False,
    )
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    want = {
        "chatml": CHAT_TEMPLATES["chatml"],
        "file": TEMPLATE_2,
        "auto": TEMPLATE_1,  # two of the three inputs have it
        "text": TEMPLATE_2,
    }[choice]
    assert tok.chat_template == want
    if choice == "chatml":
        text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
        assert text == "<|im_start|>user\nhi<|im_end|>\n"


def test_named_templates_render(words):
    from jinja2 import Environment

    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ]
    env = Environment()
    env.globals["raise_exception"] = lambda msg: (_ for _ in ()).throw(ValueError(msg))
    outputs = {
        name: env.from_string(t).render(
            messages=messages, bos_token="<s>", eos_token="</s>", add_generation_prompt=False
        )
        for name, t in CHAT_TEMPLATES.items()
    }
    assert outputs["llama3"].startswith("<s><|start_header_id|>system<|end_header_id|>\n\nbe brief<|eot_id|>")
    assert outputs["mistral"] == "<s> [INST] be brief\n\nhi [/INST] hello</s>"
    assert outputs["alpaca"] == "be brief\n\n### Instruction:\nhi\n\n### Response:\nhello"
    assert (
        outputs["exaone"] == "[|system|]be brief[|endofturn|]\n[|user|]hi\n[|assistant|]hello[|endofturn|]\n"
    )
