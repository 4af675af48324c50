"""``fuselab prune``: recipe -> search (resumable) -> pruned checkpoint, verified by reloading it.

While the search runs, its state lives in ``OUT_DIR.search-state/`` (``state.json``, rewritten atomically after
every round, and ``events.jsonl``). Rerunning the same recipe continues from the last finished round; a recipe
that changed the model, calibration data, method or batch size is refused (``--restart`` discards the state).
The output folder appears only when everything succeeded.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from fuselab import __version__
from fuselab.prune.blocks import Block, BlockLayout, BlockMasker, inspect_blocks
from fuselab.prune.calibration import calibration_chunks, tensor_fingerprint
from fuselab.prune.config import PruneRecipe, load_recipe
from fuselab.prune.runner import CalibrationRunner
from fuselab.prune.search import (
    Round,
    StopRule,
    block_candidates,
    greedy_search,
    layer_candidates,
    shortgpt_search,
)
from fuselab.utils.atomic import atomic_output_dir, atomic_write_json, atomic_write_text, check_output_dir
from fuselab.utils.config import dump_yaml
from fuselab.utils.errors import ConfigError, FuselabError
from fuselab.utils.finite import check_finite_weights
from fuselab.utils.hashing import sha256_file

log = logging.getLogger(__name__)


def search_dtype(recipe: PruneRecipe) -> torch.dtype:
    """The recipe's ``dtype`` (``auto``: bfloat16 where native, else float32) on its device."""
    from fuselab.utils.hardware import resolve_dtype

    return resolve_dtype(recipe.dtype, recipe.device, what="prune dtype")


@dataclass
class PruneResult:
    out_dir: Path
    rounds: list[Round]
    dense_ppl: float
    removed: list[str]
    export_format: str | None
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


def fingerprint(recipe: PruneRecipe, model_dir: Path, chunks: torch.Tensor) -> dict[str, Any]:
    """What a saved search depends on; a resumed search must match it exactly."""
    weights = sorted(
        (f.name, f.stat().st_size) for f in model_dir.iterdir() if f.suffix in (".safetensors", ".bin")
    )
    return {
        "model": str(model_dir),
        "config_sha256": sha256_file(model_dir / "config.json"),
        "weight_files": [list(w) for w in weights],
        "calibration_tokens": tensor_fingerprint(chunks),
        "calibration_shape": list(chunks.shape),
        "method": recipe.method,
        "block_types": recipe.block_types,
        "batch_size": recipe.search.batch_size,
        "dtype": str(search_dtype(recipe)).removeprefix("torch."),  # what really runs (auto resolved)
    }


def load_state(state_dir: Path, fp: dict[str, Any]) -> list[Round]:
    state_file = state_dir / "state.json"
    if not state_file.is_file():
        return []
    state = json.loads(state_file.read_text())
    if state.get("fingerprint") != fp:
        diff = sorted(k for k in fp if state.get("fingerprint", {}).get(k) != fp[k])
        raise ConfigError(
            f"{state_dir} holds a search for a different setup (differs in: {', '.join(diff)}); pass --restart "
            "to discard it, or choose another output folder"
        )
    return [Round(**r) for r in state["rounds"]]


def _model_and_tokenizer(recipe: PruneRecipe) -> tuple[Path, Any, Any]:
    from transformers import AutoModelForCausalLM

    from fuselab.modeling.resolve import resolve_model
    from fuselab.modeling.tokenizers import load_tokenizer

    model_dir = resolve_model(recipe.model)
    tokenizer = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=search_dtype(recipe))
    return model_dir, tokenizer, model.to(recipe.device).eval()


def verify_export(
    out: Path, model: torch.nn.Module, sample: torch.Tensor, dtype: torch.dtype
) -> dict[str, Any]:
    """Reload the export; its logits must match the in-memory pruned model, and generation with its KV cache
    must match generation without it, token for token and logit for logit (within ``dtype`` rounding)."""
    from fuselab.prune.kv_cache import verify_cached_decoding
    from fuselab.prune.loading import load_pruned_model

    device = next(model.parameters()).device
    reloaded = load_pruned_model(out, dtype=dtype).to(device)
    ids = sample[:1, :64].to(device)
    with torch.inference_mode():
        want = model(input_ids=ids, use_cache=False).logits.float()
        got = reloaded(input_ids=ids, use_cache=False).logits.float()
    diff = float((want - got).abs().max())
    if not diff <= 1e-4 * max(1.0, float(want.abs().max())):
        raise FuselabError(f"the exported checkpoint's logits differ from the pruned model's by {diff:.3g}")
    cached = verify_cached_decoding(reloaded, ids[:, :16], dtype)
    return {
        "max_abs_logit_diff": diff,
        "generation_with_cache_matches": True,
        "cached_decoding_max_abs_logit_gap": cached["max_abs_logit_gap"],
    }


