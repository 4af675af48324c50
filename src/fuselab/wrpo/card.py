"""Model and data cards (README.md) written next to WRPO outputs."""

from __future__ import annotations

from typing import Any

import yaml

from fuselab import __version__

PAPER = "Yang et al., Weighted-Reward Preference Optimization for Implicit Model Fusion, ICLR 2025 (arXiv 2412.03187)"


def _table(d: dict[str, Any]) -> list[str]:
    lines = ["| key | value |", "|---|---|"]
    for k, v in d.items():
        if isinstance(v, float):
            v = f"{v:.6g}"
        lines.append(f"| `{k}` | `{v}` |")
    return lines


def render_train_card(
    *, model_ref: str, ref_ref: str, data_path: str, config: dict[str, Any], summary: dict[str, Any]
) -> str:
    front = {
        "library_name": "transformers",
        "tags": ["fuselab", "wrpo", "preference-optimization"],
        "base_model": [model_ref],
    }
    loss = config["loss"]
    sched = loss["alpha_schedule"]
    alpha_text = (
        f"α constant at {loss['alpha']}"
        if sched == "constant"
        else f"α ramped ({sched}) from 0 to {loss['alpha']}"
    )
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        "# WRPO-trained model",
        "",
        f"Trained with [fuselab](https://github.com/fuselab/fuselab) {__version__} by weighted-reward preference "
        f"optimisation ({PAPER}): −log σ(α·r(y_ws) + (1−α)·r(y_wt) − r(y_l)), r = β·log(π/π_ref), summed "
        f"response log-probs, β = {loss['beta']}, {alpha_text} over the optimiser steps.",
        "",
        f"- Policy start point: `{model_ref}`",
        f"- Frozen reference: `{ref_ref}` ({config['reference']['mode']} log-probs)",
        f"- Data: `{data_path}`",
        "",
        "## Run summary",
        "",
        *_table(summary),
        "",
        "The resolved recipe is in `fuselab_wrpo_train.yaml`; the full log in `log_history.json`.",
        "",
    ]
    return "\n".join(lines)


def render_build_card(*, config: dict[str, Any], stats: dict[str, Any]) -> str:
    lines = [
        "# WRPO preference data",
        "",
        f"Built with fuselab {__version__} (`fuselab wrpo build`) for {PAPER}.",
        "",
        f"- Target (on-policy y_wt, y_l): `{config['target']}`",
        f"- Sources (off-policy y_ws): {', '.join('`' + s['model'] + '`' for s in config['sources'])}",
        f"- Scorer: `{config['scorer']['type']}`",
        "",
        "Files: `wrpo.jsonl` (TRL conversational preference format: `prompt`, `chosen` = y_wt, `rejected` = y_l, "
        "plus `source_chosen` = y_ws, `source_model`, `scores`), `sft.jsonl` (prompt/completion rows on y_ws "
        "for the SFT stage), `samples/` (every sampled response with its score), `build_stats.json`.",
        "",
        "## Counts",
        "",
        *_table({k: v for k, v in stats.items() if not isinstance(v, (dict, list))}),
        "",
        "Selection counts:",
        "",
        *_table(stats.get("selection", {})),
        "",
    ]
    return "\n".join(lines)
