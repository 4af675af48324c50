"""The SFT stage of WRPO: fine-tune the target on y_ws for a share of prompts (the paper: one third).

The paper's pipeline (spec §1, §5.1): the target is first fine-tuned on the best source responses of one third
of the prompts; that "Target-SFT" model is then sampled for y_wt / y_l on the other prompts, and is both the
start point and the frozen reference of WRPO. Loss: next-token cross-entropy on the response tokens only
(prompt tokens are masked), with the same tokenisation as WRPO training (chat template + response + EOS).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fuselab.utils.atomic import atomic_write_text
from fuselab.utils.config import dump_yaml
from fuselab.wrpo.config import SFTConfig
from fuselab.wrpo.data import end_of_turn_id, prompt_ids, response_ids


class SFTCollator:
    def __init__(self, pad_token_id: int) -> None:
        self.pad = pad_token_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        labels = torch.full((len(features), width), -100, dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n] = torch.tensor(f["input_ids"])
            mask[i, :n] = 1
            labels[i, f["prompt_len"] : n] = torch.tensor(f["input_ids"][f["prompt_len"] :])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def tokenize_sft(rows: list[dict[str, Any]], tokenizer: Any, max_length: int) -> list[dict[str, Any]]:
    eot = end_of_turn_id(tokenizer)
    out = []
    for r in rows:
        p = prompt_ids(tokenizer, r["prompt"])
        c = response_ids(tokenizer, r["completion"][0]["content"], eot)
        ids = (p + c)[:max_length]
        if len(ids) > len(p):
            out.append({"input_ids": ids, "prompt_len": len(p)})
    return out


def train_sft(
    model_path: Path, rows: list[dict[str, Any]], cfg: SFTConfig, out_dir: Path, work_dir: Path
) -> Path:
    """Fine-tune ``model_path`` on ``rows`` (prompt/completion) and save an HF checkpoint at ``out_dir``."""
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from fuselab.wrpo.sampling import load_tokenizer
    from fuselab.wrpo.train import ListDataset

    tok = load_tokenizer(model_path)
    data = tokenize_sft(rows, tok, cfg.max_length)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    args = TrainingArguments(
        output_dir=str(work_dir),
        remove_unused_columns=False,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_ratio,
        seed=cfg.seed,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=ListDataset(data),
        data_collator=SFTCollator(tok.pad_token_id),
        processing_class=tok,
    )
    result = trainer.train()
    trainer.save_model(str(out_dir))
    (out_dir / "training_args.bin").unlink(missing_ok=True)
    atomic_write_text(out_dir / "fuselab_wrpo_sft.yaml", dump_yaml(cfg.model_dump(mode="json")))
    atomic_write_text(
        out_dir / "README.md",
        "# Target-SFT (WRPO stage 1)\n\n"
        f"`{model_path}` fine-tuned by fuselab on the best source response (y_ws) of {len(data)} prompts "
        f"(response tokens only), {trainer.state.global_step} optimiser steps, final training loss "
        f"{result.training_loss:.4f}. Settings in `fuselab_wrpo_sft.yaml`. It is sampled for y_wt / y_l and is "
        "the start point and frozen reference of WRPO training.\n",
    )
    return out_dir


def _main(argv: list[str]) -> int:
    """``python -m fuselab.wrpo.sft JOB.json``: the SFT stage in a process of its own, which the main rank of
    a multi-process ``wrpo build`` starts outside the launch (so that it trains as one process does)."""
    import json
    import logging
    import sys

    from fuselab.utils.hardware import configure_threads

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    job = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    configure_threads()  # as the command line does
    train_sft(
        Path(job["model"]),
        job["rows"],
        SFTConfig.model_validate(job["sft"]),
        Path(job["out"]),
        Path(job["work"]),
    )
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(_main(sys.argv[1:]))
