"""Bridge to EleutherAI's lm-evaluation-harness (optional extra ``fuselab[lmeval]``): zero-shot tasks from
local task files, on an in-memory model (stock, or pruned by fuselab).

BlockPruner (Zhong et al., 2024, arXiv:2406.10594, §4.1) reports zero-shot accuracy from lm-eval on five
multiple-choice tasks, ``acc_norm`` where the task has it and ``acc`` otherwise, and their plain mean. This
module runs the same protocol with the current lm-eval API (spec ``ecosystem.md`` §5): the model is loaded by
fuselab (:func:`fuselab.prune.loading.load_pruned_model`, so checkpoints with single attention/MLP blocks
removed work, not only stock ones) and handed to lm-eval's ``HFLM`` as an instance; tasks come from task
YAML folders given with ``include_path`` (lm-eval's ``TaskManager``), whose data are local files, so nothing
touches the hub. fuselab ships two such tasks built from its bundled held-out data (``harness_tasks/``, see
:mod:`fuselab.evaluate.harness_data`); lm-eval's own tasks (PIQA, ARC, ...) are opt-in (``builtin=True``)
because their datasets come from the hub.

A task folder of your own needs a YAML per task; point it at local data with either

- ``dataset_path: json`` and ``dataset_kwargs: {data_files: {test: /absolute/path/data.jsonl}}`` (the
  ``datasets`` JSON loader; relative paths resolve against the working directory), or
- ``custom_dataset: !function utils.local_jsonl`` with ``data_files`` relative to the folder, copying
  ``harness_tasks/utils.py`` next to your YAML (how the bundled tasks do it).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fuselab.utils.errors import ConfigError, FuselabError

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'fuselab[lmeval]'"
BUNDLED_TASKS = Path(__file__).with_name("harness_tasks")
HEADLINE_METRICS = ("acc_norm", "acc")  # the paper's rule: acc_norm where the task has it, else acc


def require_lm_eval() -> Any:
    """The ``lm_eval`` module, or a :class:`FuselabError` saying how to install it."""
    try:
        import lm_eval
    except ImportError:
        raise FuselabError(
            f"lm-evaluation-harness is not installed; it is an optional extra: {INSTALL_HINT} "
            "(or pip install 'lm-eval==0.4.*')"
        ) from None
    return lm_eval


@dataclass
class TaskScore:
    """The scores of one task: every metric lm-eval reported, and the headline one."""

    metrics: dict[str, float]
    stderr: dict[str, float]
    headline_metric: str | None
    num_samples: int | None = None

    @property
    def headline(self) -> float | None:
        return self.metrics.get(self.headline_metric) if self.headline_metric else None


@dataclass
class HarnessResult:
    tasks: dict[str, TaskScore]
    lm_eval_version: str
    config: dict[str, Any] = field(default_factory=dict)
    samples: dict[str, list[dict[str, Any]]] | None = None

    @property
    def mean(self) -> float | None:
        """Plain mean of the headline metrics (the paper's "Avg" column)."""
        vals = [t.headline for t in self.tasks.values() if t.headline is not None]
        return sum(vals) / len(vals) if vals else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "lm_eval_version": self.lm_eval_version,
            "config": self.config,
            "mean": self.mean,
            "tasks": {
                name: {
                    "headline_metric": t.headline_metric,
                    "headline": t.headline,
                    "metrics": t.metrics,
                    "stderr": t.stderr,
                    "num_samples": t.num_samples,
                }
                for name, t in self.tasks.items()
            },
        }

    def table(self) -> str:
        rows = ["| task | metric | value | stderr | n |", "|---|---|---|---|---|"]
        for name, t in self.tasks.items():
            m = t.headline_metric or "-"
            val = f"{t.headline:.4f}" if t.headline is not None else "-"
            err = t.stderr.get(m)
            err_s = f"{err:.4f}" if err is not None and math.isfinite(err) else "-"
            rows.append(f"| {name} | {m} | {val} | {err_s} | {t.num_samples or '-'} |")
        if self.mean is not None and len(self.tasks) > 1:
            rows.append(f"| mean | | {self.mean:.4f} | | |")
        return "\n".join(rows)


def _include_paths(include_paths: Sequence[str | Path], bundled: bool) -> list[str]:
    paths = [BUNDLED_TASKS] if bundled else []
    for p in include_paths:
        path = Path(p).expanduser()
        if not path.is_dir():
            raise ConfigError(f"lm-eval task folder {p} does not exist (give a folder of task YAML files)")
        paths.append(path)
    return [str(p.resolve()) for p in paths]


