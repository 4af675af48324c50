"""KV-cache correctness of partially pruned models, on whichever transformers release is installed.

A removed attention block still has a slot in the model's KV cache, and transformers reads the cached length
(hence the positions of new tokens and the mask sizes) from the first attention slot. :class:`ZeroBranch`
therefore writes a one-value placeholder per token into its slot. That only works while the cache reaches the
stand-in module, and the keyword that carries it changed in transformers 5.24 (``past_key_values`` became
``cache``): on 5.24 the old stand-in silently left its slot empty and every token generated with the cache got
the wrong position. Three checks make such a change loud instead of silent:

- :func:`cache_parameter` reads the keyword from the replaced module's own ``forward`` signature (a public
  interface) instead of assuming a name;
- :func:`check_cache_placeholders` runs at load time: one two-token forward with a cache must reach every
  removed attention block and give a cache of length two, otherwise the model is refused with the installed
  version named;
- :func:`cached_decoding_gap` compares decoding with and without the cache, logits included: one step by hand
  and greedy generation of a left-padded batch. (``generate`` of one unpadded row is not enough: it passes
  positions explicitly, so on 5.24 it stayed right while a padded batch and any hand-written decoding loop
  went wrong.) ``fuselab prune`` refuses an export that fails it, and the test suite runs it for every format.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from fuselab.utils.errors import FuselabError

# The keyword under which transformers hands the KV cache to an attention module, newest first.
CACHE_PARAMETER_NAMES = ("cache", "past_key_values", "past_key_value")
PROBE_TOKENS = 2


def cache_parameter(module: nn.Module) -> str | None:
    """Name of the parameter through which ``module.forward`` receives the KV cache (None: it takes none)."""
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return None
    return next((name for name in CACHE_PARAMETER_NAMES if name in params), None)


def output_cache(outputs: Any) -> Any:
    """The cache a forward returned: ``outputs.cache`` from transformers 5.24, ``past_key_values`` before."""
    for name in ("cache", "past_key_values"):
        cache = getattr(outputs, name, None)
        if cache is not None:
            return cache
    return None


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _input_device(model: nn.Module) -> torch.device:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        return embeddings.weight.device
    return next(model.parameters()).device


def check_cache_placeholders(model: nn.Module, branches: Sequence[nn.Module], where: str) -> None:
    """Refuse ``model`` unless its KV cache reaches every removed attention block in ``branches``.

    One forward of :data:`PROBE_TOKENS` tokens with ``use_cache=True``: every stand-in must write its placeholder
    and the cache must report that many tokens. Costs one short forward; raises :class:`FuselabError` naming
    the installed transformers release otherwise.
    """
    attn = [b for b in branches if getattr(b, "kind", None) == "attn" and b.layer_idx is not None]
    if not attn:
        return
    version = _transformers_version()
    fix = (
        "Install the transformers release fuselab was tested with (requirements/lock.txt in fuselab's source; "
        "in a checkout, `make setup` installs it), or a fuselab release that supports this one."
    )
    unknown = [b.layer_idx for b in attn if b.cache_arg is None]
    if unknown:
        raise FuselabError(
            f"{where}: cannot tell how the KV cache reaches the attention of layer(s) {unknown} with "
            f"transformers {version} (its forward takes none of {', '.join(CACHE_PARAMETER_NAMES)}); cached "
            f"generation would use wrong positions. {fix}"
        )
    for b in attn:
        b.cache_updates = 0
    ids = torch.zeros((1, PROBE_TOKENS), dtype=torch.long, device=_input_device(model))
    try:
        with torch.inference_mode():
            outputs = model(input_ids=ids, use_cache=True)
        cache = output_cache(outputs)
        length = int(cache.get_seq_length()) if cache is not None else None
        missed = [b.layer_idx for b in attn if b.cache_updates != 1]
    finally:
        for b in attn:
            b.cache_updates = 0
    if cache is None or missed or length != PROBE_TOKENS:
        raise FuselabError(
            f"{where}: with transformers {version} the KV cache does not reach the removed attention of "
            f"layer(s) {missed or [b.layer_idx for b in attn]} (after {PROBE_TOKENS} tokens the cache holds "
            f"{length}), so generation with the cache would compute wrong positions and wrong logits. {fix}"
        )


def padded_batch(
    prompt: torch.Tensor, pad: int = 3, pad_token_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``prompt`` (one row) twice: as is, and left-padded by ``pad`` tokens in place of its first ones.

    Left padding is how batches are generated; it is also where a cache that reports the wrong length shows,
    because the attention mask is sized from the cache.
    """
    ids = prompt[:1].repeat(2, 1)
    mask = torch.ones_like(ids)
    pad = min(pad, ids.shape[1] - 1)
    ids[1, :pad] = pad_token_id
    mask[1, :pad] = 0
    return ids, mask


