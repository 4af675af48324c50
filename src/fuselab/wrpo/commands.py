"""Sub-commands of the wrpo stage: ``fuselab wrpo build`` and ``fuselab wrpo train``."""

from __future__ import annotations

import argparse


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "wrpo",
        help="WRPO implicit fusion: build preference data from source/target samples, then train",
        description=(
            "Weighted-reward preference optimisation (Yang et al., ICLR 2025). `build` samples the sources "
            "and the target, scores the samples and writes (y_ws, y_wt, y_l) preference data plus an SFT set; "
            "`train` runs WRPO on the transformers Trainer (works under `accelerate launch`)."
        ),
    )
    wsub = p.add_subparsers(dest="wrpo_command", metavar="SUBCOMMAND", required=True)

    b = wsub.add_parser("build", help="sample, score and select (y_ws, y_wt, y_l); optional SFT stage")
    b.add_argument("recipe", help="YAML build recipe (see configs/wrpo/)")
    b.add_argument("out_dir", help="output folder (refused if it exists, unless --force)")
    b.add_argument(
        "--force", action="store_true", help="replace OUT_DIR if it exists, once the build succeeded"
    )
    b.add_argument("--list-scorers", action="store_true", help="list the scorers, then exit")
    b.add_argument(
        "--unsafe-exec",
        action="store_true",
        help=(
            "where user namespaces are unavailable, run generated code with rlimits and an in-process guard "
            "only, instead of refusing (only for code you trust; same as FUSELAB_UNSAFE_EXEC=1)"
        ),
    )
    b.set_defaults(handler=_build)

    t = wsub.add_parser("train", help="WRPO training (single process or under accelerate launch)")
    t.add_argument("recipe", help="YAML train recipe (see configs/wrpo/)")
    t.add_argument("out_dir", help="output folder for the trained checkpoint")
    t.add_argument(
        "--force", action="store_true", help="replace OUT_DIR if it exists, once training succeeded"
    )
    t.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint of an earlier run"
    )
    t.set_defaults(handler=_train)


def _build(args: argparse.Namespace) -> int:
    if args.list_scorers:
        from fuselab.wrpo.scorers.registry import _REGISTRY, scorer_names

        for name in scorer_names():
            spec = _REGISTRY[name]
            opts = ", ".join(spec.options.model_fields)
            print(f"{name}: {spec.summary} (options: {opts})")
        return 0
    from fuselab.wrpo.build import run_build

    if args.unsafe_exec:
        import os

        from fuselab.wrpo.sandbox import UNSAFE_ENV

        os.environ[UNSAFE_ENV] = "1"  # read by every execution sandbox of this process

    from fuselab.utils.distributed import current_ranks

    result = run_build(args.recipe, args.out_dir, force=args.force)
    ranks = current_ranks()
    if not ranks.is_main:  # every rank did its share; one report is enough
        return 0
    print(
        f"built {result.wrpo_rows} WRPO rows and {result.sft_rows} SFT rows from {result.prompts} prompts "
        f"in {result.seconds:.0f} s"
        + (f" [{ranks.count} processes]" if ranks.distributed else "")
        + f" -> {result.out_dir}"
    )
    return 0


def _train(args: argparse.Namespace) -> int:
    from fuselab.wrpo.train import run_train

    result = run_train(args.recipe, args.out_dir, force=args.force, resume=args.resume)
    print(f"trained {result.steps} optimiser steps in {result.seconds:.0f} s -> {result.out_dir}")
    return 0
