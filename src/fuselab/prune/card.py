"""The model card written next to every pruned checkpoint: what was removed, how, and from which inputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from fuselab import __version__
from fuselab.prune.blocks import BlockLayout
from fuselab.prune.config import PruneRecipe
from fuselab.prune.search import Round

_METHODS = {
    "blockpruner": "BlockPruner greedy block search (Zhong et al., 2024, arXiv:2406.10594)",
    "layer_search": "greedy whole-layer search by calibration perplexity (BlockPruner's '- block' ablation)",
    "shortgpt": "ShortGPT one-shot Block Influence layer removal (Men et al., 2024, arXiv:2403.03853)",
}
_FORMATS = {
    "stock": "a stock transformers checkpoint (whole layers removed, layers renumbered); load it with "
    "`AutoModelForCausalLM.from_pretrained`",
    "fuselab": "single blocks removed; load it with `fuselab.prune.loading.load_pruned_model(path)` (stock "
    "transformers refuses the custom model type rather than filling the missing weights at random)",
    "decilm": "single blocks removed, DeciLM/Nemotron-NAS `block_configs` layout (`DeciLMForCausalLM`, read by "
    "vLLM with `trust_remote_code`); load it in Python with `fuselab.prune.loading.load_pruned_model(path)`",
}


def render_prune_card(
    recipe: PruneRecipe,
    model_dir: Path,
    layout: BlockLayout,
    rounds: list[Round],
    dense_ppl: float,
    extra: dict[str, Any],
) -> str:
    final = rounds[-1] if rounds else None
    export = extra.get("export") or {}
    front = {
        "library_name": "transformers",
        "tags": ["fuselab", "pruning", recipe.method],
        "base_model": [str(model_dir)],
    }
    cal = recipe.calibration
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        f"# Pruned model ({recipe.method})",
        "",
        f"Pruned with fuselab {__version__}: {_METHODS[recipe.method]}.",
        "",
        f"- Source: `{model_dir}` ({layout.num_layers} layers, {layout.total_params / 1e6:.1f} M parameters)",
        f"- Calibration: {cal.num_chunks} chunks of {cal.seqlen} tokens from {', '.join(f'`{f}`' for f in cal.files)}",
        f"- Calibration perplexity: dense {dense_ppl:.3f}" + (f", pruned {final.ppl:.3f}" if final else ""),
    ]
    if final:
        lines.append(
            f"- Removed: {final.params_removed / 1e6:.2f} M parameters ({100 * final.ratio:.2f}%), "
            f"{final.num_attn_removed} attention and {final.num_mlp_removed} MLP blocks"
        )
    if export:
        lines.append(f"- Format: {_FORMATS[export['format']]}")
    lines += [
        "",
        "## Removal order",
        "",
        "| step | removed | calibration ppl | parameters removed |",
        "|---|---|---|---|",
    ]
    for r in rounds:
        lines.append(f"| {r.step} | `{r.removed}` | {r.ppl:.3f} | {100 * r.ratio:.2f}% |")
    lines += [
        "",
        "The full trajectory is in `search.json` and `trajectory.csv`; the resolved recipe in `fuselab_prune.yaml`.",
        "",
    ]
    return "\n".join(lines)
