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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from fuselab.data.render import Encoded, RenderedText, encode
from fuselab.fusion.store import (
    ExampleTopK,
    StoreError,
    TopKStore,
    TopKStoreWriter,
    check_meta,
    read_manifest,
    remove_leftovers,
    shard_entry,
    write_shard_files,
)
from fuselab.utils.distributed import current_ranks, rank_device, wait_for
from fuselab.utils.errors import ConfigError, FuselabError, IncompatibleModelsError, NonFiniteError
from fuselab.utils.progress import progress

log = logging.getLogger(__name__)

HEAD_ELEMENTS = 1 << 26  # float32 logits per LM-head call (256 MiB), whatever the vocabulary size


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
    device_map: str | None = None  # transformers: "auto" spreads the model over the visible GPUs
    tensor_parallel_size: int = 1  # vllm only, like the two below
    gpu_memory_utilization: float | None = None
    max_model_len: int | None = None

    def store_meta(self) -> dict[str, Any]:
        """The settings that change what is stored (part of the store's key): k, temperature, and what the
        numbers are computed with (the precision that really runs, ``auto`` resolved; the backend; the device
        type), so that a float32 recipe never reuses a bf16 store (issue 12). Where the model is placed
        (``device_map``, ``tensor_parallel_size``, the number of processes) is not part of it: it changes no
        number beyond the reduction order of a split matmul, and keeping it out keeps existing stores valid."""
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

    Under ``accelerate launch --num_processes N`` every process calls this with the same arguments: shard
    ``n`` of the (deterministic, length-sorted) plan is computed by rank ``n mod N``
    (:meth:`~fuselab.utils.distributed.Ranks.owns`), each rank writes its shards' folders, and rank 0, the
    manifest's only author, records them and marks the store complete once every shard is there; the others
    return when it has. A shard's content depends only on its examples and the settings, never on who
    computed it, and the manifest lists shards in shard order, so the store is byte-identical to the one a
    single process writes (on the same device type, dtype and library versions). A rerun, with any number
    of processes, keeps every complete shard folder and computes only the missing ones.

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
    ranks = current_ranks()
    if ranks.distributed and settings.device_map is not None:
        raise ConfigError(
            "device_map: auto spreads one model over every visible GPU, which the other processes of "
            "`accelerate launch` use too; run the extraction in one process, or remove device_map to give "
            "each process its own GPU (device: cuda)"
        )
    if ranks.distributed and settings.backend == "vllm":
        raise ConfigError(
            "backend: vllm runs in one process (vLLM places and shards the model itself: use "
            "extract.tensor_parallel_size for a source larger than one GPU); run `fuselab fusion extract` "
            "without `accelerate launch`, or use backend: transformers for data-parallel extraction"
        )
    check_vocabulary(model_path, encoded)  # before any forward, which would crash deep in torch
    meta = {**settings.store_meta(), "examples": len(texts)}
    shards = plan_shards(encoded, settings.shard_tokens)
    plan = [(f"shard-{n:05d}", s) for n, s in enumerate(shards)]
    mine = [(name, s) for n, (name, s) in enumerate(plan) if ranks.owns(n)]
    writer = None
    if ranks.is_main:
        # the manifest's only author; with one process it cleans every leftover, as before
        writer = TopKStoreWriter(
            store_dir, meta, leftovers=[n for n, _ in mine] if ranks.distributed else None
        )
        writer.reconcile(plan)
        todo = [(name, s) for name, s in mine if not writer.has_shard(name)]
    else:
        Path(store_dir).mkdir(parents=True, exist_ok=True)
        check_meta(store_dir, read_manifest(store_dir), meta)
        remove_leftovers(store_dir, [n for n, _ in mine])
        todo = [(name, s) for name, s in mine if shard_entry(store_dir, name, s, settings.k) is None]
    resumed = len(mine) - len(todo)
    if todo:
        runner = _make_runner(model_path, replace(settings, device=rank_device(settings.device, ranks)))
        total = sum(len(encoded[i].predicting_positions()) for _, s in todo for i in s)
        kw = (
            {} if show_progress and ranks.is_main else {"disable": True}
        )  # otherwise FUSELAB_PROGRESS decides
        bar = progress(total=total, desc=f"extract {label or model_path.name}", unit="tok", **kw)
        lengths = [len(e.ids) for e in encoded]
        for name, shard in todo:
            rows: dict[int, ExampleTopK] = {}
            for batch in token_batches(shard, lengths, settings.batch_tokens):
                for i, row in zip(batch, runner([encoded[i] for i in batch])):
                    rows[i] = row
                    bar.update(len(row.gold_nll))
            if writer is not None:
                writer.write_shard(name, shard, [rows[i] for i in shard], {})
            else:
                write_shard_files(store_dir, name, shard, [rows[i] for i in shard], settings.k)
        bar.close()
    if writer is not None:
        if ranks.distributed:
            missing: list[str] = []

            def all_written() -> bool:
                missing[:] = writer.adopt(plan)
                return not missing

            wait_for(all_written, what=lambda: f"{len(missing)} shard(s) of {store_dir}: {missing[:5]}")
        store_bytes = sum(
            f.stat().st_size for name, _ in plan for f in (Path(store_dir) / name).glob("*.npy")
        )
        tokens = sum(int(s["tokens"]) for s in writer.manifest["shards"])
        writer.finish(
            {
                "examples": len(texts),
                "tokens": tokens,
                "bytes": store_bytes,
                "bytes_per_token": store_bytes / max(1, tokens),
            }
        )
    else:
        wait_for(
            lambda: bool((read_manifest(store_dir) or {}).get("complete")),
            what=lambda: f"the main process to finish the manifest of {store_dir}",
        )
    summary_of = read_manifest(store_dir)["summary"]
    summary = ExtractSummary(
        examples=len(texts),
        tokens=int(summary_of["tokens"]),
        nbytes=int(summary_of["bytes"]),
        seconds=time.perf_counter() - start,
        resumed_shards=resumed,
    )
    return summary


