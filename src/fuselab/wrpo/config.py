"""Recipes of the two WRPO commands: ``fuselab wrpo build`` (data) and ``fuselab wrpo train`` (training).

Each command has one strict model (unknown keys are errors). Defaults follow the paper's released
configuration where it applies (β = 0.01, α_final = 0.1 ramped linearly, SFT share one third, sampling
temperature 0.8 / top-p 0.95; shared/spec/wrpo.md §3–§5).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo

from fuselab.fusion.config import ExtractConfig
from fuselab.utils.config import StrictModel, check_scheduler_name, load_config, load_yaml, validate_config
from fuselab.utils.errors import ConfigError

# ---------------------------------------------------------------------------------------------------- build


def _vllm_option(name: str, description: str) -> Any:
    """Fusion extraction's field ``name`` (type, default and bounds), described for sampling."""
    return FieldInfo.merge_field_infos(ExtractConfig.model_fields[name], description=description)


def check_vllm_options(backend: str, **options: Any) -> None:
    """The vLLM engine options checked by the rule fusion extraction applies (they are vLLM's: refused with
    another backend), so that both stages accept and refuse the same; ValueError (for pydantic) if not."""
    try:
        ExtractConfig(backend=backend, **options)
    except ValidationError as err:
        raise ValueError("; ".join(e["msg"].removeprefix("Value error, ") for e in err.errors())) from None


class PromptsConfig(StrictModel):
    """Where the prompts come from: a JSON/JSONL file, or data bundled with fuselab (``code:train``)."""

    path: str | None = Field(None, description="JSON or JSONL file; rows hold `prompt` or `messages`")
    bundled: str | None = Field(None, description="`domain:split` of fuselab's bundled data, e.g. code:train")
    limit: int | None = Field(None, ge=1, description="use only the first `limit` prompts (after shuffling)")
    shuffle_seed: int | None = Field(None, description="shuffle the prompts with this seed before `limit`")

    @model_validator(mode="after")
    def _one_source(self) -> PromptsConfig:
        if (self.path is None) == (self.bundled is None):
            raise ValueError("give exactly one of `path` (a prompt file) or `bundled` (e.g. code:train)")
        if self.bundled is not None:
            parts = self.bundled.split(":")
            if len(parts) != 2 or parts[0] not in ("chat", "code") or parts[1] not in ("train", "heldout"):
                raise ValueError("`bundled` must be `chat|code:train|heldout`, e.g. code:train")
        return self


