"""``fuselab merge RECIPE.yaml OUT_DIR``."""

from __future__ import annotations

import argparse


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge",
        help="merge models of one architecture in parameter space (mergekit-compatible recipes)",
        description=(
            "Merge models of one architecture tensor by tensor (see --list-methods), or stack their layers "
            "(`slices` with passthrough). RECIPE uses mergekit's YAML format. Memory grows with the largest "
            "tensor, not with the model."
        ),
    )
    p.add_argument("recipe", nargs="?", help="YAML recipe (mergekit format)")
    p.add_argument("out_dir", nargs="?", help="output folder (refused if it exists, unless --force)")
    p.add_argument(
        "--force", action="store_true", help="replace OUT_DIR if it exists (only once the merge succeeded)"
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    p.add_argument(
        "--out-shard-size", default="2GB", help="largest output shard, e.g. 2GB, 500MB (default: 2GB)"
    )
    p.add_argument("--seed", type=int, default=None, help="seed for random methods (overrides the recipe's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--list-methods", action="store_true", help="list merge methods and their parameters, then exit"
    )
    p.set_defaults(handler=_run)


def _list_methods() -> int:
    from fuselab.merge.registry import REQUIRED, get_merge_method, merge_method_names

    for name in merge_method_names():
        m = get_merge_method(name)
        base = {"deltas_if_base": "base_model optional"}.get(
            m.inputs, "needs base_model" if m.needs_base else "no base needed"
        )
        count = f"merges {m.count_text()} model(s)"
        print(f"{name}: {m.summary} ({base}; {count}; {m.reference})")
        for p in m.params:
            scope = "per model" if p.per_model else "global"
            default = "required" if p.default is REQUIRED else f"default {p.default!r}"
            choices = f", one of {list(p.choices)}" if p.choices else ""
            print(f"    {p.name} ({p.type.__name__}, {scope}, {default}{choices}) {p.help}")
    return 0


def _run(args: argparse.Namespace) -> int:
    if args.list_methods:
        return _list_methods()
    if not args.recipe or not args.out_dir:
        from fuselab.utils.errors import ConfigError

        raise ConfigError("usage: fuselab merge RECIPE.yaml OUT_DIR (or fuselab merge --list-methods)")
    from fuselab.merge.engine import MergeOptions, run_merge

    result = run_merge(
        args.recipe,
        args.out_dir,
        MergeOptions(
            device=args.device,
            out_shard_size=args.out_shard_size,
            force=args.force,
            seed=args.seed,
            show_progress=not args.no_progress,
        ),
    )
    print(
        f"merged {result.num_tensors} tensors ({result.bytes_written / 1e6:.1f} MB, {result.method}) in "
        f"{result.seconds:.1f} s -> {result.out_dir}"
    )
    return 0
