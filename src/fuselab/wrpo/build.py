"""``fuselab wrpo build RECIPE OUT_DIR``: WRPO's data pipeline, from prompts to preference rows.

1. Read the prompts; split them deterministically into an SFT share (the paper: one third) and the rest.
2. Sample N responses per prompt from every source (all prompts) and score them.
3. SFT set: the best source response y_ws of each SFT prompt -> ``sft.jsonl``; when ``sft.train``, fine-tune
   the target on it here (``sft-model/``), and sample the target from that model (paper: Target-SFT).
4. Sample N responses per WRPO prompt from the target and score them.
5. Select (y_ws, y_wt, y_l) per prompt (:mod:`fuselab.wrpo.selection`) -> ``wrpo.jsonl``.

Resumable: samples, scores and the SFT model are kept in ``.<OUT_DIR>.work/`` as they are produced (samples
per batch, scores per prompt); rerunning the same command skips what is done. OUT_DIR appears only at the end.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fuselab.utils.atomic import atomic_output_dir, atomic_write_json, atomic_write_text, check_output_dir
from fuselab.utils.config import dump_yaml
from fuselab.utils.errors import ConfigError, FuselabError
from fuselab.wrpo.config import BuildConfig, SamplingConfig, load_build_config
from fuselab.wrpo.prompts import PromptRow, load_prompts, split_sft
from fuselab.wrpo.scorers import ScoreItem, build_scorer
from fuselab.wrpo.selection import Sample, select_triplet

log = logging.getLogger(__name__)


@dataclass
class BuildResult:
    out_dir: Path
    prompts: int
    wrpo_rows: int
    sft_rows: int
    seconds: float
    stats: dict[str, Any]


def _read_lines(path: Path) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut by an interruption
                    continue
                out[row["id"]] = row
    return out


def _append(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _check_meta(folder: Path, tag: str, meta: dict[str, Any]) -> None:
    """Forget stale samples/scores of ``tag`` when the model or the settings changed since they were made."""
    meta_path = folder / f"{tag}.meta.json"
    if meta_path.is_file() and json.loads(meta_path.read_text()) != meta:
        log.info("settings of %s changed; sampling it again", tag)
        for suffix in (".samples.jsonl", ".scores.jsonl"):
            (folder / f"{tag}{suffix}").unlink(missing_ok=True)
    atomic_write_json(meta_path, meta)


def sample_and_score(
    tag: str,
    model_ref: str,
    prompts: list[PromptRow],
    n: int,
    sampling: SamplingConfig,
    scorer: Any,
    folder: Path,
    scorer_name: str = "scorer",
) -> dict[str, dict[str, Any]]:
    """{prompt id: {responses, scores}} for ``prompts`` from one model, resuming from ``folder``."""
    from fuselab.modeling.resolve import resolve_model
    from fuselab.wrpo.sampling import generate

    path = resolve_model(model_ref)
    _check_meta(folder, tag, {"model": str(path), "n": n, "sampling": sampling.model_dump(mode="json")})
    samples_path, scores_path = folder / f"{tag}.samples.jsonl", folder / f"{tag}.scores.jsonl"
    done = _read_lines(samples_path)
    todo_batches = {
        b
        for b, start in enumerate(range(0, len(prompts), sampling.batch_size))
        if any(p.id not in done for p in prompts[start : start + sampling.batch_size])
    }
    if todo_batches:
        all_batches = set(range((len(prompts) + sampling.batch_size - 1) // sampling.batch_size))

        def on_batch(start: int, responses: list[list[str]]) -> None:
            rows = [
                {"id": p.id, "model": model_ref, "responses": r}
                for p, r in zip(prompts[start : start + len(responses)], responses)
            ]
            _append(samples_path, rows)

        generate(
            path,
            [p.messages for p in prompts],
            n,
            sampling,
            on_batch=on_batch,
            skip_batches=all_batches - todo_batches,
            desc=f"sampling {tag}",
        )
        done = _read_lines(samples_path)
    scored = _read_lines(scores_path)
    for p in prompts:
        if p.id in scored:
            continue
        responses = done[p.id]["responses"]
        scores = _score(scorer, scorer_name, p, responses)
        _append(scores_path, [{"id": p.id, "scores": scores}])
        scored[p.id] = {"scores": scores}
    return {p.id: {"responses": done[p.id]["responses"], "scores": scored[p.id]["scores"]} for p in prompts}


def _score(scorer: Any, name: str, prompt: PromptRow, responses: list[str]) -> list[float]:
    """The scorer's scores for one prompt's responses, checked: one real number per response.

    A scorer that raises or returns something other than numbers is a broken scorer, named at once with
    the prompt and the value (not a traceback after hours of sampling). NaN and infinity are kept as NaN:
    "could not score this one" (a judge that did not answer), ignored by selection and counted."""
    try:
        scores = scorer.score([ScoreItem(prompt.messages, r, prompt.row) for r in responses])
    except FuselabError:
        raise
    except Exception as err:
        raise ConfigError(
            f"scorer {name} failed on prompt {prompt.id!r}: {type(err).__name__}: {err}; fix the scorer (a "
            "response it cannot score should get NaN, not an exception)"
        ) from err
    if not isinstance(scores, (list, tuple)) or len(scores) != len(responses):
        got = f"{len(scores)} values" if isinstance(scores, (list, tuple)) else type(scores).__name__
        raise ConfigError(
            f"scorer {name} returned {got} for the {len(responses)} responses of prompt {prompt.id!r}; it must "
            "return one number per response"
        )
    out = []
    for i, v in enumerate(scores):
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise ConfigError(
                f"scorer {name} returned {v!r} ({type(v).__name__}) for response {i + 1} of prompt "
                f"{prompt.id!r}; scores must be numbers (NaN for a response it cannot score)"
            )
        v = float(v)
        out.append(v if math.isfinite(v) else math.nan)
    return out


def _no_rows_error(name: str, what: str, scores: list[float], counts: Counter[str]) -> ConfigError:
    """Why a build produced nothing usable, from the scores and the selection's counts."""
    bad = sum(1 for x in scores if math.isnan(x))
    if scores and bad == len(scores):
        reason = (
            f"every one of the {len(scores)} {what} scores is NaN or infinite: scorer {name} scored nothing "
            "(check its options, endpoint or function)"
        )
    else:
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()) if k.startswith("dropped"))
        reason = (
            f"every prompt was dropped ({detail or 'no prompts'}; {bad} of {len(scores)} scores unusable)"
        )
        if counts.get("dropped_target_all_equal"):
            reason += "; for equal target scores, use `selection: {all_equal: keep}` or sample more (`n`)"
    return ConfigError(f"wrpo build produced no usable rows: {reason}. Nothing was written")


