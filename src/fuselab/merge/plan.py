"""What a merge writes: every output tensor and the input tensors it is merged from.

mergekit's model, followed here: the output is a list of *slices*; a slice stacks ``n`` layers, and its layer
``j`` is merged from layer ``first_k + j`` of each of its sources ``k`` (``layer_range: [first_k, end_k)``). A
``models:`` recipe is one slice spanning every layer of every model (plus the base, when the method uses one and
it is not listed). Tensors outside the layers come from the first slice's sources when they precede the layers
(embeddings) and from the last slice's otherwise (final norm, head). Parameter gradients run over the layers of
each slice (``t = j / (n − 1)``, 1 for a one-layer slice; 0 outside the layers).

Planning reads only headers and configs, so every problem is found before any tensor is read.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fuselab.merge.parameters import Settings, layer_fraction, layer_index, layer_stack, with_layer
from fuselab.merge.recipe import MergeRecipe
from fuselab.merge.registry import MergeMethod
from fuselab.modeling.checkpoint import Checkpoint
from fuselab.utils.errors import ConfigError, IncompatibleModelsError

_BEFORE_LAYERS = re.compile(
    r"(?:^|\.)(?:embed_tokens|embed_in|wte|wpe|word_embeddings|position_embeddings|embeddings)(?:\.|$)"
)
_VOCABULARY = re.compile(r"(?:^|\.)(?:embed_tokens|embed_in|embed_out|wte|word_embeddings|lm_head)(?:\.|$)")
# Config lists with one entry per layer; they follow the layers when slices restack them.
PER_LAYER_KEYS = ("layer_types", "no_rope_layers")


@dataclass(frozen=True)
class SliceInput:
    """One input of a slice: a checkpoint, the layers taken from it, and its own parameters."""

    ref: str
    ckpt: Checkpoint
    first_layer: int
    parameters: Settings
    where: str  # where the recipe names it, for messages: "models[1]", "slices[0].sources[2]", "base_model"

    @property
    def label(self) -> str:
        shown = f"{self.ref!r}" if self.ref == str(self.ckpt.path) else f"{self.ref!r} ({self.ckpt.path})"
        return f"{self.where} {shown}"


@dataclass(frozen=True)
class MergeSlice:
    inputs: tuple[SliceInput, ...]
    base: int | None  # index of the base among the inputs, when the method uses one
    num_layers: int
    parameters: Settings
    where: str

    @property
    def merged(self) -> list[int]:
        """Indices of the inputs that are merged (every input but the base)."""
        return [i for i in range(len(self.inputs)) if i != self.base]


@dataclass(frozen=True)
class OutputTensor:
    name: str
    slice: int
    t: float
    sources: tuple[str, ...]  # per input of the slice: the tensor it contributes
    source_layer: int | None  # the layer of the slice's first input this comes from (None outside layers)


def is_vocabulary_tensor(name: str, shape: tuple[int, ...], vocab_size: int | None) -> bool:
    """An embedding or output head: rows indexed by token id."""
    return len(shape) == 2 and shape[0] == vocab_size and bool(_VOCABULARY.search(name))


def _count_error(method: MergeMethod, sl: MergeSlice) -> str | None:
    n = len(sl.merged)
    if n >= method.min_models and (method.max_models is None or n <= method.max_models):
        return None
    besides = " besides the base" if sl.base is not None else ""
    names = ", ".join(sl.inputs[i].ref for i in sl.merged) or "none"
    fix = {
        "passthrough": "give each slice one source (stack several slices to combine models)",
        "slerp": "list the base and one other model (slerp interpolates between the two); for more models use "
        "`multislerp`",
        "nuslerp": "list two models; for more use `multislerp`",
    }.get(method.name, "change the inputs")
    return (
        f"{sl.where}: {method.name} merges {method.count_text()} model(s){besides}, got {n} ({names}); {fix}"
    )


def build_slices(
    recipe: MergeRecipe, method: MergeMethod, open_ref: Callable[[str], Checkpoint]
) -> list[MergeSlice]:
    """The recipe's slices with their checkpoints opened and the base placed (and counts checked)."""
    if recipe.slices:
        out = []
        for s, spec in enumerate(recipe.slices):
            inputs = tuple(
                SliceInput(
                    src.model,
                    open_ref(src.model),
                    src.layer_range[0],
                    src.parameters,
                    f"slices[{s}].sources[{k}]",
                )
                for k, src in enumerate(spec.sources)
            )
            base_ref = spec.base_model or recipe.base_model
            out.append(
                _with_base(
                    method, inputs, base_ref, open_ref, spec.num_layers, spec.parameters, f"slices[{s}]"
                )
            )
    else:
        inputs = tuple(
            SliceInput(m.model, open_ref(m.model), 0, m.parameters, f"models[{i}]")
            for i, m in enumerate(recipe.models)
        )
        out = [_with_base(method, inputs, recipe.base_model, open_ref, None, None, "models")]
    for sl in out:
        msg = _count_error(method, sl)
        if msg:
            raise ConfigError(msg)
    return out


