#!/usr/bin/env python
"""Does knowledge fusion beat SFT-only training? Arms on the same code data, order, steps and seeds.

    .venv/bin/python benchmarks/fusion_quality.py                        # all arms, 3 seeds (make bench-quality)
    .venv/bin/python benchmarks/fusion_quality.py --seeds 1 --arms sft,after-0.5 --stdlib-train 100   # quick

Pivot SmolLM2-135M-Instruct learns Python from Qwen2.5-Coder-0.5B-Instruct (half SmolLM2's code NLL per byte)
on all 131 bundled HumanEval train problems plus functions with docstrings from the Python standard library
(``benchmarks/data/``, built by ``scripts/build_stdlib_code_data.py``; held-out packages and HumanEval problems
never appear in training). A user with the same data and compute would otherwise run plain SFT, so every arm
is compared with SFT (λ = 1) trained on the same tokens, in the same order, for the same steps, per seed.

Arms (``--arms``): ``sft``; ``before`` (fusion as fuselab did it before issue 12: exact vocabulary match,
dropped mass to the tail, MinCE on each model's own tokens, λ 0.9); ``after-0.9`` and ``after-0.5`` (prefix
mapping, chain rule, MinCE on the projected targets); ``after-0.5-nopivot`` (the same without the pivot as a
candidate); ``alm-0.5`` (the chunk-level likelihood loss on the same alignment).

Metrics, per trained model: held-out NLL per byte on the **function body only** (after the docstring: the
prompt's signature and docstring are copied into the reply and say nothing about coding), on the held-out
HumanEval problems and stdlib functions; HumanEval pass@1 on the held-out problems (greedy, the existing
sandbox); chat NLL per token on the bundled held-out chat, to show what fusion on code costs elsewhere. Each
arm: mean ± standard deviation over seeds, and its difference from SFT paired by seed. Also reported: the
target diagnostics of each arm's alignment (mean q(gold), share of rows whose top-1 is the gold token) and
the share of the SFT-to-Qwen gap in code-body NLL per byte each arm closes.

Everything is cached under ``--work`` (extraction, targets, models, evaluations), so an interrupted run
resumes and a second run only prints. It is not a test; on 2 CPU cores a full run takes about an hour.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "benchmarks" / "data"
PIVOT, SOURCE = "smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"
NAMES = {PIVOT: "smollm2", SOURCE: "qwen", "gemma-3-270m": "gemma"}

BEFORE = {"align": {"vocab": "exact", "chain_rule": False, "dropped_mass": "tail"}, "fuse": {"score": "own"}}
AFTER = {"align": {"vocab": "prefix", "chain_rule": True, "dropped_mass": "redistribute"}, "fuse": {"score": "projected"}}  # fmt: skip
ARMS: dict[str, dict[str, Any]] = {
    "sft": {**AFTER, "train": {"lam": 1.0}},
    "before": {**BEFORE, "train": {"lam": 0.9}},
    "after-0.9": {**AFTER, "train": {"lam": 0.9}},
    "after-0.5": {**AFTER, "train": {"lam": 0.5}},
    "after-0.5-nopivot": {
        "align": AFTER["align"],
        "fuse": {**AFTER["fuse"], "include_pivot": False},
        "train": {"lam": 0.5},
    },
    "alm-0.5": {**AFTER, "train": {"lam": 0.5, "loss": "alm"}},
}


def recipe_for(arm: str, args: argparse.Namespace, seed: int):
    from fuselab.fusion.config import FusionRecipe

    spec = ARMS[arm]
    train = {
        "learning_rate": args.lr,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "warmup_ratio": 0.1,
        "lr_scheduler": "cosine",
        "logging_steps": 5,
        "save_steps": 10_000,
        "group_by_length": True,
        "seed": seed,
        "bf16": args.bf16 == "true",
        **spec["train"],
    }
    return FusionRecipe(
        pivot=PIVOT,
        sources=[SOURCE],
        names=NAMES,
        data={
            "train": [
                {"path": "bundled:code.train"},
                {"path": str(DATA / "stdlib_code.train.jsonl"), "limit": args.stdlib_train},
            ],
            "max_length": 512,
        },
        extract={"k": 10, "batch_tokens": 4096, "dtype": args.extract_dtype},
        align=spec["align"],
        fuse={"mode": "pairwise", "function": "mince", **spec["fuse"]},
        train=train,
    )


# ------------------------------------------------------------------------------------------- held-out data
def body_texts(path: Path, tokenizer, bodies: dict[str, dict[str, int]] | None, limit: int | None):
    """Held-out code conversations rendered with the pivot's template, scored on the function body only."""
    from fuselab.data.conversations import load_conversations
    from fuselab.data.render import RenderedText, render

    out = []
    for conv in load_conversations([path])[:limit]:
        offsets = (bodies or {}).get(conv.id) or conv.metadata.get("metadata")
        content = conv.messages[-1]["content"]
        r = render(conv, tokenizer)
        a = r.spans[-1][0]
        data = r.text.encode()
        start = a + len(content[: offsets["body_start"]].encode())
        end = a + len(content[: offsets["body_end"]].encode())
        if data[a : a + len(content.encode())] != content.encode():
            raise RuntimeError(f"{conv.id}: the reply is not where the template put it")
        out.append(RenderedText(id=conv.id, text=r.text, spans=((start, end),)))
    return out


