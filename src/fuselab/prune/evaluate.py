"""Perplexity of a (pruned) model on local text, as BlockPruner reports WikiText-2 perplexity.

The paper's protocol (spec §2.3): the evaluation text joined with blank lines, tokenized once, cut into
non-overlapping ``seqlen`` chunks (remainder dropped), ``exp`` of the mean token NLL over all chunks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from fuselab.prune.calibration import read_rows, tokenize_chunks
from fuselab.prune.runner import nll_sum


@dataclass
class PerplexityResult:
    ppl: float
    nll: float
    tokens: int
    chunks: int
    seqlen: int


def chunk_perplexity(model: torch.nn.Module, chunks: torch.Tensor, batch_size: int = 1) -> PerplexityResult:
    device = next(model.parameters()).device
    total = 0.0
    with torch.inference_mode():
        for batch in chunks.split(batch_size):
            batch = batch.to(device)
            total += nll_sum(model(input_ids=batch, use_cache=False).logits, batch)
    tokens = chunks.shape[0] * (chunks.shape[1] - 1)
    ppl = math.exp(total / tokens) if math.isfinite(total) else math.inf
    return PerplexityResult(ppl, total, tokens, chunks.shape[0], chunks.shape[1])


def file_perplexity(
    model: torch.nn.Module,
    tokenizer: object,
    files: list[str],
    seqlen: int = 2048,
    max_chunks: int | None = None,
    batch_size: int = 1,
) -> PerplexityResult:
    """Perplexity on the rows of ``files`` (txt / json / jsonl, like calibration files)."""
    rows = [r for f in files for r in read_rows(f, tokenizer)]
    chunks = tokenize_chunks(rows, tokenizer, seqlen, None, source=", ".join(files))
    if max_chunks is not None:
        chunks = chunks[:max_chunks]
    return chunk_perplexity(model, chunks, batch_size)


def evaluate_path(
    model_path: str | Path, files: list[str], seqlen: int, max_chunks: int | None, dtype: torch.dtype
) -> PerplexityResult:
    from fuselab.modeling.resolve import resolve_model
    from fuselab.prune.loading import load_pruned_model, load_pruned_tokenizer

    path = resolve_model(str(model_path))
    model = load_pruned_model(path, dtype=dtype)
    return file_perplexity(model, load_pruned_tokenizer(path), files, seqlen, max_chunks)
