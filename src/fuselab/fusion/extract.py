"""Teacher-forced top-k extraction (``fuselab fusion extract``).

For every model (pivot and sources) and every rendered text, one teacher-forced forward; at each position
whose next token is supervised, keep the top-k log-probabilities (normalised over the full vocabulary, after
the temperature), their token ids, and the gold next token's NLL (always at T = 1, for MinCE scoring).

Why it is fast and small (FuseChat spec §9.2 items 1–3, §10 items 1, 2, 7): batches are length-sorted with
dynamic padding (the reference pads everything to 2048); the LM head runs only on supervised positions and
in chunks, so a [batch, length, vocab] tensor never exists and nothing vocabulary-sized leaves the device;
only supervised positions are stored.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fuselab.data.render import Encoded, RenderedText, encode
from fuselab.fusion.store import ExampleTopK, StoreError, TopKStore, TopKStoreWriter
from fuselab.utils.errors import ConfigError, FuselabError
from fuselab.utils.progress import progress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractSettings:
    k: int = 10
    temperature: float = 1.0
    batch_tokens: int = 8192  # padded tokens per forward
    chunk_positions: int = 1024  # positions per LM-head call (bounds the float32 logits at chunk × vocab)
    shard_tokens: int = 200_000  # supervised tokens per shard (resume granularity)
    device: str = "cpu"
    dtype: str = "auto"  # bfloat16 where native (GPU, AVX512-BF16/AMX CPU), else float32
    backend: str = "transformers"  # or "vllm"

    def store_meta(self) -> dict[str, Any]:
        """The settings that change what is stored (part of the store's key): k, temperature, and what the
        numbers are computed with (the precision that really runs, ``auto`` resolved; the backend; the device
        type), so that a float32 recipe never reuses a bf16 store (issue 12)."""
        return {
            "k": self.k,
            "temperature": self.temperature,
            "dtype": str(resolve_dtype(self.dtype, self.device)).removeprefix("torch."),
            "backend": self.backend,
            "device": self.device.split(":", 1)[0],
        }


@dataclass(frozen=True)
class ExtractSummary:
    examples: int
    tokens: int
    nbytes: int
    seconds: float
    resumed_shards: int

    @property
    def bytes_per_token(self) -> float:
        return self.nbytes / max(1, self.tokens)


def plan_shards(encoded: Sequence[Encoded], shard_tokens: int) -> list[list[int]]:
    """Example indices, length-sorted, cut into shards of about ``shard_tokens`` supervised tokens."""
    order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i].ids), i))
    shards: list[list[int]] = []
    current: list[int] = []
    tokens = 0
    for i in order:
        current.append(i)
        tokens += len(encoded[i].predicting_positions())
        if tokens >= shard_tokens:
            shards.append(current)
            current, tokens = [], 0
    if current:
        shards.append(current)
    return shards


def token_batches(indices: Sequence[int], lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Consecutive groups (inputs already length-sorted) whose padded size stays within ``batch_tokens``."""
    batches: list[list[int]] = []
    current: list[int] = []
    width = 0
    for i in indices:
        w = max(width, lengths[i])
        if current and w * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current, w = [], lengths[i]
        current.append(i)
        width = w
    if current:
        batches.append(current)
    return batches


def extract(
    model_path: str | Path,
    texts: Sequence[RenderedText],
    store_dir: str | Path,
    settings: ExtractSettings,
    *,
    label: str = "",
    show_progress: bool = True,
    encoded: Sequence[Encoded] | None = None,
) -> ExtractSummary:
    """Run (or resume) extraction of ``texts`` under the model in ``model_path`` into ``store_dir``.

    ``encoded``: the texts already tokenised with this model's tokenizer (saves tokenising them again)."""
    from fuselab.modeling.tokenizers import load_tokenizer

    if settings.k < 1:
        raise ConfigError(f"k must be at least 1, got {settings.k}")
    if settings.temperature <= 0:
        raise ConfigError(f"temperature must be positive, got {settings.temperature}")
    start = time.perf_counter()
    model_path = Path(model_path)
    if encoded is None:
        tokenizer = load_tokenizer(model_path)
        encoded = [encode(tokenizer, t) for t in texts]
    writer = TopKStoreWriter(store_dir, {**settings.store_meta(), "examples": len(texts)})
    shards = plan_shards(encoded, settings.shard_tokens)
    todo = [(n, s) for n, s in enumerate(shards) if not writer.has_shard(f"shard-{n:05d}")]
    resumed = len(shards) - len(todo)
    if todo:
        runner = _make_runner(model_path, settings)
        total = sum(len(encoded[i].predicting_positions()) for _, s in todo for i in s)
        kw = {} if show_progress else {"disable": True}  # otherwise FUSELAB_PROGRESS decides
        bar = progress(total=total, desc=f"extract {label or model_path.name}", unit="tok", **kw)
        lengths = [len(e.ids) for e in encoded]
        for n, shard in todo:
            rows: dict[int, ExampleTopK] = {}
            for batch in token_batches(shard, lengths, settings.batch_tokens):
                for i, row in zip(batch, runner([encoded[i] for i in batch])):
                    rows[i] = row
                    bar.update(len(row.gold_nll))
            writer.write_shard(f"shard-{n:05d}", shard, [rows[i] for i in shard], {})
        bar.close()
    store_bytes = sum(f.stat().st_size for f in Path(store_dir).rglob("*.npy"))
    tokens = sum(int(s["tokens"]) for s in writer.manifest["shards"])
    summary = ExtractSummary(
        examples=len(texts),
        tokens=tokens,
        nbytes=store_bytes,
        seconds=time.perf_counter() - start,
        resumed_shards=resumed,
    )
    writer.finish(
        {
            "examples": summary.examples,
            "tokens": tokens,
            "bytes": store_bytes,
            "bytes_per_token": summary.bytes_per_token,
        }
    )
    return summary


def open_store(store_dir: str | Path, settings: ExtractSettings, n_examples: int) -> TopKStore:
    store = TopKStore(store_dir)
    expected = {**settings.store_meta(), "examples": n_examples}
    if store.meta != expected:
        raise StoreError(f"store {store_dir} was made with {store.meta}, expected {expected}")
    return store


# --------------------------------------------------------------------------------------------------------------
# Backends


def _make_runner(model_path: Path, settings: ExtractSettings):
    if settings.backend == "transformers":
        return TransformersTopK(model_path, settings)
    if settings.backend == "vllm":
        return VllmTopK(model_path, settings)
    raise ConfigError(f"unknown extraction backend {settings.backend!r}; valid: transformers, vllm")


def resolve_dtype(dtype: str, device: str):
    """``auto``: bfloat16 where it is native on ``device`` (CUDA with bf16, a CPU with AVX512-BF16/AMX), else
    float32 (:mod:`fuselab.utils.hardware`)."""
    from fuselab.utils.hardware import resolve_dtype as resolve

    return resolve(dtype, device, what="extract.dtype")


class TransformersTopK:
    """Chunked LM-head top-k on a transformers causal LM (CPU or GPU)."""

    def __init__(self, model_path: Path, settings: ExtractSettings) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.settings = settings
        self.device = torch.device(settings.device)
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=resolve_dtype(settings.dtype, settings.device), local_files_only=True
        ).to(self.device)
        self.model.eval()
        self.model.config.use_cache = False
        self.decoder = self.model.get_decoder()
        self.head = self.model.get_output_embeddings()
        self.softcap = getattr(self.model.config.get_text_config(), "final_logit_softcapping", None)
        self.pad_id = 0
        self._checked = False

    def head_logits(self, hidden):
        logits = self.head(hidden).float()
        if self.softcap:
            logits = self.softcap * (logits / self.softcap).tanh()
        return logits

    def scored_states(self, batch: Sequence[Encoded]):
        """One decoder pass over a right-padded batch: the final hidden states at the predicting positions
        (row-major, as :meth:`Encoded.predicting_positions` lists them) and the gold next tokens there.
        Call under ``torch.inference_mode()``. Checks the LM head against the model's own logits once."""
        import torch

        width = max(len(e.ids) for e in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, e in enumerate(batch):
            ids[r, : len(e.ids)] = torch.from_numpy(e.ids)
            mask[r, : len(e.ids)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        hidden = self.decoder(input_ids=ids, attention_mask=mask).last_hidden_state
        rows_pos = [torch.from_numpy(e.predicting_positions()) for e in batch]
        row_index = torch.cat([torch.full((len(p),), r, dtype=torch.long) for r, p in enumerate(rows_pos)])
        pos_index = torch.cat(rows_pos).long()
        row_index, pos_index = row_index.to(self.device), pos_index.to(self.device)
        states = hidden[row_index, pos_index]
        gold = ids[row_index, pos_index + 1]
        if not self._checked:
            self._check_head(ids[:1], mask[:1], pos_index[row_index == 0], states[row_index == 0])
        return states, gold, [len(p) for p in rows_pos]

    def __call__(self, batch: Sequence[Encoded]) -> list[ExampleTopK]:
        import torch

        with torch.inference_mode():
            states, gold, counts = self.scored_states(batch)
            k, temp = self.settings.k, self.settings.temperature
            out_ids, out_logp, out_nll = [], [], []
            for a in range(0, len(gold), self.settings.chunk_positions):
                logits = self.head_logits(states[a : a + self.settings.chunk_positions])
                g = gold[a : a + self.settings.chunk_positions]
                lse = logits.logsumexp(-1)
                out_nll.append(lse - logits.gather(1, g[:, None])[:, 0])
                if temp != 1.0:
                    logits = logits / temp
                    lse = logits.logsumexp(-1)
                top = logits.topk(min(k, logits.shape[-1]), dim=-1)
                out_ids.append(top.indices)
                out_logp.append(top.values - lse[:, None])
            all_ids = (
                torch.cat(out_ids).to(torch.int32).cpu().numpy() if out_ids else np.zeros((0, k), np.int32)
            )
            all_logp = torch.cat(out_logp).cpu().numpy() if out_logp else np.zeros((0, k), np.float32)
            all_nll = torch.cat(out_nll).cpu().numpy() if out_nll else np.zeros(0, np.float32)
        _check_finite(all_logp, all_nll)
        result = []
        a = 0
        for n in counts:
            b = a + n
            result.append(
                ExampleTopK(
                    ids=all_ids[a:b],
                    logp=all_logp[a:b].astype(np.float16),
                    gold_nll=np.minimum(all_nll[a:b], 65000).astype(np.float16),
                )
            )
            a = b
        return result

    def _check_head(self, ids, mask, positions, states) -> None:
        """Prove once that decoder + head reproduces the model's own logits (catches unknown logit processing)."""
        import torch

        self._checked = True
        if len(positions) == 0:
            self._checked = False
            return
        positions, states = positions[:8], states[:8]
        full = self.model(input_ids=ids, attention_mask=mask).logits[0, positions].float()
        mine = self.head_logits(states)
        tol = 1e-3 if full.dtype == torch.float32 and states.dtype == torch.float32 else 5e-2
        if not torch.allclose(full, mine, atol=tol * max(1.0, float(full.abs().max())), rtol=0):
            raise FuselabError(
                f"{type(self.model).__name__}: the decoder output times the LM head differs from the model's logits "
                f"(max diff {float((full - mine).abs().max()):.3g}); this architecture post-processes its logits in "
                "a way fuselab does not reproduce. Use backend: vllm, or report the architecture"
            )


def _check_finite(logp: np.ndarray, nll: np.ndarray) -> None:
    if (logp.size and not np.isfinite(logp.sum())) or (nll.size and not np.isfinite(nll.sum())):
        from fuselab.utils.errors import NonFiniteError

        raise NonFiniteError(
            "the model produced NaN/inf log-probabilities; check the checkpoint (fuselab info) or use dtype float32"
        )


class VllmTopK:
    """vLLM prompt log-probs: top-k normalised over the full vocabulary, for sources too large for transformers.

    vLLM returns, for every prompt position, the top ``prompt_logprobs`` entries plus the actual token; raw
    log-probs (before sampling processors), so the temperature must be 1.
    """

    def __init__(self, model_path: Path, settings: ExtractSettings) -> None:
        try:
            from vllm import LLM, SamplingParams
        except ImportError:
            raise ConfigError(
                "backend: vllm needs vLLM installed (`pip install vllm` on a GPU machine)"
            ) from None
        if settings.temperature != 1.0:
            raise ConfigError(
                "backend: vllm returns raw log-probs; use temperature 1.0 or backend: transformers"
            )
        dtype = "auto" if settings.dtype == "auto" else settings.dtype
        self.llm = LLM(model=str(model_path), dtype=dtype, enable_prefix_caching=False)
        self.params = SamplingParams(max_tokens=1, prompt_logprobs=settings.k, temperature=1.0)
        self.k = settings.k

    def __call__(self, batch: Sequence[Encoded]) -> list[ExampleTopK]:
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=[int(t) for t in e.ids]) for e in batch]
        outputs = self.llm.generate(prompts, self.params, use_tqdm=False)
        return [topk_from_prompt_logprobs(o.prompt_logprobs, e, self.k) for o, e in zip(outputs, batch)]