def check_vocabulary(model_path: Path, encoded: Sequence[Encoded]) -> None:
    """Refuse, before any forward, a model whose tokenizer gives ids its embedding or LM head has no row for
    (the forward would stop at an IndexError, or a CUDA device-side assert, deep in torch), and one whose
    ``config.vocab_size`` disagrees with its weights (transformers refuses to load it, after a long report).
    Reads the weight files' headers only."""
    from fuselab.modeling.checkpoint import Checkpoint
    from fuselab.modeling.inspect import check_config_vocab_size, embedding_rows

    if not (Path(model_path) / "config.json").is_file():
        return  # not a local folder (a vLLM hub id): vLLM checks its own
    with Checkpoint(model_path) as ckpt:
        embed = embedding_rows(ckpt)
        head = next(
            ((n, ckpt.tensors[n].shape[0]) for n in ckpt.tensors if n.endswith("lm_head.weight")), None
        )
        size = ckpt.text_config().get("vocab_size")
        check_config_vocab_size(ckpt, model_path, {"embedding": embed, "LM head": head})
    bounds = [(f"`{n}`", rows) for n, rows in (f for f in (embed, head) if f)] or (
        [("config.vocab_size", size)] if isinstance(size, int) else []
    )
    top = max((int(e.ids.max()) for e in encoded if len(e.ids)), default=-1)
    for what, rows in bounds:
        if top >= rows:
            raise IncompatibleModelsError(
                f"{model_path}: its tokenizer gives token ids up to {top} on the data, but the model's {what} "
                f"has {rows} rows (ids 0 to {rows - 1}): the tokenizer in that folder is not the model's own. "
                "Put the model's own tokenizer files there, or resize the embeddings to the tokenizer "
                "(`model.resize_token_embeddings(len(tokenizer))`, then save); `fuselab info "
                f"{model_path}` shows both sizes"
            )


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
        self.model_path = model_path
        dtype = resolve_dtype(settings.dtype, settings.device)
        if settings.device_map is not None:
            # accelerate places the layers (GPUs first, then CPU) and moves activations between them
            self.model = AutoModelForCausalLM.from_pretrained(
                model_path, dtype=dtype, local_files_only=True, device_map=settings.device_map
            )
            self.device = self.model.get_input_embeddings().weight.device
        else:
            self.device = torch.device(settings.device)
            self.model = AutoModelForCausalLM.from_pretrained(
                model_path, dtype=dtype, local_files_only=True
            ).to(self.device)
        self.model.eval()
        self.model.config.use_cache = False
        self.decoder = self.model.get_decoder()
        self.head = self.model.get_output_embeddings()
        self.softcap = getattr(self.model.config.get_text_config(), "final_logit_softcapping", None)
        self.pad_id = 0
        self._checked = False

    @property
    def head_chunk(self) -> int:
        """Positions per LM-head call: ``chunk_positions``, fewer for a large vocabulary, so that one call's
        float32 logits stay within ``HEAD_ELEMENTS`` (Gemma-3's 262k vocabulary took 1 GB per 1,024 positions,
        twice that with the log-softmax, and set the demo's peak memory)."""
        vocab = self.head.weight.shape[0]
        return max(16, min(self.settings.chunk_positions, HEAD_ELEMENTS // vocab))

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
        # under a device map the last layer may sit on another GPU than the embeddings
        row_index, pos_index = row_index.to(hidden.device), pos_index.to(hidden.device)
        states = hidden[row_index, pos_index]
        gold = ids.to(hidden.device)[row_index, pos_index + 1]
        if not self._checked:
            self._check_head(ids[:1], mask[:1], pos_index[row_index == 0], states[row_index == 0])
        return states, gold, [len(p) for p in rows_pos]

    def __call__(self, batch: Sequence[Encoded]) -> list[ExampleTopK]:
        import torch

        with torch.inference_mode():
            states, gold, counts = self.scored_states(batch)
            k, temp = self.settings.k, self.settings.temperature
            out_ids, out_logp, out_nll = [], [], []
            step = self.head_chunk
            for a in range(0, len(gold), step):
                logits = self.head_logits(states[a : a + step])
                g = gold[a : a + step]
                lse = logits.logsumexp(-1)
                out_nll.append(lse - logits.gather(1, g[:, None].to(logits.device))[:, 0])
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
        if not _all_finite(all_logp, all_nll):
            raise self._nonfinite()
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
        logits = self.model(input_ids=ids, attention_mask=mask).logits
        full = logits[0, positions.to(logits.device)].float()
        mine = self.head_logits(states).to(full.device)
        if not (bool(torch.isfinite(full).all()) and bool(torch.isfinite(mine).all())):
            raise self._nonfinite()  # NaN weights, not an architecture fuselab does not reproduce
        tol = 1e-3 if full.dtype == torch.float32 and states.dtype == torch.float32 else 5e-2
        if not torch.allclose(full, mine, atol=tol * max(1.0, float(full.abs().max())), rtol=0):
            raise FuselabError(
                f"{type(self.model).__name__}: the decoder output times the LM head differs from the model's logits "
                f"(max diff {float((full - mine).abs().max()):.3g}); this architecture post-processes its logits in "
                "a way fuselab does not reproduce. Use backend: vllm, or report the architecture"
            )

    def _nonfinite(self) -> NonFiniteError:
        """Why the logits are not finite: a NaN/inf weight (named), else an overflow in the dtype."""
        from fuselab.utils.finite import nonfinite_weights_error

        err = nonfinite_weights_error(self.model, self.model_path)
        if err is not None:
            return err
        dtype = str(next(self.model.parameters()).dtype).removeprefix("torch.")
        return NonFiniteError(
            f"model {self.model_path} produced NaN/inf logits although every weight is finite: its activations "
            f"overflow in {dtype}; set extract.dtype: float32"
        )


def _all_finite(logp: np.ndarray, nll: np.ndarray) -> bool:
    return not ((logp.size and not np.isfinite(logp.sum())) or (nll.size and not np.isfinite(nll.sum())))


class VllmTopK:
    """vLLM prompt log-probs: top-k normalised over the full vocabulary, for sources too large for transformers.

    vLLM returns, for every prompt position, the top ``prompt_logprobs`` entries plus the actual token; raw
    log-probs (before sampling processors), so the temperature must be 1. vLLM is imported only here, so
    that fuselab works (and its recipes validate) where vLLM is not installed.
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
        self.llm = LLM(**vllm_engine_args(model_path, settings))
        self.params = SamplingParams(max_tokens=1, prompt_logprobs=settings.k, temperature=1.0)
        self.k = settings.k

    def __call__(self, batch: Sequence[Encoded]) -> list[ExampleTopK]:
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=[int(t) for t in e.ids]) for e in batch]
        outputs = self.llm.generate(prompts, self.params, use_tqdm=False)
        return [topk_from_prompt_logprobs(o.prompt_logprobs, e, self.k) for o, e in zip(outputs, batch)]


def vllm_engine_args(model_path: Path, settings: ExtractSettings) -> dict[str, Any]:
    """The keyword arguments of ``vllm.LLM`` for these settings: only what the recipe set, so that vLLM's own
    defaults hold otherwise. ``max_logprobs`` is raised to k (vLLM refuses more than 20 by default)."""
    args: dict[str, Any] = {
        "model": str(model_path),
        "dtype": settings.dtype,  # "auto" is vLLM's own auto (the checkpoint's dtype)
        "enable_prefix_caching": False,
        "tensor_parallel_size": settings.tensor_parallel_size,
        "max_logprobs": max(20, settings.k),
    }
    if settings.gpu_memory_utilization is not None:
        args["gpu_memory_utilization"] = settings.gpu_memory_utilization
    if settings.max_model_len is not None:
        args["max_model_len"] = settings.max_model_len
    return args


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
        if len(ranked) < k or not all(np.isfinite(lp) for _, lp in ranked):
            # Never padded: a short row would silently give the missing candidates' mass to the tail.
            raise FuselabError(
                f"vLLM returned {sum(np.isfinite(lp) for _, lp in ranked)} finite top log-probs at prompt "
                f"position {p + 1}, fewer than k = {k} (a vocabulary smaller than k, or a vLLM that caps "
                "prompt_logprobs below k); lower extract.k, or use backend: transformers"
            )
        for c, (tok, lp) in enumerate(ranked):
            ids[row, c], logp[row, c] = tok, lp
    return ExampleTopK(ids=ids, logp=logp.astype(np.float16), gold_nll=nll.astype(np.float16))
