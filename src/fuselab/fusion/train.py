"""Fusion training on the transformers ``Trainer`` (``fuselab fusion train``).

Using the stock Trainer means ``accelerate launch`` with DDP, FSDP or DeepSpeed, gradient accumulation,
checkpoints and ``--resume`` work as users know them. What fuselab adds: a collator that pads dynamically and
ships sparse targets ([N, K] ids and log-probs for the N supervised positions, never [B, L, V]), the loss of
:mod:`fuselab.fusion.loss`, and CLM and fusion losses logged separately.

The output folder appears only when training finished: checkpoints live in ``<out>.work/`` (a rerun resumes
from the last one), the final model is written to a temporary folder with its card and resolved recipe and
renamed into place.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fuselab.fusion.batching import LengthBucketSampler
from fuselab.fusion.config import TrainConfig
from fuselab.fusion.loss import IGNORE, supervised_fusion_loss
from fuselab.fusion.workspace import FusedTargets

log = logging.getLogger(__name__)


class FusedDataset(torch.utils.data.Dataset):
    def __init__(self, targets: FusedTargets) -> None:
        self.targets = targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"example_index": i, **self.targets.example(i)}

    def lengths(self) -> list[int]:
        """Tokens per example, from the offsets alone (no example is read)."""
        return np.diff(self.targets.tok_offsets).tolist()


class FusionCollator:
    """Right-pads a batch; concatenates the sparse targets of its supervised positions in row-major order."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        k = max(r["target_ids"].shape[1] for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        t_ids, t_logp = [], []
        c_ids, c_logp = [], []
        chunk_base = 0
        for b, r in enumerate(rows):
            n = len(r["input_ids"])
            x = torch.from_numpy(r["input_ids"])
            ids[b, :n] = x
            mask[b, :n] = 1
            sup = torch.from_numpy(r["supervised"].copy())
            sup[0] = False  # the first token has no prediction
            labels[b, :n] = torch.where(sup, x, torch.full_like(x, IGNORE))
            ti = torch.from_numpy(r["target_ids"])
            tl = torch.from_numpy(r["target_logp"])
            if ti.shape[0] != int(sup.sum()):
                raise ValueError(
                    f"example {r.get('example_index')}: {ti.shape[0]} targets for {int(sup.sum())} positions"
                )
            pad = k - ti.shape[1]
            t_ids.append(torch.nn.functional.pad(ti, (0, pad), value=-1))
            t_logp.append(torch.nn.functional.pad(tl, (0, pad), value=-float("inf")))
            if "chunk_ids" in r:
                ci = torch.from_numpy(r["chunk_ids"])
                c_ids.append(torch.where(ci >= 0, ci + chunk_base, ci))
                c_logp.append(torch.from_numpy(r["chunk_logp"]))
                chunk_base += len(r["chunk_logp"])
        batch = {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": labels,
            "target_ids": torch.cat(t_ids),
            "target_logp": torch.cat(t_logp),
            "example_index": torch.tensor([int(r["example_index"]) for r in rows]),
        }
        if len(c_ids) == len(rows):
            batch["chunk_ids"] = torch.cat(c_ids)
            batch["chunk_logp"] = torch.cat(c_logp)
        return batch


def _unwrapped(model: Any) -> bool:
    """A plain transformers model, not one wrapped by DDP, FSDP or DeepSpeed: only there may the decoder and
    the LM head be called apart (a wrapper's forward gathers shards and arms gradient synchronisation)."""
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def supervised_logits(model: Any, input_ids, attention_mask, labels, *, split: bool):
    """Logits of the supervised positions ``z`` [N, V] (position t predicts token t+1; row-major), their gold
    tokens [N], and the model outputs (None when split).

    ``split``: run the decoder, gather the hidden states of the N supervised positions, and apply the LM head
    (with Gemma's soft-capping) to those alone. On chat data most positions are the prompt or padding (the
    demo: 2,586 supervised of 7,244 computed per epoch), so this skips most of the LM head's work (a fifth of
    SmolLM2's FLOPs per token) and never holds [B, L, V] logits and their gradient. Otherwise the model's own
    forward, as the reference does."""
    sup = labels[:, 1:] != IGNORE
    gold = labels[:, 1:][sup]
    if not split:
        outputs = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return outputs.logits[:, :-1][sup], gold, outputs
    hidden = model.get_decoder()(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False
    ).last_hidden_state
    z = model.get_output_embeddings()(hidden[:, :-1][sup])
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    if cap:
        z = cap * torch.tanh(z / cap)
    return z, gold, None


