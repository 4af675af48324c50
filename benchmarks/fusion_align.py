#!/usr/bin/env python
"""Token alignment throughput on the real tokenizers, against a plain Python DP of the reference kind.

    .venv/bin/python benchmarks/fusion_align.py                 # 120 conversations (chat + code)
    .venv/bin/python benchmarks/fusion_align.py --conversations 60 --reference-limit 30

The texts are the bundled conversations rendered with SmolLM2's chat template (what `fuselab fusion` feeds
every model). Pairs: SmolLM2-135M (pivot, byte-level BPE) against Qwen2.5-Coder-0.5B (byte-level BPE, another
vocabulary) and Gemma-3-270M (SentencePiece with byte fallback). Tokenisation is done once, outside the timings,
for every method (each needs it). Timed, single process:

Bundled conversations are single exchanges, so --exchanges consecutive ones are joined into one dialogue
(chat-length texts, where the DP's n·m cost shows).

- reference: the FuseLLM/FuseChat DP as the reference runs it: a Python double loop over all n·m cells, one
  edit-distance call per cell (rapidfuzz's C Levenshtein, at least as fast as the `editdistance` package the
  reference uses), backtracking with its tie order, on the decoded token strings;
- `mined`: fuselab's DP (rapidfuzz cdist + anti-diagonal numpy recurrence, banded), then the same-boundary
  donor check;
- `offsets`: fuselab's default, the span merge.

The reference is slow, so it runs on the first --reference-limit texts; every ratio compares the same texts.
It also reports the alignment coverage and how often `mined` finds the same donors as `offsets`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter


def sessions(convs, exchanges: int):
    """Consecutive conversations joined into multi-turn dialogues (bundled ones are single exchanges)."""
    from fuselab.data.conversations import Conversation

    out = []
    for a in range(0, len(convs), exchanges):
        group = convs[a : a + exchanges]
        msgs = tuple(m for c in group for m in c.messages if m["role"] != "system")
        out.append(Conversation(id=group[0].id, messages=msgs))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--conversations", type=int, default=120)
    ap.add_argument("--reference-limit", type=int, default=12)
    ap.add_argument(
        "--exchanges",
        type=int,
        default=12,
        help="join this many consecutive bundled conversations into one multi-turn dialogue (chat-length texts)",
    )
    args = ap.parse_args(argv)

    from fuselab.data.bundled import bundled_path
    from fuselab.data.conversations import load_conversations
    from fuselab.data.render import encode, render
    from fuselab.data.token_spans import vocabulary
    from fuselab.fusion.align import align_sequences
    from fuselab.fusion.align.dtw import reference_dtw
    from fuselab.modeling.resolve import resolve_model
    from fuselab.modeling.tokenizers import load_tokenizer

    chat = load_conversations(bundled_path("chat.train.jsonl"))
    code = load_conversations(bundled_path("code.train.jsonl"))
    half = args.conversations // 2
    convs = sessions(chat[:half], args.exchanges) + sessions(
        code[: args.conversations - half], args.exchanges
    )
    pivot_tok = load_tokenizer(resolve_model("smollm2-135m-instruct"))
    texts = [render(c, pivot_tok) for c in convs]
    lengths = [len(pivot_tok(t.text)["input_ids"]) for t in texts]
    print(
        f"{len(texts)} dialogues of up to {args.exchanges} exchanges from {args.conversations} bundled conversations "
        f"(half chat, half code), rendered with SmolLM2's template; {statistics.mean(lengths):.0f} tokens on "
        f"average (max {max(lengths)})"
    )
    print()
    print(
        "| pair | texts | pivot tokens | reference s | mined s | offsets s | mined speed-up | offsets speed-up |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    notes = []
    for source in ("qwen2.5-coder-0.5b-instruct", "gemma-3-270m"):
        src_tok = load_tokenizer(resolve_model(source))
        pv, sv = vocabulary(pivot_tok), vocabulary(src_tok)
        piv = [encode(pivot_tok, t) for t in texts]
        src = [encode(src_tok, t) for t in texts]
        r = min(args.reference_limit, len(texts))
        t0 = time.perf_counter()
        for i in range(r):
            reference_dtw(
                [sv.text(t) for t in src[i].ids.tolist()], [pv.text(t) for t in piv[i].ids.tolist()]
            )
        t_ref = time.perf_counter() - t0
        timings = {}
        results = {}
        for method in ("mined", "offsets"):
            t0 = time.perf_counter()
            results[method] = [align_sequences(method, piv[i], src[i], pv, sv) for i in range(r)]
            timings[method] = time.perf_counter() - t0
        # Throughput of offsets over all texts, for the record.
        t0 = time.perf_counter()
        full = [align_sequences("offsets", piv[i], src[i], pv, sv) for i in range(len(texts))]
        t_off_all = time.perf_counter() - t0
        tokens = sum(len(piv[i].ids) for i in range(r))
        print(
            f"| SmolLM2 ↔ {source} | {r} | {tokens} | {t_ref:.2f} | {timings['mined']:.3f} | {timings['offsets']:.4f} "
            f"| {t_ref / timings['mined']:.0f}x | {t_ref / timings['offsets']:.0f}x |"
        )
        cov = Counter()
        agree = total = 0
        proj = 0
        for a in full:
            cov.update(a.coverage)
        for a, b in zip(results["mined"], results["offsets"]):
            agree += int((a.donor == b.donor).sum())
            total += len(b.donor)
            proj += int((b.donor >= 0).sum())
        all_tokens = sum(len(p.ids) for p in piv)
        n = sum(cov.values())
        notes.append(
            f"- SmolLM2 ↔ {source}: offsets over all {len(texts)} texts: {all_tokens / t_off_all:,.0f} pivot tokens/s. "
            f"Coverage of supervised pivot tokens: "
            + ", ".join(f"{k} {100 * v / n:.1f}%" for k, v in sorted(cov.items()))
            + f". On the first {r} texts `offsets` finds a same-boundary donor for {100 * proj / total:.1f}% of "
            f"supervised positions; `mined` agrees with it on {100 * agree / total:.1f}% of them."
        )
    print()
    print("\n".join(notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
