"""On-disk store of per-token top-k distributions: memory-mapped shards plus a manifest.

Only supervised positions are stored (FuseChat spec §10 item 7): for each one, the top-k token ids (int32),
their log-probabilities normalised over the *full* vocabulary (fp16; the reference keeps raw logits and later
renormalises over the k kept entries, which makes the target over-confident), and the gold token's NLL (fp16,
what MinCE scores sequences with). At k = 10 that is 4·10 + 2·10 + 2 = 62 bytes per supervised token.

A shard is a folder of ``.npy`` files written under a temporary name and renamed when complete, then
recorded in ``manifest.json``; an interrupted extraction resumes at the first shard the manifest lacks, and a
half-written shard never looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fuselab.utils.atomic import atomic_write_json
from fuselab.utils.errors import FuselabError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class StoreError(FuselabError):
    """A top-k store is missing, incomplete or does not match what was asked for."""


@dataclass(frozen=True)
class ExampleTopK:
    """The stored distributions of one example, at its predicting positions, in order."""

    ids: np.ndarray  # int32 [n, k]
    logp: np.ndarray  # float16 [n, k], log-probabilities over the full vocabulary, descending
    gold_nll: np.ndarray  # float16 [n]


class TopKStoreWriter:
    """Writes shards into ``root`` and keeps ``manifest.json`` current (resumable)."""

    def __init__(self, root: str | Path, meta: dict[str, Any]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / MANIFEST
        if path.exists():
            manifest = json.loads(path.read_text())
            if manifest.get("meta") != meta:
                raise StoreError(
                    f"{self.root} holds a store made with other settings; delete it or use another folder "
                    f"(stored: {manifest.get('meta')}, asked: {meta})"
                )
            self.manifest = manifest
        else:
            self.manifest = {"format": FORMAT_VERSION, "meta": meta, "shards": [], "complete": False}
            atomic_write_json(path, self.manifest)
        # Leftovers of a crash: temporary shard folders are never part of the store.
        for leftover in self.root.glob(".shard-*.tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)

    def has_shard(self, name: str) -> bool:
        return any(s["name"] == name for s in self.manifest["shards"])

    def write_shard(
        self, name: str, example_indices: list[int], rows: list[ExampleTopK], stats: dict[str, Any]
    ) -> None:
        if len(example_indices) != len(rows):
            raise ValueError("one row per example index")
        k = int(self.manifest["meta"]["k"])
        lengths = np.array([len(r.gold_nll) for r in rows], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        total = int(offsets[-1])
        ids = np.concatenate([r.ids for r in rows]) if total else np.zeros((0, k), np.int32)
        logp = np.concatenate([r.logp for r in rows]) if total else np.zeros((0, k), np.float16)
        gold = np.concatenate([r.gold_nll for r in rows]) if total else np.zeros(0, np.float16)
        tmp = self.root / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            np.save(tmp / "examples.npy", np.asarray(example_indices, dtype=np.int64))
            np.save(tmp / "offsets.npy", offsets)
            np.save(tmp / "ids.npy", ids.astype(np.int32, copy=False))
            np.save(tmp / "logp.npy", logp.astype(np.float16, copy=False))
            np.save(tmp / "gold_nll.npy", gold.astype(np.float16, copy=False))
            final = self.root / name
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.manifest["shards"].append({"name": name, "examples": len(rows), "tokens": total, **stats})
        atomic_write_json(self.root / MANIFEST, self.manifest)

    def finish(self, summary: dict[str, Any]) -> None:
        self.manifest["complete"] = True
        self.manifest["summary"] = summary
        atomic_write_json(self.root / MANIFEST, self.manifest)


class TopKStore:
    """Read access to a complete store: ``store[i]`` is example i's :class:`ExampleTopK` (memory-mapped)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        path = self.root / MANIFEST
        if not path.exists():
            raise StoreError(
                f"{self.root} is not a top-k store (no {MANIFEST}); run `fuselab fusion extract`"
            )
        self.manifest = json.loads(path.read_text())
        if not self.manifest.get("complete"):
            raise StoreError(
                f"the store in {self.root} is incomplete (extraction was interrupted); rerun the same "
                "`fuselab fusion extract` command to resume it"
            )
        self.meta: dict[str, Any] = self.manifest["meta"]
        self._shards: list[dict[str, np.ndarray]] = []
        self._where: dict[int, tuple[int, int]] = {}
        for s, shard in enumerate(self.manifest["shards"]):
            folder = self.root / shard["name"]
            arrays = {n: np.load(folder / f"{n}.npy", mmap_mode="r") for n in ("ids", "logp", "gold_nll")}
            arrays["offsets"] = np.load(folder / "offsets.npy")
            examples = np.load(folder / "examples.npy")
            self._shards.append(arrays)
            for row, ex in enumerate(examples.tolist()):
                self._where[ex] = (s, row)

    @property
    def k(self) -> int:
        return int(self.meta["k"])

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, index: int) -> bool:
        return index in self._where

    def __getitem__(self, index: int) -> ExampleTopK:
        try:
            s, row = self._where[index]
        except KeyError:
            raise StoreError(f"example {index} is not in the store {self.root}") from None
        arrays = self._shards[s]
        a, b = int(arrays["offsets"][row]), int(arrays["offsets"][row + 1])
        return ExampleTopK(ids=arrays["ids"][a:b], logp=arrays["logp"][a:b], gold_nll=arrays["gold_nll"][a:b])
