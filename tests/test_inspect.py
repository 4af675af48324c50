"""describe_checkpoint: header-only facts about a checkpoint folder."""

from __future__ import annotations

import json

import pytest
import torch

from fuselab.modeling.catalog import MARKER_FILE
from fuselab.modeling.inspect import describe_checkpoint
from fuselab.modeling.tokenizers import TokenizerFamily
from fuselab.utils.errors import FuselabError, ModelNotFoundError
from helpers.models import random_model, save_model, tiny_llama_config, tiny_qwen2_config
from helpers.tokenizers import byte_level_bpe, metaspace_bpe, save_tokenizer


@pytest.fixture(scope="module")
def bpe():
    return byte_level_bpe(300)


def _unique_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # shared parameters once


def test_tied_llama(tmp_path, bpe):
    model = random_model(tiny_llama_config(vocab_size=len(bpe), tie=True), dtype=torch.bfloat16)
    save_model(model, tmp_path, tokenizer=bpe)
    info = describe_checkpoint(tmp_path)
    assert info.architecture == "LlamaForCausalLM" and info.model_type == "llama"
    assert info.num_parameters == _unique_params(model)
    assert info.tie_word_embeddings is True
    assert info.dtypes == {"bfloat16": info.num_parameters}
    assert (info.num_layers, info.hidden_size) == (2, 32)
    assert info.vocab_size == info.embedding_rows == info.tokenizer_size == len(bpe)
    assert info.vocab_note is None
    assert info.tokenizer_family == TokenizerFamily("byte-level BPE", "BPE", False, "Ġ")
    assert info.special_tokens == {
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
    }
    assert info.special_token_ids["eos_token"] == bpe.eos_token_id
    assert info.has_chat_template and info.chat_template in ("chat_template.jinja", "tokenizer_config.json")
    assert info.generation_eos_token_ids == [2]
    assert info.format == "safetensors" and info.num_shards == 1
    assert info.num_tensors == len(model.state_dict()) - 1  # lm_head is not stored
    assert info.disk_bytes > 2 * info.num_parameters
    assert info.provenance is None


def test_untied_qwen_counts_both_matrices(tmp_path, bpe):
    model = random_model(tiny_qwen2_config(vocab_size=len(bpe), tie=False))
    save_model(model, tmp_path, tokenizer=bpe)
    info = describe_checkpoint(tmp_path)
    assert info.tie_word_embeddings is False
    assert info.num_parameters == _unique_params(model)
    assert info.dtypes == {"float32": info.num_parameters}


def test_padded_embedding_is_flagged(tmp_path, bpe):
    model = random_model(tiny_llama_config(vocab_size=len(bpe) + 20))
    save_model(model, tmp_path, tokenizer=bpe)
    info = describe_checkpoint(tmp_path)
    assert info.vocab_size == len(bpe) + 20 and info.tokenizer_size == len(bpe)
    assert "20 embedding rows have no token" in info.vocab_note
    assert "[!]" in info.to_text()


def test_tokenizer_larger_than_embedding_is_flagged(tmp_path, bpe):
    save_model(random_model(tiny_llama_config(vocab_size=len(bpe) - 5)), tmp_path, tokenizer=bpe)
    assert "5 tokens beyond the embedding" in describe_checkpoint(tmp_path).vocab_note


def test_sentencepiece_family_and_no_template(tmp_path):
    tok = metaspace_bpe(style="gemma")
    save_model(random_model(tiny_llama_config(vocab_size=len(tok))), tmp_path, tokenizer=tok)
    info = describe_checkpoint(tmp_path)
    assert info.tokenizer_family.kind == "SentencePiece/Metaspace"
    assert info.tokenizer_family.byte_fallback is True
    assert not info.has_chat_template and info.chat_template is None
    assert info.special_tokens["bos_token"] == "<bos>"


