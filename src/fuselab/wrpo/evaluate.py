"""Evaluation helpers for WRPO runs on code prompts: greedy pass@1 by executing the prompts' tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fuselab.wrpo.config import SamplingConfig
from fuselab.wrpo.prompts import prompt_messages
from fuselab.wrpo.sandbox import SandboxLimits, choose_isolation
from fuselab.wrpo.scorers.execution import row_prompt_text, run_tests


def code_pass_at_1(
    model_path: str | Path,
    rows: list[dict[str, Any]],
    *,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    limits: SandboxLimits | None = None,
    unsafe_exec: bool = False,
) -> dict[str, Any]:
    """Greedy pass@1 of ``model_path`` on HumanEval-style rows (``messages``/``prompt``, ``test``, ``entry_point``).

    One greedy completion per problem; a problem passes when every assert of its ``check`` holds. Also returns
    the mean execution score (the partial-credit rule of :mod:`fuselab.wrpo.scorers.execution`). Without
    ``limits``, the sandbox is chosen before generating (:func:`fuselab.wrpo.sandbox.choose_isolation`).
    """
    from fuselab.wrpo.sampling import generate

    limits = limits or SandboxLimits(isolation=choose_isolation(unsafe_exec))
    prompts = [prompt_messages(r, f"row {i + 1}") for i, r in enumerate(rows)]
    responses: list[str] = [""] * len(rows)

    def keep(start: int, batch: list[list[str]]) -> None:
        for i, r in enumerate(batch):
            responses[start + i] = r[0]

    cfg = SamplingConfig(n=2, max_new_tokens=max_new_tokens, batch_size=batch_size)
    generate(model_path, prompts, 1, cfg, greedy=True, on_batch=keep, desc="pass@1")
    outcomes = [
        run_tests(resp, r["test"], r["entry_point"], row_prompt_text(r), limits)
        for resp, r in zip(responses, rows)
    ]
    passed = [r.get("task_id", r.get("id")) for r, o in zip(rows, outcomes) if o.passed]
    return {
        "problems": len(rows),
        "passed": len(passed),
        "pass@1": len(passed) / len(rows) if rows else 0.0,
        "mean_score": sum(o.score for o in outcomes) / len(rows) if rows else 0.0,
        "passed_ids": passed,
    }