def task_manager(
    include_paths: Sequence[str | Path] = (), builtin: bool = False, bundled: bool = True
) -> Any:
    """An lm-eval ``TaskManager`` over fuselab's bundled tasks, ``include_paths`` and (``builtin``) lm-eval's."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    paths = _include_paths(include_paths, bundled)
    return TaskManager(include_path=paths or None, include_defaults=builtin)


def _check_tasks(tm: Any, tasks: Sequence[str], builtin: bool) -> None:
    known = set(tm.all_tasks) | set(tm.all_groups) | set(tm.all_tags)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        local = sorted(n for n in known if not builtin or n.startswith("fuselab_"))
        hint = "" if builtin else "; lm-eval's own tasks (which download from the hub) need --lm-eval-builtin"
        raise ConfigError(
            f"unknown lm-eval task(s) {', '.join(unknown)}; known here: {', '.join(local[:40]) or 'none'}"
            f"{' ...' if len(local) > 40 else ''} (add a task folder with --include-path){hint}"
        )


def _scores(results: dict[str, Any], n_samples: dict[str, Any], task: str) -> TaskScore:
    metrics: dict[str, float] = {}
    stderr: dict[str, float] = {}
    for key, value in results.get(task, {}).items():
        if "," not in key or not isinstance(value, (int, float)):
            continue
        name = key.split(",", 1)[0]
        if name.endswith("_stderr"):
            stderr[name[: -len("_stderr")]] = float(value)
        else:
            metrics[name] = float(value)
    headline = next((m for m in HEADLINE_METRICS if m in metrics), None)
    if headline is None and metrics:
        headline = sorted(metrics)[0]
    n = n_samples.get(task, {})
    return TaskScore(metrics, stderr, headline, n.get("effective") if isinstance(n, dict) else None)


def run_lm_eval(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str],
    include_paths: Sequence[str | Path] = (),
    builtin: bool = False,
    batch_size: int = 1,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    log_samples: bool = False,
    seed: int = 1234,
) -> HarnessResult:
    """Run lm-eval ``tasks`` on the in-memory causal LM ``model`` (zero-shot unless ``num_fewshot``).

    ``model`` may have blocks removed (fuselab's ``ZeroBranch`` modules); lm-eval only calls its forward.
    Task names come from fuselab's bundled tasks, ``include_paths`` (folders of task YAMLs) and, with
    ``builtin``, lm-eval's own task list.
    """
    require_lm_eval()
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    if not tasks:
        raise ConfigError("no lm-eval task given (e.g. --lm-eval fuselab_chat_reply,fuselab_code_body)")
    tm = task_manager(include_paths, builtin)
    _check_tasks(tm, tasks, builtin)
    model.eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=tm,
        log_samples=log_samples,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
        bootstrap_iters=1000,
    )
    if out is None:  # only on non-zero ranks of a distributed run
        raise FuselabError("lm-eval returned no results (run the bridge in a single process)")
    results, n_samples = out.get("results", {}), out.get("n-samples", {})
    scores = {t: _scores(results, n_samples, t) for t in results}
    samples = out.get("samples") if log_samples else None
    return HarnessResult(
        tasks=scores,
        lm_eval_version=getattr(lm_eval, "__version__", "unknown"),
        config={
            "tasks": list(tasks),
            "include_paths": _include_paths(include_paths, True),
            "builtin": builtin,
            "batch_size": batch_size,
            "limit": limit,
            "num_fewshot": num_fewshot,
            "seed": seed,
        },
        samples=samples,
    )


def evaluate_checkpoint(
    model_ref: str | Path,
    tasks: Sequence[str],
    include_paths: Sequence[str | Path] = (),
    builtin: bool = False,
    batch_size: int = 1,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    dtype: Any = None,
    device: str = "cpu",
    log_samples: bool = False,
) -> HarnessResult:
    """:func:`run_lm_eval` on a checkpoint folder or catalog name (stock, or written by ``fuselab prune``)."""
    require_lm_eval()
    import torch

    from fuselab.modeling.resolve import resolve_model
    from fuselab.prune.loading import load_pruned_model, load_pruned_tokenizer

    path = resolve_model(str(model_ref))
    model = load_pruned_model(path, dtype=dtype or torch.float32).to(device)
    result = run_lm_eval(
        model,
        load_pruned_tokenizer(path),  # fuselab's DeciLM exports: no trust-remote-code prompt
        tasks,
        include_paths,
        builtin,
        batch_size,
        limit,
        num_fewshot,
        log_samples,
    )
    result.config["model"] = str(path)
    return result
