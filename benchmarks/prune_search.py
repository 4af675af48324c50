"""BlockPruner search on SmolLM2-135M-Instruct: fast (cached + early-abandoning) vs plain search, and
BlockPruner vs ShortGPT at about 20% fewer parameters.

Both searches run in this process on the same model, calibration chunks and micro-batch shape; the benchmark
checks that they select the same blocks (with bitwise-equal scores) and reports the wall-time ratio. The pruned
models are then compared on held-out text (the bundled chat held-out split), with ShortGPT (one-shot Block
Influence over whole layers, the baseline a user would otherwise pick) at the same parameter target.

    .venv/bin/python benchmarks/prune_search.py            # ~20% target, plain search in full
    .venv/bin/python benchmarks/prune_search.py --plain-rounds 4   # time the plain search on 4 rounds only
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
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--num-chunks", type=int, default=4)
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
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
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
    fast_layers = runner.forward_layers
    fast_removed = {Block.parse(b) for r in fast for b in r.blocks}
    print(
        f"fast search: {len(fast)} rounds in {fast_s:.1f} s: {', '.join(r.removed for r in fast)}", flush=True
    )

    masker.set_removed(set())
    runner.forward_layers = 0
    plain_stop = StopRule(num_blocks=args.plain_rounds) if args.plain_rounds else stop
    t = time.perf_counter()
    plain = greedy_search(runner, masker, cands, plain_stop, fast=False, show_progress=False)
    plain_s = time.perf_counter() - t
    n = len(plain)
    same = [r.removed for r in plain] == [r.removed for r in fast[:n]]
    bitwise = [r.nll for r in plain] == [r.nll for r in fast[:n]]
    fast_s_n = sum(r.seconds for r in fast[:n])
    plain_s_n = sum(r.seconds for r in plain)
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
    results = {
        "model": args.model,
        "calibration": f"bundled chat.train.jsonl, {args.num_chunks} chunks x {args.seqlen} tokens",
        "heldout": f"bundled chat.heldout.jsonl, {heldout.shape[0]} chunks x {args.eval_seqlen} tokens",
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "fast": {
            "rounds": len(fast),
            "seconds": fast_s,
            "removed": [r.removed for r in fast],
            "abandoned": sum(r.abandoned for r in fast),
            "evaluated": sum(r.evaluated for r in fast),
            "layer_forwards": fast_layers,
        },
        "plain": {"rounds": n, "seconds": plain_s, "layer_forwards": runner.forward_layers},
        "same_selections": same,
        "bitwise_equal_scores": bitwise,
        "speedup_same_rounds": plain_s_n / fast_s_n,
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
    }
    print(json.dumps(results, indent=2))
    print(
        f"\n| search | rounds | wall time (s) |\n|---|---|---|\n| plain | {n} | {plain_s_n:.1f} |\n"
        f"| fast (same rounds) | {n} | {fast_s_n:.1f} |\n\nspeedup {plain_s_n / fast_s_n:.2f}x, same selections: {same}\n"
        f"\n| model | params removed | held-out ppl |\n|---|---|---|\n| dense | 0% | {dense_ppl:.2f} |\n"
        f"| BlockPruner | {100 * layout.ratio(fast_removed):.2f}% | {bp_ppl:.2f} |\n"
        f"| ShortGPT | {100 * layout.ratio(sg_removed):.2f}% | {sg_ppl:.2f} |"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
