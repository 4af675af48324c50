"""``fuselab fusion extract|align|train RECIPE.yaml``: explicit knowledge fusion, stage by stage."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fusion",
        help="cross-tokenizer knowledge fusion (FuseChat / FuseLLM): extract, align, train",
        description=(
            "Explicit knowledge fusion. `extract` stores each model's top-k next-token distributions on the "
            "recipe's data, `align` maps the sources' distributions onto the pivot's tokens and vocabulary and "
            "fuses them, `train` trains the pivot on λ·CLM + (1−λ)·fusion. Each stage caches its output in the "
            "work folder by content hash and resumes after an interruption."
        ),
    )
    stages = p.add_subparsers(dest="stage", metavar="STAGE", required=True)
    for name, text in (
        ("extract", "teacher-forced top-k distributions of the pivot and every source"),
        ("align", "align sources to the pivot, project and fuse their distributions"),
        ("train", "train one target per source (pairwise) or one for all (multi)"),
    ):
        s = stages.add_parser(name, help=text, description=text)
        s.add_argument("recipe", help="fusion recipe (YAML); see configs/fusion/")
        if name == "train":
            s.add_argument("out_dir", help="folder for the trained model(s): OUT_DIR/<target>/")
            s.add_argument("--target", action="append", help="train only this target (repeatable)")
            s.add_argument("--force", action="store_true", help="replace existing output folders")
        s.add_argument(
            "--workdir", help="stage cache (default: the recipe's workdir or outputs/fusion/<recipe>)"
        )
        s.add_argument("--no-progress", action="store_true", help="no progress bars")
        s.set_defaults(handler=_run)


def load_checked_recipe(path: str):
    """The recipe, with the checks that need this machine (devices) made before any model is loaded."""
    from fuselab.fusion.config import load_recipe
    from fuselab.utils.hardware import check_device

    recipe = load_recipe(path)
    check_device(recipe.extract.device, "extract.device")
    return recipe


def _workspace(args: argparse.Namespace, recipe):
    from fuselab.fusion.workspace import Workspace

    workdir = args.workdir or recipe.workdir or str(Path("outputs/fusion") / Path(args.recipe).stem)
    return recipe, Workspace(recipe, workdir, show_progress=not args.no_progress)


def _run(args: argparse.Namespace) -> int:
    from fuselab.utils.atomic import output_lock

    recipe = load_checked_recipe(args.recipe)
    recipe, ws = _workspace(args, recipe)
    with output_lock(ws.workdir):  # one run per work folder: a second one fails at once
        return _run_stage(args, recipe, ws)


def _run_stage(args: argparse.Namespace, recipe, ws) -> int:
    if args.stage == "extract":
        from fuselab.utils.distributed import current_ranks

        ranks = current_ranks()
        done = ws.extract()
        if not ranks.is_main:  # every rank extracted its share; one report is enough
            return 0
        for name, summary in done.items():
            if summary is None:
                print(f"{name}: already extracted ({ws.store_dir(name)})")
                continue
            print(
                f"{name}: {summary.tokens} supervised tokens of {summary.examples} texts in {summary.seconds:.1f} s; "
                f"{summary.nbytes / 1e6:.1f} MB, {summary.bytes_per_token:.1f} bytes per stored token"
                + (f" (resumed {summary.resumed_shards} finished shards)" if summary.resumed_shards else "")
                + (f" [{ranks.count} processes]" if ranks.distributed else "")
                + f" -> {ws.store_dir(name)}"
            )
        return 0
    if args.stage == "align":
        ws.extract()
        for target, stats in ws.build_targets().items():
            print(f"{target}: {ws.targets_dir(target)}")
            print(json.dumps(stats, indent=2))
        return 0
    from fuselab.fusion.train import train

    ws.extract()
    ws.build_targets()
    targets = args.target or list(ws.target_groups())
    unknown = set(targets) - set(ws.target_groups())
    if unknown:
        from fuselab.utils.errors import ConfigError

        raise ConfigError(f"unknown target(s) {sorted(unknown)}; this recipe has {list(ws.target_groups())}")
    for target in targets:
        out = Path(args.out_dir) / target
        summary = train(
            ws.targets_dir(target),
            out,
            recipe.train,
            resolved_recipe=recipe.model_dump(),
            force=args.force,
            show_progress=not args.no_progress,
        )
        print(f"{target}: {summary['steps']} steps, final loss {summary['train_loss']:.4f} -> {out}")
    return 0
