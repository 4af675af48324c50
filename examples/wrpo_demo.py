"""WRPO on real models, small enough for a CPU: SmolLM2-135M-Instruct (target) fused implicitly with
Qwen2.5-Coder-0.5B-Instruct (source) on HumanEval prompts scored by executing their tests.

    .venv/bin/python examples/wrpo_demo.py            # ~30 min on 2 CPU cores; outputs under outputs/wrpo/

Steps (each skipped when its output exists, so the script resumes):

1. ``fuselab wrpo build configs/wrpo/humaneval-smollm2-build.yaml`` on 24 bundled HumanEval train prompts:
   one third trains Target-SFT on the source's best answer; the rest become (y_ws, y_wt, y_l) rows.
2. Held-out preference rows on the 33 held-out problems, used only to measure implicit-reward accuracy:
   y_wt / y_l = best / worst of 3 Target-SFT samples (scored by execution), y_ws = the canonical solution.
3. ``fuselab wrpo train configs/wrpo/humaneval-smollm2-train.yaml`` with the held-out rows as eval set
   (implicit-reward accuracy before and after training).
4. Greedy pass@1 on the 33 held-out problems for the target, Target-SFT and the WRPO model.

Results: ``outputs/wrpo/demo_results.json`` and a Markdown table on stdout.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "outputs" / "wrpo"


def heldout_preferences(build_cfg, sft_model: Path, out: Path) -> None:
    """Held-out preference rows for implicit-reward accuracy, cheaply: y_wt / y_l are the best / worst of 3
    Target-SFT samples per held-out problem (scored by execution), and y_ws is HumanEval's canonical solution
    (an oracle "source", so the 0.5B source model need not be sampled again on CPU)."""
    from collections import Counter

    from fuselab.data.bundled import load_bundled
    from fuselab.wrpo.build import sample_and_score
    from fuselab.wrpo.prompts import PromptRow, prompt_messages
    from fuselab.wrpo.scorers import build_scorer
    from fuselab.wrpo.selection import Sample, select_triplet

    rows = load_bundled("code", "heldout")
    prompts = [PromptRow(r["id"], prompt_messages(r, r["id"]), r) for r in rows]
    work = out.parent / f".{out.name}.work"
    work.mkdir(parents=True, exist_ok=True)
    sampling = build_cfg.sampling.model_copy(update={"n": 3, "batch_size": 11})
    table = sample_and_score(
        "target", str(sft_model), prompts, 3, sampling, build_scorer(build_cfg.scorer), work
    )
    counts: Counter[str] = Counter()
    lines = []
    for p in prompts:
        canonical = p.row["messages"][-1]["content"]
        tgt = [
            Sample(x, s, "target", i)
            for i, (x, s) in enumerate(zip(table[p.id]["responses"], table[p.id]["scores"]))
        ]
        trip = select_triplet([Sample(canonical, 1.0, "canonical", 0)], tgt, build_cfg.selection, counts)
        if trip is not None:
            lines.append(
                {
                    "id": p.id,
                    "prompt": p.messages,
                    "source_chosen": [{"role": "assistant", "content": canonical}],
                    "chosen": [{"role": "assistant", "content": trip.wt.text}],
                    "rejected": [{"role": "assistant", "content": trip.l.text}],
                    "source_model": "canonical",
                    "scores": {"ws": 1.0, "wt": trip.wt.score, "l": trip.l.score},
                }
            )
    out.mkdir(parents=True, exist_ok=True)
    (out / "wrpo.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (out / "build_stats.json").write_text(
        json.dumps({"prompts": len(prompts), "rows": len(lines), "selection": dict(counts)}, indent=2)
    )


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.chdir(ROOT)
    from fuselab.data.bundled import load_bundled
    from fuselab.wrpo.build import run_build
    from fuselab.wrpo.config import load_build_config, load_train_config
    from fuselab.wrpo.evaluate import code_pass_at_1
    from fuselab.wrpo.train import run_train

    timings: dict[str, float] = {}
    data = OUT / "humaneval-data"
    build_cfg = load_build_config("configs/wrpo/humaneval-smollm2-build.yaml")
    t = time.perf_counter()
    if not (data / "wrpo.jsonl").is_file():
        run_build(build_cfg, data)
    timings["build_train_data_s"] = time.perf_counter() - t

    heldout = OUT / "humaneval-heldout-data"
    t = time.perf_counter()
    if not (heldout / "wrpo.jsonl").is_file():
        heldout_preferences(build_cfg, data / "sft-model", heldout)
    timings["build_heldout_data_s"] = time.perf_counter() - t

    model_out = OUT / "humaneval-wrpo"
    t = time.perf_counter()
    if not (model_out / "wrpo_summary.json").is_file():
        train_cfg = load_train_config("configs/wrpo/humaneval-smollm2-train.yaml")
        train_cfg = train_cfg.model_copy(
            update={"data": train_cfg.data.model_copy(update={"eval_path": str(heldout / "wrpo.jsonl")})}
        )
        run_train(train_cfg, model_out, force=True)
    timings["train_s"] = time.perf_counter() - t
    summary = json.loads((model_out / "wrpo_summary.json").read_text())

    rows = load_bundled("code", "heldout")
    from fuselab.modeling.resolve import resolve_model

    evals = {}
    for name, path in (
        ("target", resolve_model(build_cfg.target)),
        ("target_sft", data / "sft-model"),
        ("target_sft_wrpo", model_out),
    ):
        t = time.perf_counter()
        evals[name] = code_pass_at_1(
            path, rows, max_new_tokens=build_cfg.sampling.max_new_tokens, batch_size=33
        )
        timings[f"pass@1_{name}_s"] = time.perf_counter() - t

    results = {
        "build_train": json.loads((data / "build_stats.json").read_text()),
        "build_heldout": json.loads((heldout / "build_stats.json").read_text()),
        "train_summary": summary,
        "pass_at_1": evals,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
    }
    (OUT / "demo_results.json").write_text(json.dumps(results, indent=2) + "\n")
    print("| model | held-out pass@1 (greedy, 33 problems) | mean execution score |")
    print("|---|---|---|")
    for name, e in evals.items():
        print(f"| {name} | {e['passed']}/{e['problems']} = {e['pass@1']:.3f} | {e['mean_score']:.3f} |")
    print()
    for k in ("rewards/accuracies", "rewards/source_accuracies", "rewards/target_accuracies", "loss"):
        b, a = summary.get(f"before_eval_{k}"), summary.get(f"after_eval_{k}")
        print(f"held-out {k}: before {b} after {a}")
    print(json.dumps(results["timings_s"]))


if __name__ == "__main__":
    main()
