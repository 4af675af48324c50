"""BlockPruner search on SmolLM2-135M-Instruct: fast (cached + early-abandoning) vs plain search, and
BlockPruner vs ShortGPT at about 20% fewer parameters.

Both searches run in this process on the same model, calibration chunks and micro-batch shape; the benchmark
checks that they select the same blocks (with bitwise-equal scores) and reports the wall-time ratio. The pruned
models are then compared on held-out text (the bundled chat held-out split) and, with ``--lm-eval``, on
fuselab's bundled zero-shot lm-eval tasks, with ShortGPT (one-shot Block Influence over whole layers, the
baseline a user would otherwise pick) at the same parameter target.

    .venv/bin/python benchmarks/prune_search.py --threads 1 --plain-rounds 2     # the documented run
    .venv/bin/python benchmarks/prune_search.py --num-chunks 4 --seqlen 128 --dtype float32   # the 2026-11-21 run

The calibration set is ``--num-chunks`` chunks of ``--seqlen`` tokens (micro-batch: one chunk). The paper
calibrates on ~16-19 chunks of 2048 tokens in bf16 with micro-batches of 2 chunks, i.e. ~9 micro-batches;
the defaults here (12 x 128 tokens, bf16) keep that granularity at a token count a 2-core CPU can search
to 20% in about half an hour.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time

import torch
from transformers import AutoModelForCausalLM

from fuselab.modeling.resolve import resolve_model
from fuselab.modeling.tokenizers import load_tokenizer
from fuselab.prune.blocks import Block, BlockMasker, inspect_blocks
from fuselab.prune.calibration import calibration_chunks, read_rows, tokenize_chunks
from fuselab.prune.evaluate import chunk_perplexity
from fuselab.prune.runner import CalibrationRunner
from fuselab.prune.search import StopRule, block_candidates, greedy_search, shortgpt_search


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--target-ratio", type=float, default=0.20)
    ap.add_argument("--seqlen", type=int, default=128, help="calibration tokens per chunk")
    ap.add_argument("--num-chunks", type=int, default=12, help="calibration chunks (= micro-batches)")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument(
        "--lm-eval", action="store_true", help="also run the bundled zero-shot lm-eval tasks (needs lm-eval)"
    )
    ap.add_argument("--eval-seqlen", type=int, default=256)
    ap.add_argument("--eval-chunks", type=int, default=16)
    ap.add_argument(
        "--plain-rounds", type=int, default=None, help="run the plain search for this many rounds only"
    )
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    os.environ.setdefault("FUSELAB_PROGRESS", "0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    path = resolve_model(args.model)
    tok = load_tokenizer(path)
    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    chunks = calibration_chunks(["bundled:chat.train.jsonl"], tok, args.seqlen, args.num_chunks)
    heldout = tokenize_chunks(read_rows("bundled:chat.heldout.jsonl", tok), tok, args.eval_seqlen, None)
    heldout = heldout[: args.eval_chunks]
    layout = inspect_blocks(model)
    masker = BlockMasker(model, layout)
    runner = CalibrationRunner(model, layout, chunks, batch_size=1)
    cands = block_candidates(layout)
    stop = StopRule(target_ratio=args.target_ratio)

    t = time.perf_counter()
    fast = greedy_search(runner, masker, cands, stop, fast=True, show_progress=False)
    fast_s = time.perf_counter() - t
    fast_layers, fast_batches = runner.forward_layers, runner.batches_run
    fast_removed = {Block.parse(b) for r in fast for b in r.blocks}
    print(
        f"fast search: {len(fast)} rounds in {fast_s:.1f} s: {', '.join(r.removed for r in fast)}", flush=True
    )

    masker.set_removed(set())
    runner.forward_layers = runner.batches_run = 0
    plain_stop = StopRule(num_blocks=args.plain_rounds) if args.plain_rounds else stop
    t = time.perf_counter()
    plain = greedy_search(runner, masker, cands, plain_stop, fast=False, show_progress=False)
    plain_s = time.perf_counter() - t
    n = len(plain)
    same = [r.removed for r in plain] == [r.removed for r in fast[:n]]
    bitwise = [r.nll for r in plain] == [r.nll for r in fast[:n]]
    fast_s_n = sum(r.seconds for r in fast[:n])
    plain_s_n = sum(r.seconds for r in plain)
    plain_per_cand = plain_s_n / sum(r.evaluated for r in plain)
    plain_full_est = plain_per_cand * sum(r.evaluated for r in fast)
    print(f"plain search: {n} rounds in {plain_s:.1f} s; same selections: {same}, bitwise scores: {bitwise}")

    def heldout_ppl(removed: set[Block]) -> float:
        masker.set_removed(removed)
        return chunk_perplexity(model, heldout).ppl

    dense_ppl = heldout_ppl(set())
    bp_ppl = heldout_ppl(fast_removed)
    masker.set_removed(set())
    sg_rounds, _ = shortgpt_search(runner, masker, stop, show_progress=False)
    sg_removed = {Block.parse(b) for r in sg_rounds for b in r.blocks}
    sg_ppl = heldout_ppl(sg_removed)
    zero_shot: dict[str, dict[str, float | None]] = {}
    if args.lm_eval:
        from fuselab.evaluate.harness import run_lm_eval

        for name, removed in (("dense", set()), ("blockpruner", fast_removed), ("shortgpt", sg_removed)):
            masker.set_removed(removed)
            t = time.perf_counter()
            h = run_lm_eval(model, tok, ["fuselab_chat_reply", "fuselab_code_body"])
            zero_shot[name] = {task: score.headline for task, score in h.tasks.items()} | {"mean": h.mean}
            print(f"zero-shot {name}: {zero_shot[name]} ({time.perf_counter() - t:.0f} s)", flush=True)
        masker.set_removed(set())
    results = {
        "model": args.model,
        "calibration": f"bundled chat.train.jsonl, {args.num_chunks} chunks x {args.seqlen} tokens",
        "heldout": f"bundled chat.heldout.jsonl, {heldout.shape[0]} chunks x {args.eval_seqlen} tokens",
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "dtype": args.dtype,
        "fast": {
            "rounds": len(fast),
            "seconds": fast_s,
            "seconds_same_rounds": fast_s_n,
            "removed": [r.removed for r in fast],
            "abandoned": sum(r.abandoned for r in fast),
            "evaluated": sum(r.evaluated for r in fast),
            "layer_forwards": fast_layers,
            "micro_batches": fast_batches,
            "round_seconds": [r.seconds for r in fast],
        },
        "plain": {
            "rounds": n,
            "seconds": plain_s,
            "seconds_same_rounds": plain_s_n,
            "layer_forwards": runner.forward_layers,
            "micro_batches": runner.batches_run,
            "evaluated": sum(r.evaluated for r in plain),
            "seconds_per_candidate": plain_per_cand,
            "EXTRAPOLATED_full_search_seconds": plain_full_est,
        },
        "same_selections": same,
        "bitwise_equal_scores": bitwise,
        "speedup_same_rounds": plain_s_n / fast_s_n,
        "EXTRAPOLATED_speedup_full_search": plain_full_est / fast_s,
        "dense_heldout_ppl": dense_ppl,
        "blockpruner": {
            "ratio": layout.ratio(fast_removed),
            "heldout_ppl": bp_ppl,
            "calib_ppl": fast[-1].ppl,
            "attn": fast[-1].num_attn_removed,
            "mlp": fast[-1].num_mlp_removed,
        },
        "shortgpt": {
            "ratio": layout.ratio(sg_removed),
            "heldout_ppl": sg_ppl,
            "calib_ppl": sg_rounds[-1].ppl,
            "layers": [r.removed for r in sg_rounds],
        },
        "zero_shot_acc_norm": zero_shot,
        "plain_round_scores": [r.scores for r in plain],
        "blockpruner_rounds": [{k: v for k, v in r.to_dict().items() if k != "scores"} for r in fast],
    }
    print(json.dumps(results, indent=2))
    print(
        f"\n| search | rounds | wall time (s) |\n|---|---|---|\n| plain | {n} | {plain_s_n:.1f} |\n"
        f"| fast (same rounds) | {n} | {fast_s_n:.1f} |\n\nspeedup {plain_s_n / fast_s_n:.2f}x, same selections: {same}\n"
        f"\n| model | params removed | held-out ppl |\n|---|---|---|\n| dense | 0% | {dense_ppl:.2f} |\n"
        f"| BlockPruner | {100 * layout.ratio(fast_removed):.2f}% | {bp_ppl:.2f} |\n"
        f"| ShortGPT | {100 * layout.ratio(sg_removed):.2f}% | {sg_ppl:.2f} |"
    )
    print(
        f"plain search EXTRAPOLATED to the fast search's {sum(r.evaluated for r in fast)} candidates: "
        f"{plain_full_est:.0f} s ({plain_per_cand:.2f} s per candidate, measured on {n} rounds) -> "
        f"{plain_full_est / fast_s:.2f}x"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
