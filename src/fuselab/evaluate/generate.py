"""Greedy answers to a few prompts, for side-by-side reading in reports.

Each model answers with its own chat template when it has one, so that an instruction-tuned source is
shown at its best; a model without a template gets the text rendered by ``fallback_template`` (the pivot's).
Greedy decoding keeps the answers reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _stop_ids(tokenizer: Any, model: Any) -> list[int]:
    ids: set[int] = set()
    eos = model.generation_config.eos_token_id
    ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    for marker in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|endoftext|>"):
        tid = tokenizer.convert_tokens_to_ids(marker)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
            ids.add(tid)
    return sorted(ids)


def generate_answers(
    model_path: str | Path,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    fallback_template: Any = None,
    device: str = "cpu",
    model: Any = None,
) -> list[str]:
    """The greedy answer of the model in ``model_path`` to each user message in ``prompts``
    (``model``: that model already loaded)."""
    import torch
    from transformers import AutoModelForCausalLM

    from fuselab.modeling.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(model_path)
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, local_files_only=True)
    model = model.to(device)
    model.eval()
    stops = _stop_ids(tokenizer, model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    answers = []
    for prompt in prompts:
        messages = [{"role": "user", "content": prompt}]
        template = tokenizer if getattr(tokenizer, "chat_template", None) else fallback_template
        if template is None:
            text = prompt
        else:
            text = template.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # A template that writes its own BOS (Gemma's) must not get a second one; text rendered by another
        # model's template gets the tokenizer's usual prefix, as in training and evaluation.
        own_bos = tokenizer.bos_token is not None and text.startswith(tokenizer.bos_token)
        ids = tokenizer(text, add_special_tokens=not own_bos, return_tensors="pt").input_ids.to(device)
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                use_cache=True,  # a model loaded for scoring has use_cache off in its config
                eos_token_id=stops,
                pad_token_id=pad,
            )
        answers.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip())
    return answers
