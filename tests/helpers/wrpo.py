"""Helpers for the WRPO tests: a tiny chat model on disk, preference rows, and an independent DPO."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from helpers.models import random_model, save_model, tiny_llama_config
from helpers.tokenizers import byte_level_bpe

WORDS = ["hello", "fox", "dog", "add", "capital", "Paris", "numbers", "merge", "models", "quick", "lazy"]


def tiny_chat_model(path: Path, seed: int = 0, vocab: int = 300):
    """A tiny random Llama with a byte-level BPE tokenizer and a ChatML template, saved at ``path``."""
    tok = byte_level_bpe(vocab)
    cfg = tiny_llama_config(vocab_size=len(tok))
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = (
        tok.bos_token_id,
        tok.eos_token_id,
        tok.pad_token_id,
    )
    model = random_model(cfg, seed=seed)
    save_model(model, path, tokenizer=tok)
    return model, tok


def preference_rows(n: int, seed: int = 0, long_ws: bool = False) -> list[dict]:
    g = torch.Generator().manual_seed(seed)

    def text(k: int) -> str:
        return " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (k,), generator=g))

    rows = []
    for i in range(n):
        rows.append(
            {
                "id": f"p{i}",
                "prompt": [{"role": "user", "content": f"question {i}: {text(3)}"}],
                "source_chosen": [{"role": "assistant", "content": text(40 if long_ws else 6)}],
                "chosen": [{"role": "assistant", "content": text(5)}],
                "rejected": [{"role": "assistant", "content": text(4 + i % 3)}],
                "source_model": "src",
                "scores": {"ws": 1.0, "wt": 0.5, "l": 0.0},
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def reference_dpo(pc, pr, rc, rr, beta):
    """DPO written from the paper's formula, independently of fuselab.wrpo.loss."""
    return torch.stack(
        [-F.logsigmoid(beta * ((a - c) - (b - d))) for a, b, c, d in zip(pc, pr, rc, rr)]
    ).mean()


def brute_logp(model, prompt_ids: list[int], resp_ids: list[int]) -> torch.Tensor:
    """Summed log-prob of ``resp_ids`` after ``prompt_ids``, one unpadded sequence at a time."""
    ids = torch.tensor([prompt_ids + resp_ids])
    logp = torch.log_softmax(model(ids).logits[0].double(), -1)
    return sum(logp[len(prompt_ids) - 1 + j, t] for j, t in enumerate(resp_ids))


def build_recipe(root: Path, scorer_function: str, *, batch_size: int, share: float, **over) -> dict:
    """A ``wrpo build`` recipe over the tiny models and prompts under ``root`` (``target/``, ``source/``,
    ``prompts.jsonl``), scored by the ``python`` scorer ``scorer_function``, with 2 SFT steps."""
    recipe = {
        "prompts": {"path": str(root / "prompts.jsonl")},
        "target": str(root / "target"),
        "sources": [{"model": str(root / "source"), "name": "src"}],
        "sampling": {"n": 3, "max_new_tokens": 6, "batch_size": batch_size, "temperature": 1.0, "top_p": 1.0},
        "scorer": {"type": "python", "function": scorer_function},
        "sft": {"share": share, "train": True, "max_steps": 2, "per_device_train_batch_size": 2},
    }
    recipe.update(over)
    return recipe