def head_splits(model: Any, input_ids, attention_mask, labels) -> bool:
    """Whether :func:`supervised_logits` with ``split`` gives this model's own logits (checked once, on the
    first batch, without gradients): a model whose forward transforms the logits in a way fuselab does not
    reproduce, or a wrapped model, keeps the full forward."""
    if not _unwrapped(model) or model.get_decoder() is None or model.get_output_embeddings() is None:
        return False
    # on a window of at most 64 tokens of one row that ends on a supervised token: both ways see the same
    # input, and the check costs two short forwards, not two passes over the batch
    sup = labels[:, 1:] != IGNORE
    if bool(sup.any()):
        row = int(sup.sum(1).argmax())
        end = int(sup[row].nonzero().max()) + 2  # the last supervised label's position, included
        start = max(0, end - 64)
        input_ids, attention_mask = (
            input_ids[row : row + 1, start:end],
            attention_mask[row : row + 1, start:end],
        )
        labels = labels[row : row + 1, start:end]
    with torch.no_grad():
        full, _, _ = supervised_logits(model, input_ids, attention_mask, labels, split=False)
        part, _, _ = supervised_logits(model, input_ids, attention_mask, labels, split=True)
        full, part = full.float(), part.float()
        scale = float(full.abs().max()) if full.numel() else 0.0
        ok = full.shape == part.shape and bool(((full - part).abs() <= 1e-2 * max(scale, 1.0)).all())
    if not ok:
        log.warning(
            "%s: the LM head applied to the decoder's states does not reproduce the model's logits; "
            "training computes the full logits (slower, more memory)",
            type(model).__name__,
        )
    return ok


def _trainer_class():
    from transformers import Trainer

    class FusionTrainer(Trainer):
        """Trainer with the fusion loss; logs ``clm_loss`` and ``fusion_loss`` next to ``loss``."""

        def __init__(self, *args: Any, fusion: TrainConfig, seen_path: Path | None = None, **kw: Any) -> None:
            super().__init__(*args, **kw)
            self.fusion = fusion
            self._sums = {"clm_loss": 0.0, "fusion_loss": 0.0}
            self._count = 0
            self._seen_path = seen_path
            self._split: bool | None = None

        def _get_train_sampler(self, train_dataset=None):
            ds = train_dataset if train_dataset is not None else self.train_dataset
            if self.fusion.group_by_length and isinstance(ds, FusedDataset):
                return LengthBucketSampler(
                    ds.lengths(), self.args.per_device_train_batch_size, self.args.seed
                )
            return super()._get_train_sampler(train_dataset)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            target_ids = inputs.pop("target_ids")
            target_logp = inputs.pop("target_logp")
            chunk_ids = inputs.pop("chunk_ids", None)
            chunk_logp = inputs.pop("chunk_logp", None)
            seen = inputs.pop("example_index", None)
            if self._seen_path is not None and seen is not None and model.training:
                with open(self._seen_path, "a") as f:
                    f.write(" ".join(str(int(i)) for i in seen.tolist()) + "\n")
            if self._split is None:  # first batch: may the LM head run on the supervised positions alone?
                self._split = head_splits(model, inputs["input_ids"], inputs["attention_mask"], labels)
            z, gold, outputs = supervised_logits(
                model,
                inputs["input_ids"],
                inputs["attention_mask"],
                labels,
                split=self._split and not return_outputs,
            )
            out = supervised_fusion_loss(
                z,
                gold,
                target_ids,
                target_logp,
                lam=self.fusion.lam,
                kind=self.fusion.loss,
                tail=self.fusion.tail,
                chunk_ids=chunk_ids,
                chunk_logp=chunk_logp,
                alm_temperature=self.fusion.alm_temperature,
            )
            if model.training:
                self._sums["clm_loss"] += float(out.clm)
                self._sums["fusion_loss"] += float(out.fuse)
                self._count += 1
            return (out.loss, outputs) if return_outputs else out.loss

        def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
            if self._count and "loss" in logs:
                for key, total in self._sums.items():
                    logs[key] = round(total / self._count, 6)
                self._sums = dict.fromkeys(self._sums, 0.0)
                self._count = 0
            super().log(logs, *args, **kwargs)

    return FusionTrainer


