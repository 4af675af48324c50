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


def load_scorer(model_path: str | Path, *, device: str = "cpu", dtype: str = "auto") -> Any:
    """The extraction forward of the model in ``model_path`` (its ``.model`` is the loaded causal LM)."""
    from fuselab.fusion.extract import ExtractSettings, TransformersTopK

    return TransformersTopK(Path(model_path), ExtractSettings(k=1, device=device, dtype=dtype))


def assistant_nll(
    model_path: str | Path,
    texts: Sequence[RenderedText],
    *,
    batch_tokens: int = 4096,
    device: str = "cpu",
    dtype: str = "auto",
    label: str = "",
    show_progress: bool = True,
    scorer: Any = None,
    encoded: Sequence[Any] | None = None,
) -> NLLScore:
    """NLL of the assistant tokens of ``texts`` under the causal LM in ``model_path``.

    ``scorer``: a :func:`load_scorer` of that model, to share one loaded model between several calls;
    ``encoded``: ``texts`` already encoded with this model's tokenizer (models that share a tokenizer, as
    every model trained from one pivot does, share one encoding)."""
    import torch

    from fuselab.fusion.extract import token_batches
    from fuselab.modeling.tokenizers import load_tokenizer
    from fuselab.utils.progress import progress

    model_path = Path(model_path)
    if encoded is None:
        tokenizer = load_tokenizer(model_path)
        encoded = [encode(tokenizer, t) for t in texts]
    elif len(encoded) != len(texts):
        raise ValueError(f"{len(encoded)} encodings for {len(texts)} texts")
    runner = scorer or load_scorer(model_path, device=device, dtype=dtype)
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
        with torch.inference_mode():
            states, gold, _ = runner.scored_states([encoded[i] for i in batch])
            step = runner.head_chunk
            for a in range(0, len(gold), step):
                logits = runner.head_logits(states[a : a + step])
                total += float(torch.nn.functional.cross_entropy(logits, gold[a : a + step], reduction="sum"))
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
