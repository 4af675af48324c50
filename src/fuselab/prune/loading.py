"""Load a checkpoint written by ``fuselab prune``: stock ones with stock transformers, partial ones rebuilt.

A partially pruned checkpoint (``fuselab`` or ``decilm`` format, see :mod:`fuselab.prune.export`) stores the
stock base config in ``config.json``'s ``fuselab_block_pruning`` section. The model is built from that config
with stock transformers, its removed blocks are replaced by :class:`~fuselab.prune.blocks.ZeroBranch` and their
norms by ``nn.Identity`` (which is what the removed blocks computed), and only the weights in the files are
loaded; any weight the files lack that is not part of a removed block is an error, not a random tensor.
A model with removed attention blocks is then probed once (:func:`~fuselab.prune.kv_cache.check_cache_placeholders`):
if the installed transformers does not hand the KV cache to the stand-ins, loading fails instead of generating
with wrong positions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fuselab.prune.blocks import OutputSpec, ZeroBranch, get_submodule
from fuselab.prune.export import FORMAT_KEY
from fuselab.prune.kv_cache import check_cache_placeholders
from fuselab.utils.errors import FuselabError, ModelNotFoundError


def pruning_section(path: str | Path) -> dict[str, Any] | None:
    """The ``fuselab_block_pruning`` section of a checkpoint's config (None for stock checkpoints)."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise ModelNotFoundError(f"{path} is not a checkpoint folder: config.json is missing")
    return json.loads(config_file.read_text()).get(FORMAT_KEY)


def _base_config(section: dict[str, Any]) -> Any:
    """The stock config the pruned model was cut from (stored by fuselab's export), built by transformers."""
    from transformers import AutoConfig

    base = dict(section["base_config"])
    return AutoConfig.for_model(base.pop("model_type"), **base)


def load_pruned_tokenizer(path: str | Path, **kwargs: Any) -> Any:
    """The tokenizer of a checkpoint, without transformers' trust-remote-code prompt for fuselab's exports.

    A DeciLM export's ``config.json`` names ``configuration_decilm.py`` in ``auto_map`` (vLLM reads that
    layout), so ``AutoTokenizer`` stopped at the interactive "run the custom code?" prompt and unattended
    jobs hung. For a checkpoint that carries the ``fuselab_block_pruning`` section fuselab's export writes,
    the tokenizer gets the stock base config from that section instead, so no remote code is read or run at
    all. Any other checkpoint loads as it always did: arbitrary remote code still asks, or fails."""
    from fuselab.modeling.tokenizers import load_tokenizer

    section = pruning_section(path)
    if section is not None and section.get("format_version") == 1 and "config" not in kwargs:
        kwargs["config"] = _base_config(section)
    return load_tokenizer(path, **kwargs)


def load_pruned_model(
    path: str | Path, dtype: torch.dtype | None = torch.float32, **kwargs: Any
) -> nn.Module:
    """A causal LM from ``path``: any stock checkpoint, or one with single blocks removed by fuselab."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    path = Path(path)
    section = pruning_section(path)
    if section is None:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs).eval()
    if section.get("format_version") != 1:
        raise FuselabError(f"{path}: unknown fuselab pruning format {section.get('format_version')!r}")
    config = _base_config(section)
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the removed blocks' weights are missing on purpose
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            path, config=config, dtype=dtype, output_loading_info=True, **kwargs
        )
    finally:
        hf_logging.set_verbosity(previous)
    layers = get_submodule(model, section["layers_path"])
    expected_missing: set[str] = set()
    branches: list[ZeroBranch] = []
    for entry in section["removed"]:
        layer = layers[entry["layer"]]
        block, *norms = entry["modules"]
        original = getattr(layer, block)
        prefix = f"{section['layers_path']}.{entry['layer']}."
        expected_missing |= {
            prefix + f"{n}.{p}" for n in entry["modules"] for p, _ in getattr(layer, n).named_parameters()
        }
        branch = ZeroBranch.replacing(original, entry["kind"], OutputSpec(entry["output_tuple_len"]))
        branches.append(branch)
        setattr(layer, block, branch)
        for n in norms:
            setattr(layer, n, nn.Identity())
    missing = set(info.get("missing_keys", ())) - expected_missing
    unexpected = set(info.get("unexpected_keys", ()))
    if missing or unexpected:
        raise FuselabError(
            f"{path}: the weight files do not match the pruned layout (missing: {sorted(missing)[:5]}, "
            f"unexpected: {sorted(unexpected)[:5]}); the checkpoint is damaged"
        )
    model.eval()
    check_cache_placeholders(model, branches, str(path))
    return model