def resolved_bf16(cfg: TrainConfig, device: str | None = None) -> bool:
    """Whether training runs under bf16 autocast here (``train.bf16: auto`` resolved for the device the
    Trainer will use); part of a trained model's cache key."""
    from fuselab.utils.hardware import resolve_bf16

    on = "cuda" if torch.cuda.is_available() and device != "cpu" else "cpu"
    return resolve_bf16(cfg.bf16, on, what="train.bf16")


def training_arguments(cfg: TrainConfig, work: Path, *, show_progress: bool, device: str | None = None):
    from transformers import TrainingArguments

    bf16 = resolved_bf16(cfg, device)
    return TrainingArguments(
        output_dir=str(work),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        warmup_steps=cfg.warmup_ratio,  # transformers 5: a value below 1 is a ratio of the steps
        lr_scheduler_type=cfg.lr_scheduler,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        seed=cfg.seed,
        data_seed=cfg.seed,
        logging_steps=cfg.logging_steps,
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        bf16=bool(bf16),
        activation_checkpointing=cfg.gradient_checkpointing,  # transformers 5 name of gradient_checkpointing
        train_sampling_strategy="random",  # group_by_length: FusionTrainer's LengthBucketSampler
        remove_unused_columns=False,
        report_to=[],
        disable_tqdm=not show_progress,
        dataloader_num_workers=0,
        use_cpu=device == "cpu" or not torch.cuda.is_available(),
        dataloader_pin_memory=torch.cuda.is_available(),
        save_only_model=False,
    )


def train(
    targets_dir: str | Path,
    out_dir: str | Path,
    cfg: TrainConfig,
    *,
    resolved_recipe: dict[str, Any] | None = None,
    force: bool = False,
    show_progress: bool = True,
    meta_overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train the pivot on the fused targets in ``targets_dir``; write an HF checkpoint to ``out_dir``.

    ``meta_overrides`` replaces entries of the targets' metadata in the model card (e.g. the name of an
    SFT baseline trained with λ = 1 on the same tokens)."""
    from transformers import AutoModelForCausalLM
    from transformers.trainer_utils import get_last_checkpoint

    from fuselab.fusion.card import write_card
    from fuselab.modeling.tokenizers import load_tokenizer
    from fuselab.utils.atomic import atomic_output_dir, check_output_dir
    from fuselab.utils.checkpointing import CheckpointPolicy

    out_dir = Path(out_dir).absolute()
    check_output_dir(out_dir, force)
    targets = FusedTargets.open(targets_dir)
    pivot_path = Path(targets.meta["pivot_path"])
    tokenizer = load_tokenizer(pivot_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(pivot_path, dtype=torch.float32, local_files_only=True)
    model.config.use_cache = False
    work = out_dir.with_name(out_dir.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    args = training_arguments(cfg, work, show_progress=show_progress)
    seen = work / f"examples_seen.rank{args.process_index}.txt" if cfg.log_example_ids else None
    if seen is not None and seen.exists() and get_last_checkpoint(str(work)) is None:
        seen.unlink()
    trainer = _trainer_class()(
        model=model,
        args=args,
        train_dataset=FusedDataset(targets),
        data_collator=FusionCollator(pad_id),
        fusion=cfg,
        seen_path=seen,
        callbacks=[CheckpointPolicy(cfg.save_minutes)],
    )
    last = get_last_checkpoint(str(work))
    if last:
        log.info("resuming from %s", last)
    result = trainer.train(resume_from_checkpoint=last)
    history = [h for h in trainer.state.log_history if "loss" in h or "train_loss" in h]
    summary = {
        "steps": trainer.state.global_step,
        "train_loss": result.training_loss,
        "log_history": history,
        "targets": str(targets.root),
    }
    if trainer.is_world_process_zero():
        with atomic_output_dir(out_dir, force=force) as tmp:
            trainer.save_model(str(tmp))
            tokenizer.save_pretrained(str(tmp))
            gen = pivot_path / "generation_config.json"
            if gen.exists() and not (tmp / "generation_config.json").exists():
                shutil.copy(gen, tmp / "generation_config.json")
            (tmp / "training_log.json").write_text(json.dumps(summary, indent=2))
            for f in work.glob("examples_seen.rank*.txt"):
                shutil.copy(f, tmp / f.name)
            write_card(tmp, {**targets.meta, **(meta_overrides or {})}, cfg, summary, resolved_recipe)
        if os.environ.get("FUSELAB_KEEP_CHECKPOINTS") != "1":
            shutil.rmtree(work, ignore_errors=True)
    if trainer.accelerator.num_processes > 1:
        trainer.accelerator.wait_for_everyone()
    return summary
