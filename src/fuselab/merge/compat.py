"""Checks that the inputs of a parameter-space merge can be merged, done before any tensor is read.

Every input must have the reference's architecture and structure (the layer count may differ for ``slices``,
the vocabulary when it is aligned), and every tensor the plan reads must exist with the output's shape. The
first difference is reported with the fix, because a late failure (or, worse, a silent broadcast) after minutes of
streaming is what users of merge tools complain about most.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from fuselab.modeling.checkpoint import Checkpoint
from fuselab.utils.errors import IncompatibleModelsError

log = logging.getLogger(__name__)

# Config keys that fix the shapes and meaning of the tensors.
STRUCTURE_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "num_local_experts",
    "n_routed_experts",
)

# The usual (output embedding, input embedding) names; checked first, before asking transformers' classes.
_COMMON_TIES = (
    ("lm_head.weight", "model.embed_tokens.weight"),
    ("lm_head.weight", "transformer.wte.weight"),
    ("embed_out.weight", "gpt_neox.embed_in.weight"),
    ("lm_head.weight", "model.language_model.embed_tokens.weight"),
)


def tied_pairs(ckpt: Checkpoint) -> list[tuple[str, str]]:
    """(output-embedding name, input-embedding name) pairs that the model ties when configured to.

    The usual names are recognised directly; otherwise the transformers class named in the config is asked
    (``_tied_weights_keys``). Importing model classes costs ~100 MB of memory, so it is the fallback.
    """
    known = [(o, i) for o, i in _COMMON_TIES if i in ckpt.tensors]
    if known:
        return known
    try:
        import transformers

        cls = getattr(transformers, ckpt.architecture, None)
        keys = getattr(cls, "_tied_weights_keys", None)
        if isinstance(keys, dict) and keys:
            return [(k, v) for k, v in keys.items()]
    except Exception:  # an exotic class that fails to import is no reason to stop
        pass
    return []


def tensor_source(ckpt: Checkpoint, name: str, pairs: Sequence[tuple[str, str]]) -> str | None:
    """The tensor in ``ckpt`` that holds ``name``: itself, or the input embedding a tied head shares."""
    if name in ckpt.tensors:
        return name
    if ckpt.tie_word_embeddings:
        for out_name, in_name in pairs:
            if name == out_name and in_name in ckpt.tensors:
                return in_name
    return None


def check_config(
    reference: Checkpoint, ckpt: Checkpoint, ref_label: str, label: str, ignore: frozenset[str] = frozenset()
) -> None:
    """Same architecture and the same structure keys (except those in ``ignore``) as the reference."""
    if ckpt.architecture != reference.architecture:
        raise IncompatibleModelsError(
            f"{label} is a {ckpt.architecture} but {ref_label} is a {reference.architecture}; "
            "parameter-space merging needs one architecture. Merge only models fine-tuned from the same "
            "base, or combine different architectures with knowledge fusion (`fuselab fusion`)"
        )
    ref_cfg, cfg = reference.text_config(), ckpt.text_config()
    for key in STRUCTURE_KEYS:
        a, b = ref_cfg.get(key), cfg.get(key)
        if a != b and key not in ignore:
            extra = ""
            if key == "vocab_size":
                extra = (
                    " (the models have different vocabularies; parameter merging needs the same vocabulary: "
                    "merge models that share one tokenizer, set `tokenizer_source: union` (or a model, or "
                    "`base`) to align the embedding rows as mergekit does, or use `fuselab fusion`, which aligns "
                    "different vocabularies by distillation)"
                )
            elif key == "num_hidden_layers":
                extra = " (models of different depths can be combined with `slices`)"
            raise IncompatibleModelsError(
                f"config `{key}` differs: {b} in {label} but {a} in {ref_label}{extra}"
            )


@dataclass(frozen=True)
class PlannedRead:
    """One output tensor: the tensor each input contributes, and the one whose layout the output takes."""

    name: str
    reads: tuple[tuple[Checkpoint, str], ...]
    layout: tuple[Checkpoint, str]
    vocabulary: bool = False  # rows follow the vocabulary (aligned separately): the first axis may differ


def _stored(ckpt: Checkpoint, name: str, label: str, ref_label: str, pairs) -> str:
    src = tensor_source(ckpt, name, pairs)
    if src is None:
        raise IncompatibleModelsError(
            f"{label} has no tensor `{name}`, which {ref_label} has; the checkpoints do not have the same "
            "layout (different architecture variant or a partial checkpoint)"
        )
    return src


def check_mergeable(
    reference: Checkpoint,
    planned: Sequence[PlannedRead],
    labels: dict[int, str],
    *,
    ignore_keys: frozenset[str] = frozenset(),
    whole_models: bool = True,
) -> dict[int, dict[str, str]]:
    """Validate every planned read; return, per checkpoint (by ``id``), tensor name -> stored name.

    ``labels`` maps ``id(checkpoint)`` to how the user named it, for the messages. For whole-model merges
    (``whole_models``) a tensor an input holds but the reference lacks is an error too, and a separately
    stored head of a model whose reference ties it is reported.
    """
    ref_label = labels.get(id(reference), str(reference.path))
    pairs = tied_pairs(reference)
    ckpts = {id(reference): reference}
    for p in planned:
        ckpts.update({id(c): c for c, _ in p.reads})
    for ckpt in ckpts.values():
        if ckpt is not reference:
            check_config(reference, ckpt, ref_label, labels.get(id(ckpt), str(ckpt.path)), ignore_keys)
    sources: dict[int, dict[str, str]] = {k: {} for k in ckpts}
    for p in planned:
        layout_ckpt, layout_name = p.layout
        a = layout_ckpt.tensors[_stored(layout_ckpt, layout_name, ref_label, ref_label, pairs)]
        a_label = labels.get(id(layout_ckpt), str(layout_ckpt.path))
        sources[id(layout_ckpt)][layout_name] = a.name
        for ckpt, name in p.reads:
            label = labels.get(id(ckpt), str(ckpt.path))
            b = ckpt.tensors[_stored(ckpt, name, label, ref_label, pairs)]
            sources[id(ckpt)][name] = b.name
            same = (
                a.shape[1:] == b.shape[1:] and len(a.shape) == len(b.shape)
                if p.vocabulary
                else a.shape == b.shape
            )
            if not same:
                raise IncompatibleModelsError(
                    f"tensor `{p.name}` has shape {list(b.shape)} in {label} but {list(a.shape)} in {a_label}"
                    + _shape_hint(a.shape, b.shape, reference.text_config().get("vocab_size"))
                )
            if a.dtype.is_floating_point != b.dtype.is_floating_point:
                raise IncompatibleModelsError(
                    f"tensor `{p.name}` is {b.dtype} in {label} but {a.dtype} in {a_label}"
                )
    if whole_models:
        _check_whole_models(reference, ckpts, sources, labels, ref_label, {o for o, _ in pairs})
    return sources


def _check_whole_models(reference, ckpts, sources, labels, ref_label, tied_heads) -> None:
    for key, ckpt in ckpts.items():
        if ckpt is reference:
            continue
        label = labels.get(key, str(ckpt.path))
        used = set(sources[key].values())
        extra_names = [n for n in ckpt.tensors if n not in used and n not in tied_heads]
        if extra_names:
            raise IncompatibleModelsError(
                f"{label} has tensor `{extra_names[0]}`, which {ref_label} lacks; the checkpoints do not have "
                "the same layout"
            )
        for head in tied_heads & set(ckpt.tensors) - used:
            log.warning(
                "%s stores `%s` separately, but %s ties it to the input embedding; the output follows %s, so this "
                "tensor is not merged",
                label,
                head,
                ref_label,
                ref_label,
            )


def _shape_hint(a: tuple[int, ...], b: tuple[int, ...], vocab: int | None) -> str:
    if len(a) == len(b) and a and a[0] != b[0] and vocab in (a[0], b[0]):
        return (
            f" (vocabulary sizes differ: {b[0]} vs {a[0]} rows in the embedding; parameter merging needs the same "
            "vocabulary: set `tokenizer_source: union` (or a model) to align the rows as mergekit does, or use "
            "`fuselab fusion` for models with different tokenizers)"
        )
    return ""
