"""The GGUF -> HF converter and its fix-ups, on tiny models (no download)."""

from __future__ import annotations

import json

import pytest
import torch
from jinja2.exceptions import TemplateError
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from fuselab.modeling.convert import (
    GEMMA_CHAT_TEMPLATE,
    apply_fixups,
    check_dense,
    convert_gguf,
    detach_gguf_quantizer,
    gemma_chat_template,
    retie_embeddings,
    stop_on_end_of_turn,
    verify_checkpoint,
)
from fuselab.utils.errors import FuselabError
from helpers.gguf import tiny_llama_gguf
from helpers.models import random_model, save_model, tiny_llama_config, tiny_qwen2_config
from helpers.tokenizers import byte_level_bpe, metaspace_bpe


@pytest.fixture(scope="module")
def gemma_tok():
    tok = metaspace_bpe(style="gemma")
    gemma_chat_template(None, tok)
    return tok


def test_retie_uses_the_output_projection_and_stores_it_once(tmp_path):
    model = random_model(tiny_qwen2_config(tie=False))
    head = model.lm_head.weight.detach().clone()
    assert not torch.equal(head, model.model.embed_tokens.weight)
    retie_embeddings(model, None)
    assert model.config.tie_word_embeddings is True
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, head)

    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert torch.equal(reloaded.lm_head.weight, head)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, reloaded(ids).logits)


def test_detach_quantizer_makes_the_model_saveable(tmp_path):
    class FakeQuantizer:
        quantization_config = type("C", (), {"quant_method": "gguf"})()

        def is_serializable(self, *args, **kwargs):
            return False

    model = random_model(tiny_llama_config())
    model.hf_quantizer = FakeQuantizer()
    model.config.quantization_config = {"quant_method": "gguf", "gguf_file": "x.gguf"}
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(tmp_path / "before")
    detach_gguf_quantizer(model)
    detach_gguf_quantizer(model)  # idempotent
    model.save_pretrained(tmp_path / "after")
    assert "quantization_config" not in json.loads((tmp_path / "after" / "config.json").read_text())


def test_check_dense_refuses_packed_weights():
    model = random_model(tiny_llama_config())
    check_dense(model)
    model.model.norm.packed = torch.nn.Parameter(torch.zeros(4, dtype=torch.uint8), requires_grad=False)
    with pytest.raises(FuselabError, match="still packed"):
        check_dense(model)


def test_gemma_template_renders_turns(gemma_tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": " Hi! "},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Capital of France?"},
    ]
    text = gemma_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi!<end_of_turn>\n"
        "<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\nCapital of France?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    plain = gemma_tok.apply_chat_template(messages[1:2], tokenize=False)
    assert plain == "<bos><start_of_turn>user\nHi!<end_of_turn>\n"
    ids = gemma_tok.apply_chat_template(messages[1:2], tokenize=True, return_dict=True)["input_ids"]
    assert ids.count(gemma_tok.bos_token_id) == 1  # the template's <bos>, not a second one
    assert gemma_tok.convert_tokens_to_ids("<end_of_turn>") in ids


@pytest.mark.parametrize(
    ("messages", "error"),
    [
        ([{"role": "tool", "content": "x"}], "roles system"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
        ([{"role": "assistant", "content": "a"}], "alternate"),
        ([{"role": "system", "content": "s"}], "user message after the system"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}], "roles system"),
    ],
)
def test_gemma_template_refuses_unsupported_conversations(gemma_tok, messages, error):
    with pytest.raises(TemplateError, match=error):
        gemma_tok.apply_chat_template(messages, tokenize=False)


def test_gemma_fixups_need_gemma_tokens():
    with pytest.raises(FuselabError, match="no <start_of_turn> token"):
        gemma_chat_template(None, byte_level_bpe())


def test_stop_on_end_of_turn(gemma_tok):
    model = random_model(tiny_llama_config(vocab_size=len(gemma_tok)))
    model.generation_config.eos_token_id = gemma_tok.eos_token_id
    end = gemma_tok.convert_tokens_to_ids("<end_of_turn>")
    stop_on_end_of_turn(model, gemma_tok)
    stop_on_end_of_turn(model, gemma_tok)
    assert model.generation_config.eos_token_id == [gemma_tok.eos_token_id, end]


def test_apply_fixups_rejects_unknown_names():
    with pytest.raises(FuselabError, match="unknown conversion fix-up 'nope'"):
        apply_fixups(random_model(tiny_llama_config()), None, ["nope"])


def test_template_is_plain_jinja():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment()

    def raise_exception(msg):
        raise TemplateError(msg)

    env.globals["raise_exception"] = raise_exception
    out = env.from_string(GEMMA_CHAT_TEMPLATE).render(
        messages=[{"role": "user", "content": "x"}], bos_token="<bos>", add_generation_prompt=False
    )
    assert out == "<bos><start_of_turn>user\nx<end_of_turn>\n"


def test_convert_tiny_gguf_end_to_end(tmp_path):
    gguf = tiny_llama_gguf(tmp_path / "tiny.gguf", untied=True)
    out = tmp_path / "out"
    out.mkdir()
    result = convert_gguf(gguf, out, fixups=["retie-embeddings"])
    assert result.fixups == ["retie-embeddings"] and isinstance(result.sample, str)
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= {
        p.name for p in out.iterdir()
    }
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.tie_word_embeddings and model.dtype == torch.bfloat16
    assert result.num_parameters == sum(p.numel() for p in model.parameters())


def test_verify_catches_a_checkpoint_that_differs(tmp_path):
    model = random_model(tiny_llama_config(), seed=0)
    save_model(model, tmp_path)
    assert isinstance(verify_checkpoint(tmp_path, reference=model, max_new_tokens=2), str)
    other = random_model(tiny_llama_config(), seed=1)
    with pytest.raises(FuselabError, match="does not reproduce"):
        verify_checkpoint(tmp_path, reference=other)