def _with_base(
    method: MergeMethod,
    inputs: tuple[SliceInput, ...],
    base_ref: str | None,
    open_ref: Callable[[str], Checkpoint],
    num_layers: int | None,
    parameters: Settings,
    where: str,
) -> MergeSlice:
    depth = num_layers if num_layers is not None else _depth(inputs[0].ckpt)
    if base_ref is None or not method.uses_base(True):
        return MergeSlice(inputs, None, depth, parameters, where)
    base_ckpt = open_ref(base_ref)
    found = [i for i, inp in enumerate(inputs) if inp.ckpt is base_ckpt]
    if found:
        return MergeSlice(inputs, found[0], depth, parameters, where)
    if num_layers is not None:
        raise ConfigError(
            f"{where}: {method.name} needs the base model {base_ref!r} among the slice's sources; add it with "
            "the same layer_range as the others"
        )
    base = SliceInput(base_ref, base_ckpt, 0, None, "base_model")
    return MergeSlice((*inputs, base), len(inputs), depth, parameters, where)


def _depth(ckpt: Checkpoint) -> int:
    return int(ckpt.text_config().get("num_hidden_layers") or 1)


def plan_tensors(reference: Checkpoint, slices: list[MergeSlice], whole_models: bool) -> list[OutputTensor]:
    """Every output tensor, in writing order: the reference's order for whole models; for slices the
    tensors before the layers, each slice's layers, then the tensors after them."""
    if whole_models:
        n_in, depth = len(slices[0].inputs), _depth(reference)
        return [
            OutputTensor(name, 0, layer_fraction(name, depth), (name,) * n_in, layer_index(name))
            for name in reference.tensors
        ]
    _check_slices(reference, slices)
    outside = [n for n in reference.tensors if layer_index(n) is None]
    before = [n for n in outside if _BEFORE_LAYERS.search(n)]
    after = [n for n in outside if not _BEFORE_LAYERS.search(n)]
    last = len(slices) - 1
    out = [OutputTensor(n, 0, 0.0, (n,) * len(slices[0].inputs), None) for n in before]
    index = 0
    for s, sl in enumerate(slices):
        for j in range(sl.num_layers):
            first = sl.inputs[0].first_layer + j
            t = j / (sl.num_layers - 1) if sl.num_layers > 1 else 1.0
            for name in (n for n in sl.inputs[0].ckpt.tensors if layer_index(n) == first):
                names = tuple(with_layer(name, inp.first_layer + j) for inp in sl.inputs)
                out.append(OutputTensor(with_layer(name, index), s, t, names, first))
            index += 1
    out += [OutputTensor(n, last, 0.0, (n,) * len(slices[last].inputs), None) for n in after]
    return out


def _check_slices(reference: Checkpoint, slices: list[MergeSlice]) -> None:
    for sl in slices:
        for inp in sl.inputs:
            stacks = {layer_stack(n) for n in inp.ckpt.tensors} - {None}
            if len(stacks) > 1:
                raise IncompatibleModelsError(
                    f"{inp.label} has several stacks of layers ({', '.join(sorted(stacks))}); `slices` needs a "
                    "model with one, so merge it whole with `models`"
                )
            depth = _depth(inp.ckpt)
            if inp.first_layer + sl.num_layers > depth:
                raise ConfigError(
                    f"{inp.where}: layer_range [{inp.first_layer}, {inp.first_layer + sl.num_layers}) goes past "
                    f"the {depth} layers of {inp.ref!r}"
                )
    if not any(layer_index(n) is not None for n in reference.tensors):
        raise IncompatibleModelsError(f"{reference.path} has no decoder layers that `slices` could take")


def output_config(
    reference: Checkpoint,
    outputs: list[OutputTensor],
    slices: list[MergeSlice],
    *,
    restacked: bool,
    vocab_size: int | None,
) -> dict[str, Any]:
    """The reference's config, with the output's layer count and per-layer lists when slices restack the
    layers, and the output's vocabulary size when it was aligned."""
    config = copy.deepcopy(reference.config)
    text = config["text_config"] if isinstance(config.get("text_config"), dict) else config
    if restacked:
        layers: dict[int, tuple[Checkpoint, int]] = {}
        for out in outputs:
            o = layer_index(out.name)
            if o is not None and out.source_layer is not None:
                layers.setdefault(o, (slices[out.slice].inputs[0].ckpt, out.source_layer))
        for key in PER_LAYER_KEYS:
            if isinstance(text.get(key), list):
                text[key] = [
                    _layer_entry(ckpt, key, src, text[key]) for _, (ckpt, src) in sorted(layers.items())
                ]
        text["num_hidden_layers"] = len(layers)
    if vocab_size is not None:
        text["vocab_size"] = vocab_size
    return config


def _layer_entry(ckpt: Checkpoint, key: str, layer: int, fallback: list[Any]) -> Any:
    values = ckpt.text_config().get(key)
    if isinstance(values, list) and layer < len(values):
        return values[layer]
    return fallback[layer % len(fallback)]
