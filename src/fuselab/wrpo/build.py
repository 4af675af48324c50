"""``fuselab wrpo build RECIPE OUT_DIR``: WRPO's data pipeline, from prompts to preference rows.

1. Read the prompts; split them deterministically into an SFT share (the paper: one third) and the rest.
2. Sample N responses per prompt from every source (all prompts) and score them.
3. SFT set: the best source response y_ws of each SFT prompt -> ``sft.jsonl``; when ``sft.train``, fine-tune
   the target on it here (``sft-model/``), and sample the target from that model (paper: Target-SFT).
4. Sample N responses per WRPO prompt from the target and score them.
5. Select (y_ws, y_wt, y_l) per prompt (:mod:`fuselab.wrpo.selection`) -> ``wrpo.jsonl``.

Resumable: samples, scores and the SFT model are kept in ``.<OUT_DIR>.work/`` as they are produced, in
pieces (one sampling batch of one model: its samples, then its scores, each file written whole); rerunning
the same command skips what is done. OUT_DIR appears only at the end.

Data-parallel: ``accelerate launch --num_processes N $(which fuselab) wrpo build RECIPE OUT_DIR`` splits
the pieces over the processes (piece ``b`` of every model on rank ``b mod N``, as fusion extraction splits
its shards, :mod:`fuselab.utils.distributed`); the main rank trains the SFT model and writes OUT_DIR, the
same bytes as one process writes (:func:`run_build`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import numbers
import os
import re
import shutil
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fuselab.utils.atomic import atomic_output_dir, atomic_write_json, atomic_write_text, check_output_dir
from fuselab.utils.config import dump_yaml
from fuselab.utils.distributed import Ranks, current_ranks, rank_device, wait_for
from fuselab.utils.errors import ConfigError, FuselabError
from fuselab.utils.memory import release_memory
from fuselab.wrpo.config import BuildConfig, SamplingConfig, load_build_config
from fuselab.wrpo.prompts import PromptRow, load_prompts, split_sft
from fuselab.wrpo.scorers import ScoreItem, build_scorer, check_scorer_prompts
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


# ----------------------------------------------------------------------------------------- pieces of work


def _key(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class ModelPlan:
    """One model's samples and scores, cut into pieces: piece ``b`` is sampling batch ``b`` (prompts
    ``b * batch_size`` onwards, seeded ``seed + b``), sampled and scored by rank ``b mod N``.

    The pieces live in ``<tag>.<key>/`` under the work folder, ``key`` a hash of what makes the samples (the
    model, n, the sampling settings, the prompt ids in order), and the scores in ``scores-<hash of the
    scorer>/`` inside it: a change of any of them starts afresh instead of mixing old and new, and no rank
    ever has to delete what another is writing."""

    tag: str
    model_ref: str
    prompts: list[PromptRow]
    n: int
    sampling: SamplingConfig
    root: Path  # the folder of every model's pieces
    folder: Path
    scores: Path
    meta: dict[str, Any]
    label: str  # what OUT_DIR calls the model (its reference, or ``sft-model``, the copy there)

    @property
    def batches(self) -> list[list[PromptRow]]:
        size = self.sampling.batch_size
        return [self.prompts[i : i + size] for i in range(0, len(self.prompts), size)]

    def samples_piece(self, b: int) -> Path:
        return self.folder / "samples" / f"{b:05d}.jsonl"

    def scores_piece(self, b: int) -> Path:
        return self.scores / f"{b:05d}.jsonl"


def plan_model(
    tag: str,
    model_ref: str,
    prompts: list[PromptRow],
    n: int,
    sampling: SamplingConfig,
    root: Path,
    scorer_key: Any = "",
    model_key: str = "",
    label: str | None = None,
) -> ModelPlan:
    """``scorer_key``: what identifies the scorer (its recipe section); ``model_key``: what identifies the
    model's weights when its folder does not (the SFT model, retrained in the same folder); ``label``: what
    OUT_DIR calls the model (default ``model_ref``)."""
    from fuselab.modeling.resolve import resolve_model

    meta = {"model": str(resolve_model(model_ref)), "n": n, "sampling": sampling.model_dump(mode="json")}
    key = _key({**meta, "prompts": [p.id for p in prompts], **({"weights": model_key} if model_key else {})})
    folder = root / f"{tag}.{key}"
    scores = folder / f"scores-{_key(scorer_key)}"
    return ModelPlan(tag, model_ref, prompts, n, sampling, root, folder, scores, meta, label or model_ref)


def _write_piece(path: Path, rows: list[dict[str, Any]]) -> None:
    """One piece, whole or not at all (a killed rank leaves at most a hidden temporary)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _read_piece(path: Path, prompts: list[PromptRow], field: str, width: int | None) -> list[Any] | None:
    """``field`` of each row of the piece at ``path``, or None unless it is whole and holds exactly these
    prompts (each with ``width`` values, when given)."""
    try:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, ValueError):
        return None
    if [r.get("id") if isinstance(r, dict) else None for r in rows] != [p.id for p in prompts]:
        return None
    values = [r.get(field) for r in rows]
    if not all(isinstance(v, list) and (width is None or len(v) == width) for v in values):
        return None
    return values