def _source_samples(pid: str, per_source: list[tuple[str, dict[str, dict[str, Any]]]]) -> list[Sample]:
    out: list[Sample] = []
    for name, table in per_source:
        for text, score in zip(table[pid]["responses"], table[pid]["scores"]):
            out.append(Sample(text, float(score), name, len(out)))
    return out


def _assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def run_build(recipe: str | Path | BuildConfig, out_dir: str | Path, *, force: bool = False) -> BuildResult:
    from fuselab.modeling.resolve import resolve_model

    cfg = recipe if isinstance(recipe, BuildConfig) else load_build_config(recipe)
    out = Path(out_dir).absolute()
    check_output_dir(out, force)
    work = out.parent / f".{out.name}.work"
    (work / "samples").mkdir(parents=True, exist_ok=True)
    start_time = time.perf_counter()

    prompts = load_prompts(cfg.prompts)
    sft_prompts, wrpo_prompts = split_sft(prompts, cfg.sft.share, cfg.seed)
    scorer = build_scorer(cfg.scorer)
    scorer_name = str(cfg.scorer.get("type", "scorer"))

    # 1. Sources on every prompt.
    per_source = []
    for k, src in enumerate(cfg.sources):
        name = src.name or src.model
        table = sample_and_score(
            f"source-{k}",
            src.model,
            prompts,
            src.n or cfg.sampling.n,
            cfg.sampling,
            scorer,
            work / "samples",
            scorer_name,
        )
        per_source.append((name, table))
    source_scores = [float(s) for _, t in per_source for r in t.values() for s in r["scores"]]
    if prompts and all(math.isnan(x) for x in source_scores):  # before SFT and target sampling
        raise _no_rows_error(scorer_name, "source", source_scores, Counter())

    # 2. SFT set (+ SFT model) on y_ws of the SFT share.
    sft_rows = []
    for p in sft_prompts:
        best = max(_source_samples(p.id, per_source), key=lambda s: (s.score, -s.index))
        sft_rows.append(
            {
                "id": p.id,
                "prompt": p.messages,
                "completion": _assistant(best.text),
                "source_model": best.model,
                "score": best.score,
            }
        )
    target_ref = cfg.target
    sft_dir = work / "sft-model"
    if sft_rows and cfg.sft.train:
        if not (sft_dir / "fuselab_wrpo_sft.yaml").is_file():
            from fuselab.wrpo.sft import train_sft

            shutil.rmtree(sft_dir, ignore_errors=True)
            train_sft(resolve_model(cfg.target), sft_rows, cfg.sft, sft_dir, work / "sft-checkpoints")
        target_ref = str(sft_dir)

    # 3. Target (after SFT) on the WRPO prompts.
    tsampling = cfg.target_sampling or cfg.sampling
    target = sample_and_score(
        "target", target_ref, wrpo_prompts, tsampling.n, tsampling, scorer, work / "samples", scorer_name
    )

    # 4. Selection.
    counts: Counter[str] = Counter()
    wrpo_rows = []
    for p in wrpo_prompts:
        src = _source_samples(p.id, per_source)
        tgt = [
            Sample(t, float(s), "target", i)
            for i, (t, s) in enumerate(zip(target[p.id]["responses"], target[p.id]["scores"]))
        ]
        trip = select_triplet(src, tgt, cfg.selection, counts)
        if trip is None:
            continue
        extra = {k: v for k, v in p.row.items() if k in ("task_id", "entry_point", "test")}
        wrpo_rows.append(
            {
                "id": p.id,
                "prompt": p.messages,
                "chosen": _assistant(trip.wt.text),
                "rejected": _assistant(trip.l.text),
                "source_chosen": _assistant(trip.ws.text),
                "source_model": trip.ws.model,
                "scores": {"ws": trip.ws.score, "wt": trip.wt.score, "l": trip.l.score},
                **extra,
            }
        )

    if wrpo_prompts and not wrpo_rows:
        target_scores = [float(s) for r in target.values() for s in r["scores"]]
        raise _no_rows_error(scorer_name, "target", target_scores, counts)
    stats = {
        "prompts": len(prompts),
        "sft_prompts": len(sft_prompts),
        "wrpo_prompts": len(wrpo_prompts),
        "wrpo_rows": len(wrpo_rows),
        "sft_rows": len(sft_rows),
        "sft_trained": bool(sft_rows and cfg.sft.train),
        "target_sampled_from": "sft-model" if target_ref != cfg.target else cfg.target,
        "selection": dict(sorted(counts.items())),
        "mean_score_sources": _mean([s for _, t in per_source for r in t.values() for s in r["scores"]]),
        "mean_score_target": _mean([s for r in target.values() for s in r["scores"]]),
        "seconds": round(time.perf_counter() - start_time, 1),
    }
    with atomic_output_dir(out, force) as tmp:
        atomic_write_text(
            tmp / "wrpo.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in wrpo_rows)
        )
        atomic_write_text(
            tmp / "sft.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in sft_rows)
        )
        atomic_write_json(tmp / "build_stats.json", stats)
        atomic_write_text(tmp / "fuselab_wrpo_build.yaml", dump_yaml(cfg.model_dump(mode="json")))
        from fuselab.wrpo.card import render_build_card

        atomic_write_text(
            tmp / "README.md", render_build_card(config=cfg.model_dump(mode="json"), stats=stats)
        )
        shutil.copytree(work / "samples", tmp / "samples")
        if sft_dir.is_dir() and target_ref != cfg.target:
            shutil.copytree(sft_dir, tmp / "sft-model")
    shutil.rmtree(work, ignore_errors=True)
    return BuildResult(out, len(prompts), len(wrpo_rows), len(sft_rows), stats["seconds"], stats)


def _mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x == x]
    return round(sum(xs) / len(xs), 4) if xs else None
