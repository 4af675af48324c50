"""The model card written next to every merged checkpoint: what was merged, how, and from which inputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from fuselab import __version__
from fuselab.merge.registry import MergeMethod
from fuselab.modeling.checkpoint import Checkpoint


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, (dict, list)):
        return "`" + yaml.safe_dump(v, default_flow_style=True).strip() + "`"
    return f"`{v}`"


def render_merge_card(
    *,
    method: MergeMethod,
    resolved: dict[str, Any],
    inputs: list[tuple[str, Path, dict[str, Any] | None]],
    base: tuple[str, Path] | None,
    reference: Checkpoint,
    result: Any,
) -> str:
    front = {
        "library_name": "transformers",
        "tags": ["fuselab", "merge", method.name],
        "base_model": [str(base[0])] if base else [str(r) for r, _, _ in inputs],
    }
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        f"# Merged model ({method.name})",
        "",
        f"Merged with [fuselab](https://github.com/fuselab/fuselab) {__version__} using **{method.name}**: "
        f"{method.summary} ([reference]({method.reference})).",
        "",
        f"- Architecture: `{reference.architecture}`, {reference.num_parameters() / 1e6:.1f} M parameters",
        f"- Output dtype: `{resolved.get('out_dtype')}` (merged in float32)",
        f"- Tensors: {result.num_tensors}, {result.bytes_written / 1e6:.1f} MB in {len(result.files)} file(s)",
        f"- Seed: `{resolved.get('seed')}`",
        f"- Merge time: {result.seconds:.1f} s",
        "",
    ]
    if base:
        lines += [f"Base model: `{base[0]}` (`{base[1]}`)", ""]
    lines += ["## Inputs", "", "| model | path | parameters |", "|---|---|---|"]
    for ref, path, params in inputs:
        lines.append(f"| `{ref}` | `{path}` | {_fmt(params)} |")
    lines += ["", "## Method parameters", "", "| parameter | value |", "|---|---|"]
    for k, v in (resolved.get("parameters") or {}).items():
        lines.append(f"| `{k}` | {_fmt(v)} |")
    lines += [
        "",
        "## Recipe",
        "",
        "The resolved recipe is in `fuselab_merge.yaml`; rerun with `fuselab merge fuselab_merge.yaml OUT_DIR`.",
        "",
    ]
    return "\n".join(lines)
