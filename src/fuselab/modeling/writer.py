"""Streaming writer of sharded safetensors checkpoints.

Because every output tensor's name, dtype and shape are known before the first one is computed, each shard's
header can be written up front and tensors streamed into place as they are produced: no shard is ever
buffered in memory. The files follow the Hugging Face conventions (``model.safetensors`` or
``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``), so stock ``transformers`` loads
them.
"""

from __future__ import annotations

import json
import queue
import re
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from fuselab.modeling.checkpoint import DTYPE_TO_SAFETENSORS
from fuselab.utils.errors import FuselabError

_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
}


def parse_size(text: str | int) -> int:
    """'2GB' -> 2_000_000_000; '500MiB' -> 524_288_000; an int is bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)([KMGT]I?B|B)?", text.strip().upper().replace(" ", ""))
    if not m:
        raise ValueError(f"cannot read size {text!r}; write e.g. 2GB, 500MB or 512MiB")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2) or ""])


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


def _split_into_shards(specs: Sequence[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def _header_bytes(specs: Sequence[TensorSpec], metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for spec in specs:
        header[spec.name] = {
            "dtype": DTYPE_TO_SAFETENSORS[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


class ShardedSafetensorsWriter:
    """Write ``specs`` (in that order) into shards of at most ``max_shard_bytes`` (a larger tensor gets its own).

    Call :meth:`write` once per tensor, in plan order, then :meth:`finish`.
    """

    def __init__(
        self,
        out_dir: str | Path,
        specs: Sequence[TensorSpec],
        max_shard_bytes: int = 2 * 10**9,
        metadata: dict[str, str] | None = None,
    ):
        self.out_dir = Path(out_dir)
        self.specs = list(specs)
        names = [s.name for s in self.specs]
        if len(set(names)) != len(names):
            raise ValueError("duplicate tensor names in the write plan")
        for s in self.specs:
            if s.dtype not in DTYPE_TO_SAFETENSORS:
                raise ValueError(f"tensor {s.name}: dtype {s.dtype} cannot be stored in safetensors")
        self.metadata = {"format": "pt", **(metadata or {})}
        self.shards = _split_into_shards(self.specs, max_shard_bytes)
        n = len(self.shards)
        self.file_names = (
            ["model.safetensors"]
            if n == 1
            else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self._order = [(si, spec) for si, shard in enumerate(self.shards) for spec in shard]
        self._next = 0
        self._file: BinaryIO | None = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._order):
            raise FuselabError(f"tensor {name} written after the plan was complete")
        shard_index, spec = self._order[self._next]
        if name != spec.name:
            raise FuselabError(f"tensor {name} written out of order; expected {spec.name}")
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise FuselabError(
                f"tensor {name}: planned {spec.dtype} {list(spec.shape)}, got {tensor.dtype} {list(tensor.shape)}"
            )
        if self._file is None:
            self._file = open(self.out_dir / self.file_names[shard_index], "wb")  # noqa: SIM115
            self._file.write(_header_bytes(self.shards[shard_index], self.metadata))
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        if data.numel():
            self._file.write(memoryview(data.view(torch.uint8).numpy()))
        self._next += 1
        if self._next == len(self._order) or self._order[self._next][0] != shard_index:
            self._file.close()
            self._file = None

    def finish(self) -> list[str]:
        """Close the last shard, write the index for sharded outputs, and return the file names."""
        if self._next != len(self._order):
            missing = self._order[self._next][1].name
            raise FuselabError(f"write plan incomplete: tensor {missing} was never written")
        if len(self.file_names) > 1:
            weight_map = {spec.name: self.file_names[si] for si, spec in self._order}
            index = {
                "metadata": {"total_size": sum(s.nbytes for s in self.specs)},
                "weight_map": weight_map,
            }
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return list(self.file_names)

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class BackgroundWriter:
    """Run a :class:`ShardedSafetensorsWriter` on its own thread so disk writes overlap computation.

    At most ``depth`` tensors wait in the queue, so memory stays bounded.
    """

    _DONE = object()

    def __init__(self, writer: ShardedSafetensorsWriter, depth: int = 2):
        self.writer = writer
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="fuselab-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is self._DONE:
                return
            if self._error is not None:
                continue
            try:
                self.writer.write(*item)
            except BaseException as err:
                self._error = err

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put((name, tensor))

    def finish(self) -> list[str]:
        self._queue.put(self._DONE)
        self._thread.join()
        if self._error is not None:
            self.writer.abort()
            raise self._error
        return self.writer.finish()

    def abort(self) -> None:
        self._queue.put(self._DONE)
        self._thread.join()
        self.writer.abort()
