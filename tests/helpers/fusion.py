"""A tiny cross-tokenizer fusion setup: a pivot and two sources with different tokenizer families."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from helpers.models import save_model, tiny_llama_config, tiny_qwen2_config
from helpers.tokenizers import CHATML_TEMPLATE, byte_level_bpe, metaspace_bpe

CONVERSATIONS = [
    [("user", "What is the capital of France?"), ("assistant", "Paris is the capital of France.")],
    [("user", "Add two numbers."), ("assistant", "def add(a, b):\n    return a + b\n")],
    [("system", "Be brief."), ("user", "Count to five."), ("assistant", "1 2 3 4 5")],
    [
        ("user", "How are you?"),
        ("assistant", "I am fine, thank you. 😀"),
        ("user", "And the fox?"),
        ("assistant", "The quick brown fox jumps over the lazy dog."),
    ],
    [("user", "Say hello in Chinese."), ("assistant", "你好, hello!")],
    [("user", "Berlin?"), ("assistant", "Berlin is the capital of Germany.")],
    [("user", "Numbers please"), ("assistant", "0 1 2 3 42 1000")],
    [("user", "Merge?"), ("assistant", "Merging models in parameter space needs the same architecture.")],
]


def write_conversations(path: Path, conversations=CONVERSATIONS) -> Path:
    with open(path, "w") as f:
        for i, conv in enumerate(conversations):
            msgs = [{"role": r, "content": c} for r, c in conv]
            f.write(json.dumps({"id": f"c{i}", "messages": msgs}, ensure_ascii=False) + "\n")
    return path


def _model(config, seed: int):
    """Default transformers initialisation (norm weights 1), so that a few steps visibly move the outputs."""
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def fusion_models(root: Path) -> dict[str, Path]:
    """pivot: Llama + byte-level BPE (300); src_a: Qwen2 + a larger byte-level BPE (360; transformers 5 loads a
    qwen2 checkpoint's tokenizer as Qwen2Tokenizer, which rebuilds a byte-level pipeline); src_b: Llama + a
    Gemma-style SentencePiece tokenizer (byte fallback, no Metaspace pre-tokenizer)."""
    root = Path(root)
    pivot_tok = byte_level_bpe(300)
    a_tok = byte_level_bpe(360)
    b_tok = metaspace_bpe(400, style="gemma")
    b_tok.chat_template = CHATML_TEMPLATE
    paths = {
        "pivot": save_model(_model(tiny_llama_config(len(pivot_tok)), seed=1), root / "pivot", pivot_tok),
        "src_a": save_model(_model(tiny_qwen2_config(len(a_tok)), seed=2), root / "src_a", a_tok),
        "src_b": save_model(_model(tiny_llama_config(len(b_tok), tie=False), seed=3), root / "src_b", b_tok),
    }
    return paths


def fusion_recipe(paths: dict[str, Path], data: Path, **overrides) -> dict:
    recipe = {
        "pivot": str(paths["pivot"]),
        "sources": [str(paths["src_a"]), str(paths["src_b"])],
        "data": {"train": [str(data)], "max_length": 96},
        "extract": {"k": 5, "batch_tokens": 256, "shard_tokens": 40},
        "train": {
            "lam": 0.5,
            "learning_rate": 5e-3,
            "max_steps": 4,
            "batch_size": 2,
            "logging_steps": 1,
            "save_steps": 2,
            "warmup_ratio": 0.0,
            "lr_scheduler": "constant",
        },
    }
    for key, value in overrides.items():
        if isinstance(value, dict):
            recipe.setdefault(key, {}).update(value)
        else:
            recipe[key] = value
    return recipe