def topk_from_prompt_logprobs(prompt_logprobs: Sequence[Any], encoded: Encoded, k: int) -> ExampleTopK:
    """Convert vLLM's per-position ``{token_id: Logprob}`` dicts (entry p is for token p) to an ExampleTopK."""
    positions = encoded.predicting_positions()
    ids = np.zeros((len(positions), k), np.int32)
    logp = np.full((len(positions), k), -np.inf, np.float32)
    nll = np.zeros(len(positions), np.float32)
    for row, p in enumerate(positions.tolist()):
        entries = prompt_logprobs[p + 1]
        gold = int(encoded.ids[p + 1])
        if entries is None or gold not in entries:
            raise FuselabError(f"vLLM returned no log-prob for prompt position {p + 1}")
        nll[row] = -float(entries[gold].logprob)
        ranked = sorted(
            ((int(tok), float(lp.logprob)) for tok, lp in entries.items() if lp.rank is None or lp.rank <= k),
            key=lambda t: (-t[1], t[0]),
        )[:k]
        for c, (tok, lp) in enumerate(ranked):
            ids[row, c], logp[row, c] = tok, lp
    if len(positions) and not np.isfinite(logp).all():
        raise FuselabError("vLLM returned fewer than k prompt log-probs; is prompt_logprobs >= k?")
    return ExampleTopK(ids=ids, logp=logp.astype(np.float16), gold_nll=nll.astype(np.float16))