def trajectory_csv(rounds: list[Round]) -> str:
    buf = io.StringIO()
    cols = ["step", "removed", "ppl", "nll", "ratio", "params_left", "num_attn_removed", "num_mlp_removed"]
    cols += ["evaluated", "abandoned", "seconds"]
    w = csv.writer(buf)
    w.writerow(cols)
    for r in rounds:
        w.writerow([getattr(r, c) for c in cols])
    return buf.getvalue()


def nested_sets(rounds: list[Round]) -> dict[str, list[list[Any]]]:
    """The reference code's output format: ``{k: sorted removal set after k steps}``."""
    out: dict[str, list[list[Any]]] = {}
    removed: set[Block] = set()
    for r in rounds:
        removed |= {Block.parse(b) for b in r.blocks}
        out[str(r.step)] = [[b.kind, b.layer] for b in sorted(removed, key=lambda b: (b.layer, b.kind))]
    return out


def check_stop_reachable(recipe: PruneRecipe, layout: BlockLayout) -> None:
    """Refuse a stop rule the model cannot satisfy without losing every block it may lose.

    Without this the greedy search simply ran out of candidates and exported a model with no layers (exit
    0). ``num_blocks`` must be below the number of removable blocks when those are all of the model's blocks,
    and at most that number otherwise; ``target_ratio`` must be below the ratio of removing them all."""
    if recipe.method == "blockpruner" and recipe.block_types != "mix":
        kinds: tuple[str, ...] = (recipe.block_types,)
    else:
        kinds = ("attn", "mlp")
    removable = [Block(k, i) for i in range(layout.num_layers) for k in kinds]
    every_block = len(kinds) == 2
    what = f"the model has {layout.num_layers} layers = {2 * layout.num_layers} blocks" + (
        "" if every_block else f", {len(removable)} of them {kinds[0]} blocks (block_types: {kinds[0]})"
    )
    n = recipe.stop.num_blocks
    limit = len(removable) - 1 if every_block else len(removable)
    if n is not None and n > limit:
        raise ConfigError(
            f"stop.num_blocks is {n}, but {what}; removing {'them all' if n >= len(removable) else n} would "
            f"leave {'no layer' if every_block else 'none of them'}. Use stop.num_blocks <= {limit}"
        )
    ratio = recipe.stop.target_ratio
    if ratio is not None:
        most = layout.ratio(removable)
        if ratio >= most - 1e-12:
            raise ConfigError(
                f"stop.target_ratio {ratio} cannot be reached: {what}, and removing every one of them removes "
                f"{most:.4f} of the parameters (embeddings and head stay). Use stop.target_ratio < {most:.4f}"
            )