def heldout_sets(args, tokenizer) -> dict[str, list]:
    from fuselab.data.bundled import bundled_path
    from fuselab.data.conversations import load_conversations
    from fuselab.data.render import render

    bodies = json.loads((DATA / "humaneval_bodies.json").read_text())
    chat = [render(c, tokenizer) for c in load_conversations([bundled_path("chat.heldout.jsonl")])]
    return {
        "humaneval body": body_texts(bundled_path("code.heldout.jsonl"), tokenizer, bodies, None),
        "stdlib body": body_texts(DATA / "stdlib_code.heldout.jsonl", tokenizer, None, args.stdlib_heldout),
        "chat": chat,
    }


# --------------------------------------------------------------------------------------------------- pass@1
def pass_at_1(model_dir: Path, max_new_tokens: int, batch: int = 33) -> dict[str, Any]:
    """Greedy answers to the held-out HumanEval problems, run against their tests in fuselab's sandbox."""
    import torch
    from transformers import AutoModelForCausalLM

    from fuselab.data.bundled import bundled_path
    from fuselab.evaluate.generate import _stop_ids
    from fuselab.modeling.tokenizers import load_tokenizer
    from fuselab.wrpo.scorers.execution import run_tests

    rows = [json.loads(x) for x in bundled_path("code.heldout.jsonl").read_text().splitlines()]
    tok = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True).eval()
    stops = _stop_ids(tok, model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else stops[0]
    prompts = [
        tok.apply_chat_template([r["messages"][0]], tokenize=False, add_generation_prompt=True) for r in rows
    ]
    answers: list[str] = []
    tok.padding_side = "left"
    for a in range(0, len(prompts), batch):
        enc = tok(prompts[a : a + batch], return_tensors="pt", padding=True)
        with torch.inference_mode():
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                use_cache=True,
                eos_token_id=stops,
                pad_token_id=pad,
            )
        answers += tok.batch_decode(out[:, enc.input_ids.shape[1] :], skip_special_tokens=True)
    passed = [
        run_tests(ans, r["test"], r["entry_point"], prompt_text=r["messages"][0]["content"]).passed
        for ans, r in zip(answers, rows)
    ]
    return {"pass@1": sum(passed) / len(passed), "passed": int(sum(passed)), "problems": len(passed)}


