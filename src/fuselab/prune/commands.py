"""Sub-commands of the prune stage: ``fuselab prune`` and ``fuselab prune-eval``."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1 (``--seqlen 0`` would divide by zero deep in the evaluation)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


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
        help="perplexity on local text and lm-eval zero-shot tasks of a model (stock or pruned by fuselab)",
        description=(
            "Perplexity as BlockPruner reports it (text joined, cut into SEQLEN chunks, remainder dropped) "
            "and/or zero-shot lm-evaluation-harness tasks from local task files (optional extra: "
            "pip install 'fuselab[lmeval]'). fuselab's bundled tasks: fuselab_chat_reply, fuselab_code_body "
            "(tag fuselab_zero_shot); add your own task folders with --include-path."
        ),
    )
    e.add_argument("model", help="checkpoint folder (stock, or written by `fuselab prune`) or catalog name")
    e.add_argument(
        "--data", nargs="+", default=None, help=".txt/.json/.jsonl files or bundled:NAME (perplexity)"
    )
    e.add_argument(
        "--seqlen", type=positive_int, default=2048, help="tokens per perplexity chunk (default 2048)"
    )
    e.add_argument("--max-chunks", type=positive_int, default=None, help="use at most this many chunks")
    e.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    e.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    e.add_argument(
        "--lm-eval",
        metavar="TASK[,TASK]",
        default=None,
        help="lm-eval tasks or tags to run zero-shot, comma-separated (e.g. fuselab_zero_shot)",
    )
    e.add_argument(
        "--include-path",
        action="append",
        default=[],
        metavar="DIR",
        help="folder of lm-eval task YAMLs with local data (repeatable)",
    )
    e.add_argument(
        "--lm-eval-builtin",
        action="store_true",
        help="also offer lm-eval's own tasks (piqa, arc_easy, ...; their data come from the hub or its cache)",
    )
    e.add_argument(
        "--batch-size", type=positive_int, default=1, help="lm-eval batch size (default 1, as the paper)"
    )
    e.add_argument("--limit", type=float, default=None, help="lm-eval: at most this many items per task")
    e.add_argument("--num-fewshot", type=int, default=None, help="lm-eval few-shot examples (default 0)")
    e.add_argument("--json", default=None, metavar="FILE", help="also write all figures to this JSON file")
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
    from fuselab.utils.errors import ConfigError

    if not args.data and not args.lm_eval:
        raise ConfigError(
            "nothing to evaluate: give --data FILE... (perplexity) and/or --lm-eval TASK[,TASK]"
        )
    tasks = [t.strip() for t in (args.lm_eval or "").split(",") if t.strip()]
    if args.lm_eval is not None and not tasks:
        raise ConfigError("--lm-eval needs at least one task name")
    if tasks:
        from fuselab.evaluate.harness import require_lm_eval

        require_lm_eval()  # fail before loading the model

    from fuselab.modeling.resolve import resolve_model
    from fuselab.prune.loading import load_pruned_model, load_pruned_tokenizer
    from fuselab.utils.atomic import atomic_write_json
    from fuselab.utils.hardware import resolve_dtype

    dtype = resolve_dtype(args.dtype, args.device, what="--dtype")
    path = resolve_model(args.model)
    from fuselab.utils.finite import check_finite_weights

    model = load_pruned_model(path, dtype=dtype).to(args.device)
    check_finite_weights(model, path)  # a perplexity of inf would not say why
    tokenizer = load_pruned_tokenizer(path)  # no trust-remote-code prompt for fuselab's own exports
    report: dict = {"model": str(path), "dtype": args.dtype}
    if args.data:
        from fuselab.prune.evaluate import file_perplexity

        r = file_perplexity(model, tokenizer, args.data, args.seqlen, args.max_chunks)
        print(
            f"perplexity {r.ppl:.4f} (NLL {r.nll:.2f} over {r.tokens} tokens, {r.chunks} chunks of {r.seqlen})"
        )
        report["perplexity"] = {"data": args.data, **vars(r)}
    if tasks:
        from fuselab.evaluate.harness import run_lm_eval

        limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
        h = run_lm_eval(
            model,
            tokenizer,
            tasks,
            args.include_path,
            builtin=args.lm_eval_builtin,
            batch_size=args.batch_size,
            limit=limit,
            num_fewshot=args.num_fewshot,
        )
        print(
            f"lm-eval {h.lm_eval_version}, zero-shot"
            if not args.num_fewshot
            else f"lm-eval {h.lm_eval_version}"
        )
        print(h.table())
        report["lm_eval"] = h.to_dict()
    if args.json:
        atomic_write_json(args.json, report)
    return 0
