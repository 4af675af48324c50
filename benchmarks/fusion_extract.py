#!/usr/bin/env python
"""Top-k extraction against the reference's way of doing it: time, peak memory and bytes stored per token.

    .venv/bin/python benchmarks/fusion_extract.py                         # SmolLM2-135M, 64 conversations
    .venv/bin/python benchmarks/fusion_extract.py --model qwen2.5-coder-0.5b-instruct --conversations 32

Same texts (bundled chat and code conversations rendered with SmolLM2's template), same model, float32 on CPU,
each variant in its own process (peak RSS via a tiny launcher):

- reference kind (FuseChat v2 `get_data_representation.py`, spec §2.1): every example padded to --pad-length,
  batches of --ref-batch, full [B, L, V] logits, top-k over every position, and the columns it stores
  (int64 indices and fp16 logits for all positions, int64 ids and labels, bool mask, fp16 per-step CE);
- fuselab: `fuselab.fusion.extract` (length-sorted dynamic batches, LM head on supervised positions only, in
  chunks; int32 ids, fp16 full-vocabulary log-probs and fp16 gold NLL at supervised positions).

Bytes per token are per *supervised* token (the tokens the fusion loss trains on) for both.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

from peak_rss import run_json_with_peak


def texts(n: int):
    from fuselab.data.bundled import bundled_path
    from fuselab.data.conversations import load_conversations
    from fuselab.data.render import render
    from fuselab.modeling.resolve import resolve_model
    from fuselab.modeling.tokenizers import load_tokenizer

    tok = load_tokenizer(resolve_model("smollm2-135m-instruct"))
    chat = load_conversations(bundled_path("chat.train.jsonl"))
    code = load_conversations(bundled_path("code.train.jsonl"))
    return [render(c, tok) for c in chat[: n // 2] + code[: n - n // 2]]


def run_fuselab(model: str, n: int, k: int) -> dict:
    from fuselab.fusion.extract import ExtractSettings, extract
    from fuselab.modeling.resolve import resolve_model

    ts = texts(n)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        s = extract(resolve_model(model), ts, d, ExtractSettings(k=k, batch_tokens=4096), show_progress=False)
        return {"seconds": time.perf_counter() - t0, "tokens": s.tokens, "bytes": s.nbytes}


def run_reference(model: str, n: int, k: int, pad: int, batch: int) -> dict:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from fuselab.data.render import encode
    from fuselab.modeling.resolve import resolve_model
    from fuselab.modeling.tokenizers import load_tokenizer

    path = resolve_model(model)
    tok = load_tokenizer(path)
    encs = [encode(tok, t) for t in texts(n)]
    t0 = time.perf_counter()  # like fuselab's figure, this includes loading the model
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    nbytes = 0
    sup_tokens = 0
    for a in range(0, len(encs), batch):
        group = encs[a : a + batch]
        ids = torch.zeros((len(group), pad), dtype=torch.long)
        mask = torch.zeros((len(group), pad), dtype=torch.long)
        for r, e in enumerate(group):
            ids[r, : min(pad, len(e.ids))] = torch.from_numpy(e.ids[:pad])
            mask[r, : min(pad, len(e.ids))] = 1
            sup_tokens += int(e.supervised[1:pad].sum())
        with torch.inference_mode():
            logits = m(input_ids=ids, attention_mask=mask).logits.to(torch.float16)
            ce = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
            ).to(torch.float16)
            top = logits.topk(k, -1)
        cols = [
            top.values.numpy(),
            top.indices.numpy(),
            ids.numpy(),
            ids.numpy(),
            mask.bool().numpy(),
            ce.numpy(),
        ]
        nbytes += sum(np.ascontiguousarray(c).nbytes for c in cols)
    return {"seconds": time.perf_counter() - t0, "tokens": sup_tokens, "bytes": nbytes}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--conversations", type=int, default=64)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--pad-length", type=int, default=1024, help="the reference pads every example to this")
    ap.add_argument("--ref-batch", type=int, default=4)
    ap.add_argument("--worker", choices=["fuselab", "reference"])
    args = ap.parse_args(argv)
    if args.worker == "fuselab":
        print(json.dumps(run_fuselab(args.model, args.conversations, args.k)))
        return 0
    if args.worker == "reference":
        print(
            json.dumps(run_reference(args.model, args.conversations, args.k, args.pad_length, args.ref_batch))
        )
        return 0
    res = {}
    for variant in ("reference", "fuselab"):
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            variant,
            "--model",
            args.model,
            "--conversations",
            str(args.conversations),
            "--k",
            str(args.k),
            "--pad-length",
            str(args.pad_length),
            "--ref-batch",
            str(args.ref_batch),
        ]
        res[variant] = run_json_with_peak(cmd)
    r, f = res["reference"], res["fuselab"]
    print(
        f"{args.model}, {args.conversations} conversations, k = {args.k}, reference padded to {args.pad_length}"
    )
    print()
    print("| variant | s | peak MiB | supervised tokens | MB stored | bytes per supervised token |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, x in (("reference kind", r), ("fuselab", f)):
        print(
            f"| {name} | {x['seconds']:.1f} | {x['peak_mib']:.0f} | {x['tokens']} | {x['bytes'] / 1e6:.2f} | "
            f"{x['bytes'] / max(1, x['tokens']):.1f} |"
        )
    print(
        f"| ratio (fuselab / reference) | **{f['seconds'] / r['seconds']:.2f}x** | **{f['peak_mib'] / r['peak_mib']:.2f}x**"
        f" | | | **{(f['bytes'] / f['tokens']) / (r['bytes'] / r['tokens']):.4f}x** |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
