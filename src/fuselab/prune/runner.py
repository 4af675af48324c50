"""Calibration forward passes: summed NLL per micro-batch, optionally starting at a layer from cached inputs.

Scores are **summed** token NLLs (fp32 cross-entropy with ``reduction="sum"`` per micro-batch, accumulated in
Python floats, i.e. float64, in a fixed micro-batch order). Every candidate sees the same tokens, so ranking
by summed NLL is ranking by the paper's perplexity ``exp(mean NLL)`` (BlockPruner eq. 3), and the running sum
over micro-batches is a lower bound of the total: each token NLL is ``-log p >= 0`` and adding a non-negative
float never decreases a sum, even with rounding. That monotonicity is what makes early abandoning exact.

Layer-input caching (spec §5.2a): removing a block in layer ``i`` leaves layers ``0..i-1`` unchanged, so their
output for each micro-batch is cached and a candidate runs from layer ``i`` on. Both the plain and the cached
path go through the model's own ``forward`` (same kernels, same micro-batch shapes, same masks and position
embeddings, final norm, head and any logit post-processing); the cached path only makes layers ``0..i-1`` return
their input and hands layer ``i`` the cached tensor. The value layer ``i`` receives is therefore bitwise the
one the plain path computes, and so is every score after it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fuselab.prune.blocks import BlockLayout, OutputSpec, _hidden_arg, _with_hidden, get_submodule


def nll_sum(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Summed next-token NLL of ``ids`` under ``logits`` (fp32); nothing is ignored (chunks have no padding)."""
    v = logits.shape[-1]
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, v).float(), ids[:, 1:].reshape(-1), reduction="sum")
    value = float(loss)
    return value if math.isfinite(value) else math.inf


def _passthrough(spec: OutputSpec) -> Any:
    def forward(*args: Any, **kwargs: Any) -> Any:
        return spec.wrap(_hidden_arg(args, kwargs))

    return forward


class CalibrationRunner:
    """Runs ``model`` over fixed token chunks in micro-batches of ``batch_size``."""

    def __init__(self, model: nn.Module, layout: BlockLayout, chunks: torch.Tensor, batch_size: int = 1):
        self.model = model
        self.layout = layout
        self.layers = get_submodule(model, layout.layers_path)
        device = next(model.parameters()).device
        self.batches = [b.to(device) for b in chunks.split(batch_size)]
        self.num_tokens = int(chunks.shape[0] * (chunks.shape[1] - 1))  # predicted tokens
        # cache[layer][batch]: the input of ``layer`` for micro-batch ``batch`` in the current model
        self.cache: list[list[torch.Tensor | None]] = [[None] * len(self.batches) for _ in self.layers]
        self.forward_layers = 0  # decoder-layer forwards done (for reports)
        self.batches_run = 0  # micro-batch forwards done (for reports)

    @contextlib.contextmanager
    def _start_at(self, start: int, batch: int, record_from: int | None) -> Iterator[None]:
        """Inside: a model forward skips layers ``< start`` (layer ``start`` gets the cached input) and records
        the inputs of layers ``>= record_from`` into the cache."""
        patched: list[tuple[nn.Module, Any]] = []
        handles = []
        spec = self.layout.layer_output
        try:
            if start > 0:
                cached = self.cache[start][batch]
                if cached is None:
                    raise RuntimeError(f"no cached input for layer {start}; refresh the cache first")
                for j in range(start):
                    layer = self.layers[j]
                    patched.append((layer, layer.__dict__.get("forward")))
                    layer.forward = _passthrough(spec)

                def inject(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
                    return _with_hidden(args, kwargs, cached)

                handles.append(self.layers[start].register_forward_pre_hook(inject, with_kwargs=True))
            if record_from is not None:
                for j in range(record_from, len(self.layers)):

                    def record(mod: nn.Module, args: tuple, kwargs: dict, j: int = j) -> None:
                        self.cache[j][batch] = _hidden_arg(args, kwargs).detach().clone()

                    handles.append(self.layers[j].register_forward_pre_hook(record, with_kwargs=True))
            yield
        finally:
            for h in handles:
                h.remove()
            for layer, fwd in patched:
                if fwd is None:
                    del layer.forward
                else:
                    layer.forward = fwd

    def batch_nll(self, batch: int, start: int = 0, record_from: int | None = None) -> float:
        ids = self.batches[batch]
        with torch.inference_mode(), self._start_at(start, batch, record_from):
            logits = self.model(input_ids=ids, use_cache=False).logits
        self.forward_layers += len(self.layers) - start
        self.batches_run += 1
        return nll_sum(logits, ids)

    def iter_nll(self, start: int = 0) -> Iterator[float]:
        """Per-micro-batch NLL sums of the current model, lazily (stop iterating to abandon)."""
        for b in range(len(self.batches)):
            yield self.batch_nll(b, start)

    def total_nll(self, start: int = 0) -> float:
        total = 0.0
        for v in self.iter_nll(start):
            total += v
        return total

    def refresh(self, from_layer: int = 0) -> float:
        """Recompute the cached inputs of layers ``> from_layer`` (all layers for 0) for the current model and
        return its total NLL. Call after a removal in layer ``from_layer``."""
        total = 0.0
        for b in range(len(self.batches)):
            total += self.batch_nll(b, start=from_layer, record_from=from_layer + 1 if from_layer else 0)
        return total

    def ppl(self, total_nll: float) -> float:
        return math.exp(total_nll / self.num_tokens) if math.isfinite(total_nll) else math.inf

    def block_influence(self) -> list[float]:
        """ShortGPT's Block Influence per layer: 1 - mean over tokens of cos(layer input, layer output).

        Uses the raw output of every layer (the official code takes the last one after the final norm; see
        the spec §8). Predicted and unpredicted positions alike, as ShortGPT does.
        """
        n = len(self.layers)
        sums = [0.0] * n
        count = 0
        for ids in self.batches:
            ins: list[torch.Tensor | None] = [None] * n
            outs: list[torch.Tensor | None] = [None] * n
            handles = []
            for j, layer in enumerate(self.layers):

                def pre(mod: nn.Module, args: tuple, kwargs: dict, j: int = j, ins: list = ins) -> None:
                    ins[j] = _hidden_arg(args, kwargs)

                def post(mod: nn.Module, args: tuple, out: Any, j: int = j, outs: list = outs) -> None:
                    outs[j] = out[0] if isinstance(out, tuple) else out

                handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
                handles.append(layer.register_forward_hook(post))
            try:
                with torch.inference_mode():
                    self.model(input_ids=ids, use_cache=False)
            finally:
                for h in handles:
                    h.remove()
            for j in range(n):
                cos = F.cosine_similarity(ins[j].double(), outs[j].double(), dim=-1)  # type: ignore[union-attr]
                sums[j] += float(cos.sum())
            count += ids.numel()
        return [1.0 - s / count for s in sums]