def _clean_stale(plan: ModelPlan) -> None:
    """Remove the pieces of this tag made with other settings (the main rank only; nobody writes there)."""
    prefix = f"{plan.tag}."
    if plan.root.is_dir():
        for p in plan.root.iterdir():
            if p.name.startswith(prefix) and p != plan.folder:
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    if plan.folder.is_dir():
        for p in plan.folder.glob("scores-*"):
            if p != plan.scores:
                shutil.rmtree(p, ignore_errors=True)


def run_pieces(
    plan: ModelPlan, scorer: Any, scorer_name: str, ranks: Ranks, sampling: SamplingConfig | None = None
) -> int:
    """Sample, then score, the pieces of ``plan`` this rank owns and has not finished; return how many of
    them were finished already (resumed). ``sampling``: the settings as this rank runs them (its device),
    default ``plan.sampling``."""
    from fuselab.wrpo.sampling import generate

    if ranks.is_main:
        _clean_stale(plan)
    plan.folder.mkdir(parents=True, exist_ok=True)
    if ranks.is_main:
        atomic_write_json(plan.folder / "meta.json", plan.meta)
    batches = plan.batches
    mine = [b for b in range(len(batches)) if ranks.owns(b)]
    to_sample = [
        b for b in mine if _read_piece(plan.samples_piece(b), batches[b], "responses", plan.n) is None
    ]
    for b in to_sample:  # scores of responses that are sampled again would not be theirs
        plan.scores_piece(b).unlink(missing_ok=True)
    if to_sample:

        def on_batch(start: int, responses: list[list[str]]) -> None:
            b = start // plan.sampling.batch_size
            rows = [
                {"id": p.id, "model": plan.model_ref, "responses": r} for p, r in zip(batches[b], responses)
            ]
            _write_piece(plan.samples_piece(b), rows)

        generate(
            plan.meta["model"],
            [p.messages for p in plan.prompts],
            plan.n,
            sampling or plan.sampling,
            on_batch=on_batch,
            only_batches=to_sample,
            desc=f"sampling {plan.tag}" + (f" [rank {ranks.index}]" if ranks.distributed else ""),
            show_progress=ranks.is_main,
        )
    resumed = 0
    for b in mine:
        if _read_piece(plan.scores_piece(b), batches[b], "scores", plan.n) is not None:
            resumed += 1
            continue
        responses = _read_piece(plan.samples_piece(b), batches[b], "responses", plan.n)
        if responses is None:
            raise FuselabError(f"sampling {plan.tag} wrote no whole piece {plan.samples_piece(b)}")
        rows = [
            {"id": p.id, "scores": _score(scorer, scorer_name, p, r)} for p, r in zip(batches[b], responses)
        ]
        _write_piece(plan.scores_piece(b), rows)
    return resumed


def collect_pieces(plan: ModelPlan, ranks: Ranks) -> dict[str, dict[str, Any]]:
    """{prompt id: {responses, scores}} of every piece, once all are there (waiting for the other ranks)."""
    batches = plan.batches

    def missing() -> list[Path]:
        return [
            f
            for b in range(len(batches))
            for f in (plan.samples_piece(b), plan.scores_piece(b))
            if not f.is_file()
        ]

    if ranks.distributed:
        wait_for(lambda: not missing(), what=lambda: f"{plan.tag}: {[str(f) for f in missing()[:5]]}")
    table: dict[str, dict[str, Any]] = {}
    for b, prompts in enumerate(batches):
        responses = _read_piece(plan.samples_piece(b), prompts, "responses", plan.n)
        scores = _read_piece(plan.scores_piece(b), prompts, "scores", plan.n)
        if responses is None or scores is None:
            raise FuselabError(
                f"the work folder holds a damaged piece {b} of {plan.tag} ({plan.folder}); delete that folder "
                "and rerun (the other models' samples are kept)"
            )
        for p, r, sc in zip(prompts, responses, scores):
            table[p.id] = {"responses": r, "scores": sc}
    return table


