"""The recipe of ``fuselab fuse``: a fusion recipe plus the merge, evaluation and report sections.

Everything ``fuselab fusion`` reads keeps its meaning (pivot, sources, data, extract, align, fuse, train), so
a stage-by-stage recipe becomes a one-command recipe by adding sections, not by rewriting it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from fuselab.fusion.config import DataItem, FusionRecipe
from fuselab.utils.config import StrictModel, load_config

STAGES = ("extract", "align", "train", "merge", "evaluate", "report")


class MergeStage(StrictModel):
    """How the pairwise targets become one model (FuseChat's second step; unused in ``multi`` mode)."""

    method: str = Field("sce", description="any merge method of `fuselab merge methods`")
    parameters: dict[str, Any] = Field(
        default_factory=lambda: {"select_topk": 1.0},
        description="global parameters of the method (mergekit spelling)",
    )
    dtype: str = Field("float32", description="output dtype: float32 keeps small fine-tuning deltas exact")

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        from fuselab.merge.registry import merge_method_names

        if v not in merge_method_names():
            raise ValueError(f"unknown merge method {v!r}; valid: {', '.join(merge_method_names())}")
        return v

    @model_validator(mode="after")
    def _known_parameters(self) -> MergeStage:
        from fuselab.merge.registry import get_merge_method

        method = get_merge_method(self.method)
        unknown = [k for k in self.parameters if method.param(k) is None]
        if unknown:
            valid = ", ".join(p.name for p in method.params) or "none"
            raise ValueError(f"merge method {self.method!r} has no parameter(s) {unknown}; valid: {valid}")
        return self


class EvaluateStage(StrictModel):
    heldout: dict[str, list[DataItem]] = Field(
        default_factory=dict,
        description="domain name -> held-out conversation files (bundled:<domain>.<split> or paths)",
    )
    max_length: int = Field(512, ge=16, description="tokens per held-out text, for every tokenizer")
    batch_tokens: int = Field(4096, ge=64)
    sources: bool = Field(True, description="also score the sources (compared per byte)")
    prompts: list[str] = Field(default_factory=list, description="user messages answered by every model")
    max_new_tokens: int = Field(64, ge=1)
    dtype: str = Field(
        "auto", description="auto (bfloat16 where native, else float32) | float32 | bfloat16 | float16"
    )
    device: str = "cpu"


class FuseRecipe(FusionRecipe):
    """``fuselab fuse``: extract → align → train (targets and SFT baseline) → merge → evaluate → report."""

    output: str | None = Field(
        None, description="folder of the fused model and report (default: outputs/<recipe name>)"
    )
    baseline: bool = Field(
        True, description="also train an SFT-only baseline (λ = 1) on the same data and steps, for the report"
    )
    merge: MergeStage = MergeStage()
    evaluate: EvaluateStage = EvaluateStage()

    @model_validator(mode="after")
    def _merge_needs_pairs(self) -> FuseRecipe:
        if self.fuse.mode == "pairwise" and len(self.sources) < 2 and "merge" in self.model_fields_set:
            raise ValueError("a merge needs at least two pairwise targets (two sources); remove `merge:`")
        return self


def load_recipe(path: str | Path) -> FuseRecipe:
    return load_config(FuseRecipe, path)


def validate_recipe_file(path: str | Path) -> None:
    load_recipe(path)
