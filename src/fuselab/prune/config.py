"""The ``fuselab prune`` recipe (one strict config model) and the validator used for shipped recipes."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from fuselab.utils.config import StrictModel, load_config

METHODS = ("blockpruner", "layer_search", "shortgpt")


class CalibrationConfig(StrictModel):
    """Calibration text: rows joined with blank lines, tokenized once, cut into chunks (spec §1.4)."""

    files: list[str] = Field(
        min_length=1,
        description="local .txt / .json / .jsonl files (rows with `text` or OpenAI `messages`); "
        "`bundled:chat.train.jsonl` names a file shipped with fuselab",
    )
    seqlen: int = Field(default=2048, ge=8, description="tokens per chunk (the paper: 2048)")
    num_chunks: int = Field(default=16, ge=1, description="chunks used; the rest of the text is dropped")
    num_rows: int | None = Field(
        default=None, ge=1, description="sample this many rows (with `seed`) before joining; null: all rows"
    )
    seed: int = Field(default=42, description="seed of the row sample (the paper: 42)")


class StopConfig(StrictModel):
    """When the search stops: at a block count, at a parameter ratio, or at whichever comes first."""

    num_blocks: int | None = Field(
        default=None, ge=1, description="blocks to remove (a whole layer counts as two blocks)"
    )
    target_ratio: float | None = Field(
        default=None, gt=0, lt=1, description="stop once this fraction of all parameters is removed"
    )

    @model_validator(mode="after")
    def _one_needed(self) -> StopConfig:
        if self.num_blocks is None and self.target_ratio is None:
            raise ValueError("give `num_blocks`, `target_ratio` or both")
        return self


class SearchConfig(StrictModel):
    fast: bool = Field(
        default=True,
        description="layer-input caching + early abandoning (selects exactly what the plain search selects)",
    )
    batch_size: int = Field(default=1, ge=1, description="chunks per forward pass (the abandon granularity)")


class ExportConfig(StrictModel):
    enabled: bool = Field(
        default=True, description="write the pruned checkpoint (false: search results only)"
    )
    decilm: Literal["auto", "always", "never"] = Field(
        default="auto",
        description="DeciLM/Nemotron-NAS block_configs for partially pruned Llama-family models",
    )
    verify: bool = Field(
        default=True, description="reload the export and compare its logits with the in-memory pruned model"
    )
    max_shard_size: str = "2GB"


class PruneRecipe(StrictModel):
    """``fuselab prune RECIPE.yaml [OUT_DIR]``."""

    model: str = Field(description="local folder or fuselab catalog name")
    output: str | None = Field(default=None, description="output folder (the command's OUT_DIR overrides it)")
    method: Literal["blockpruner", "layer_search", "shortgpt"] = Field(
        default="blockpruner",
        description="blockpruner (greedy over attention/MLP blocks), layer_search (the same over whole layers, "
        "the paper's '- block' ablation, SLEB-like) or shortgpt (one-shot Block Influence over layers)",
    )
    block_types: Literal["mix", "attn", "mlp"] = Field(
        default="mix", description="blockpruner candidates: both kinds (the paper's default) or one kind"
    )
    stop: StopConfig
    calibration: CalibrationConfig
    search: SearchConfig = Field(default_factory=SearchConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto",
        description="dtype of the model during the search (exported weights keep theirs); auto: bfloat16 "
        "where native, else float32",
    )
    device: str = Field(default="cpu", description="cpu, cuda or cuda:N")

    @model_validator(mode="after")
    def _layer_counts(self) -> PruneRecipe:
        if self.method != "blockpruner" and self.block_types != "mix":
            raise ValueError("`block_types` applies to method blockpruner only")
        if self.method != "blockpruner" and self.stop.num_blocks is not None and self.stop.num_blocks % 2:
            raise ValueError(
                f"method {self.method} removes whole layers (two blocks each): num_blocks must be even"
            )
        return self


def load_recipe(path: str | Path) -> PruneRecipe:
    return load_config(PruneRecipe, path)


def validate_recipe_file(path: str | Path) -> PruneRecipe:
    """Parse a shipped recipe with the command's strict model (used by tests/test_configs.py)."""
    return load_recipe(path)
