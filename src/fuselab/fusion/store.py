"""On-disk store of per-token top-k distributions: memory-mapped shards plus a manifest.

Only supervised positions are stored (FuseChat spec §10 item 7): for each one, the top-k token ids (int32),
their log-probabilities normalised over the *full* vocabulary (fp16; the reference keeps raw logits and later
renormalises over the k kept entries, which makes the target over-confident), and the gold token's NLL (fp16,
what MinCE scores sequences with). At k = 10 that is 4·10 + 2·10 + 2 = 62 bytes per supervised token.

A shard is a folder of ``.npy`` files written under a temporary name and renamed when complete, then
recorded in ``manifest.json``; an interrupted extraction resumes at the shards it lacks, and a half-written
shard never looks complete. Under ``accelerate launch`` every process writes its own shards and only the main
process writes the manifest; it lists the shards in shard order, so the finished store is the same, byte for
byte, whichever number of processes wrote it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fuselab.utils.atomic import atomic_write_json
from fuselab.utils.errors import FuselabError

log = logging.getLogger(__name__)

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


SHARD_FILES = ("examples", "offsets", "ids", "logp", "gold_nll")


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, dtype and data offset of a ``.npy`` file, from its header alone."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        return shape, dtype, f.tell()


def shard_problem(folder: str | Path, k: int, entry: dict[str, Any] | None = None) -> str | None:
    """What is wrong with the files of the shard ``folder``, or None when they are whole.

    Each ``.npy`` file must hold the bytes its header promises (a half-written or truncated file does not),
    the shapes must agree with each other and with ``k``, and with the manifest's ``entry`` when given.
    Reads the headers and the last offset only (issue 16: a half ``logp.npy`` was "already extracted")."""
    folder = Path(folder)
    shapes: dict[str, tuple[int, ...]] = {}
    for n in SHARD_FILES:
        f = folder / f"{n}.npy"
        try:
            shape, dtype, start = _npy_header(f)
            size = f.stat().st_size
        except FileNotFoundError:
            return f"{f} is missing"
        except (OSError, ValueError, EOFError) as err:
            return f"{f} has no readable .npy header ({err})"
        need = start + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if size < need:
            return f"{f} is truncated: {size} bytes, where its header ({dtype} {shape}) needs {need}"
        shapes[n] = shape
    examples = shapes["examples"][0] if len(shapes["examples"]) == 1 else -1
    try:
        offsets = np.load(folder / "offsets.npy", mmap_mode="r")
        tokens = int(offsets[-1]) if offsets.ndim == 1 and len(offsets) else -1
    except (OSError, ValueError) as err:
        return f"{folder / 'offsets.npy'} cannot be read ({err})"
    want = {
        "offsets": (examples + 1,),
        "ids": (tokens, k),
        "logp": (tokens, k),
        "gold_nll": (tokens,),
    }
    for n, shape in want.items():
        if shapes[n] != shape:
            return (
                f"{folder / f'{n}.npy'} has shape {shapes[n]} where the shard's {examples} examples and "
                f"{tokens} tokens at k = {k} need {shape}"
            )
    if entry is not None and (entry.get("examples"), entry.get("tokens")) != (examples, tokens):
        return (
            f"{folder} holds {examples} examples and {tokens} tokens, but the manifest records "
            f"{entry.get('examples')} and {entry.get('tokens')}"
        )
    return None


def damaged_shards(root: str | Path, manifest: dict[str, Any]) -> list[str]:
    """What is wrong with each shard the manifest records (empty when every one is whole)."""
    k = int(manifest["meta"]["k"])
    found = (shard_problem(Path(root) / s["name"], k, s) for s in manifest.get("shards", []))
    return [p for p in found if p is not None]


def shard_entry(root: str | Path, name: str, example_indices: list[int], k: int) -> dict[str, Any] | None:
    """The manifest entry of shard ``name`` if its folder in ``root`` is complete and holds exactly
    ``example_indices`` (in that order) at ``k`` candidates, else None.

    Why the folder is enough: a shard folder appears only by renaming a temporary folder whose files were all
    written, so its presence means it is whole. That lets several processes write shards without sharing the
    manifest, and lets any later run (with one process or many) take over the shards a crashed run finished.
    Checking the example indices against the plan keeps a shard planned differently (another
    ``shard_tokens``) from being mistaken for this one; only headers are read, so it costs little. A folder
    whose files were damaged afterwards (a full disk, a copy cut short) is not whole either
    (:func:`shard_problem`): it counts as missing, so it is extracted again, with a warning."""
    folder = Path(root) / name
    if not folder.is_dir():
        return None
    problem = shard_problem(folder, k)
    if problem is not None:
        log.warning("%s; extracting shard %s again", problem, name)
        return None
    examples = np.load(folder / "examples.npy")
    if examples.tolist() != list(example_indices):
        return None
    return {"name": name, "examples": len(examples), "tokens": int(np.load(folder / "offsets.npy")[-1])}


def remove_leftovers(root: str | Path, names: Iterable[str] | None = None) -> None:
    """Delete the temporary folders a crash left behind: those of the shards in ``names`` (all when None).
    With several processes each removes only its own shards' leftovers, never a folder another is writing."""
    root = Path(root)
    patterns = [".shard-*.tmp-*"] if names is None else [f".{n}.tmp-*" for n in names]
    for pattern in patterns:
        for leftover in root.glob(pattern):
            shutil.rmtree(leftover, ignore_errors=True)