def cached_decoding_gap(model: nn.Module, prompt: torch.Tensor, max_new_tokens: int = 8) -> dict[str, Any]:
    """How far decoding with the KV cache is from decoding without it, on the installed transformers.

    Two checks, both on public interfaces: (1) one step by hand, the prompt minus its last token run with a
    cache and the last token fed on that cache (no positions given: the model reads them from the cache),
    against the full forward; (2) greedy ``generate`` of a left-padded batch with and without the cache, every
    step's logits and the tokens. Without the cache every step recomputes the full forward, so any difference
    is the cache's fault, within the rounding of the two attention paths. ``logit_scale`` is the largest logit
    magnitude, to compare the gap with.
    """
    prompt = prompt[:1]
    gaps = []
    scale = 0.0
    with torch.inference_mode():
        keyword = cache_parameter(model)
        if keyword is not None and prompt.shape[1] >= 2:
            full = model(input_ids=prompt, use_cache=False).logits[:, -1].float()
            past = output_cache(model(input_ids=prompt[:, :-1], use_cache=True))
            step = model(input_ids=prompt[:, -1:], use_cache=True, **{keyword: past}).logits[:, -1].float()
            gaps.append(float((step - full).abs().max()))
            scale = float(full.abs().max())
        ids, mask = padded_batch(prompt)
        runs = {}
        for use_cache in (True, False):
            runs[use_cache] = model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens,
                do_sample=False,
                use_cache=use_cache,
                pad_token_id=0,
                output_logits=True,
                return_dict_in_generate=True,
            )
    cached, uncached = runs[True], runs[False]
    for a, b in zip(cached.logits, uncached.logits):
        gaps.append(float((a.float() - b.float()).abs().max()))
        scale = max(scale, float(b.float().abs().max()))
    return {
        "same_tokens": bool(torch.equal(cached.sequences, uncached.sequences)),
        "max_abs_logit_gap": max(gaps),
        "logit_scale": scale,
        "steps": len(cached.logits),
    }


def logit_tolerance(dtype: torch.dtype) -> float:
    """Allowed cached-vs-full logit gap, relative to max(1, largest logit), for weights of ``dtype``."""
    return 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2


def verify_cached_decoding(model: nn.Module, prompt: torch.Tensor, dtype: torch.dtype) -> dict[str, Any]:
    """:func:`cached_decoding_gap` that raises unless tokens agree and the logit gap is within tolerance."""
    result = cached_decoding_gap(model, prompt)
    limit = logit_tolerance(dtype) * max(1.0, result["logit_scale"])
    if not result["same_tokens"] or not result["max_abs_logit_gap"] <= limit:
        raise FuselabError(
            f"with transformers {_transformers_version()}, the exported checkpoint decodes differently with and "
            f"without its KV cache (tokens equal: {result['same_tokens']}, largest logit gap "
            f"{result['max_abs_logit_gap']:.3g}, allowed {limit:.3g}); the export is refused. Install the "
            "versions of fuselab's requirements/lock.txt (`make setup` in a checkout), or report this version."
        )
    return result