def run_prune(
    recipe: PruneRecipe | str | Path,
    out_dir: str | Path | None = None,
    force: bool = False,
    restart: bool = False,
    show_progress: bool = True,
) -> PruneResult:
    t_start = time.perf_counter()
    source = str(recipe) if not isinstance(recipe, PruneRecipe) else "recipe"
    if not isinstance(recipe, PruneRecipe):
        recipe = load_recipe(recipe)
    out_ref = out_dir or recipe.output
    if not out_ref:
        raise ConfigError("no output folder: give OUT_DIR on the command line or `output:` in the recipe")
    out = Path(out_ref).absolute()
    check_output_dir(out, force)
    state_dir = out.with_name(out.name + ".search-state")
    if restart and state_dir.exists():
        shutil.rmtree(state_dir)

    model_dir, tokenizer, model = _model_and_tokenizer(recipe)
    check_output_dir(out, force, inputs=[model_dir])  # never the model it reads
    check_finite_weights(model, model_dir)  # NaN weights would fail the block probe, blaming the layout
    layout = inspect_blocks(model)
    check_stop_reachable(recipe, layout)  # before calibration and search, which are the expensive part
    cal = recipe.calibration
    chunks = calibration_chunks(cal.files, tokenizer, cal.seqlen, cal.num_chunks, cal.num_rows, cal.seed)
    log.info(
        "%s: %d layers, %d blocks; attention block %.2f M, MLP block %.2f M of %.1f M parameters",
        model_dir.name,
        layout.num_layers,
        2 * layout.num_layers,
        layout.layers[0].params["attn"] / 1e6,
        layout.layers[0].params["mlp"] / 1e6,
        layout.total_params / 1e6,
    )
    runner = CalibrationRunner(model, layout, chunks, recipe.search.batch_size)
    masker = BlockMasker(model, layout)
    stop = StopRule(recipe.stop.num_blocks, recipe.stop.target_ratio)
    dense_nll = runner.total_nll()
    log.info("dense model: calibration ppl %.4f on %d tokens", runner.ppl(dense_nll), runner.num_tokens)
    extra: dict[str, Any] = {}
    t_search = time.perf_counter()
    if recipe.method == "shortgpt":
        rounds, bi = shortgpt_search(runner, masker, stop, show_progress)
        extra["block_influence"] = bi
    else:
        fp = fingerprint(recipe, model_dir, chunks)
        state_dir.mkdir(parents=True, exist_ok=True)
        history = load_state(state_dir, fp)
        if history:
            log.info("resuming after round %d (%s)", len(history), ", ".join(r.removed for r in history))
        atomic_write_json(
            state_dir / "state.json", {"fingerprint": fp, "rounds": [r.to_dict() for r in history]}
        )

        def save(rec: Round, rounds: list[Round]) -> None:
            atomic_write_json(
                state_dir / "state.json", {"fingerprint": fp, "rounds": [r.to_dict() for r in rounds]}
            )
            with open(state_dir / "events.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps({"event": "round", **rec.to_dict()}) + "\n")

        candidates = (
            layer_candidates(layout)
            if recipe.method == "layer_search"
            else block_candidates(
                layout, ("attn", "mlp") if recipe.block_types == "mix" else (recipe.block_types,)
            )
        )
        if history:
            _check_resumed(runner, masker, history)
        rounds = greedy_search(
            runner, masker, candidates, stop, recipe.search.fast, history, save, show_progress
        )
    extra["search_seconds"] = time.perf_counter() - t_search
    removed = {Block.parse(b) for r in rounds for b in r.blocks}
    masker.set_removed(removed)
    export_format = None
    with atomic_output_dir(out, force, inputs=[model_dir]) as tmp:
        if recipe.export.enabled:
            from transformers import AutoConfig

            from fuselab.modeling.writer import parse_size
            from fuselab.prune.export import export_pruned

            info = export_pruned(
                model_dir,
                tmp,
                AutoConfig.from_pretrained(model_dir),
                layout,
                removed,
                recipe.export.decilm,
                parse_size(recipe.export.max_shard_size),
            )
            export_format = info.format
            extra["export"] = {
                "format": info.format,
                "kept_layers": info.kept_layers,
                "partial": [[i, k] for i, k in info.partial],
                "files": info.files,
                "decilm_not_used_because": info.decilm_note or None,
            }
            if recipe.export.verify:
                extra["verification"] = verify_export(tmp, model, chunks, search_dtype(recipe))
        dense_ppl = runner.ppl(dense_nll)
        write_outputs(tmp, out, recipe, model_dir, layout, rounds, dense_nll, dense_ppl, extra, source)
        if state_dir.exists() and (state_dir / "events.jsonl").is_file():
            shutil.copy2(state_dir / "events.jsonl", tmp / "events.jsonl")
    shutil.rmtree(state_dir, ignore_errors=True)
    return PruneResult(
        out_dir=out,
        rounds=rounds,
        dense_ppl=runner.ppl(dense_nll),
        removed=[str(b) for b in sorted(removed, key=lambda b: b.canonical_key)],
        export_format=export_format,
        seconds=time.perf_counter() - t_start,
        extra=extra,
    )


def _check_resumed(runner: CalibrationRunner, masker: BlockMasker, history: list[Round]) -> None:
    """Re-score the model of the last saved round; it must reproduce the saved score."""
    masker.set_removed({Block.parse(b) for r in history for b in r.blocks})
    got = runner.total_nll()
    want = history[-1].nll
    if not math.isclose(got, want, rel_tol=1e-5):
        raise FuselabError(
            f"the resumed search re-scores the model of round {len(history)} at NLL {got:.6f}, the saved state "
            f"says {want:.6f}; the model or data changed. Rerun with --restart"
        )
    if got != want:
        log.warning(
            "resumed score differs in the last bits (%r vs %r): a different backend or thread count",
            got,
            want,
        )


def write_outputs(
    out: Path,
    final_out: Path,
    recipe: PruneRecipe,
    model_dir: Path,
    layout: BlockLayout,
    rounds: list[Round],
    dense_nll: float,
    dense_ppl: float,
    extra: dict[str, Any],
    source: str,
) -> None:
    from fuselab.prune.card import render_prune_card

    final = rounds[-1] if rounds else None
    search = {
        "fuselab_version": __version__,
        "method": recipe.method,
        "block_types": recipe.block_types,
        "model": str(model_dir),
        "layout": layout.to_dict(),
        "calibration": recipe.calibration.model_dump(),
        "dense": {"nll": dense_nll, "ppl": dense_ppl},
        "removed": [r.removed for r in rounds],
        "final": final.to_dict() if final else None,
        "rounds": [r.to_dict() for r in rounds],
        "nested_sets": nested_sets(rounds),
        **extra,
    }
    atomic_write_json(out / "search.json", search)
    atomic_write_text(out / "trajectory.csv", trajectory_csv(rounds))
    resolved = recipe.model_dump(mode="json")
    resolved["model"] = str(model_dir)
    resolved["output"] = str(final_out)
    header = (
        f"# Resolved by fuselab {__version__} on {datetime.now(timezone.utc).isoformat(timespec='seconds')}\n"
        f"# from {source}; rerun with: fuselab prune fuselab_prune.yaml OUT_DIR\n"
    )
    (out / "fuselab_prune.yaml").write_text(header + dump_yaml(resolved))
    (out / "README.md").write_text(render_prune_card(recipe, model_dir, layout, rounds, dense_ppl, extra))