# ------------------------------------------------------------------------------------------------ evaluation
def evaluate(model_dir: Path, sets: dict[str, list], cache: Path, args, *, generate: bool = True) -> dict:
    from fuselab.evaluate.nll import assistant_nll, load_scorer

    if cache.exists():
        return json.loads(cache.read_text())
    t0 = time.perf_counter()
    scorer = load_scorer(model_dir)
    out: dict[str, Any] = {}
    for name, texts in sets.items():
        s = assistant_nll(model_dir, texts, show_progress=False, scorer=scorer)
        out[name] = {"per_byte": s.per_byte, "per_token": s.per_token, "tokens": s.tokens, "bytes": s.bytes}
    hb, sb = out["humaneval body"], out["stdlib body"]
    out["code body per byte"] = (hb["per_byte"] * hb["bytes"] + sb["per_byte"] * sb["bytes"]) / (
        hb["bytes"] + sb["bytes"]
    )
    del scorer
    if generate:
        out["humaneval"] = pass_at_1(model_dir, args.max_new_tokens)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(out, indent=2))
    return out


def mean_sd(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(
            line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")
        )
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of: {', '.join(ARMS)}")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--stdlib-train", type=int, default=50, help="stdlib functions added to the 131 problems")
    ap.add_argument("--stdlib-heldout", type=int, default=100)
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument(
        "--bf16",
        choices=("false", "true"),
        default="true",
        help="autocast for training (fast where bf16 is native)",
    )
    ap.add_argument("--extract-dtype", default="float32")
    ap.add_argument("--max-new-tokens", type=int, default=320)
    ap.add_argument("--no-pass-at-1", action="store_true", help="skip generation (NLL only, much faster)")
    ap.add_argument("--work", default=str(ROOT / "outputs" / "bench-quality"))
    ap.add_argument("--json", help="write the figures to this file")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("FUSELAB_PROGRESS", "0")
    from fuselab.fusion import train as fusion_train
    from fuselab.fusion.workspace import Workspace
    from fuselab.modeling.resolve import resolve_model
    from fuselab.modeling.tokenizers import load_tokenizer

    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = set(arms) - set(ARMS)
    if unknown:
        raise SystemExit(f"unknown arms {sorted(unknown)}; valid: {', '.join(ARMS)}")
    work = Path(args.work)
    t_start = time.perf_counter()
    pivot_tok = load_tokenizer(resolve_model(PIVOT))
    sets = heldout_sets(args, pivot_tok)
    timings: dict[str, float] = {}
    results: dict[str, Any] = {"arms": {}, "diagnostics": {}}
    evals: dict[str, dict[int, dict]] = {}
    for seed in range(args.seeds):  # seed-major: an interrupted run has whole seeds to compare
        for arm in arms:
            recipe = recipe_for(arm, args, seed)
            ws = Workspace(recipe, work / "fusion", show_progress=False)
            t = time.perf_counter()
            ws.extract()
            timings["extract"] = timings.get("extract", 0.0) + time.perf_counter() - t
            t = time.perf_counter()
            stats = ws.build_targets()
            timings["align"] = timings.get("align", 0.0) + time.perf_counter() - t
            target = next(iter(stats))
            results["diagnostics"][arm] = {
                "targets": stats[target]["sources"][NAMES[SOURCE]]["targets"],
                "vocab": stats[target]["sources"][NAMES[SOURCE]]["vocab"],
                "choices": stats[target]["choices"],
                "chunks": stats[target].get("chunks"),
            }
            out = work / "models" / f"{arm}-seed{seed}-{ws.targets_dir(target).name}-{_cfg_key(recipe)}"
            if not (out / "config.json").exists():
                t = time.perf_counter()
                fusion_train.train(ws.targets_dir(target), out, recipe.train, show_progress=False, force=True)
                timings["train"] = timings.get("train", 0.0) + time.perf_counter() - t
                print(f"trained {arm} seed {seed} in {time.perf_counter() - t:.0f} s", flush=True)
            t = time.perf_counter()
            ev = evaluate(out, sets, work / "eval" / f"{out.name}.json", args, generate=not args.no_pass_at_1)
            timings["evaluate"] = timings.get("evaluate", 0.0) + time.perf_counter() - t
            evals.setdefault(arm, {})[seed] = ev
    refs = {}
    for ref in (PIVOT, SOURCE):
        path = resolve_model(ref)
        gen = ref == PIVOT and not args.no_pass_at_1
        refs[NAMES[ref]] = evaluate(path, sets, work / "eval" / f"ref-{NAMES[ref]}-{_sets_key(args)}.json", args, generate=gen)  # fmt: skip
    results["references"] = refs
    metrics = ["code body per byte", "humaneval body", "stdlib body", "chat", "pass@1"]

    def value(ev: dict, metric: str) -> float:
        if metric == "pass@1":
            return ev.get("humaneval", {}).get("pass@1", math.nan)
        if metric == "code body per byte":
            return ev[metric]
        if metric == "chat":
            return ev["chat"]["per_token"]
        return ev[metric]["per_byte"]

    sft = evals.get("sft", {})
    qwen_gap = None
    for arm, by_seed in evals.items():
        row: dict[str, Any] = {"seeds": sorted(by_seed)}
        for m in metrics:
            vals = [value(by_seed[s], m) for s in sorted(by_seed)]
            row[m] = mean_sd(vals)
            if arm != "sft" and sft:
                diffs = [value(by_seed[s], m) - value(sft[s], m) for s in sorted(by_seed) if s in sft]
                row[f"{m} - sft"] = mean_sd(diffs)
        if sft:
            sft_code = mean_sd([sft[s]["code body per byte"] for s in sorted(sft)])[0]
            qwen_gap = sft_code - refs["qwen"]["code body per byte"]
            row["gap closed"] = (sft_code - row["code body per byte"][0]) / qwen_gap if qwen_gap else math.nan
        results["arms"][arm] = row
    results["setup"] = {
        "cpu": cpu_name(),
        "threads": int(__import__("torch").get_num_threads()),
        "args": vars(args),
        "seconds": round(time.perf_counter() - t_start, 1),
        "stage_seconds": {k: round(v, 1) for k, v in timings.items()},
    }
    print(report(results, metrics))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def _cfg_key(recipe) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(recipe.train.model_dump(), sort_keys=True).encode()).hexdigest()[:10]