class SamplingConfig(StrictModel):
    """How responses are sampled (the paper follows SimPO: temperature 0.8, top-p 0.95).

    Batch ``b`` (prompts ``b * batch_size`` onwards) is sampled with seed ``seed + b`` whichever process
    samples it: under ``accelerate launch --num_processes N`` batch ``b`` goes to rank ``b mod N``. vLLM's
    engine options (``tensor_parallel_size``, ``gpu_memory_utilization``, ``max_model_len``) are fusion
    extraction's fields with its checks: refused with ``backend: transformers``, taken with ``auto``
    (which may pick vLLM) and ``vllm``."""

    n: int = Field(4, ge=2, description="responses per prompt and model (>= 2 so that best != worst)")
    temperature: float = Field(0.8, gt=0)
    top_p: float = Field(0.95, gt=0, le=1)
    max_new_tokens: int = Field(512, ge=1)
    batch_size: int = Field(8, ge=1, description="prompts per generate() call")
    seed: int = 0
    backend: Literal["auto", "transformers", "vllm"] = Field(
        "auto", description="auto: vLLM when installed and a GPU is present, else transformers"
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = Field("auto", description="cpu, cuda, cuda:N or auto")
    # vLLM's engine options: the fields (type, default, bounds) and their checks are fusion extraction's
    tensor_parallel_size: int = _vllm_option(
        "tensor_parallel_size", "vllm backend: GPUs one model is split over (vLLM's tensor parallelism)"
    )
    gpu_memory_utilization: float | None = _vllm_option(
        "gpu_memory_utilization",
        "vllm backend: share of each GPU's memory vLLM may take (vLLM's default: 0.9)",
    )
    max_model_len: int | None = _vllm_option(
        "max_model_len",
        "vllm backend: context length vLLM reserves its KV cache for (default: the model's); longer than "
        "max_new_tokens",
    )

    @model_validator(mode="after")
    def _vllm_options(self) -> SamplingConfig:
        # `auto` may pick vLLM, so the options are accepted there; `transformers` never uses them
        check_vllm_options(
            "transformers" if self.backend == "transformers" else "vllm",
            tensor_parallel_size=self.tensor_parallel_size,
            gpu_memory_utilization=self.gpu_memory_utilization,
            max_model_len=self.max_model_len,
        )
        if self.max_model_len is not None and self.max_model_len <= self.max_new_tokens:
            raise ValueError(
                f"max_model_len ({self.max_model_len}) leaves no room for a prompt before max_new_tokens "
                f"({self.max_new_tokens}) new tokens; raise max_model_len or lower max_new_tokens"
            )
        return self


class SourceConfig(StrictModel):
    model: str
    name: str | None = Field(None, description="label in the data (default: the model reference)")
    n: int | None = Field(None, ge=1, description="samples per prompt for this source (default sampling.n)")


class SelectionConfig(StrictModel):
    """How y_ws, y_wt and y_l are picked from scored samples, and what happens on ties.

    Best/worst is by score; among equal scores ``tie_break`` decides: ``first`` takes the earliest sample
    (sources in recipe order, then sample order), ``shortest`` the shortest text (then the earliest). y_l is
    never the same sample as y_wt. When all target samples score the same, there is no on-policy
    preference: ``all_equal: drop`` (default) drops the prompt, ``keep`` keeps it (y_wt = first, y_l = last).
    Every case is counted in ``build_stats.json``.
    """

    tie_break: Literal["first", "shortest"] = "first"
    all_equal: Literal["drop", "keep"] = "drop"
    min_source_margin: float | None = Field(
        None, description="drop prompts whose best source score is below the best target score minus this"
    )


class SFTConfig(StrictModel):
    """The SFT stage on y_ws for a share of prompts (the paper: one third); the rest become WRPO data."""

    share: float = Field(1 / 3, ge=0, lt=1, description="share of prompts used for SFT on y_ws")
    train: bool = Field(True, description="train the SFT model here; the target is then sampled from it")
    learning_rate: float = Field(7e-6, gt=0)
    num_train_epochs: float = Field(1.0, gt=0)
    max_steps: int = -1
    per_device_train_batch_size: int = Field(2, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = Field(0.1, ge=0, le=1)
    max_length: int = Field(1024, ge=8)
    seed: int = 42

    @field_validator("lr_scheduler_type")
    @classmethod
    def _scheduler(cls, v: str) -> str:
        return check_scheduler_name(v)


class BuildConfig(StrictModel):
    """Recipe of ``fuselab wrpo build``."""

    prompts: PromptsConfig
    target: str = Field(description="the target model (sampled on-policy, after SFT when sft.train)")
    sources: list[SourceConfig] = Field(min_length=1)
    sampling: SamplingConfig = SamplingConfig()
    target_sampling: SamplingConfig | None = Field(None, description="default: the `sampling` settings")
    scorer: dict[str, Any] = Field(description="`type:` one of the registered scorers, plus its options")
    selection: SelectionConfig = SelectionConfig()
    sft: SFTConfig = SFTConfig()
    seed: int = 0

    @field_validator("scorer")
    @classmethod
    def _scorer_known(cls, v: dict[str, Any]) -> dict[str, Any]:
        from fuselab.wrpo.scorers import validate_scorer_config

        return validate_scorer_config(v)


# ---------------------------------------------------------------------------------------------------- train


class TrainDataConfig(StrictModel):
    path: str = Field(description="preference JSONL written by `fuselab wrpo build` (wrpo.jsonl)")
    eval_path: str | None = Field(None, description="held-out preference rows for evaluation")
    eval_share: float = Field(0.0, ge=0, lt=1, description="hold out this share of `path` when no eval_path")
    limit: int | None = Field(None, ge=1)
    max_length: int = Field(1024, ge=8, description="longest prompt + response, per sequence")
    max_prompt_length: int = Field(512, ge=1, description="prompts keep their last tokens up to this")
    drop_truncated: Literal["none", "source", "any"] = Field(
        "none", description="drop examples whose y_ws (source) or any response had to be truncated"
    )

    @model_validator(mode="after")
    def _lengths(self) -> TrainDataConfig:
        if self.max_prompt_length >= self.max_length:
            raise ValueError("max_prompt_length must be smaller than max_length")
        return self


class LossConfig(StrictModel):
    beta: float = Field(0.01, gt=0, description="β of the implicit reward (paper: 0.01)")
    alpha: float = Field(0.1, ge=0, le=1, description="final α (paper: 0.1); the value for `constant`")
    alpha_schedule: Literal["linear", "cosine", "constant"] = Field(
        "linear", description="linear ramp 0 → alpha (paper), cosine ramp, or constant (static α; 0/1 = DPO)"
    )
    reach_final: bool = Field(False, description="ramp so that the last update uses exactly `alpha`")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="cDPO ε; 0 in the paper")


class ReferenceConfig(StrictModel):
    model: str | None = Field(None, description="frozen reference model (default: the policy's start point)")
    mode: Literal["precompute", "live"] = Field(
        "precompute", description="precompute: log-probs once, cached on disk; live: forward every step"
    )
    cache_dir: str | None = Field(None, description="default: $FUSELAB_CACHE/wrpo-ref")
    batch_size: int = Field(4, ge=1, description="prompts per forward when precomputing")


class TrainingConfig(StrictModel):
    """The transformers TrainingArguments this recipe sets; `extra` passes any other one through."""

    learning_rate: float = Field(5e-7, gt=0)
    num_train_epochs: float = Field(1.0, gt=0)
    max_steps: int = -1
    per_device_train_batch_size: int = Field(2, ge=1)
    per_device_eval_batch_size: int = Field(2, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    optim: str = "adamw_torch"
    seed: int = 42
    logging_steps: int = Field(1, ge=1)
    eval_steps: int | None = Field(None, ge=1, description="evaluate every N steps (default: at the end)")
    save_steps: int | None = Field(None, ge=1, description="checkpoint every N steps (for resuming)")
    save_minutes: float | None = Field(
        None,
        gt=0,
        description="also checkpoint when this many minutes of training passed since the last checkpoint "
        "(fuselab.utils.checkpointing)",
    )
    bf16: bool | Literal["auto"] = Field(
        "auto", description="bf16 mixed precision (fp32 master weights); auto: where bf16 is native"
    )
    gradient_checkpointing: bool = False
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="dtype the policy is loaded in")
    pad_to_multiple_of: int | None = Field(None, ge=1)
    report_to: list[str] = Field(default_factory=list)
    extra: dict[str, Any] = Field(
        default_factory=dict, description="other TrainingArguments, e.g. deepspeed: ds.json, fsdp: ..."
    )

    @field_validator("lr_scheduler_type")
    @classmethod
    def _scheduler(cls, v: str) -> str:
        return check_scheduler_name(v)

    @field_validator("extra")
    @classmethod
    def _known_args(cls, v: dict[str, Any]) -> dict[str, Any]:
        import dataclasses

        from transformers import TrainingArguments

        valid = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
        unknown = sorted(set(v) - valid)
        if unknown:
            raise ValueError(f"not TrainingArguments: {', '.join(unknown)}")
        owned = sorted(set(v) & (set(cls.model_fields) | {"output_dir", "remove_unused_columns"}))
        if owned:
            raise ValueError(f"set {', '.join(owned)} directly under `training:`, not in `extra`")
        return v


class TrainConfig(StrictModel):
    """Recipe of ``fuselab wrpo train``."""

    model: str = Field(description="policy start point: the target after SFT (paper) or the target itself")
    data: TrainDataConfig
    loss: LossConfig = LossConfig()
    reference: ReferenceConfig = ReferenceConfig()
    training: TrainingConfig = TrainingConfig()


# ------------------------------------------------------------------------------------------------- recipes


def load_build_config(path: str | Path) -> BuildConfig:
    return load_config(BuildConfig, path)


def load_train_config(path: str | Path) -> TrainConfig:
    return load_config(TrainConfig, path)


def validate_recipe_file(path: str | Path) -> BuildConfig | TrainConfig:
    """Parse a recipe under configs/wrpo/ with the model of the command its first line names."""
    path = Path(path)
    first = path.read_text(encoding="utf-8").splitlines()[0] if path.is_file() else ""
    data = load_yaml(path)
    if "wrpo build" in first:
        return validate_config(BuildConfig, data, str(path))
    if "wrpo train" in first:
        return validate_config(TrainConfig, data, str(path))
    if isinstance(data, dict) and "sources" in data:
        return validate_config(BuildConfig, data, str(path))
    if isinstance(data, dict) and "data" in data:
        return validate_config(TrainConfig, data, str(path))
    raise ConfigError(
        f"{path}: cannot tell whether this is a build or a train recipe; line 1 should be "
        "`# fuselab wrpo build|train <this file> OUT_DIR`"
    )
