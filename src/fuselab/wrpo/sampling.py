"""Sampling responses from a model: transformers ``generate`` (default) or vLLM (when installed with a GPU).

Prompts are rendered with the model's own chat template (each source answers in its own format). Sampling is
seeded per batch (``seed + batch number``, the batch's place in the whole prompt list): a resumed run
regenerates nothing, a rerun reproduces the same responses on the same hardware and library versions, and
under ``accelerate launch`` a batch gets the same seed whichever rank samples it and however many ranks
there are (``only_batches`` gives a rank its batches without renumbering them).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from fuselab.utils.errors import ConfigError
from fuselab.utils.progress import progress
from fuselab.wrpo.config import SamplingConfig

log = logging.getLogger(__name__)


def pick_device(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name} requested but CUDA is not available; use cpu")
    return dev


def pick_dtype(name: str, device: Any) -> Any:
    """``auto``: bfloat16 where it is native on ``device``, else float32 (:mod:`fuselab.utils.hardware`)."""
    from fuselab.utils.hardware import resolve_dtype

    return resolve_dtype(name, device, what="sampling.dtype")


def load_tokenizer(path: str | Path) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def render_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    from fuselab.wrpo.data import prompt_ids

    return prompt_ids(tokenizer, messages)


def use_vllm(backend: str) -> bool:
    if backend == "transformers":
        return False
    try:
        import vllm  # noqa: F401
    except ImportError:
        if backend == "vllm":
            raise ConfigError(
                "sampling.backend is vllm but vLLM is not installed (pip install vllm)"
            ) from None
        return False
    import torch

    return not (backend == "auto" and not torch.cuda.is_available())


def generate(
    model_path: str | Path,
    prompts: Sequence[list[dict[str, str]]],
    n: int,
    cfg: SamplingConfig,
    *,
    greedy: bool = False,
    on_batch: Callable[[int, list[list[str]]], None] | None = None,
    skip_batches: set[int] | None = None,
    only_batches: Iterable[int] | None = None,
    desc: str = "sampling",
    show_progress: bool = True,
) -> None:
    """Generate ``n`` responses per prompt; ``on_batch(first_prompt_index, responses)`` receives each batch.

    Batch ``b`` holds prompts ``b * batch_size`` onwards and is sampled with seed ``seed + b``. ``skip_batches``
    lists batch numbers already done (resuming); ``only_batches``, when given, the only ones to sample (a
    rank's share). Nothing is loaded when no batch is left. ``greedy`` decodes one response per prompt
    without sampling (evaluation).
    """
    count = (len(prompts) + cfg.batch_size - 1) // cfg.batch_size
    wanted = set(range(count)) if only_batches is None else set(only_batches) & set(range(count))
    todo = sorted(wanted - set(skip_batches or ()))
    if not todo:
        return
    if use_vllm(cfg.backend):
        _generate_vllm(model_path, prompts, n, cfg, greedy, on_batch, todo)
        return
    unused = [
        k
        for k in ("tensor_parallel_size", "gpu_memory_utilization", "max_model_len")
        if k in cfg.model_fields_set
    ]
    if unused:
        log.warning(
            "sampling with transformers (backend: auto without vLLM or a GPU): %s ignored", ", ".join(unused)
        )
    import torch
    from transformers import AutoModelForCausalLM

    device = pick_device(cfg.device)
    tok = load_tokenizer(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=pick_dtype(cfg.dtype, device)).to(device)
    model.eval()
    eos = model.generation_config.eos_token_id
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    if tok.eos_token_id is not None and tok.eos_token_id not in eos_ids:
        eos_ids.append(tok.eos_token_id)
    for b in progress(todo, desc=desc, **({} if show_progress else {"disable": True})):
        start = b * cfg.batch_size
        chunk = [render_ids(tok, p) for p in prompts[start : start + cfg.batch_size]]
        width = max(len(c) for c in chunk)
        ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, c in enumerate(chunk):  # left padding, so that every prompt ends where generation starts
            ids[i, width - len(c) :] = torch.tensor(c)
            mask[i, width - len(c) :] = 1
        torch.manual_seed(cfg.seed + b)
        kwargs: dict[str, Any] = {
            "max_new_tokens": cfg.max_new_tokens,
            "eos_token_id": eos_ids,
            "pad_token_id": tok.pad_token_id,
        }
        if greedy:
            kwargs.update(do_sample=False, num_return_sequences=1, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(
                do_sample=True,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                top_k=None,
                num_return_sequences=n,
            )
        with torch.no_grad():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
        texts = tok.batch_decode(out[:, width:], skip_special_tokens=True)
        k = 1 if greedy else n
        if on_batch is not None:
            on_batch(start, [texts[i * k : (i + 1) * k] for i in range(len(chunk))])
    del model


def vllm_engine_args(model_path: str | Path, cfg: SamplingConfig) -> dict[str, Any]:
    """The keyword arguments of ``vllm.LLM`` for sampling: the engine options only where the recipe set
    them, so that vLLM's own defaults hold otherwise."""
    args: dict[str, Any] = {
        "model": str(model_path),
        "dtype": cfg.dtype,  # "auto" is vLLM's own auto (the checkpoint's dtype)
        "seed": cfg.seed,
        "tensor_parallel_size": cfg.tensor_parallel_size,
    }
    if cfg.gpu_memory_utilization is not None:
        args["gpu_memory_utilization"] = cfg.gpu_memory_utilization
    if cfg.max_model_len is not None:
        args["max_model_len"] = cfg.max_model_len
    return args


def _generate_vllm(model_path, prompts, n, cfg, greedy, on_batch, todo) -> None:  # pragma: no cover
    """vLLM path (GPU machines): same prompts (as token ids, so no second BOS), same settings."""
    from vllm import LLM, SamplingParams

    tok = load_tokenizer(model_path)
    llm = LLM(**vllm_engine_args(model_path, cfg))
    for b in todo:
        start = b * cfg.batch_size
        chunk = [render_ids(tok, p) for p in prompts[start : start + cfg.batch_size]]
        params = SamplingParams(
            n=1 if greedy else n,
            temperature=0.0 if greedy else cfg.temperature,
            top_p=1.0 if greedy else cfg.top_p,
            max_tokens=cfg.max_new_tokens,
            seed=cfg.seed + b,
        )
        outs = llm.generate([{"prompt_token_ids": c} for c in chunk], params)
        if on_batch is not None:
            on_batch(start, [[o.text for o in r.outputs] for r in outs])