def write_samples(plan: ModelPlan, table: dict[str, dict[str, Any]], folder: Path) -> None:
    """The samples, scores and settings of one model in OUT_DIR/samples/, in prompt order."""
    samples = [{"id": p.id, "model": plan.label, "responses": table[p.id]["responses"]} for p in plan.prompts]
    scores = [{"id": p.id, "scores": table[p.id]["scores"]} for p in plan.prompts]
    for suffix, rows in ((".samples.jsonl", samples), (".scores.jsonl", scores)):
        atomic_write_text(
            folder / f"{plan.tag}{suffix}", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        )
    meta = plan.meta if plan.label == plan.model_ref else {**plan.meta, "model": plan.label}
    atomic_write_json(folder / f"{plan.tag}.meta.json", meta)


def sample_and_score(
    tag: str,
    model_ref: str,
    prompts: list[PromptRow],
    n: int,
    sampling: SamplingConfig,
    scorer: Any,
    folder: Path,
    scorer_name: str = "scorer",
    scorer_key: Any = "",
) -> dict[str, dict[str, Any]]:
    """{prompt id: {responses, scores}} for ``prompts`` from one model, in one process, resuming from the
    pieces in ``folder``. ``scorer_key``: what identifies the scorer (its recipe section)."""
    plan = plan_model(tag, model_ref, prompts, n, sampling, folder, scorer_key)
    run_pieces(plan, scorer, scorer_name, Ranks())
    return collect_pieces(plan, Ranks())


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


def _sft_rows(sft_prompts: list[PromptRow], per_source) -> list[dict[str, Any]]:
    rows = []
    for p in sft_prompts:
        best = max(_source_samples(p.id, per_source), key=lambda s: (s.score, -s.index))
        rows.append(
            {
                "id": p.id,
                "prompt": p.messages,
                "completion": _assistant(best.text),
                "source_model": best.model,
                "score": best.score,
            }
        )
    return rows


def _check_distributed(cfg: BuildConfig, ranks: Ranks) -> None:
    from fuselab.wrpo.sampling import use_vllm

    for where, sampling in (("sampling", cfg.sampling), ("target_sampling", cfg.target_sampling)):
        if sampling is not None and use_vllm(sampling.backend):
            raise ConfigError(
                f"{where}: vLLM runs in one process (it places and shards the model itself: use "
                f"{where}.tensor_parallel_size for a model larger than one GPU); run `fuselab wrpo build` "
                f"without `accelerate launch`, or set {where}.backend: transformers to split the sampling over "
                f"the {ranks.count} processes"
            )


def _rank_sampling(sampling: SamplingConfig, ranks: Ranks) -> SamplingConfig:
    """The sampling settings as this rank runs them: ``auto``/``cuda`` is its own GPU (the recipe's value
    stays what the pieces are keyed by, so that every rank agrees on the keys)."""
    if not ranks.distributed or sampling.device not in ("auto", "cuda"):
        return sampling
    import torch

    if sampling.device == "auto" and not torch.cuda.is_available():
        return sampling
    return sampling.model_copy(update={"device": rank_device("cuda", ranks)})


def _rank_scorer_config(config: dict[str, Any], ranks: Ranks) -> dict[str, Any]:
    """A reward model on ``auto``/``cuda`` runs on this rank's own GPU."""
    if not ranks.distributed or config.get("type") != "reward_model":
        return config
    import torch

    if config.get("device", "auto") in ("auto", "cuda") and torch.cuda.is_available():
        return {**config, "device": rank_device("cuda", ranks)}
    return config


