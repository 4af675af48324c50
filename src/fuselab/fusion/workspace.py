"""The stages of explicit fusion on disk: texts → top-k stores → fused targets, each cached by content hash.

::

    <workdir>/texts/<hash>.jsonl            rendered texts + assistant byte spans (shared by every model)
    <workdir>/topk/<model>-<hash>/          one top-k store per model (resumable shards)
    <workdir>/targets/<target>-<hash>/      pivot tokens, labels and fused sparse targets (training input)

A key covers everything that determines the output (model fingerprint, tokenizer, template, data, k,
temperature, alignment and fusion settings), so a rerun reuses finished work and a changed input never
reuses stale work. Stores are keyed by content, not row index: the reference pairs pivot and source rows by
position and silently misaligns on any filtering difference (FuseChat spec §9.2 item 11).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fuselab.data.render import Encoded, RenderedText, SplitReport, encode, render_to_fit, texts_fingerprint
from fuselab.fusion.config import FusionRecipe
from fuselab.utils.atomic import atomic_output_dir, atomic_write_text
from fuselab.utils.errors import ConfigError
from fuselab.utils.memory import release_memory

log = logging.getLogger(__name__)


# Bumped whenever the way targets are computed from the same inputs changes, so that an upgrade of fuselab
# never reuses targets built by the previous algorithm (2: prefix mapping, chain rule, projected scores, chunks).
TARGETS_VERSION = 2


def _h(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def default_name(ref: str) -> str:
    return Path(ref.rstrip("/")).name or ref


def load_data_items(items, on_bad_rows: str = "error", report=None) -> list:
    """Conversations of recipe data items: paths, ``bundled:<domain>.<split>`` or ``{path, limit}``."""
    from fuselab.data.bundled import bundled_path
    from fuselab.data.conversations import load_conversations
    from fuselab.fusion.config import DataFile

    convs = []
    for item in items:
        spec = item if isinstance(item, DataFile) else DataFile(path=item)
        if spec.path.startswith("bundled:"):
            path = bundled_path(spec.path.removeprefix("bundled:") + ".jsonl")
        else:
            path = Path(spec.path)
        rows = load_conversations([path], on_error=on_bad_rows, report=report)
        convs.extend(rows[: spec.limit] if spec.limit else rows)
    return convs


def load_training_conversations(recipe: FusionRecipe, report=None):
    convs = load_data_items(recipe.data.train, recipe.data.on_bad_rows, report)
    return convs[: recipe.data.limit] if recipe.data.limit else convs


@dataclass
class FusedTargets:
    """Training input for one target model, memory-mapped from a targets folder."""

    root: Path
    tokens: np.ndarray  # int32, all examples' pivot ids concatenated
    tok_offsets: np.ndarray  # int64 [E+1]
    supervised: np.ndarray  # bool, like tokens
    target_ids: np.ndarray  # int32 [N, K]
    target_logp: np.ndarray  # float16 [N, K]
    tgt_offsets: np.ndarray  # int64 [E+1]
    meta: dict[str, Any]
    chunk_ids: np.ndarray | None = None  # int32 [N]: chunk of each target row within its example (-1: none)
    chunk_logp: np.ndarray | None = None  # float32 [C]: the teacher's log-likelihood of each chunk
    chunk_offsets: np.ndarray | None = None  # int64 [E+1]

    @classmethod
    def open(cls, root: str | Path) -> FusedTargets:
        root = Path(root)
        if not (root / "meta.json").exists():
            raise ConfigError(f"{root} holds no fused targets; run `fuselab fusion align` first")
        arr = {
            n: np.load(root / f"{n}.npy", mmap_mode="r")
            for n in ("tokens", "supervised", "target_ids", "target_logp")
        }
        chunks = {}
        if (root / "chunk_ids.npy").exists():
            chunks = {
                "chunk_ids": np.load(root / "chunk_ids.npy", mmap_mode="r"),
                "chunk_logp": np.load(root / "chunk_logp.npy", mmap_mode="r"),
                "chunk_offsets": np.load(root / "chunk_offsets.npy"),
            }
        return cls(
            root=root,
            tok_offsets=np.load(root / "tok_offsets.npy"),
            tgt_offsets=np.load(root / "tgt_offsets.npy"),
            meta=json.loads((root / "meta.json").read_text()),
            **arr,
            **chunks,
        )

    def __len__(self) -> int:
        return len(self.tok_offsets) - 1

    def example(self, i: int) -> dict[str, np.ndarray]:
        a, b = int(self.tok_offsets[i]), int(self.tok_offsets[i + 1])
        c, d = int(self.tgt_offsets[i]), int(self.tgt_offsets[i + 1])
        out = {
            "input_ids": np.asarray(self.tokens[a:b], dtype=np.int64),
            "supervised": np.asarray(self.supervised[a:b]),
            "target_ids": np.asarray(self.target_ids[c:d], dtype=np.int64),
            "target_logp": np.asarray(self.target_logp[c:d], dtype=np.float32),
        }
        if self.chunk_ids is not None:
            e, f = int(self.chunk_offsets[i]), int(self.chunk_offsets[i + 1])
            out["chunk_ids"] = np.asarray(self.chunk_ids[c:d], dtype=np.int64)
            out["chunk_logp"] = np.array(self.chunk_logp[e:f], dtype=np.float32)  # a writable copy
        return out


class Workspace:
    """Runs and caches the stages of one recipe."""

    def __init__(
        self,
        recipe: FusionRecipe,
        workdir: str | Path,
        *,
        show_progress: bool = True,
        persist: bool = True,
        resolved: dict[str, Path] | None = None,
    ) -> None:
        """``persist=False`` computes keys without writing anything (``fuselab fuse --dry-run``);
        ``resolved`` maps model references to folders already resolved (nothing is fetched for them)."""
        from fuselab.modeling.resolve import resolve_model

        self.recipe = recipe
        self.workdir = Path(workdir)
        self.show_progress = show_progress
        self.persist = persist
        names = dict(recipe.names or {})
        refs = [recipe.pivot, *recipe.sources]
        self.names = [names.get(r, default_name(r)) for r in refs]
        if len(set(self.names)) != len(self.names):
            raise ConfigError(
                f"two models share the name {self.names}; give them distinct names under `names:`"
            )
        self.refs = dict(zip(self.names, refs))
        resolved = resolved or {}
        self.paths = {n: resolved.get(r) or resolve_model(r) for n, r in zip(self.names, refs)}
        self.pivot = self.names[0]
        self.sources = self.names[1:]
        self._tokenizers: dict[str, Any] = {}
        self._texts: list[RenderedText] | None = None
        self._encoded: dict[str, list[Encoded]] = {}
        self._fingerprints: dict[str, str] = {}
        self._texts_key: str | None = None
        self._domains: list[str] | None = None

    # -- models ------------------------------------------------------------------------------------------
    def tokenizer(self, name: str):
        from fuselab.modeling.tokenizers import load_tokenizer

        if name not in self._tokenizers:
            self._tokenizers[name] = load_tokenizer(self.paths[name])
        return self._tokenizers[name]

    def fingerprint(self, name: str) -> str:
        """Read once per model: it hashes config, tokenizer and the edges of every weight file."""
        from fuselab.modeling.fingerprint import model_fingerprint

        if name not in self._fingerprints:
            self._fingerprints[name] = model_fingerprint(self.paths[name])
        return self._fingerprints[name]

    # -- texts -------------------------------------------------------------------------------------------
    def texts(self) -> list[RenderedText]:
        if self._texts is not None:
            return self._texts
        from fuselab.data.conversations import LoadReport
        from fuselab.modeling.fingerprint import tokenizer_fingerprint

        report = LoadReport()
        convs = load_training_conversations(self.recipe, report)
        tpl = self.recipe.data.template
        tpl_name = self.pivot if tpl == "pivot" else tpl
        if tpl_name in self.paths:
            tpl_path = self.paths[tpl_name]
        else:
            from fuselab.modeling.resolve import resolve_model

            tpl_path = resolve_model(tpl)
        key = _h(
            [c.fingerprint() for c in convs],
            tokenizer_fingerprint(tpl_path),
            [tokenizer_fingerprint(self.paths[n]) for n in self.names],
            self.recipe.data.max_length,
        )
        path = self.workdir / "texts" / f"{key}.jsonl"
        if path.exists():
            self._texts = [RenderedText.from_json(json.loads(line)) for line in path.open()]
            return self._texts
        from fuselab.modeling.tokenizers import load_tokenizer

        split = SplitReport()
        template_tok = self.tokenizer(tpl_name) if tpl_name in self.paths else load_tokenizer(tpl_path)
        texts = render_to_fit(
            convs, template_tok, [self.tokenizer(n) for n in self.names], self.recipe.data.max_length, split
        )
        log.info("data: %s; %s", report.summary(), split.summary())
        if self.persist:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(
                path, "".join(json.dumps(t.to_json(), ensure_ascii=False) + "\n" for t in texts)
            )
        self._texts = texts
        return texts

    def text_domains(self) -> list[str]:
        """The domain of each training text, for per-domain diagnostics: the row's ``domain`` field, else the
        data item it came from (``bundled:code.train`` -> ``code``, a file -> its stem)."""
        from fuselab.fusion.config import DataFile

        if self._domains is None:
            of: dict[str, str] = {}
            for item in self.recipe.data.train:
                spec = item if isinstance(item, DataFile) else DataFile(path=item)
                label = (
                    spec.path.removeprefix("bundled:").split(".")[0]
                    if spec.path.startswith("bundled:")
                    else Path(spec.path).stem
                )
                for c in load_data_items([spec], self.recipe.data.on_bad_rows):
                    of.setdefault(c.id, str(c.metadata.get("domain") or label))
            self._domains = [of.get(t.id) or of.get(t.id.rsplit("#", 1)[0], "all") for t in self.texts()]
        return self._domains

    def texts_key(self) -> str:
        """Content hash of the rendered texts, computed once."""
        if self._texts_key is None:
            self._texts_key = texts_fingerprint(self.texts())
        return self._texts_key

    def encoded(self, name: str) -> list[Encoded]:
        if name not in self._encoded:
            tok = self.tokenizer(name)
            self._encoded[name] = [encode(tok, t) for t in self.texts()]
        return self._encoded[name]

    # -- extraction --------------------------------------------------------------------------------------
    def extract_settings(self):
        from fuselab.fusion.extract import ExtractSettings

        return ExtractSettings(**self.recipe.extract.model_dump())

    def store_dir(self, name: str) -> Path:
        s = self.extract_settings()
        key = _h(self.fingerprint(name), self.texts_key(), s.store_meta())
        return self.workdir / "topk" / f"{name}-{key}"

    def is_extracted(self, name: str) -> bool:
        """Whether the store is complete and every shard it records is whole: a damaged shard (a half
        ``logp.npy``) sends the store back to :meth:`extract`, which extracts that shard again."""
        from fuselab.fusion.store import damaged_shards

        directory = self.store_dir(name)
        manifest = directory / "manifest.json"
        if not manifest.exists():
            return False
        recorded = json.loads(manifest.read_text())
        if not recorded.get("complete"):
            return False
        return not damaged_shards(directory, recorded)  # extract() warns, naming each damaged file

    def extract(self, names: list[str] | None = None) -> dict[str, Any]:
        from fuselab.fusion.extract import extract

        out = {}
        for name in names or self.names:
            directory = self.store_dir(name)
            if self.is_extracted(name):
                out[name] = None
                continue
            out[name] = extract(
                self.paths[name],
                self.texts(),
                directory,
                self.extract_settings(),
                label=name,
                show_progress=self.show_progress,
                encoded=self.encoded(name),
            )
            release_memory()  # the next model starts without this one's freed heap
        return out

    def store(self, name: str):
        from fuselab.fusion.extract import open_store

        return open_store(self.store_dir(name), self.extract_settings(), len(self.texts()))

    # -- alignment and fusion ----------------------------------------------------------------------------
    def target_groups(self) -> dict[str, list[str]]:
        """Target name -> its sources: one per source (pairwise) or one with all (multi)."""
        if self.recipe.fuse.mode == "pairwise":
            return {f"{self.pivot}+{s}": [s] for s in self.sources}
        return {f"{self.pivot}+multi": list(self.sources)}

    def targets_dir(self, target: str) -> Path:
        srcs = self.target_groups()[target]
        key = _h(
            [self.store_dir(n).name for n in [self.pivot, *srcs]],  # names: a moved work folder stays valid
            self.recipe.align.model_dump(),
            self.recipe.fuse.model_dump(),
            TARGETS_VERSION,
        )
        return self.workdir / "targets" / f"{target}-{key}"

    def build_targets(self) -> dict[str, dict[str, Any]]:
        out = {}
        for target, srcs in self.target_groups().items():
            directory = self.targets_dir(target)
            if (directory / "meta.json").exists():
                out[target] = json.loads((directory / "meta.json").read_text())["stats"]
                continue
            out[target] = self._build(target, srcs, directory)
        return out

    def _source_setup(self, s: str) -> dict[str, Any]:
        """Sequence alignment, vocabulary map and the special ids it lacks, for one source."""
        from fuselab.data.token_spans import vocabulary
        from fuselab.fusion.align.sequence import align_sequences
        from fuselab.fusion.align.vocab import build_vocab_map, count_pairs, tokenizer_encoder
        from fuselab.utils.progress import progress

        texts = self.texts()
        pv = vocabulary(self.tokenizer(self.pivot))
        piv_enc = self.encoded(self.pivot)
        sv = vocabulary(self.tokenizer(s))
        enc = self.encoded(s)
        store = self.store(s)
        seq_method, map_method = self.recipe.align.sequence, self.recipe.align.vocab
        alignments, coverage = [], Counter()
        for i in progress(range(len(texts)), desc=f"align {s}", disable=not self.show_progress):
            a = align_sequences(seq_method, piv_enc[i], enc[i], pv, sv)
            alignments.append(a.donor)
            coverage.update(a.coverage)
        needed = np.unique(np.concatenate([np.asarray(store[i].ids).ravel() for i in range(len(texts))]))
        pairs = None
        if map_method == "statistics":
            pairs = count_pairs(
                (
                    (
                        enc[i].ids[enc[i].predicting_positions()[alignments[i][alignments[i] >= 0]] + 1],
                        piv_enc[i].ids[piv_enc[i].predicting_positions()[alignments[i] >= 0] + 1],
                    )
                    for i in range(len(texts))
                ),
                len(pv),
            )
        vmap = build_vocab_map(
            map_method,
            sv,
            pv,
            needed=needed,
            pair_counts=pairs,
            pivot_encode=tokenizer_encoder(self.tokenizer(self.pivot)),
        )
        src_special = {sv.surfaces[i] for i in sv.special}
        lacking = np.zeros(len(pv), dtype=bool)
        for i in pv.special:
            lacking[i] = pv.surfaces[i] not in src_special
        stats = {"coverage": dict(coverage), "vocab": {**vmap.stats(needed.tolist()), **vmap.routes}}
        return {"store": store, "enc": enc, "vocab": sv, "alignments": alignments, "map": vmap,
                "lacking": lacking, "stats": stats}  # fmt: skip

    def _build(self, target: str, srcs: list[str], directory: Path) -> dict[str, Any]:
        from fuselab.fusion.align.chunks import source_chunks, token_chunks
        from fuselab.fusion.align.gold_path import gold_path
        from fuselab.fusion.align.project import Projected, project, summarize_counts
        from fuselab.fusion.fuse import Candidate, fuse, per_byte_nll, projected_scores
        from fuselab.utils.progress import progress

        texts = self.texts()
        domains = self.text_domains()
        piv_enc = self.encoded(self.pivot)
        piv_store = self.store(self.pivot)
        vocab_size = int(self._vocab_size(self.pivot))
        align, fuse_cfg = self.recipe.align, self.recipe.fuse
        per_source = {s: self._source_setup(s) for s in srcs}
        counts = {s: Counter() for s in srcs}
        by_domain = {s: {} for s in srcs}
        stats: dict[str, Any] = {"examples": len(texts), "sources": {s: per_source[s]["stats"] for s in srcs}}
        choices: Counter = Counter()
        with atomic_output_dir(directory, force=True) as tmp:
            tokens, supervised, tok_off = [], [], [0]
            t_ids, t_logp, tgt_off = [], [], [0]
            c_ids, c_logp, c_off = [], [], [0]
            for i in progress(range(len(texts)), desc=f"fuse {target}", disable=not self.show_progress):
                pe = piv_enc[i]
                pos = pe.predicting_positions()
                gold = pe.ids[pos + 1]
                gold_bytes = pe.spans.ends[pos + 1] - pe.spans.starts[pos + 1]
                sup_bytes = texts[i].supervised_bytes
                data = texts[i].text.encode("utf-8")
                cands, own, chunks = [], [], []
                if fuse_cfg.include_pivot:
                    row = piv_store[i]
                    dist = Projected(
                        np.asarray(row.ids, np.int64),
                        np.asarray(row.logp, np.float32),
                        np.zeros(len(pos), bool),
                    )
                    cands.append(Candidate(self.pivot, dist, 0.0))
                    own.append(per_byte_nll(row.gold_nll, sup_bytes))
                    chunks.append(lambda row=row: token_chunks(row.gold_nll))
                for s in srcs:
                    src = per_source[s]
                    row = src["store"][i]
                    donor = src["alignments"][i]
                    path = None
                    if align.chain_rule:
                        path = gold_path(
                            pe, src["enc"][i], donor, np.asarray(row.ids), np.asarray(row.logp),
                            np.asarray(row.gold_nll), src["vocab"], data,
                        )  # fmt: skip
                    local = Counter()
                    dist = project(
                        np.asarray(row.ids),
                        np.asarray(row.logp),
                        donor,
                        gold,
                        src["map"],
                        unsupported_gold=src["lacking"][gold],
                        counts=local,
                        path=path,
                        dropped_mass=align.dropped_mass,
                    )
                    counts[s].update(local)
                    by_domain[s].setdefault(domains[i], Counter()).update(local)
                    cands.append(Candidate(s, dist, 0.0))
                    own.append(per_byte_nll(row.gold_nll, sup_bytes))
                    chunks.append(
                        lambda pe=pe, enc=src["enc"][i], row=row: source_chunks(
                            pe, enc, np.asarray(row.gold_nll)
                        )
                    )
                if fuse_cfg.score == "projected":
                    scores = projected_scores([c.dist for c in cands], gold, vocab_size, gold_bytes)
                else:
                    scores = np.asarray(own, dtype=np.float64)
                for c, sc in zip(cands, scores.tolist()):
                    c.score = sc
                fused = fuse(fuse_cfg.function, cands, gold, vocab_size, choices)
                # the chunk-level loss (train.loss: alm) learns from the sequence's best-scored candidate
                chunk_of_row, chunk_lp = chunks[int(np.argmin(scores))]()
                tokens.append(pe.ids.astype(np.int32))
                supervised.append(pe.supervised)
                tok_off.append(tok_off[-1] + len(pe.ids))
                t_ids.append(fused.ids)
                t_logp.append(fused.logp)
                tgt_off.append(tgt_off[-1] + len(pos))
                c_ids.append(chunk_of_row.astype(np.int32))
                c_logp.append(chunk_lp.astype(np.float32))
                c_off.append(c_off[-1] + len(chunk_lp))
            width = max(x.shape[1] for x in t_ids)
            pad = lambda a, v: np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=v)  # noqa: E731
            np.save(tmp / "tokens.npy", np.concatenate(tokens))
            np.save(tmp / "supervised.npy", np.concatenate(supervised))
            np.save(tmp / "tok_offsets.npy", np.asarray(tok_off, np.int64))
            np.save(tmp / "target_ids.npy", np.concatenate([pad(x, -1) for x in t_ids]).astype(np.int32))
            np.save(
                tmp / "target_logp.npy", np.concatenate([pad(x, -np.inf) for x in t_logp]).astype(np.float16)
            )
            np.save(tmp / "tgt_offsets.npy", np.asarray(tgt_off, np.int64))
            np.save(tmp / "chunk_ids.npy", np.concatenate(c_ids))
            np.save(tmp / "chunk_logp.npy", np.concatenate(c_logp) if c_logp else np.zeros(0, np.float32))
            np.save(tmp / "chunk_offsets.npy", np.asarray(c_off, np.int64))
            for s in srcs:
                stats["sources"][s]["projection"] = dict(counts[s])
                stats["sources"][s]["targets"] = summarize_counts(counts[s])
                stats["sources"][s]["targets_by_domain"] = {
                    d: summarize_counts(c) for d, c in sorted(by_domain[s].items())
                }
            stats["choices"] = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in choices.items()}
            stats["chunks"] = {
                "chunks": int(c_off[-1]),
                "rows in a chunk": int(sum((x >= 0).sum() for x in c_ids)),
            }
            meta = {
                "target": target,
                "pivot": self.pivot,
                "sources": srcs,
                "pivot_path": str(self.paths[self.pivot]),
                "align": self.recipe.align.model_dump(),
                "fuse": self.recipe.fuse.model_dump(),
                "stats": stats,
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        return stats

    def _vocab_size(self, name: str) -> int:
        cfg = json.loads((self.paths[name] / "config.json").read_text())
        text = cfg.get("text_config", cfg)
        return int(text.get("vocab_size") or cfg.get("vocab_size"))
