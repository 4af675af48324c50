"""Tiny model families for the merge tests: a base and "fine-tunes" of it, saved as real checkpoints."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from helpers.models import perturbed, random_model, save_model, tiny_llama_config


def make_family(root: Path, fine_tunes: int = 3, **config) -> dict[str, Path]:
    """A tiny Llama base (float32, tied embeddings unless told otherwise) and ``fine_tunes`` perturbed copies."""
    base = random_model(tiny_llama_config(**config), seed=0)
    paths = {"base": save_model(base, root / "base")}
    for i in range(fine_tunes):
        paths[f"ft{i}"] = save_model(perturbed(base, seed=10 + i, scale=0.01), root / f"ft{i}")
    return paths


def state(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def word_tokenizer(words: list[str], chat_template: str | None = None):
    """A word-level tokenizer with exactly ``words`` as its vocabulary (id = position; ``<unk>`` first)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    if chat_template:
        fast.chat_template = chat_template
    return fast


def model_with_words(
    base_dir: Path, words: list[str], out: Path, seed: int, chat_template: str | None = None
) -> Path:
    """A "fine-tune" of the model in ``base_dir`` whose vocabulary is ``words``: its own (random) embedding rows,
    every other tensor the base's plus noise."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base_dir)
    config.vocab_size = len(words)
    model = random_model(config, seed=seed)
    base = load_file(base_dir / "model.safetensors")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in base and "embed" not in name:
                p.copy_(base[name] + 0.01 * torch.randn(p.shape, generator=g))
    return save_model(model, out, tokenizer=word_tokenizer(words, chat_template))
