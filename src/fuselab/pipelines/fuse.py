"""``fuselab fuse``: FuseChat from sources to a fused model and a report, in one command.

Stages, in order (FuseChat, Wan et al. 2024, arXiv 2402.16107 / 2408.07990)::

    extract   top-k next-token distributions of the pivot and every source on the training texts
    align     token and vocabulary alignment to the pivot, fusion (MinCE, AvgCE, ...) into sparse targets
    train     one target per source (pairwise) or one for all sources (multi, FuseLLM), plus an SFT-only
              baseline (λ = 1) on the same tokens and steps, so that the report can say what fusion added
    merge     the pairwise targets into one model (SCE by default, any merge method by name)
    evaluate  held-out NLL on assistant tokens per domain for every model, and greedy answers to a few prompts
    report    the fused model, a Markdown report with plots, and the resolved recipe in the output folder

Every stage output lives in the work folder under a key that hashes everything that determines it (model
fingerprints, data, settings and the keys of the stages it reads), so a rerun skips finished work, resumes
interrupted work (extraction by shard, training from its last checkpoint) and never reuses stale work.
``--from STAGE`` deletes that stage's and the later stages' outputs for the current keys and runs them again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fuselab.fusion.workspace import Workspace, load_data_items
from fuselab.pipelines.config import STAGES, FuseRecipe
from fuselab.utils.atomic import atomic_output_dir, atomic_write_json, output_lock
from fuselab.utils.errors import ConfigError, OutputExistsError
from fuselab.utils.memory import release_memory

log = logging.getLogger(__name__)

STAMP = "fuselab_fuse.json"
CHECKPOINT_CADENCE = {"save_steps", "save_minutes", "save_total_limit"}  # not part of a trained model's key


def _h(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class PlanItem:
    """One output of a stage: where it goes, whether it is already there, what it will cost."""

    stage: str
    label: str
    path: Path
    done: bool
    seconds: float = 0.0
    nbytes: int = 0


@dataclass
class FuseResult:
    output: Path
    model: Path
    report: Path
    ran: dict[str, list[str]] = field(default_factory=dict)
    skipped: dict[str, list[str]] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").exists() and any(path.glob("*.safetensors"))


class FusePipeline:
    """The stages of one ``fuselab fuse`` recipe over a work folder."""

    def __init__(
        self,
        recipe: FuseRecipe,
        *,
        name: str = "fuse",
        output: str | Path | None = None,
        workdir: str | Path | None = None,
        show_progress: bool = True,
        dry_run: bool = False,
    ) -> None:
        from fuselab.modeling.resolve import resolve_model
        from fuselab.utils.errors import ModelNotFoundError

        self.recipe = recipe
        self.output = Path(output or recipe.output or Path("outputs") / name).absolute()
        self.workdir = Path(workdir or recipe.workdir or self.output.with_name(self.output.name + ".work"))
        self.show_progress = show_progress
        self.dry_run = dry_run
        paths = None
        if dry_run:
            try:  # a dry run downloads nothing
                refs = [recipe.pivot, *recipe.sources]
                paths = {ref: resolve_model(ref, fetch=False) for ref in refs}
            except ModelNotFoundError as err:
                raise ModelNotFoundError(
                    f"{err}\n--dry-run needs every model on disk to count tokens; fetch them first with "
                    "`fuselab models fetch NAME` (or run without --dry-run, which fetches on first use)"
                ) from None
        self.ws = Workspace(
            recipe, self.workdir, show_progress=show_progress, persist=not dry_run, resolved=paths
        )
        self.pivot = self.ws.pivot
        self._heldout: dict[str, list] | None = None
        self._heldout_convs: dict[str, list] | None = None
        self._heldout_key: dict[str, str] | None = None

    # -- names and keys ----------------------------------------------------------------------------------
    def target_names(self) -> list[str]:
        return list(self.ws.target_groups())

    def baseline_name(self) -> str:
        return f"{self.pivot}-sft"

    def train_dir(self, target: str) -> Path:
        from fuselab.fusion.train import resolved_bf16

        cfg = self.recipe.train.model_dump(exclude=CHECKPOINT_CADENCE)  # when to checkpoint: same model
        cfg["bf16"] = resolved_bf16(self.recipe.train)  # `auto` as it runs here: bf16 and float32 differ
        if target == self.baseline_name():
            cfg["lam"] = 1.0
            key = _h("sft", self.ws.fingerprint(self.pivot), self.ws.texts_key(), cfg)
        else:
            key = _h(self.ws.targets_dir(target).name, self.ws.fingerprint(self.pivot), cfg)
        return self.workdir / "models" / f"{target}-{key}"

    def trained(self) -> list[str]:
        """Models the train stage produces: the targets, then the SFT baseline when enabled."""
        return self.target_names() + ([self.baseline_name()] if self.recipe.baseline else [])

    def merges(self) -> bool:
        return self.recipe.fuse.mode == "pairwise" and len(self.target_names()) > 1

    def merged_name(self) -> str:
        return f"{self.pivot}-fused-{self.recipe.merge.method}"

    def merged_dir(self) -> Path:
        key = _h([self.train_dir(t).name for t in self.target_names()], self.recipe.merge.model_dump())
        return self.workdir / "models" / f"{self.merged_name()}-{key}"

    def fused_model(self) -> tuple[str, Path]:
        """The pipeline's result: the merged model, or the single (multi or only) target."""
        if self.merges():
            return self.merged_name(), self.merged_dir()
        target = self.target_names()[0]
        return target, self.train_dir(target)

    def evaluated(self) -> dict[str, tuple[Path, str]]:
        """Model name -> (folder, kind) for every model the report compares."""
        out: dict[str, tuple[Path, str]] = {self.pivot: (self.ws.paths[self.pivot], "pivot")}
        if self.recipe.baseline:
            out[self.baseline_name()] = (self.train_dir(self.baseline_name()), "baseline")
        for t in self.target_names():
            out[t] = (self.train_dir(t), "target")
        if self.merges():
            out[self.merged_name()] = (self.merged_dir(), "merged")
        if self.recipe.evaluate.sources:
            for s in self.ws.sources:
                out[s] = (self.ws.paths[s], "source")
        return out

    def heldout(self) -> dict[str, list]:
        """Domain -> held-out texts, rendered with the pivot's template to fit every evaluated tokenizer."""
        if self._heldout is None:
            from fuselab.data.render import SplitReport, render_to_fit

            ev = self.recipe.evaluate
            toks = [
                self.ws.tokenizer(n) for n in ([self.pivot, *self.ws.sources] if ev.sources else [self.pivot])
            ]
            self._heldout = {
                domain: render_to_fit(
                    convs, self.ws.tokenizer(self.pivot), toks, ev.max_length, SplitReport()
                )
                for domain, convs in self.heldout_conversations().items()
            }
        return self._heldout

    def heldout_conversations(self) -> dict[str, list]:
        """Domain -> held-out conversations, read once: :meth:`run` reads them before the first stage, so that
        a file that is not UTF-8 or holds a malformed row stops the run before extraction, not after training."""
        if self._heldout_convs is None:
            convs = {}
            for domain, items in self.recipe.evaluate.heldout.items():
                convs[domain] = load_data_items(items, self.recipe.data.on_bad_rows)
                if not convs[domain]:
                    raise ConfigError(f"evaluate.heldout.{domain}: no conversations in {items}")
            self._heldout_convs = convs
        return self._heldout_convs

    def heldout_key(self) -> dict[str, str]:
        """Domain -> content hash of its held-out texts, computed once."""
        if self._heldout_key is None:
            from fuselab.data.render import texts_fingerprint

            self._heldout_key = {d: texts_fingerprint(t) for d, t in self.heldout().items()}
        return self._heldout_key

    def eval_path(self, name: str, folder: Path) -> Path:
        from fuselab.utils.hardware import resolve_dtype

        ev = self.recipe.evaluate
        key = _h(
            folder.name if str(folder).startswith(str(self.workdir)) else self.ws.fingerprint(name),
            self.heldout_key(),
            ev.prompts,
            ev.max_new_tokens,
            str(resolve_dtype(ev.dtype, ev.device, what="evaluate.dtype")),  # `auto` as it runs here
            "per-text",  # evaluations hold per-text NLL (the verdict's standard error); older ones are redone
        )
        return self.workdir / "eval" / f"{name}-{key}.json"

    def report_key(self) -> str:
        return _h(
            self.fused_model()[1].name,
            [self.eval_path(n, p).name for n, (p, _) in self.evaluated().items()],
            [self.train_dir(t).name for t in self.trained()],
            self.recipe.model_dump(),
        )

    # -- plan --------------------------------------------------------------------------------------------
    def plan(self) -> list[PlanItem]:
        from fuselab.data.render import encode
        from fuselab.pipelines import estimate as est

        rate = est.flops_per_second(self.recipe.extract.device, self.recipe.extract.dtype)
        cost = {n: est.model_cost(p) for n, p in self.ws.paths.items()}
        items: list[PlanItem] = []
        k = self.recipe.extract.k
        enc = {n: self.ws.encoded(n) for n in self.ws.names}
        tokens = {n: sum(len(e.ids) for e in enc[n]) for n in self.ws.names}
        scored = {n: sum(len(e.predicting_positions()) for e in enc[n]) for n in self.ws.names}
        for n in self.ws.names:
            items.append(
                PlanItem(
                    "extract",
                    n,
                    self.ws.store_dir(n),
                    self.ws.is_extracted(n),
                    est.forward_seconds(cost[n], tokens[n], scored[n], rate),
                    est.store_bytes(scored[n], k),
                )
            )
        piv_tokens, piv_scored = tokens[self.pivot], scored[self.pivot]
        for t in self.target_names():
            d = self.ws.targets_dir(t)
            items.append(
                PlanItem(
                    "align",
                    t,
                    d,
                    (d / "meta.json").exists(),
                    piv_tokens / 20_000,
                    piv_tokens * 5 + est.store_bytes(piv_scored, k * (1 + len(self.ws.sources))),
                )
            )
        tc = self.recipe.train
        n_examples = len(enc[self.pivot])
        per_epoch = math.ceil(n_examples / tc.batch_size)
        steps = tc.max_steps if tc.max_steps > 0 else math.ceil(per_epoch * tc.epochs / tc.grad_accum)
        step_tokens = tokens[self.pivot] / max(n_examples, 1) * tc.batch_size * tc.grad_accum
        for t in self.trained():
            d = self.train_dir(t)
            items.append(
                PlanItem(
                    "train",
                    t,
                    d,
                    _is_model_dir(d),
                    est.train_seconds(cost[self.pivot], int(steps * step_tokens), rate),
                    cost[self.pivot].parameters * 4,
                )
            )
        if self.merges():
            d = self.merged_dir()
            nbytes = cost[self.pivot].parameters * 4
            items.append(
                PlanItem(
                    "merge",
                    self.merged_name(),
                    d,
                    _is_model_dir(d),
                    nbytes * (len(self.target_names()) + 2) / 300e6,
                    nbytes,
                )
            )
        ev = self.recipe.evaluate
        held_counts: dict[
            str, tuple[int, int]
        ] = {}  # tokenizer's model -> (tokens, scored) of all held-out texts
        for name, (folder, kind) in self.evaluated().items():
            reader = name if kind == "source" else self.pivot  # trained models keep the pivot's tokenizer
            if reader not in held_counts:
                tok = self.ws.tokenizer(reader)
                e = [encode(tok, t) for texts in self.heldout().values() for t in texts]
                held_counts[reader] = (
                    sum(len(x.ids) for x in e),
                    sum(len(x.predicting_positions()) for x in e),
                )
            c = cost[reader]
            secs = est.forward_seconds(c, *held_counts[reader], rate) + est.load_seconds(c)
            secs += est.generate_seconds(c, len(ev.prompts) * ev.max_new_tokens, rate)
            p = self.eval_path(name, folder)
            items.append(PlanItem("evaluate", name, p, p.exists(), secs, 2000))
        stamp = self.output / STAMP
        done = stamp.exists() and json.loads(stamp.read_text()).get("key") == self.report_key()
        items.append(PlanItem("report", "report", self.output, done, 5.0, cost[self.pivot].parameters * 4))
        return items

    # -- run ---------------------------------------------------------------------------------------------
    def run(self, from_stage: str | None = None, until: str | None = None) -> FuseResult:
        """Run the stages from the first unfinished one (``from_stage``: rerun it and the later ones) up to
        and including ``until`` (default: all).

        Under ``accelerate launch`` with several processes only the extract stage runs (``until`` must be
        ``extract``): every process extracts its share of the shards (:func:`fuselab.fusion.extract.extract`)
        and the main one holds the locks. The later stages are not split over processes by this command;
        a second, single-process ``fuselab fuse`` finds the extraction cached and runs them."""
        from fuselab.utils.distributed import current_ranks

        for name, value in (("--from", from_stage), ("--until", until)):
            if value is not None and value not in STAGES:
                raise ConfigError(f"unknown stage {value!r} for {name}; valid: {', '.join(STAGES)}")
        ranks = current_ranks()
        if ranks.distributed and (until != "extract" or from_stage is not None):
            raise ConfigError(
                f"`fuselab fuse` under {ranks.count} processes runs only the extract stage: pass `--until "
                "extract` (and no --from; clear a stage in one process first), then run `fuselab fuse` again "
                "in one process for the later stages, which finds the extraction cached"
            )
        self._check_output()
        from fuselab.utils.hardware import check_device

        check_device(self.recipe.extract.device, "extract.device")  # at load, not after the extraction
        check_device(self.recipe.evaluate.device, "evaluate.device")  # nor after training
        if until is None or STAGES.index(until) >= STAGES.index("evaluate"):
            self.heldout_conversations()  # their files are read now, not after training
        if not ranks.is_main:  # a helper of the main process, which holds the locks
            return self._run(from_stage, until, record=False)
        # one run per work folder and output: a second `fuselab fuse` to either fails at once
        with output_lock(self.workdir), output_lock(self.output):
            return self._run(from_stage, until)

    def _run(self, from_stage: str | None, until: str | None = None, *, record: bool = True) -> FuseResult:
        start = time.perf_counter()
        forced = set(STAGES[STAGES.index(from_stage) :]) if from_stage else set()
        result = FuseResult(self.output, self.output / "model", self.output / "report.md")
        last = STAGES.index(until) if until else len(STAGES) - 1
        for stage in STAGES[: last + 1]:
            t0 = time.perf_counter()
            log.info("stage %s%s", stage, " (forced by --from)" if stage in forced else "")
            if stage in forced:
                self._clear(stage)
            ran, skipped = getattr(self, f"_run_{stage}")()
            release_memory()  # the next stage starts without this one's freed heap
            result.ran[stage], result.skipped[stage] = ran, skipped
            result.stage_seconds[stage] = time.perf_counter() - t0
            log.info("%s: ran %s, cached %s (%.1f s)", stage, ran, skipped, result.stage_seconds[stage])
        result.seconds = time.perf_counter() - start
        if not record:
            return result
        with open(
            self.workdir / "runs.jsonl", "a"
        ) as f:  # provenance: what each run did, and how long it took
            f.write(
                json.dumps(
                    {
                        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                        "from": from_stage,
                        "seconds": round(result.seconds, 2),
                        "stage_seconds": {k: round(v, 2) for k, v in result.stage_seconds.items()},
                        "ran": result.ran,
                        "cached": result.skipped,
                    }
                )
                + "\n"
            )
        return result

    def _check_output(self) -> None:
        if self.output.exists() and any(self.output.iterdir()) and not (self.output / STAMP).exists():
            raise OutputExistsError(
                f"output folder {self.output} exists and was not written by `fuselab fuse`; choose another "
                "`output:` (or OUT argument), or remove it"
            )

    def _clear(self, stage: str) -> None:
        if stage == "extract":
            paths = [self.ws.store_dir(n) for n in self.ws.names]
        elif stage == "align":
            paths = [self.ws.targets_dir(t) for t in self.target_names()]
        elif stage == "train":
            paths = [self.train_dir(t) for t in self.trained()]
            paths += [p.with_name(p.name + ".work") for p in paths]
        elif stage == "merge":
            paths = [self.merged_dir()] if self.merges() else []
        elif stage == "evaluate":
            paths = [self.eval_path(n, p) for n, (p, _) in self.evaluated().items()]
        else:
            paths = [self.output / STAMP]
        for p in paths:
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()

    def _run_extract(self) -> tuple[list[str], list[str]]:
        out = self.ws.extract()
        return [n for n, s in out.items() if s is not None], [n for n, s in out.items() if s is None]

    def _run_align(self) -> tuple[list[str], list[str]]:
        before = {t: (self.ws.targets_dir(t) / "meta.json").exists() for t in self.target_names()}
        self.ws.build_targets()
        return [t for t, d in before.items() if not d], [t for t, d in before.items() if d]

    def _run_train(self) -> tuple[list[str], list[str]]:
        from fuselab.fusion import train as fusion_train

        ran, skipped = [], []
        resolved = self.recipe.model_dump()
        for t in self.trained():
            out = self.train_dir(t)
            if _is_model_dir(out):
                skipped.append(t)
                continue
            cfg = self.recipe.train
            overrides = None
            targets = (
                self.ws.targets_dir(t)
                if t != self.baseline_name()
                else self.ws.targets_dir(self.target_names()[0])
            )
            if t == self.baseline_name():
                cfg = cfg.model_copy(update={"lam": 1.0})
                overrides = {"target": t, "sources": []}
            fusion_train.train(
                targets,
                out,
                cfg,
                resolved_recipe=resolved,
                show_progress=self.show_progress,
                meta_overrides=overrides,
            )
            release_memory()
            ran.append(t)
        return ran, skipped

    def _run_merge(self) -> tuple[list[str], list[str]]:
        if not self.merges():
            return [], []
        from fuselab.merge.engine import run_merge

        out = self.merged_dir()
        if _is_model_dir(out):
            return [], [self.merged_name()]
        m = self.recipe.merge
        recipe = {
            "merge_method": m.method,
            "base_model": str(self.ws.paths[self.pivot]),
            "models": [{"model": str(self.train_dir(t))} for t in self.target_names()],
            "parameters": dict(m.parameters),
            "dtype": m.dtype,
        }
        run_merge(recipe, out, force=True, show_progress=self.show_progress)
        return [self.merged_name()], []

    def _run_evaluate(self) -> tuple[list[str], list[str]]:
        import torch

        from fuselab.evaluate.generate import generate_answers
        from fuselab.evaluate.nll import assistant_nll, load_scorer

        ev = self.recipe.evaluate
        ran, skipped = [], []
        encodings: dict[str, dict[str, list]] = {}  # tokenizer files' hash -> domain -> encoded texts
        for name, (folder, kind) in self.evaluated().items():
            path = self.eval_path(name, folder)
            if path.exists():
                skipped.append(name)
                continue
            t0 = time.perf_counter()
            encoded = self._encoded_heldout(folder, encodings)
            scorer = load_scorer(folder, device=ev.device, dtype=ev.dtype)  # one load for NLL and answers
            scores = {
                domain: assistant_nll(
                    folder,
                    texts,
                    batch_tokens=ev.batch_tokens,
                    label=f"{name} {domain}",
                    show_progress=self.show_progress,
                    scorer=scorer,
                    encoded=encoded[domain],
                ).to_json()
                for domain, texts in self.heldout().items()
            }
            # answers come from float32 weights: the scorer's own model when it is float32, else a float32
            # copy loaded after the scorer is gone (both at once set the bf16 demo's peak: Qwen, 6.4 GB)
            model = scorer.model if scorer.model.dtype == torch.float32 else None
            del scorer
            if model is None:
                release_memory()
            answers = (
                generate_answers(
                    folder,
                    ev.prompts,
                    max_new_tokens=ev.max_new_tokens,
                    fallback_template=self.ws.tokenizer(self.pivot),
                    device=ev.device,
                    model=model,
                )
                if ev.prompts
                else []
            )
            del model
            release_memory()
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(
                path,
                {
                    "model": name,
                    "kind": kind,
                    "path": str(folder),
                    "heldout": scores,
                    "answers": answers,
                    "seconds": round(time.perf_counter() - t0, 2),
                },
            )
            ran.append(name)
        return ran, skipped

    def _encoded_heldout(self, folder: Path, cache: dict[str, dict[str, list]]) -> dict[str, list]:
        """The held-out texts encoded with ``folder``'s tokenizer, once per distinct set of tokenizer files
        (the pivot, the SFT baseline, the targets and the merged model all share the pivot's)."""
        from fuselab.data.render import encode
        from fuselab.modeling.tokenizers import load_tokenizer

        h = hashlib.sha256()
        files = [f for f in sorted(folder.glob("*")) if f.name.startswith(("tokenizer", "special_tokens"))]
        for f in files:
            h.update(f.name.encode() + f.read_bytes())
        key = h.hexdigest() if files else str(folder)  # no tokenizer files: never shared
        if key not in cache:
            tok = load_tokenizer(folder)
            cache[key] = {d: [encode(tok, t) for t in texts] for d, texts in self.heldout().items()}
        return cache[key]

    def _run_report(self) -> tuple[list[str], list[str]]:
        from fuselab.pipelines.report import write_report

        key = self.report_key()
        stamp = self.output / STAMP
        if stamp.exists() and json.loads(stamp.read_text()).get("key") == key:
            return [], ["report"]
        evals = {n: json.loads(self.eval_path(n, p).read_text()) for n, (p, _) in self.evaluated().items()}
        logs = {}
        for t in self.trained():
            f = self.train_dir(t) / "training_log.json"
            logs[t] = json.loads(f.read_text()) if f.exists() else {}
        stats = {
            t: json.loads((self.ws.targets_dir(t) / "meta.json").read_text())["stats"]
            for t in self.target_names()
        }
        fused_name, fused_dir = self.fused_model()
        with atomic_output_dir(self.output, force=True) as tmp:
            _link_tree(fused_dir, tmp / "model")
            write_report(
                tmp,
                recipe=self.recipe,
                pivot=self.pivot,
                sources=self.ws.sources,
                fused_name=fused_name,
                evals=evals,
                logs=logs,
                stats=stats,
                workdir=self.workdir,
                baseline=self.baseline_name() if self.recipe.baseline else None,
            )
            (tmp / STAMP).write_text(json.dumps({"key": key, "fused_model": fused_name}, indent=2))
        return ["report"], []


def _link_tree(src: Path, dst: Path) -> None:
    """Hard-link ``src``'s files into ``dst`` (copy across file systems): the work folder keeps its copy."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file():
            try:
                os.link(f, dst / f.name)
            except OSError:
                shutil.copy2(f, dst / f.name)
