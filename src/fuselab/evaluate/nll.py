"""Held-out NLL on assistant tokens, comparable across tokenizers.

Every model reads the same rendered texts (one chat template, split to fit every tokenizer, as in fusion
training), and only the tokens of the assistant replies are scored. Models that share a tokenizer compare by
NLL per token; models with different tokenizers compare by NLL per supervised *byte* of text, since a
tokenizer that cuts text into fewer, longer tokens has a larger NLL per token for the same text
(FuseLLM scores its candidates the same way for the same reason).

The forward pass is the extraction one (:class:`fuselab.fusion.extract.TransformersTopK`): the decoder once,
the LM head only on scored positions, Gemma's soft-capping reproduced and checked against the model's own
logits, but the gold NLL is kept in float32 per position (summed per text in float64) rather than stored as
float16.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fuselab.data.render import RenderedText, encode
from fuselab.utils.errors import NonFiniteError


@dataclass(frozen=True)
class NLLScore:
    """Summed NLL of the supervised tokens of a set of texts under one model, and the same per text (in the
    order of the texts), so that two models scored on the same texts can be compared text by text: the
    paired difference's standard error over texts (:func:`paired_difference`) says whether a gap between
    them is larger than which texts happened to be held out."""

    nll: float
    tokens: int
    bytes: int
    examples: int
    per_text_nll: tuple[float, ...] = field(default=(), repr=False)
    per_text_tokens: tuple[int, ...] = field(default=(), repr=False)

    @property
    def per_token(self) -> float:
        return self.nll / self.tokens if self.tokens else math.nan

    @property
    def per_byte(self) -> float:
        return self.nll / self.bytes if self.bytes else math.nan

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "per_token": self.per_token, "per_byte": self.per_byte}


def paired_difference(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, float | None]:
    """Per-token NLL of model ``a`` minus model ``b`` on the same held-out texts, and its standard error over
    the texts (``None`` when the per-text figures are missing, disagree in tokens, or there is one text).

    Both are scores (:meth:`NLLScore.to_json`) of models that share a tokenizer. The difference is a ratio of
    sums, D = Σ(a_i − b_i) / Σ t_i; its standard error is the linearised (delta-method) one of a ratio
    estimator with texts as the sampling unit, sqrt(n/(n−1) · Σ (a_i − b_i − D·t_i)²) / Σ t_i. It measures
    how much the gap depends on which texts were held out, not how much it would move with another training
    seed (that needs several trainings: ``benchmarks/fusion_quality.py``)."""
    delta = a["nll"] / a["tokens"] - b["nll"] / b["tokens"]
    na, nb = a.get("per_text_nll") or [], b.get("per_text_nll") or []
    ta, tb = a.get("per_text_tokens") or [], b.get("per_text_tokens") or []
    if len(na) < 2 or len(na) != len(nb) or list(ta) != list(tb) or len(ta) != len(na):
        return delta, None
    d = np.asarray(na, dtype=np.float64) - np.asarray(nb, dtype=np.float64)
    t = np.asarray(ta, dtype=np.float64)
    total = t.sum()
    if total <= 0:
        return delta, None
    ratio = d.sum() / total
    z = d - ratio * t
    n = len(d)
    return float(ratio), float(math.sqrt(n / (n - 1) * float((z * z).sum())) / total)


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
    per_nll = [0.0] * len(encoded)
    per_tokens = [0] * len(encoded)
    kw = {} if show_progress else {"disable": True}
    bar = progress(
        total=sum(len(e.predicting_positions()) for e in encoded),
        desc=f"NLL {label or model_path.name}",
        unit="tok",
        **kw,
    )
    for batch in token_batches(order, lengths, batch_tokens):
        with torch.inference_mode():
            states, gold, counts = runner.scored_states([encoded[i] for i in batch])
            step = runner.head_chunk
            losses = []
            for a in range(0, len(gold), step):
                logits = runner.head_logits(states[a : a + step])
                losses.append(torch.nn.functional.cross_entropy(logits, gold[a : a + step], reduction="none"))
            position_nll = torch.cat(losses).double().cpu() if losses else torch.zeros(0, dtype=torch.float64)
            for i, part in zip(batch, position_nll.split(counts), strict=True):
                per_nll[i] = float(part.sum())
                per_tokens[i] = len(part)
        bar.update(len(gold))
    bar.close()
    total, tokens = math.fsum(per_nll), sum(per_tokens)
    if not np.isfinite(total):
        raise NonFiniteError(
            f"{model_path}: the held-out NLL is not finite; the checkpoint holds NaN/inf weights"
        )
    return NLLScore(
        nll=total,
        tokens=tokens,
        bytes=sum(t.supervised_bytes for t in texts),
        examples=len(texts),
        per_text_nll=tuple(per_nll),
        per_text_tokens=tuple(per_tokens),
    )