def _sets_key(args) -> str:
    return f"he33-std{args.stdlib_heldout}-chat90-{args.max_new_tokens}"


def report(results: dict, metrics: list[str]) -> str:
    def fmt(ms, digits=4):
        m, s = ms
        return f"{m:.{digits}f} ± {s:.{digits}f}" if not math.isnan(m) else "–"

    lines = [
        f"CPU: {results['setup']['cpu']}, {results['setup']['threads']} threads; "
        f"total {results['setup']['seconds']:.0f} s, stages {results['setup']['stage_seconds']}",
        "",
        "| arm | code body NLL/byte | − SFT | HumanEval body | stdlib body | chat NLL/token | − SFT | pass@1 | gap closed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, row in results["arms"].items():
        d_code = fmt(row.get("code body per byte - sft", (math.nan, math.nan)))
        d_chat = fmt(row.get("chat - sft", (math.nan, math.nan)))
        gap = row.get("gap closed", math.nan)
        lines.append(
            f"| {arm} (n={len(row['seeds'])}) | {fmt(row['code body per byte'])} | {d_code} | "
            f"{fmt(row['humaneval body'])} | {fmt(row['stdlib body'])} | {fmt(row['chat'])} | {d_chat} | "
            f"{fmt(row['pass@1'], 3)} | {gap:.1%} |"
        )
    for name, ev in results["references"].items():
        p = ev.get("humaneval", {}).get("pass@1", math.nan)
        lines.append(
            f"| {name} (reference) | {ev['code body per byte']:.4f} | | {ev['humaneval body']['per_byte']:.4f} | "
            f"{ev['stdlib body']['per_byte']:.4f} | {ev['chat']['per_token']:.4f} | | {p:.3f} | |"
        )
    lines += [
        "",
        "| arm | mean q(gold) | top-1 is gold | projected share | MinCE choices |",
        "|---|---|---|---|---|",
    ]
    for arm, d in results["diagnostics"].items():
        t = d["targets"]
        lines.append(
            f"| {arm} | {t['mean q(gold)']:.3f} | {t['top-1 is gold']:.3f} | {t['projected share']:.3f} | "
            f"{d['choices']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