def _launch_token(ranks: Ranks) -> str:
    """A name for this launch that every rank shares (for the ranks' "finished" files, so that one left by
    an earlier, crashed launch is never taken for this one's). The one collective of a build: every rank
    gets here right after start-up, so it cannot time out on uneven work."""
    if not ranks.distributed:
        return ""
    from accelerate.utils import broadcast_object_list

    token: list[str | None] = [uuid.uuid4().hex[:12] if ranks.is_main else None]
    broadcast_object_list(token, from_process=0)
    return str(token[0])


_LAUNCH_ENV = re.compile(
    r"(RANK|LOCAL_RANK|WORLD_SIZE|LOCAL_WORLD_SIZE|GROUP_RANK|GROUP_WORLD_SIZE|ROLE_RANK|ROLE_WORLD_SIZE|"
    r"ROLE_NAME|MASTER_ADDR|MASTER_PORT|TORCHELASTIC_.*|ACCELERATE_(?!USE_CPU$).*)"
)


def _die_with_parent() -> None:
    """In the child: be killed when the process that started it dies (the launcher stops a failed group
    with SIGKILL, which leaves no chance to stop the child), so that no orphan keeps writing the SFT model
    while a rerun trains it again. Linux only; elsewhere a no-op."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _train_sft_alone(
    model: Path, rows: list[dict[str, Any]], cfg: BuildConfig, out: Path, work: Path
) -> None:
    """Train the SFT model in a process of its own, outside the launch (what the main rank does under
    ``accelerate launch``): the SFT model, and so the target's samples, are then the ones a one-process
    build makes. The Trainer would otherwise train data-parallel over the ranks, with another batch."""
    import subprocess
    import sys

    job = work / "sft-job.json"
    atomic_write_json(
        job,
        {"model": str(model), "rows": rows, "sft": cfg.sft.model_dump(mode="json"), "out": str(out),
         "work": str(work / "sft-checkpoints")},
    )  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not _LAUNCH_ENV.fullmatch(k)}
    proc = subprocess.run(
        [sys.executable, "-m", "fuselab.wrpo.sft", str(job)],
        env=env,
        check=False,
        preexec_fn=_die_with_parent,
    )
    if proc.returncode != 0:
        raise FuselabError(
            f"the SFT stage (`{sys.executable} -m fuselab.wrpo.sft {job}`, run by the main process) failed "
            f"with exit status {proc.returncode}; its messages are above. Rerun the build to resume: the "
            "samples are kept"
        )


def run_build(recipe: str | Path | BuildConfig, out_dir: str | Path, *, force: bool = False) -> BuildResult:
    """Run (or resume) a build into ``out_dir``.

    Under ``accelerate launch --num_processes N`` every process runs the same command: sampling batch ``b``
    of each model (with its scores) is a piece done by rank ``b mod N``, written to the work folder whole;
    the main rank trains the SFT model (alone, in a process of its own) once every source piece is there,
    and writes OUT_DIR once every piece is. A piece depends only on its prompts, its seed (``seed + b``)
    and the settings, never on who made it, so OUT_DIR is byte-identical to a one-process build's (on the
    same device type, library versions and threads per process), apart from the time taken. A rerun, with
    any number of processes, keeps every finished piece."""
    from fuselab.modeling.resolve import resolve_model

    cfg = recipe if isinstance(recipe, BuildConfig) else load_build_config(recipe)
    out = Path(out_dir).absolute()
    check_output_dir(out, force)
    start_time = time.perf_counter()
    ranks = current_ranks()

    # Everything that can be refused is refused here, before any model is loaded.
    prompts = load_prompts(cfg.prompts)
    check_scorer_prompts(cfg.scorer, prompts)
    if ranks.distributed:
        _check_distributed(cfg, ranks)
    sft_prompts, wrpo_prompts = split_sft(prompts, cfg.sft.share, cfg.seed)
    scorer = build_scorer(_rank_scorer_config(cfg.scorer, ranks))
    scorer_name = str(cfg.scorer.get("type", "scorer"))
    work = out.parent / f".{out.name}.work"
    pieces = work / "samples"
    pieces.mkdir(parents=True, exist_ok=True)
    token = _launch_token(ranks)

    # 1. Sources on every prompt.
    source_plans = [
        plan_model(
            f"source-{k}", src.model, prompts, src.n or cfg.sampling.n, cfg.sampling, pieces, cfg.scorer
        )
        for k, src in enumerate(cfg.sources)
    ]
    for plan in source_plans:
        run_pieces(plan, scorer, scorer_name, ranks, _rank_sampling(plan.sampling, ranks))
        release_memory()  # the next source starts without this one's freed heap
    train_sft = bool(sft_prompts) and cfg.sft.train
    per_source: list[tuple[str, dict[str, dict[str, Any]]]] = []
    if ranks.is_main or train_sft:  # the others need the source samples only for the SFT model's key
        per_source = [
            (src.name or src.model, collect_pieces(plan, ranks))
            for src, plan in zip(cfg.sources, source_plans)
        ]
    if ranks.is_main:
        source_scores = [float(s) for _, t in per_source for r in t.values() for s in r["scores"]]
        if prompts and all(math.isnan(x) for x in source_scores):  # before SFT and target sampling
            raise _no_rows_error(scorer_name, "source", source_scores, Counter())

    # 2. SFT set (+ SFT model) on y_ws of the SFT share.
    sft_rows = _sft_rows(sft_prompts, per_source) if per_source else []
    target_ref, target_key, target_label = cfg.target, "", None
    sft_dir = work / "sft-model"
    if train_sft:
        # the SFT model is kept between runs while its inputs stay the same
        target_key = _key(
            {
                "target": str(resolve_model(cfg.target)),
                "sft": cfg.sft.model_dump(mode="json"),
                "rows": sft_rows,
            }
        )
        key_file = work / "sft-model.key"

        def sft_ready() -> bool:
            return (
                (sft_dir / "fuselab_wrpo_sft.yaml").is_file()
                and key_file.is_file()
                and key_file.read_text() == target_key
            )

        if ranks.is_main and not sft_ready():
            key_file.unlink(missing_ok=True)
            shutil.rmtree(sft_dir, ignore_errors=True)
            if ranks.distributed:
                _train_sft_alone(resolve_model(cfg.target), sft_rows, cfg, sft_dir, work)
            else:
                from fuselab.wrpo.sft import train_sft as train

                train(resolve_model(cfg.target), sft_rows, cfg.sft, sft_dir, work / "sft-checkpoints")
            atomic_write_text(key_file, target_key)
        elif not ranks.is_main:
            wait_for(sft_ready, what=lambda: f"the main process to train the SFT model ({sft_dir})")
        target_ref, target_label = str(sft_dir), "sft-model"  # where OUT_DIR holds it

    # 3. Target (after SFT) on the WRPO prompts.
    tsampling = cfg.target_sampling or cfg.sampling
    target_plan = plan_model(
        "target",
        target_ref,
        wrpo_prompts,
        tsampling.n,
        tsampling,
        pieces,
        cfg.scorer,
        target_key,
        target_label,
    )
    run_pieces(target_plan, scorer, scorer_name, ranks, _rank_sampling(tsampling, ranks))
    finished = work / "ranks"
    if not ranks.is_main:
        # what is left is the main process's: it writes OUT_DIR once every rank said it is done, then
        # removes the work folder
        _write_piece(finished / f"{token}-{ranks.index}.done", [])
        wait_for(lambda: not work.exists(), what=lambda: f"the main process to write {out}")
        stats = json.loads((out / "build_stats.json").read_text(encoding="utf-8"))
        return BuildResult(
            out, stats["prompts"], stats["wrpo_rows"], stats["sft_rows"], stats["seconds"], stats
        )
    target = collect_pieces(target_plan, ranks)

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
    if ranks.distributed:
        others = [finished / f"{token}-{r}.done" for r in range(1, ranks.count)]
        wait_for(
            lambda: all(f.is_file() for f in others),
            what=lambda: f"ranks {[r for r, f in enumerate(others, 1) if not f.is_file()]} to finish",
        )
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
        (tmp / "samples").mkdir()
        for plan, (_, table) in zip(source_plans, per_source):
            write_samples(plan, table, tmp / "samples")
        write_samples(target_plan, target, tmp / "samples")
        if sft_dir.is_dir() and target_ref != cfg.target:
            shutil.copytree(sft_dir, tmp / "sft-model")
    shutil.rmtree(work, ignore_errors=True)
    return BuildResult(out, len(prompts), len(wrpo_rows), len(sft_rows), stats["seconds"], stats)


def _mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x == x]
    return round(sum(xs) / len(xs), 4) if xs else None