def test_chat_template_sources(tmp_path, bpe):
    save_model(random_model(tiny_llama_config(vocab_size=len(bpe))), tmp_path, tokenizer=bpe)
    for f in ("chat_template.jinja", "chat_template.json"):
        (tmp_path / f).unlink(missing_ok=True)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{{ messages }}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert describe_checkpoint(tmp_path).chat_template == "tokenizer_config.json"
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "x"}))
    assert describe_checkpoint(tmp_path).chat_template == "chat_template.json"


def test_additional_special_tokens_and_old_style_map(tmp_path, bpe):
    save_model(random_model(tiny_llama_config(vocab_size=len(bpe))), tmp_path, tokenizer=bpe)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    for key in ("bos_token", "eos_token", "extra_special_tokens", "additional_special_tokens"):
        cfg.pop(key, None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tmp_path / "special_tokens_map.json").write_text(
        json.dumps(
            {
                "bos_token": {"content": "<|im_start|>", "lstrip": False},
                "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
            }
        )
    )
    info = describe_checkpoint(tmp_path)
    assert info.special_tokens["bos_token"] == "<|im_start|>"
    assert info.special_tokens["eos_token"] is None
    assert info.additional_special_tokens == ["<|im_start|>", "<|im_end|>"]


def test_sharded_checkpoint_and_no_tokenizer(tmp_path):
    model = random_model(tiny_llama_config())
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    info = describe_checkpoint(tmp_path)
    assert info.num_shards > 1 and info.format == "safetensors"
    assert info.num_parameters == _unique_params(model)
    assert info.tokenizer_family is None and info.tokenizer_size is None
    assert "unknown (no tokenizer files)" in info.to_text()


def test_tied_pickled_checkpoint_counts_the_matrix_once(tmp_path):
    model = random_model(tiny_llama_config(tie=True))
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # keeps both names of the tied matrix
    info = describe_checkpoint(tmp_path)
    assert info.format == "bin" and info.num_parameters == _unique_params(model)


def test_to_dict_is_json_and_text_mentions_everything(tmp_path, bpe):
    save_model(random_model(tiny_llama_config(vocab_size=len(bpe))), tmp_path, tokenizer=bpe)
    (tmp_path / MARKER_FILE).write_text(
        json.dumps(
            {
                "upstream": "org/model",
                "packages": [{"package": "p", "version": "1"}, {"package": "p", "version": "1"}],
                "converted_at": "2025-01-01T00:00:00+00:00",
                "licence": "Apache-2.0",
            }
        )
    )
    info = describe_checkpoint(tmp_path)
    data = json.loads(json.dumps(info.to_dict()))
    assert data["tokenizer_family"]["kind"] == "byte-level BPE"
    assert data["has_chat_template"] is True and data["provenance"]["upstream"] == "org/model"
    text = info.to_text()
    for needle in (
        "LlamaForCausalLM",
        "parameters",
        "tied embeddings  yes",
        "byte-level BPE",
        "p==1 on 2025",
    ):
        assert needle in text


def test_errors(tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"no config\.json"):
        describe_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="holds no model weights"):
        describe_checkpoint(tmp_path)
    save_model(random_model(tiny_llama_config()), tmp_path / "m")
    (tmp_path / "m" / "generation_config.json").write_text("{broken")
    with pytest.raises(FuselabError, match="not valid JSON"):
        describe_checkpoint(tmp_path / "m")


def test_does_not_read_weights(tmp_path, bpe, monkeypatch):
    from fuselab.modeling.checkpoint import Checkpoint

    save_model(random_model(tiny_llama_config(vocab_size=len(bpe))), tmp_path, tokenizer=bpe)

    def no_reads(*args, **kwargs):
        raise AssertionError("describe_checkpoint read tensor data")

    monkeypatch.setattr(Checkpoint, "read", no_reads)
    save_tokenizer(bpe, tmp_path)
    assert describe_checkpoint(tmp_path).num_parameters > 0
