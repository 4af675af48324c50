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

fuselab additions: the ``seed`` key (random methods are always seeded) and the methods ``sce`` options and
``varm``. Keys mergekit has but fuselab does not implement (``slices``, ``modules``, ``tokenizer_source:
union``, ``tokenizer.tokens``) are refused with a message rather than silently ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from fuselab.utils.config import StrictModel

ScalarParameter = bool | int | float | str
ScalarOrGradient = ScalarParameter | list[ScalarParameter]

DTypeName = Literal["float32", "float16", "bfloat16", "float64", "fp32", "fp16", "bf16"]

_UNSUPPORTED_KEYS = {
    "slices": "fuselab merges whole models: list them under `models` (layer slicing is not supported)",
    "modules": "fuselab merges whole models: list them under `models` (per-module definitions are not supported)",
}


class ConditionalParameter(StrictModel):
    """A value that applies to tensors whose name contains ``filter`` (all tensors when it is absent)."""

    value: ScalarOrGradient
    filter: str | None = None


ParameterSetting = ScalarOrGradient | ConditionalParameter | list[ConditionalParameter]


class InputModel(StrictModel):
    model: str = Field(description="local folder, fuselab catalog name, or hub id (when a hub is reachable)")
    parameters: dict[str, ParameterSetting] | None = None


class TokenizerSettings(StrictModel):
    """mergekit's ``tokenizer:`` block; only ``source`` (base or one input model) is supported."""

    source: str

    @field_validator("source")
    @classmethod
    def _no_union(cls, v: str) -> str:
        if v == "union":
            raise ValueError(
                "tokenizer source `union` builds a new vocabulary; fuselab merges models that share one "
                "vocabulary. Use `base` or one input model, or fuse models with different tokenizers with "
                "`fuselab fusion`"
            )
        return v


class MergeRecipe(StrictModel):
    merge_method: str
    models: list[InputModel] = Field(min_length=1)
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
        default=None, description="a Jinja chat template to store with the output, replacing the source's"
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
    def _template_is_jinja(cls, v: str | None) -> str | None:
        if v is None or v == "auto" or "{{" in v or "{%" in v:
            return v
        raise ValueError(
            "chat_template must be a Jinja template (text with {{ }} / {% %}) or `auto` (keep the tokenizer "
            "source's); named templates such as mergekit's `chatml` are not built in, paste the template instead"
        )

    @field_validator("tokenizer_source")
    @classmethod
    def _no_union_source(cls, v: str | None) -> str | None:
        if v is not None:
            TokenizerSettings(source=v)
        return v

    @model_validator(mode="after")
    def _one_tokenizer_key(self) -> MergeRecipe:
        if self.tokenizer_source is not None and self.tokenizer is not None:
            raise ValueError("give either `tokenizer_source` or `tokenizer.source`, not both")
        return self

    @property
    def tokenizer_ref(self) -> str:
        """Which input supplies tokenizer, chat template, config and generation config."""
        src = self.tokenizer.source if self.tokenizer else self.tokenizer_source
        if src in (None, "base"):
            return self.base_model or self.models[0].model
        return src

    def output_dtype_name(self) -> str | None:
        name = self.out_dtype or self.dtype
        return {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}.get(name, name) if name else None
