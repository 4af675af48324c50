"""Tiny random causal LMs saved as real Hugging Face checkpoints."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel, Qwen2Config

from helpers.tokenizers import byte_level_bpe, save_tokenizer

# The shape every tiny test model shares: small enough for milliseconds, with GQA and several layers.
TINY_SHAPE = dict(
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


def tiny_llama_config(vocab_size: int = 300, tie: bool = True, layers: int = 2, **kw) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        num_hidden_layers=layers,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        **TINY_SHAPE,
        **kw,
    )


def tiny_qwen2_config(vocab_size: int = 300, tie: bool = False, layers: int = 2) -> Qwen2Config:
    return Qwen2Config(vocab_size=vocab_size, num_hidden_layers=layers, tie_word_embeddings=tie, **TINY_SHAPE)


def random_model(config, seed: int = 0, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)  # norms too, so that every tensor carries information
    return model.to(dtype).eval()


def perturbed(model: PreTrainedModel, seed: int, scale: float = 0.01) -> PreTrainedModel:
    """A copy of ``model`` with every parameter moved by Gaussian noise: a stand-in for a fine-tune."""
    import copy

    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_((torch.randn(p.shape, generator=g) * scale).to(p.dtype))
    return out


def save_model(model: PreTrainedModel, path: str | Path, tokenizer=None, **save_kw) -> Path:
    path = Path(path)
    model.save_pretrained(path, **save_kw)
    save_tokenizer(tokenizer if tokenizer is not None else byte_level_bpe(model.config.vocab_size), path)
    return path
