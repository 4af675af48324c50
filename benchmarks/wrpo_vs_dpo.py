"""WRPO (three responses) against TRL's DPOTrainer (two) on the same model and batch: step time and peak memory.

    .venv/bin/python benchmarks/wrpo_vs_dpo.py [--model smollm2-135m-instruct] [--steps 6] [--batch 2]

Four runs, each in a fresh subprocess (so peak memory is per run), on identical prompts from the bundled
HumanEval train split (y_ws = the canonical solution, y_wt = it without its last lines, y_l = the bare stub):

- ``trl_dpo_live``: trl.DPOTrainer on (y_wt, y_l), reference model forwarded every step;
- ``trl_dpo_cached``: the same with ``precompute_ref_log_probs=True``;
- ``wrpo_live``: fuselab's WRPOTrainer on (y_ws, y_wt, y_l), reference forwarded every step;
- ``wrpo_cached``: the same with reference log-probs precomputed (fuselab.wrpo.refcache).

Step time is the median wall time of the optimiser steps after ``--warmup`` steps (the Trainer's step callbacks
around one update); fuselab's precomputation time is reported separately (TRL 1.16 precomputes inside
``DPOTrainer.__init__``, so its ``precompute_s`` stays ~0: not measured). Peak memory: ``ru_maxrss`` of the run's process
(CPU) and ``torch.cuda.max_memory_allocated`` on GPU. Goals (issue 5): WRPO live ≤ 1.5x TRL DPO live, WRPO cached
≤ 1.1x TRL DPO live. Needs ``trl`` (the proposed ``bench`` extra). Results go to ``.bench/wrpo_vs_dpo.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = ("trl_dpo_live", "trl_dpo_cached", "wrpo_live", "wrpo_cached")


def make_rows(n: int) -> list[dict]:
    from fuselab.data.bundled import load_bundled

    rows = []
    for r in load_bundled("code", "train")[:n]:
        answer = r["messages"][1]["content"]
        body = answer.strip("`\n").removeprefix("python\n").splitlines()
        stub = "\n".join(
            line for line in body if not line.startswith("    ") or '"""' in line or ">>>" in line
        )
        cut = "\n".join(body[: max(3, len(body) - 3)])
        rows.append(
            {
                "id": r["id"],
                "prompt": [r["messages"][0]],
                "source_chosen": [{"role": "assistant", "content": answer}],
                "chosen": [{"role": "assistant", "content": f"```python\n{cut}\n```"}],
                "rejected": [{"role": "assistant", "content": f"```python\n{stub}\n    pass\n```"}],
            }
        )
    return rows


class StepTimer:
    """A TrainerCallback recording the wall time of each optimiser step."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._t = 0.0

    def on_step_begin(self, args, state, control, **kw):
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.times.append(time.perf_counter() - self._t)

    def __getattr__(self, name):  # every other callback event: nothing to do
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)


def _peak() -> dict:
    import torch

    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def run_one(kind: str, model_ref: str, data: Path, steps: int, batch: int, work: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from fuselab.modeling.resolve import resolve_model
    from fuselab.wrpo.sampling import load_tokenizer

    torch.manual_seed(0)
    path = resolve_model(model_ref)
    tok = load_tokenizer(path)
    rows = [json.loads(x) for x in data.read_text().splitlines()]
    timer = StepTimer()
    common = dict(
        output_dir=str(work / kind),
        per_device_train_batch_size=batch,
        max_steps=steps,
        learning_rate=1e-6,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        seed=0,
        data_seed=0,
        lr_scheduler_type="constant",
        gradient_checkpointing=False,
        bf16=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    pre_seconds = 0.0
    if kind.startswith("trl"):
        from datasets import Dataset
        from trl import DPOConfig, DPOTrainer

        ds = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
        cfg = DPOConfig(beta=0.1, max_length=1024, precompute_ref_log_probs=kind.endswith("cached"), **common)
        trainer = DPOTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[timer])
        if kind.endswith("cached"):
            t = time.perf_counter()
            trainer.get_train_dataloader()  # TRL precomputes here, before the first step
            pre_seconds = time.perf_counter() - t
    else:
        from transformers import TrainingArguments

        from fuselab.wrpo.config import LossConfig
        from fuselab.wrpo.data import TokenizeOptions, WRPOCollator, tokenize_rows
        from fuselab.wrpo.refcache import compute_ref_logps
        from fuselab.wrpo.train import ListDataset
        from fuselab.wrpo.trainer import WRPOTrainer

        examples, _ = tokenize_rows(rows, tok, TokenizeOptions(max_length=1024, max_prompt_length=512))
        ref_model = None
        if kind.endswith("cached"):
            t = time.perf_counter()
            ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            logps = compute_ref_logps(ref, examples, tok.pad_token_id, batch_size=batch)
            del ref
            for ex, lp in zip(examples, logps.tolist()):
                ex["ref_logps"] = lp
            pre_seconds = time.perf_counter() - t
        else:
            ref_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        trainer = WRPOTrainer(
            model=model,
            args=TrainingArguments(remove_unused_columns=False, **common),
            train_dataset=ListDataset(examples),
            data_collator=WRPOCollator(tok.pad_token_id),
            processing_class=tok,
            loss_config=LossConfig(beta=0.1, alpha=0.1),
            ref_model=ref_model,
            callbacks=[timer],
        )
    trainer.train()
    return {"kind": kind, "step_seconds": timer.times, "precompute_seconds": pre_seconds, **_peak()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / ".bench" / "wrpo_vs_dpo.json"))
    ap.add_argument("--run", choices=RUNS, help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("FUSELAB_PROGRESS", "0")
    work = ROOT / ".bench" / "wrpo-bench"
    if args.run:
        res = run_one(args.run, args.model, Path(args.data), args.steps, args.batch, work)
        Path(args.result).write_text(json.dumps(res))
        return
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_rows(args.batch * args.steps)))
    results = {}
    for kind in RUNS:
        res_path = work / f"{kind}.json"
        cmd = [
            sys.executable,
            __file__,
            "--run",
            kind,
            "--model",
            args.model,
            "--steps",
            str(args.steps),
            "--batch",
            str(args.batch),
            "--data",
            str(data),
            "--result",
            str(res_path),
        ]
        print(f"running {kind} ...", flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        r = json.loads(res_path.read_text())
        r["median_step_s"] = statistics.median(r["step_seconds"][args.warmup :])
        results[kind] = r
    base = results["trl_dpo_live"]
    summary = {
        "model": args.model,
        "batch_prompts": args.batch,
        "measured_steps": args.steps - args.warmup,
        "runs": {
            k: {
                "median_step_s": round(r["median_step_s"], 3),
                "peak_rss_mb": round(r["peak_rss_mb"]),
                "precompute_s": round(r["precompute_seconds"], 1),
                **({"cuda_peak_mb": round(r["cuda_peak_mb"])} if "cuda_peak_mb" in r else {}),
            }
            for k, r in results.items()
        },
        "ratios_vs_trl_dpo_live": {
            k: {
                "time": round(r["median_step_s"] / base["median_step_s"], 3),
                "peak_rss": round(r["peak_rss_mb"] / base["peak_rss_mb"], 3),
            }
            for k, r in results.items()
        },
        "wrpo_cached_vs_trl_dpo_cached_time": round(
            results["wrpo_cached"]["median_step_s"] / results["trl_dpo_cached"]["median_step_s"], 3
        ),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
