"""Model card and resolved recipe written next to every fusion-trained checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from fuselab import __version__
from fuselab.fusion.config import TrainConfig


def write_card(
    folder: Path,
    meta: dict[str, Any],
    cfg: TrainConfig,
    summary: dict[str, Any],
    resolved_recipe: dict[str, Any] | None,
) -> None:
    if resolved_recipe is not None:
        (folder / "fuselab_fusion.yaml").write_text(yaml.safe_dump(resolved_recipe, sort_keys=False))
    stats = meta.get("stats", {})
    front = {
        "library_name": "transformers",
        "tags": ["fuselab", "knowledge-fusion", meta["fuse"]["function"]],
    }
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        f"# {meta['target']}",
        "",
        *(
            [
                f"Trained with [fuselab](https://github.com/) {__version__}: an SFT baseline of `{meta['pivot']}`",
                "(CLM loss only, λ = 1) on the same tokens and steps as the fused targets; no source distributions.",
            ]
            if cfg.lam >= 1.0
            else [
                f"Trained with [fuselab](https://github.com/) {__version__} by explicit knowledge fusion (FuseLLM / FuseChat):",
                f"the pivot `{meta['pivot']}` learned from the per-token distributions of "
                + ", ".join(f"`{s}`" for s in meta["sources"])
                + f" ({meta['fuse']['mode']} mode) with loss λ·CLM + (1−λ)·{cfg.loss.upper()}, λ = {cfg.lam}.",
            ]
        ),
        "",
        "| setting | value |",
        "|---|---|",
        f"| pivot checkpoint | `{meta['pivot_path']}` |",
        f"| sequence alignment | `{meta['align']['sequence']}` |",
        f"| vocabulary mapping | `{meta['align']['vocab']}` |",
        f"| fusion function | `{meta['fuse']['function']}` (pivot is a candidate: {meta['fuse']['include_pivot']}) |",
        f"| target tail mass | `{cfg.tail}` |",
        f"| learning rate / epochs / max steps | {cfg.learning_rate} / {cfg.epochs} / {cfg.max_steps} |",
        f"| batch × accumulation | {cfg.batch_size} × {cfg.grad_accum} |",
        f"| optimiser steps | {summary['steps']} |",
        f"| final training loss | {summary['train_loss']:.4f} |",
        f"| examples | {stats.get('examples')} |",
        "",
        "## Alignment and fusion statistics",
        "",
        "```json",
        json.dumps({k: v for k, v in stats.items() if k != "examples"}, indent=2),
        "```",
        "",
        "`fuselab_fusion.yaml` is the resolved recipe; `training_log.json` holds the CLM and fusion loss curves.",
    ]
    (folder / "README.md").write_text("\n".join(lines) + "\n")