def write_shard_files(
    root: str | Path, name: str, example_indices: list[int], rows: list[ExampleTopK], k: int
) -> dict[str, Any]:
    """Write shard ``name`` into ``root`` (complete or not at all) and return its manifest entry; the
    manifest itself is left to the one process that keeps it (:class:`TopKStoreWriter`)."""
    if len(example_indices) != len(rows):
        raise ValueError("one row per example index")
    root = Path(root)
    lengths = np.array([len(r.gold_nll) for r in rows], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    total = int(offsets[-1])
    ids = np.concatenate([r.ids for r in rows]) if total else np.zeros((0, k), np.int32)
    logp = np.concatenate([r.logp for r in rows]) if total else np.zeros((0, k), np.float16)
    gold = np.concatenate([r.gold_nll for r in rows]) if total else np.zeros(0, np.float16)
    tmp = root / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        np.save(tmp / "examples.npy", np.asarray(example_indices, dtype=np.int64))
        np.save(tmp / "offsets.npy", offsets)
        np.save(tmp / "ids.npy", ids.astype(np.int32, copy=False))
        np.save(tmp / "logp.npy", logp.astype(np.float16, copy=False))
        np.save(tmp / "gold_nll.npy", gold.astype(np.float16, copy=False))
        final = root / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"name": name, "examples": len(rows), "tokens": total}


def read_manifest(root: str | Path) -> dict[str, Any] | None:
    path = Path(root) / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None


def check_meta(root: str | Path, manifest: dict[str, Any] | None, meta: dict[str, Any]) -> None:
    if manifest is not None and manifest.get("meta") != meta:
        raise StoreError(
            f"{root} holds a store made with other settings; delete it or use another folder "
            f"(stored: {manifest.get('meta')}, asked: {meta})"
        )


class TopKStoreWriter:
    """Writes shards into ``root`` and keeps ``manifest.json`` current (resumable).

    With several processes only the main one holds a writer (the manifest has one author); the others write
    their shards with :func:`write_shard_files` and the main one records them (:meth:`adopt`)."""

    def __init__(
        self, root: str | Path, meta: dict[str, Any], *, leftovers: Iterable[str] | None = None
    ) -> None:
        """``leftovers``: the shards whose crash leftovers to delete (None: every shard's)."""
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / MANIFEST
        manifest = read_manifest(self.root)
        check_meta(self.root, manifest, meta)
        if manifest is not None:
            self.manifest = manifest
        else:
            self.manifest = {"format": FORMAT_VERSION, "meta": meta, "shards": [], "complete": False}
            atomic_write_json(path, self.manifest)
        # Leftovers of a crash: temporary shard folders are never part of the store.
        remove_leftovers(self.root, leftovers)

    def has_shard(self, name: str) -> bool:
        return any(s["name"] == name for s in self.manifest["shards"])

    def write_shard(
        self, name: str, example_indices: list[int], rows: list[ExampleTopK], stats: dict[str, Any]
    ) -> None:
        entry = write_shard_files(self.root, name, example_indices, rows, int(self.manifest["meta"]["k"]))
        self._record([{**entry, **stats}])

    def reconcile(self, plan: list[tuple[str, list[int]]]) -> None:
        """Make the manifest agree with the folders for this shard plan: forget recorded shards whose folder
        is missing or was planned differently, record complete shard folders the manifest lacks (written by
        another process, or by a run that crashed between the rename and the manifest), and delete shard
        folders the plan does not have (left by a plan with other ``shard_tokens``)."""
        k = int(self.manifest["meta"]["k"])
        planned = dict(plan)
        kept, changed = [], False
        for entry in self.manifest["shards"]:
            if entry["name"] in planned and shard_entry(self.root, entry["name"], planned[entry["name"]], k):
                kept.append(entry)
            else:
                changed = True
        self.manifest["shards"] = kept
        if changed:  # a forgotten shard is extracted again: until then the store is not complete
            self.manifest["complete"] = False
        for folder in self.root.glob("shard-*"):
            if folder.name not in planned and folder.is_dir():
                shutil.rmtree(folder, ignore_errors=True)
        if changed:
            atomic_write_json(self.root / MANIFEST, self.manifest)
        self.adopt(plan)

    def adopt(self, plan: list[tuple[str, list[int]]]) -> list[str]:
        """Record the complete shard folders of ``plan`` that the manifest lacks; return those still missing."""
        k = int(self.manifest["meta"]["k"])
        found, missing = [], []
        for name, indices in plan:
            if self.has_shard(name):
                continue
            entry = shard_entry(self.root, name, indices, k)
            (found if entry else missing).append(entry or name)
        if found:
            self._record(found)
        return missing

    def _record(self, entries: list[dict[str, Any]]) -> None:
        self.manifest["shards"].extend(entries)
        atomic_write_json(self.root / MANIFEST, self.manifest)

    def finish(self, summary: dict[str, Any]) -> None:
        # In shard order, whichever process finished which shard first.
        self.manifest["shards"].sort(key=lambda s: s["name"])
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
        damaged = damaged_shards(self.root, self.manifest)
        if damaged:
            raise StoreError(
                f"the store in {self.root} has {len(damaged)} damaged shard(s): {damaged[0]}; rerun the same "
                "`fuselab fusion extract` (or `fuselab fuse`) command: it extracts the damaged shards again and "
                "keeps the others"
            )
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
