"""The recipe of ``fuselab fuse``: a fusion recipe plus the merge, evaluation and report sections.

Everything ``fuselab fusion`` reads keeps its meaning (pivot, sources, data, extract, align, fuse, train), so
a stage-by-stage recipe becomes a one-command recipe by adding sections, not by rewriting it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, ValidationInfo, field_validator, model_validator

from fuselab.fusion.config import DataFile, DataItem, FusionRecipe
from fuselab.utils.config import StrictModel, load_config
from fuselab.utils.errors import ConfigError

STAGES = ("extract", "align", "train", "merge", "evaluate", "report")


class MergeStage(StrictModel):
    """How the pairwise targets become one model (FuseChat's second step; unused in ``multi`` mode)."""

    method: str = Field("sce", description="any merge method of `fuselab merge methods`")
    parameters: dict[str, Any] = Field(
        default_factory=lambda: {"select_topk": 1.0},
        description="global parameters of the method (mergekit spelling)",
    )
    dtype: str = Field("float32", description="output dtype: float32 keeps small fine-tuning deltas exact")

    @model_validator(mode="before")
    @classmethod
    def _default_parameters(cls, data: Any) -> Any:
        """The default ``parameters`` are SCE's: another method named without parameters starts from none
        (it used to be refused for a ``select_topk`` the recipe never wrote)."""
        if isinstance(data, dict) and "parameters" not in data and data.get("method", "sce") != "sce":
            return {**data, "parameters": {}}
        return data

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        from fuselab.merge.registry import merge_method_names

        if v not in merge_method_names():
            raise ValueError(f"unknown merge method {v!r}; valid: {', '.join(merge_method_names())}")
        return v

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        import typing

        from fuselab.merge.recipe import DTypeName

        valid = typing.get_args(DTypeName)
        if v not in valid:
            raise ValueError(f"unknown dtype {v!r}; valid: {', '.join(valid)}")
        return v

    @model_validator(mode="after")
    def _known_parameters(self) -> MergeStage:
        """Names, types, ranges and choices of the parameters, and the ones the method requires, checked as
        the merge stage will (:func:`fuselab.merge.engine.validate_parameters`): at load, not after extraction
        and training."""
        from fuselab.merge.engine import validate_parameters
        from fuselab.merge.recipe import MergeRecipe
        from fuselab.merge.registry import get_merge_method

        method = get_merge_method(self.method)
        unknown = [k for k in self.parameters if method.param(k) is None]
        if unknown:
            valid = ", ".join(p.name for p in method.params) or "none"
            raise ValueError(f"merge method {self.method!r} has no parameter(s) {unknown}; valid: {valid}")
        n = max(method.min_models, min(2, method.max_models or 2))  # what is checked does not depend on n
        recipe = MergeRecipe(
            merge_method=self.method,
            base_model="pivot",
            models=[{"model": f"target-{i}"} for i in range(n)],
            parameters=dict(self.parameters),
        )
        try:
            validate_parameters(method, recipe, list(range(n)))
        except ConfigError as err:
            message = str(err).replace("models[0] (target-0): ", "", 1)
            raise ValueError(message.replace("the model's `parameters` or the top-level ", "", 1)) from None
        return self

    def check_count(self, targets: int) -> None:
        """Refuse a method that cannot merge ``targets`` pairwise targets (slerp merges one onto the base)."""
        from fuselab.merge.registry import get_merge_method

        method = get_merge_method(self.method)
        lo, hi = method.min_models, method.max_models
        if targets < lo or (hi is not None and targets > hi):
            raise ValueError(
                f"{self.method} merges {method.count_text()} model(s) besides the base, but this recipe makes "
                f"{targets} pairwise targets (one per source); choose a method that merges {targets} (sce, "
                "ties, task_arithmetic, linear, ...), or set fuse.mode: multi (one target, no merge)"
            )


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

    @field_validator("heldout")
    @classmethod
    def _heldout_files(cls, v: dict[str, list[DataItem]]) -> dict[str, list[DataItem]]:
        """Every held-out file exists and can be opened, at load: they are first read by the evaluate stage,
        after extraction and training. (Their rows are read before extraction too, by ``fuselab fuse``.)"""
        for domain, items in v.items():
            if not items:
                raise ValueError(f"{domain}: no files; list at least one, or remove the domain")
            for item in items:
                problem = data_file_problem(item.path if isinstance(item, DataFile) else item)
                if problem:
                    raise ValueError(f"{domain}: {problem}")
        return v


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

    @field_validator("merge")
    @classmethod
    def _merge_fits_the_targets(cls, v: MergeStage, info: ValidationInfo) -> MergeStage:
        fuse, sources = info.data.get("fuse"), info.data.get("sources")  # validated before `merge`
        if fuse is not None and fuse.mode == "pairwise" and sources and len(sources) >= 2:
            v.check_count(len(sources))
        return v


def data_file_problem(ref: str) -> str | None:
    """Why the data item ``ref`` (a path or ``bundled:<domain>.<split>``) cannot be read, or None."""
    if ref.startswith("bundled:"):
        from fuselab.data.bundled import bundled_path

        try:
            bundled_path(ref.removeprefix("bundled:") + ".jsonl")
        except FileNotFoundError as err:
            return f"{ref}: {err}; write bundled:<domain>.<split>, e.g. bundled:chat.heldout"
        return None
    path = Path(ref)
    if not path.exists():
        return (
            f"data file {path.absolute()} does not exist; fix the path (a relative one is read from the folder "
            "fuselab runs in) or remove it"
        )
    try:
        if path.is_dir():
            next(path.iterdir(), None)
        else:
            with open(path, "rb") as f:
                f.read(1)
    except OSError as err:
        return f"data file {path} cannot be read ({err.strerror}); fix its permissions or use a copy you can read"
    return None


def load_recipe(path: str | Path) -> FuseRecipe:
    return load_config(FuseRecipe, path)


def validate_recipe_file(path: str | Path) -> None:
    load_recipe(path)
