"""The recipe of ``fuselab fusion extract|align|train``: one strict model, one YAML file.

A recipe names the pivot (the model that is trained, whose chat template and vocabulary the targets use),
the sources, the conversation data, and the settings of each stage. Every stage reads the sections it needs;
the work folder keeps each stage's outputs under a content hash of what produced them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from fuselab.utils.config import StrictModel, check_scheduler_name, load_config


class DataFile(StrictModel):
    """One conversation file with its own row limit (``{path: bundled:chat.train, limit: 100}``)."""

    path: str = Field(
        description="file/folder (JSON, JSONL, Parquet, datasets folder) or bundled:<domain>.<split>"
    )
    limit: int | None = Field(None, ge=1, description="use only the first N conversations of this file")


DataItem = str | DataFile


class DataConfig(StrictModel):
    train: list[DataItem] = Field(
        min_length=1,
        description="conversation files/folders (JSON, JSONL, Parquet, datasets folder) or bundled:<domain>.<split>; "
        "an item may be {path: ..., limit: N}",
    )
    max_length: int = Field(
        1024, ge=16, description="tokens per text, for every tokenizer (longer ones are split)"
    )
    template: str = Field(
        "pivot", description="whose chat template renders the text: 'pivot' or a model reference"
    )
    on_bad_rows: Literal["error", "skip"] = "error"
    limit: int | None = Field(None, ge=1, description="use only the first N conversations")


class ExtractConfig(StrictModel):
    """Top-k extraction. Under ``accelerate launch --num_processes N`` the shards are split over the processes
    (shard n on rank n mod N) and the store is the same as one process writes."""

    k: int = Field(10, ge=1, le=256)
    temperature: float = Field(1.0, gt=0, description="applied to the teachers' full-vocabulary logits")
    batch_tokens: int = Field(8192, ge=64)
    chunk_positions: int = Field(1024, ge=1)
    shard_tokens: int = Field(
        200_000,
        ge=1,
        description="supervised tokens per shard: the unit of resume and of the split over ranks",
    )
    device: str = Field(
        "cpu", description="cpu, cuda (under accelerate launch: each rank's own GPU) or cuda:N"
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    backend: Literal["transformers", "vllm"] = "transformers"
    device_map: Literal["auto"] | None = Field(
        None,
        description="transformers backend: `auto` spreads a source larger than one GPU over all visible GPUs "
        "(accelerate's device map); one process only",
    )
    tensor_parallel_size: int = Field(
        1, ge=1, description="vllm backend: GPUs one model is split over (vLLM's tensor parallelism)"
    )
    gpu_memory_utilization: float | None = Field(
        None,
        gt=0,
        le=1,
        description="vllm backend: share of each GPU's memory vLLM may take (vLLM's default: 0.9)",
    )
    max_model_len: int | None = Field(
        None,
        ge=16,
        description="vllm backend: context length vLLM reserves its KV cache for (default: the model's); at least "
        "data.max_length",
    )

    @model_validator(mode="after")
    def _backend_options(self) -> ExtractConfig:
        vllm_only = {
            "tensor_parallel_size": self.tensor_parallel_size != 1,
            "gpu_memory_utilization": self.gpu_memory_utilization is not None,
            "max_model_len": self.max_model_len is not None,
        }
        if self.backend != "vllm" and any(vllm_only.values()):
            given = ", ".join(k for k, v in vllm_only.items() if v)
            raise ValueError(f"{given} only apply to backend: vllm; set backend: vllm or remove them")
        if self.backend == "vllm":
            if self.device_map is not None:
                raise ValueError(
                    "device_map applies to backend: transformers; with vllm use tensor_parallel_size"
                )
            if self.temperature != 1.0:
                raise ValueError(
                    "backend: vllm returns raw log-probs; use temperature 1.0 or backend: transformers"
                )
        if self.device_map is not None and self.device.startswith("cuda:"):
            raise ValueError(
                "device_map: auto spreads the model over every visible GPU; set device: cuda (and choose GPUs "
                "with CUDA_VISIBLE_DEVICES), not an indexed device"
            )
        return self


class AlignConfig(StrictModel):
    sequence: str = Field("offsets", description="offsets | mined | exact")
    vocab: str = Field(
        "prefix",
        description="prefix (the pivot token a candidate begins with, by the pivot's own tokenizer) | exact | "
        "mined | statistics",
    )
    chain_rule: bool = Field(
        True,
        description="where the pivot's gold token is longer than the source's, its probability by the chain "
        "rule along the gold text (stored gold NLLs)",
    )
    dropped_mass: Literal["redistribute", "tail"] = Field(
        "redistribute",
        description="probability of candidates with no pivot id: spread over the mapped ones (the tail stays "
        "the source's own) or added to the tail (fuselab before 0.2)",
    )

    @field_validator("sequence")
    @classmethod
    def _seq(cls, v: str) -> str:
        from fuselab.fusion.align.sequence import sequence_aligner_names

        if v not in sequence_aligner_names():
            raise ValueError(
                f"unknown sequence alignment {v!r}; valid: {', '.join(sequence_aligner_names())}"
            )
        return v

    @field_validator("vocab")
    @classmethod
    def _vocab(cls, v: str) -> str:
        from fuselab.fusion.align.vocab import vocab_mapping_names

        if v not in vocab_mapping_names():
            raise ValueError(f"unknown vocabulary mapping {v!r}; valid: {', '.join(vocab_mapping_names())}")
        return v


class FuseConfig(StrictModel):
    mode: Literal["pairwise", "multi"] = Field(
        "pairwise",
        description="pairwise: one target per source (FuseChat); multi: all sources at once (FuseLLM)",
    )
    function: str = Field("mince", description="mince | mince_token | avgce")
    include_pivot: bool = Field(
        True,
        description="the pivot's own distribution (of the frozen starting model) is a candidate (FuseChat "
        "default); where it wins, the fusion term pulls the student back towards its starting point",
    )
    score: Literal["projected", "own"] = Field(
        "projected",
        description="how MinCE/AvgCE score a candidate: per-byte NLL of its projected target on the pivot's "
        "tokens (what is trained), or of its own tokenisation (the reference's choice)",
    )

    @field_validator("function")
    @classmethod
    def _fn(cls, v: str) -> str:
        from fuselab.fusion.fuse import fusion_names

        if v not in fusion_names():
            raise ValueError(f"unknown fusion function {v!r}; valid: {', '.join(fusion_names())}")
        return v


class TrainConfig(StrictModel):
    lam: float = Field(0.9, ge=0.0, le=1.0, description="weight of the CLM loss (λ); 1.0 is plain SFT")
    loss: Literal["ce", "kl", "alm"] = Field(
        "ce",
        description="fusion term: token-level ce or kl against the sparse targets, or alm (chunk likelihoods "
        "between shared byte boundaries, Minixhofer et al. 2025)",
    )
    alm_temperature: float = Field(
        1.0, gt=0, description="ALM binarisation temperature (chunk log-probs / T)"
    )
    tail: Literal["bucket", "renormalize"] = "bucket"
    learning_rate: float = Field(5e-6, gt=0)
    epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, description="overrides epochs when > 0")
    batch_size: int = Field(4, ge=1, description="sequences per device per micro-batch")
    grad_accum: int = Field(1, ge=1)
    warmup_ratio: float = Field(0.03, ge=0, le=1)
    lr_scheduler: str = "cosine"
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = 1.0
    seed: int = 42
    logging_steps: int = Field(10, ge=1)
    save_steps: int = Field(500, ge=1, description="checkpoint every N optimiser steps (for resuming)")
    save_minutes: float | None = Field(
        None,
        gt=0,
        description="also checkpoint when this many minutes of training passed since the last checkpoint: "
        "bounds what an interruption costs whatever the hardware (fuselab.utils.checkpointing)",
    )
    save_total_limit: int | None = 2
    bf16: bool | Literal["auto"] = "auto"
    gradient_checkpointing: bool = False
    group_by_length: bool = Field(
        False,
        description="batch examples of similar length: the whole set sorted into one-batch buckets, batch order "
        "shuffled per epoch (fuselab.fusion.batching; 30% fewer padded tokens than transformers' sampler "
        "on the demo)",
    )
    log_example_ids: bool = Field(
        False, description="write the example ids each process trained on (diagnostics)"
    )

    @field_validator("lr_scheduler")
    @classmethod
    def _scheduler(cls, v: str) -> str:
        return check_scheduler_name(v)


class FusionRecipe(StrictModel):
    pivot: str = Field(description="the model to train: folder, catalog name or hub id")
    sources: list[str] = Field(min_length=1)
    names: dict[str, str] | None = Field(
        None, description="short names of the models (default: folder names)"
    )
    data: DataConfig
    extract: ExtractConfig = ExtractConfig()
    align: AlignConfig = AlignConfig()
    fuse: FuseConfig = FuseConfig()
    train: TrainConfig = TrainConfig()
    workdir: str | None = Field(
        None, description="where stage outputs are cached (default: outputs/fusion/<recipe>)"
    )

    @model_validator(mode="after")
    def _distinct(self) -> FusionRecipe:
        if len(set(self.sources)) != len(self.sources) or self.pivot in self.sources:
            raise ValueError("the pivot and every source must be different models")
        if self.extract.max_model_len is not None and self.extract.max_model_len < self.data.max_length:
            raise ValueError(
                f"extract.max_model_len ({self.extract.max_model_len}) is below data.max_length "
                f"({self.data.max_length}): vLLM would refuse the longest texts; raise it or lower data.max_length"
            )
        return self


def load_recipe(path: str | Path) -> FusionRecipe:
    return load_config(FusionRecipe, path)


def validate_recipe_file(path: str | Path) -> None:
    load_recipe(path)
