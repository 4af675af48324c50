"""Held-out NLL on assistant tokens, comparable across tokenizers.

Every model reads the same rendered texts (one chat template, split to fit every tokenizer, as in fusion
training), and only the tokens of the assistant replies are scored. Models that share a tokenizer compare by
NLL per token; models with different tokenizers compare by NLL per supervised *byte* of text, since a
tokenizer that cuts text into fewer, longer tokens has a larger NLL per token for the same text
(FuseLLM scores its candidates the same way for the same reason).

The forward pass is the extraction one (:class:`fuselab.fusion.extract.TransformersTopK`): the decoder once,
the LM head only on scored positions, Gemma's soft-capping reproduced and checked against the model's own
logits, but the gold NLL is summed in float32 rather than stored as float16.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fuselab.data.render import RenderedText, encode
from fuselab.utils.errors import NonFiniteError


@dataclass(frozen=True)
class NLLScore:
    """Summed NLL of the supervised tokens of a set of texts under one model."""

    nll: float
    tokens: int
    bytes: int
    examples: int

    @property
    def per_token(self) -> float:
        return self.nll / self.tokens if self.tokens else math.nan

    @property
    def per_byte(self) -> float:
        return self.nll / self.bytes if self.bytes else math.nan

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "per_token": self.per_token, "per_byte": self.per_byte}


def assistant_nll(
    model_path: str | Path,
    texts: Sequence[RenderedText],
    *,
    batch_tokens: int = 4096,
    device: str = "cpu",
    dtype: str = "float32",
    label: str = "",
    show_progress: bool = True,
) -> NLLScore:
    """NLL of the assistant tokens of ``texts`` under the causal LM in ``model_path``."""
    import torch

    from fuselab.fusion.extract import ExtractSettings, TransformersTopK, token_batches
    from fuselab.modeling.tokenizers import load_tokenizer
    from fuselab.utils.progress import progress

    model_path = Path(model_path)
    tokenizer = load_tokenizer(model_path)
    encoded = [encode(tokenizer, t) for t in texts]
    runner = TransformersTopK(model_path, ExtractSettings(k=1, device=device, dtype=dtype))
    lengths = [len(e.ids) for e in encoded]
    order = sorted(range(len(encoded)), key=lambda i: (lengths[i], i))
    total = 0.0
    tokens = 0
    kw = {} if show_progress else {"disable": True}
    bar = progress(
        total=sum(len(e.predicting_positions()) for e in encoded),
        desc=f"NLL {label or model_path.name}",
        unit="tok",
        **kw,
    )
    for batch in token_batches(order, lengths, batch_tokens):
        rows = [encoded[i] for i in batch]
        width = max(len(e.ids) for e in rows)
        ids = torch.full((len(rows), width), runner.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, e in enumerate(rows):
            ids[r, : len(e.ids)] = torch.from_numpy(e.ids)
            mask[r, : len(e.ids)] = 1
        ids, mask = ids.to(runner.device), mask.to(runner.device)
        pos = [torch.from_numpy(e.predicting_positions()).long() for e in rows]
        row_index = torch.cat([torch.full((len(p),), r, dtype=torch.long) for r, p in enumerate(pos)])
        pos_index = torch.cat(pos)
        if len(pos_index) == 0:
            continue
        row_index, pos_index = row_index.to(runner.device), pos_index.to(runner.device)
        with torch.inference_mode():
            hidden = runner.decoder(input_ids=ids, attention_mask=mask).last_hidden_state
            states = hidden[row_index, pos_index]
            gold = ids[row_index, pos_index + 1]
            if not runner._checked:
                runner._check_head(ids[:1], mask[:1], pos_index[row_index == 0], states[row_index == 0])
            for a in range(0, len(gold), 1024):
                logits = runner.head_logits(states[a : a + 1024])
                nll = torch.nn.functional.cross_entropy(logits, gold[a : a + 1024], reduction="sum")
                total += float(nll)
        tokens += len(gold)
        bar.update(len(gold))
    bar.close()
    if not np.isfinite(total):
        raise NonFiniteError(
            f"{model_path}: the held-out NLL is not finite; the checkpoint holds NaN/inf weights"
        )
    return NLLScore(
        nll=total, tokens=tokens, bytes=sum(t.supervised_bytes for t in texts), examples=len(texts)
    )
