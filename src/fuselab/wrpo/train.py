"""``fuselab wrpo train RECIPE OUT_DIR``: WRPO training on the transformers Trainer.

Works under ``accelerate launch`` (DDP, DeepSpeed, FSDP through ``training.extra``): every process runs this
function; the reference log-probs are computed by the main process first and read from the cache by the
others; only the main process writes the output folder.

Resuming: checkpoints (``training.save_steps``) go to ``.<OUT_DIR>.work/`` next to the output; ``--resume``
continues from the newest one. The finished model appears at OUT_DIR only when everything succeeded.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fuselab.utils.atomic import (
    atomic_write_json,
    atomic_write_text,
    check_output_dir,
    lock_output,
    release_output,
)
from fuselab.utils.config import dump_yaml
from fuselab.utils.errors import ConfigError
from fuselab.wrpo.config import TrainConfig, load_train_config

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    seconds: float
    metrics: dict[str, Any]


class ListDataset:
    """A plain list as a map-style dataset (the Trainer needs ``__len__`` and ``__getitem__``)."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.rows[i]


def _split_eval(rows: list[dict[str, Any]], share: float, seed: int) -> tuple[list[dict], list[dict]]:
    if share <= 0:
        return rows, []
    idx = list(range(len(rows)))
    random.Random(seed).shuffle(idx)
    n_eval = max(1, round(share * len(rows)))
    held = set(idx[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def training_arguments(cfg: TrainConfig, output_dir: Path, has_eval: bool) -> Any:
    from transformers import TrainingArguments

    t = cfg.training
    kwargs: dict[str, Any] = {
        "output_dir": str(output_dir),
        "remove_unused_columns": False,
        "learning_rate": t.learning_rate,
        "num_train_epochs": t.num_train_epochs,
        "max_steps": t.max_steps,
        "per_device_train_batch_size": t.per_device_train_batch_size,
        "per_device_eval_batch_size": t.per_device_eval_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "lr_scheduler_type": t.lr_scheduler_type,
        "warmup_steps": t.warmup_ratio,  # transformers 5: a float below 1 is a ratio of the total steps
        "weight_decay": t.weight_decay,
        "max_grad_norm": t.max_grad_norm,
        "optim": t.optim,
        "seed": t.seed,
        "data_seed": t.seed,
        "logging_steps": t.logging_steps,
        "bf16": _bf16(t.bf16),
        "activation_checkpointing": t.gradient_checkpointing,  # transformers 5.23+ name of gradient_checkpointing
        "report_to": t.report_to or "none",
        "save_strategy": "steps" if t.save_steps else "no",
        "save_only_model": False,
        "eval_strategy": "steps" if (has_eval and t.eval_steps) else "no",
        "disable_tqdm": os.environ.get("FUSELAB_PROGRESS", "1") in ("0", "false", "no"),
        **({"save_steps": t.save_steps} if t.save_steps else {}),
        **({"eval_steps": t.eval_steps} if (has_eval and t.eval_steps) else {}),
        **t.extra,
    }
    try:
        return TrainingArguments(**kwargs)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"training: the TrainingArguments are not valid: {err}") from None


def _bf16(flag: bool | str) -> bool:
    """``training.bf16``: ``auto`` is bf16 autocast where bf16 is native (:mod:`fuselab.utils.hardware`)."""
    import torch

    from fuselab.utils.hardware import resolve_bf16

    return resolve_bf16(flag, "cuda" if torch.cuda.is_available() else "cpu", what="training.bf16")


def _load_model(path: Path, dtype: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        path, dtype={"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    )


def run_train(
    recipe: str | Path | TrainConfig, out_dir: str | Path, *, force: bool = False, resume: bool = False
) -> TrainResult:
    from transformers.trainer_utils import get_last_checkpoint

    from fuselab.modeling.resolve import resolve_model
    from fuselab.utils.checkpointing import CheckpointPolicy
    from fuselab.wrpo.card import render_train_card
    from fuselab.wrpo.data import TokenizeOptions, WRPOCollator, read_jsonl, tokenize_rows
    from fuselab.wrpo.refcache import cached_ref_logps
    from fuselab.wrpo.sampling import load_tokenizer
    from fuselab.wrpo.trainer import WRPOTrainer, columns_for

    cfg = recipe if isinstance(recipe, TrainConfig) else load_train_config(recipe)
    out = Path(out_dir).absolute()
    if not resume:
        check_output_dir(out, force)
    else:
        lock_output(out)  # a resumed run still writes OUT_DIR: one run at a time
    work = out.parent / f".{out.name}.work"
    model_path = resolve_model(cfg.model)
    ref_path = resolve_model(cfg.reference.model) if cfg.reference.model else model_path
    tok = load_tokenizer(model_path)
    tok.padding_side = "right"

    rows = read_jsonl(cfg.data.path)
    if cfg.data.limit:
        rows = rows[: cfg.data.limit]
    if cfg.data.eval_path:
        train_rows, eval_rows = rows, read_jsonl(cfg.data.eval_path)
    else:
        train_rows, eval_rows = _split_eval(rows, cfg.data.eval_share, cfg.training.seed)
    opts = TokenizeOptions(cfg.data.max_length, cfg.data.max_prompt_length, cfg.data.drop_truncated)
    train_ex, train_stats = tokenize_rows(train_rows, tok, opts, cfg.data.path)
    eval_ex, eval_stats = tokenize_rows(eval_rows, tok, opts, "eval data") if eval_rows else ([], None)
    if not train_ex:
        raise ConfigError(f"{cfg.data.path}: no training examples left (rows: {len(train_rows)})")

    args = training_arguments(cfg, work, bool(eval_ex))
    columns = columns_for(cfg.loss)
    ref_model = None
    cache_info: dict[str, Any] = {}
    if cfg.reference.mode == "precompute":
        for name, examples in (("train", train_ex), ("eval", eval_ex)):
            if not examples:
                continue
            with args.main_process_first(desc=f"reference log-probs ({name})"):
                logps, key, hit = cached_ref_logps(
                    examples,
                    ref_path,
                    load_model=lambda: _load_model(ref_path, cfg.training.dtype),
                    pad_token_id=tok.pad_token_id,
                    batch_size=cfg.reference.batch_size,
                    dtype=cfg.training.dtype,
                    bf16=_bf16(cfg.training.bf16),
                    device=args.device,
                    cache=cfg.reference.cache_dir,
                )
            for ex, row in zip(examples, logps.tolist()):
                ex["ref_logps"] = row
            cache_info[f"ref_cache_{name}"] = f"{key} ({'hit' if hit else 'computed'})"
    else:
        ref_model = _load_model(ref_path, cfg.training.dtype)

    model = _load_model(model_path, cfg.training.dtype)
    if cfg.training.gradient_checkpointing:
        model.config.use_cache = False
    trainer = WRPOTrainer(
        model=model,
        args=args,
        train_dataset=ListDataset(train_ex),
        eval_dataset=ListDataset(eval_ex) if eval_ex else None,
        data_collator=WRPOCollator(tok.pad_token_id, columns, cfg.training.pad_to_multiple_of),
        processing_class=tok,
        loss_config=cfg.loss,
        ref_model=ref_model,
        columns=columns,
        callbacks=[CheckpointPolicy(cfg.training.save_minutes)],
    )
    eval_before = trainer.evaluate(metric_key_prefix="eval") if eval_ex else {}
    start = time.perf_counter()
    last = get_last_checkpoint(str(work)) if (resume and work.is_dir()) else None
    train_out = trainer.train(resume_from_checkpoint=last)
    seconds = time.perf_counter() - start
    eval_after = trainer.evaluate(metric_key_prefix="eval") if eval_ex else {}

    final = work / "final"
    trainer.save_model(str(final))
    trainer.accelerator.wait_for_everyone()
    summary: dict[str, Any] = {
        "optimizer_steps": trainer.state.global_step,
        "train_examples": len(train_ex),
        "eval_examples": len(eval_ex),
        "train_loss": train_out.training_loss,
        "train_seconds": round(seconds, 1),
        "world_size": args.world_size,
        "columns_forwarded": ",".join(columns),
        **cache_info,
        **{f"before_{k}": v for k, v in eval_before.items() if k.startswith("eval_")},
        **{f"after_{k}": v for k, v in eval_after.items() if k.startswith("eval_")},
    }
    if trainer.is_world_process_zero():
        resolved = cfg.model_dump(mode="json")
        atomic_write_text(final / "fuselab_wrpo_train.yaml", dump_yaml(resolved))
        atomic_write_json(final / "log_history.json", trainer.state.log_history)
        atomic_write_json(
            final / "wrpo_summary.json",
            {
                **summary,
                "tokenize_train": train_stats.to_dict(),
                "tokenize_eval": eval_stats.to_dict() if eval_stats else None,
            },
        )
        atomic_write_text(
            final / "README.md",
            render_train_card(
                model_ref=cfg.model,
                ref_ref=cfg.reference.model or cfg.model,
                data_path=cfg.data.path,
                config=resolved,
                summary=summary,
            ),
        )
        for junk in ("training_args.bin",):
            (final / junk).unlink(missing_ok=True)
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(final, out)
        shutil.rmtree(work, ignore_errors=True)
        release_output(out)
    trainer.accelerator.wait_for_everyone()
    log.info("WRPO: %s", json.dumps(summary))
    return TrainResult(out, trainer.state.global_step, seconds, summary)
