"""Sub-commands of the prune stage: ``fuselab prune`` and ``fuselab prune-eval``."""

from __future__ import annotations

import argparse


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prune",
        help="remove attention/MLP blocks or whole layers (BlockPruner, layer search, ShortGPT)",
        description=(
            "Greedy BlockPruner search (arXiv:2406.10594) over attention and MLP blocks, or the whole-layer and "
            "ShortGPT baselines, on local calibration text; then write a real pruned checkpoint. The search "
            "state is saved after every round; rerunning the recipe resumes it."
        ),
    )
    p.add_argument("recipe", help="YAML recipe (see configs/prune/)")
    p.add_argument("out_dir", nargs="?", help="output folder (default: the recipe's `output`)")
    p.add_argument(
        "--force", action="store_true", help="replace OUT_DIR if it exists (once the run succeeded)"
    )
    p.add_argument("--restart", action="store_true", help="discard a saved search state instead of resuming")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(handler=_run_prune)

    e = sub.add_parser(
        "prune-eval",
        help="perplexity of a model (stock or pruned by fuselab) on local text",
        description="Perplexity as BlockPruner reports it: text joined, cut into SEQLEN chunks, remainder dropped.",
    )
    e.add_argument("model", help="checkpoint folder (stock, or written by `fuselab prune`) or catalog name")
    e.add_argument("--data", nargs="+", required=True, help=".txt/.json/.jsonl files or bundled:NAME")
    e.add_argument("--seqlen", type=int, default=2048, help="tokens per chunk (default 2048)")
    e.add_argument("--max-chunks", type=int, default=None, help="use at most this many chunks")
    e.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    e.set_defaults(handler=_run_eval)


def _run_prune(args: argparse.Namespace) -> int:
    from fuselab.prune.run import run_prune

    result = run_prune(
        args.recipe, args.out_dir, force=args.force, restart=args.restart, show_progress=not args.no_progress
    )
    final = result.rounds[-1] if result.rounds else None
    summary = f"removed {', '.join(r.removed for r in result.rounds) or 'nothing'}"
    if final:
        summary += f"; {100 * final.ratio:.2f}% of parameters, calibration ppl {result.dense_ppl:.3f} -> {final.ppl:.3f}"
    fmt = f" ({result.export_format} checkpoint)" if result.export_format else ""
    print(f"{summary} in {result.seconds:.1f} s -> {result.out_dir}{fmt}")
    return 0


def _run_eval(args: argparse.Namespace) -> int:
    import torch

    from fuselab.prune.evaluate import evaluate_path

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    r = evaluate_path(args.model, args.data, args.seqlen, args.max_chunks, dtype)
    print(f"perplexity {r.ppl:.4f} (NLL {r.nll:.2f} over {r.tokens} tokens, {r.chunks} chunks of {r.seqlen})")
    return 0
