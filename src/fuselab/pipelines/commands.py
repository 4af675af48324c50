"""``fuselab fuse RECIPE.yaml``: the FuseChat pipeline in one command."""

from __future__ import annotations

import argparse
from pathlib import Path

from fuselab.pipelines.config import STAGES


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fuse",
        help="sources -> fused model + report in one command (extract, align, train, merge, evaluate, report)",
        description=(
            "FuseChat end to end: extract the pivot's and sources' top-k distributions, align and fuse them, "
            "train one target per source (or one for all in multi mode) plus an SFT-only baseline, merge the "
            "targets, evaluate every model on held-out data and write a report. Each stage is cached in the "
            "work folder by content hash: a rerun skips finished work and resumes interrupted work."
        ),
    )
    p.add_argument("recipe", help="YAML recipe (see configs/demo.yaml)")
    p.add_argument(
        "out_dir", nargs="?", help="folder of the fused model and report (default: the recipe's `output`)"
    )
    p.add_argument("--workdir", help="stage cache (default: the recipe's workdir, or OUT_DIR.work)")
    p.add_argument("--from", dest="from_stage", choices=STAGES, help="rerun this stage and every later one")
    p.add_argument(
        "--until",
        choices=STAGES,
        help="stop after this stage (under `accelerate launch` with several processes: --until extract)",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print the plan with estimated disk and time; write nothing"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from fuselab.pipelines.config import load_recipe
    from fuselab.pipelines.fuse import FusePipeline

    if args.no_progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    recipe = load_recipe(args.recipe)
    pipe = FusePipeline(
        recipe,
        name=Path(args.recipe).stem,
        output=args.out_dir,
        workdir=args.workdir,
        show_progress=not args.no_progress,
        dry_run=args.dry_run,
    )
    if args.dry_run:
        print(format_plan(pipe, args.from_stage))
        return 0
    result = pipe.run(args.from_stage, args.until)
    from fuselab.utils.distributed import current_ranks

    if not current_ranks().is_main:  # one report, from the main process
        return 0
    for stage in STAGES:
        ran, skipped = result.ran.get(stage, []), result.skipped.get(stage, [])
        parts = ([f"ran {', '.join(ran)}"] if ran else []) + (
            [f"cached {', '.join(skipped)}"] if skipped else []
        )
        print(f"{stage:9s} {result.stage_seconds.get(stage, 0.0):7.1f} s  {'; '.join(parts) or '-'}")
    print(f"done in {result.seconds:.0f} s")
    if args.until and args.until != STAGES[-1]:
        print(f"stopped after {args.until}; run the same `fuselab fuse` without --until for the later stages")
        return 0
    print(f"fused model: {result.model}")
    print(f"report:      {result.report}")
    return 0


def format_plan(pipe, from_stage: str | None) -> str:
    from fuselab.pipelines.estimate import human_bytes, human_seconds

    forced = set(STAGES[STAGES.index(from_stage) :]) if from_stage else set()
    lines = [f"plan for {pipe.output} (work folder {pipe.workdir}); nothing was written", ""]
    total_s = total_b = 0.0
    for item in pipe.plan():
        todo = item.stage in forced or not item.done
        state = "run" if todo else "cached"
        if todo:
            total_s += item.seconds
            total_b += item.nbytes
        lines.append(
            f"{item.stage:9s} {item.label:40s} {state:6s} ~{human_seconds(item.seconds):>8s} "
            f"{human_bytes(item.nbytes):>9s}  {item.path}"
        )
    lines += ["", f"to run: ~{human_seconds(total_s)}, ~{human_bytes(total_b)} of new files (estimates)"]
    return "\n".join(lines)
