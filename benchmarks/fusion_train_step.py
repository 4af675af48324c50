#!/usr/bin/env python
"""Fusion training step against plain SFT: same model, same batch, same optimiser; time and peak memory.

    .venv/bin/python benchmarks/fusion_train_step.py                  # SmolLM2-135M, 4 × 256 tokens, k = 10
    .venv/bin/python benchmarks/fusion_train_step.py --steps 8 --batch 2 --length 512

SFT is what a user runs without fusion: transformers' own causal-LM loss (`model(..., labels=labels).loss`).
Fusion is fuselab's λ·CLM + (1−λ)·CE with sparse top-k targets (λ = 0.9, ``tail: bucket``), on the same batch.
The batch is real text (bundled conversations rendered with SmolLM2's template); targets are SmolLM2's own
top-10 next-token distributions at the supervised positions (the pivot candidate of FuseChat), computed once
before timing. Each variant runs in its own process so that peak resident memory (ru_maxrss, read by a tiny
launcher) belongs to that variant alone; time is the median step (forward, backward, AdamW step) after warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from peak_rss import run_json_with_peak


def worker(variant: str, steps: int, batch: int, length: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from fuselab.data.bundled import bundled_path
    from fuselab.data.conversations import load_conversations
    from fuselab.data.render import encode, render
    from fuselab.fusion.loss import IGNORE, fusion_loss
    from fuselab.modeling.resolve import resolve_model
    from fuselab.modeling.tokenizers import load_tokenizer

    torch.manual_seed(0)
    torch.set_num_threads(2)
    path = resolve_model("smollm2-135m-instruct")
    tok = load_tokenizer(path)
    convs = load_conversations(bundled_path("code.train.jsonl"))
    rows = []
    for c in convs:
        enc = encode(tok, render(c, tok))
        if len(enc.ids) >= length:
            rows.append(enc)
        if len(rows) == batch:
            break
    ids = torch.stack([torch.from_numpy(r.ids[:length]) for r in rows])
    sup = torch.stack([torch.from_numpy(r.supervised[:length]) for r in rows])
    labels = torch.where(sup, ids, torch.full_like(ids, IGNORE))
    labels[:, 0] = IGNORE
    mask = torch.ones_like(ids)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.config.use_cache = False
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1][labels[:, 1:] != IGNORE]
        top = torch.log_softmax(logits.float(), -1).topk(10, -1)
        t_ids, t_logp = top.indices, top.values
        del logits
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    times = []
    for step in range(steps + 2):
        t0 = time.perf_counter()
        if variant == "sft":
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        else:
            out = model(input_ids=ids, attention_mask=mask).logits
            loss = fusion_loss(out, labels, t_ids, t_logp, lam=0.9).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= 2:
            times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "positions": int((labels[:, 1:] != IGNORE).sum())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--worker", choices=["sft", "fusion"])
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.batch, args.length)))
        return 0
    results = {}
    for variant in ("sft", "fusion", "sft", "fusion"):  # interleaved, twice: drift affects both equally
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            variant,
            "--steps",
            str(args.steps),
            "--batch",
            str(args.batch),
            "--length",
            str(args.length),
        ]
        out = run_json_with_peak(cmd)
        results.setdefault(variant, []).append(out)
    sft_t = statistics.median(r["median_s"] for r in results["sft"])
    fus_t = statistics.median(r["median_s"] for r in results["fusion"])
    sft_m = max(r["peak_mib"] for r in results["sft"])
    fus_m = max(r["peak_mib"] for r in results["fusion"])
    print(
        f"SmolLM2-135M, batch {args.batch} × {args.length} tokens, {results['sft'][0]['positions']} supervised "
        f"positions, float32 on CPU, {args.steps} timed steps per run, 2 runs each"
    )
    print()
    print("| variant | step s (median) | peak MiB |")
    print("|---|---:|---:|")
    print(f"| plain SFT (transformers loss) | {sft_t:.3f} | {sft_m:.0f} |")
    print(f"| fusion λ=0.9, k=10 (fuselab) | {fus_t:.3f} | {fus_m:.0f} |")
    print(f"| ratio | **{fus_t / sft_t:.2f}x** | **{fus_m / sft_m:.2f}x** |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
