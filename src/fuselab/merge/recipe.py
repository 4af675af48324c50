"""The merge recipe: mergekit's YAML format for the methods both tools have.

A mergekit recipe such as::

    merge_method: ties
    base_model: path/to/base
    models:
      - model: path/to/chat
        parameters: {weight: 0.5, density: 0.6}
      - model: path/to/code
        parameters: {weight: 0.5, density: 0.6}
    parameters: {normalize: true}
    dtype: bfloat16

runs unchanged. Parameters may be scalars, gradients (a list interpolated over layer depth) or conditional
values (``[{filter: self_attn, value: 0.3}, {value: 0.5}]``), with mergekit's semantics.

Layer stacking and per-slice merges use mergekit's ``slices`` (each a list of ``sources`` with a
``layer_range``; parameters per source override the slice's, which override the global ones).
``tokenizer_source`` (or ``tokenizer.source``) may be ``base``, ``union`` or one input model; where vocabularies
differ the embedding rows are aligned to the output vocabulary as mergekit does. ``chat_template`` is a
built-in name (see :mod:`fuselab.merge.chat_templates`), a file, a Jinja template, or ``auto``.

fuselab additions: the ``seed`` key (random methods are always seeded) and the methods ``sce`` options and
``varm``. Keys mergekit has but fuselab does not implement (``modules``, ``tokenizer.tokens``) are refused
with a message rather than silently ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from fuselab.merge.chat_templates import CHAT_TEMPLATES
from fuselab.utils.config import StrictModel

ScalarParameter = bool | int | float | str
ScalarOrGradient = ScalarParameter | list[ScalarParameter]

DTypeName = Literal["float32", "float16", "bfloat16", "float64", "fp32", "fp16", "bf16"]

_UNSUPPORTED_KEYS = {
    "modules": "per-module definitions (multimodal models) are not supported; use `slices` (one stack of "
    "layers) or `models` (whole models)",
}


class ConditionalParameter(StrictModel):
    """A value that applies to tensors whose name contains ``filter`` (all tensors when it is absent)."""

    value: ScalarOrGradient
    filter: str | None = None


ParameterSetting = ScalarOrGradient | ConditionalParameter | list[ConditionalParameter]


class InputModel(StrictModel):
    model: str = Field(description="local folder, fuselab catalog name, or hub id (when a hub is reachable)")
    parameters: dict[str, ParameterSetting] | None = None


class SliceSource(StrictModel):
    """One input of a slice: layers ``layer_range[0]`` … ``layer_range[1] − 1`` of ``model``."""

    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, ParameterSetting] | None = None

    @field_validator("layer_range")
    @classmethod
    def _range(cls, v: tuple[int, int]) -> tuple[int, int]:
        if not 0 <= v[0] < v[1]:
            raise ValueError(
                f"layer_range [{v[0]}, {v[1]}] must be [first, end) with 0 <= first < end (end excluded)"
            )
        return v


class OutputSlice(StrictModel):
    """Consecutive output layers, layer j merged from layer ``layer_range[0] + j`` of every source."""

    sources: list[SliceSource] = Field(min_length=1)
    base_model: str | None = None
    parameters: dict[str, ParameterSetting] | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_residual_weight(cls, data: Any) -> Any:
        if isinstance(data, dict) and "residual_weight" in data:
            raise ValueError("`residual_weight` is accepted but never used by mergekit; remove it")
        return data

    @model_validator(mode="after")
    def _same_depth(self) -> OutputSlice:
        depths = {s.layer_range[1] - s.layer_range[0] for s in self.sources}
        if len(depths) > 1:
            ranges = ", ".join(f"{s.model} {list(s.layer_range)}" for s in self.sources)
            raise ValueError(f"every source of a slice needs the same number of layers; got {ranges}")
        return self

    @property
    def num_layers(self) -> int:
        r = self.sources[0].layer_range
        return r[1] - r[0]


class TokenizerSettings(StrictModel):
    """mergekit's ``tokenizer:`` block: ``source`` (``union``, mergekit's default, ``base`` or one input model)
    and ``pad_to_multiple_of``; per-token embedding sources (``tokens``) are refused."""

    source: str = "union"
    pad_to_multiple_of: int | None = Field(default=None, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _no_tokens(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("tokens"):
            raise ValueError(
                "`tokenizer.tokens` (per-token embedding sources) is not supported; remove it: a token a model "
                "lacks gets mergekit's default row (the only model that has it, else the base's, else the mean "
                "of the models that have it)"
            )
        return {k: v for k, v in data.items() if k != "tokens"} if isinstance(data, dict) else data


def _chat_template_ok(v: str) -> bool:
    return v == "auto" or v in CHAT_TEMPLATES or "{{" in v or "{%" in v or Path(v).is_file()


class MergeRecipe(StrictModel):
    merge_method: str
    models: list[InputModel] = Field(default_factory=list, description="whole models (or use `slices`)")
    slices: list[OutputSlice] | None = Field(
        default=None, description="layer ranges of the inputs, stacked in order (or use `models`)"
    )
    base_model: str | None = None
    parameters: dict[str, ParameterSetting] | None = None
    dtype: DTypeName | None = Field(
        default=None,
        description="output dtype when out_dtype is absent (fuselab always computes in float32)",
    )
    out_dtype: DTypeName | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerSettings | None = None
    chat_template: str | None = Field(
        default=None,
        description="a built-in template name, a .jinja file, a Jinja template, or `auto` (the most common "
        "template of the inputs); replaces the tokenizer source's",
    )
    seed: int | None = Field(default=None, description="seed of random methods (dare_*); default 0")

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key, why in _UNSUPPORTED_KEYS.items():
                if data.get(key) is not None:
                    raise ValueError(f"`{key}` is not supported: {why}")
        return data

    @field_validator("chat_template")
    @classmethod
    def _template_known(cls, v: str | None) -> str | None:
        if v is None or _chat_template_ok(v):
            return v
        raise ValueError(
            f"chat_template must be a built-in name ({', '.join(sorted(CHAT_TEMPLATES))}), a file holding a "
            "Jinja template, a Jinja template itself (text with {{ }} / {% %}), or `auto` (the most common "
            "template among the inputs)"
        )

    @model_validator(mode="after")
    def _inputs_and_tokenizer(self) -> MergeRecipe:
        if bool(self.models) == bool(self.slices):
            raise ValueError(
                "give exactly one of `models` (whole models) and `slices` (layer ranges), not "
                + ("both" if self.models else "neither")
            )
        if self.tokenizer_source is not None and self.tokenizer is not None:
            raise ValueError("give either `tokenizer_source` or `tokenizer.source`, not both")
        return self

    @property
    def first_model(self) -> str:
        return self.models[0].model if self.models else self.slices[0].sources[0].model  # type: ignore[index]

    @property
    def tokenizer_source_name(self) -> str | None:
        """``tokenizer_source`` or ``tokenizer.source`` as written (None when neither is given)."""
        return self.tokenizer.source if self.tokenizer else self.tokenizer_source

    @property
    def tokenizer_ref(self) -> str:
        """Which input supplies the tokenizer files, chat template and generation config (for ``union``: the
        base, whose tokenizer the union extends)."""
        src = self.tokenizer_source_name
        if src in (None, "base", "union"):
            return self.base_model or self.first_model
        return src

    def referenced_models(self) -> list[str]:
        """Every model the recipe names, in order of first mention (base first)."""
        refs = [self.base_model] if self.base_model else []
        refs += [m.model for m in self.models]
        for sl in self.slices or []:
            refs += [s.model for s in sl.sources] + ([sl.base_model] if sl.base_model else [])
        return list(dict.fromkeys(refs))

    def output_dtype_name(self) -> str | None:
        name = self.out_dtype or self.dtype
        return {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}.get(name, name) if name else None
