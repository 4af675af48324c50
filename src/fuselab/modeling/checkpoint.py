"""Lazy, tensor-by-tensor access to a Hugging Face checkpoint folder.

Only headers are read when a :class:`Checkpoint` is opened: names, dtypes and shapes of every tensor come from
the safetensors headers (or, for pickled ``.bin`` files, from a memory-mapped, ``weights_only`` load that never
executes code). A tensor's bytes are read when it is asked for, with one ``readinto`` into a fresh buffer,
not through a memory map: mapped pages of every input would otherwise stay resident and make peak memory
grow with model size.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fuselab.utils.errors import FuselabError, ModelNotFoundError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, known without reading its data."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    offset: int  # absolute byte offset of the data in ``file`` (-1 for pickled files)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def read_config(config_file: Path) -> dict[str, Any]:
    """A model's ``config.json``, or an error naming the file, the place and the fix when it is malformed."""
    from fuselab.utils.boundary import read_text

    try:
        data = json.loads(read_text(config_file))
    except json.JSONDecodeError as err:
        raise FuselabError(
            f"{config_file} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); fix it, or "
            "re-download / re-export the model"
        ) from None
    if not isinstance(data, dict):
        raise FuselabError(
            f"{config_file} must hold a JSON object, not {type(data).__name__}; fix or replace it"
        )
    return data


def check_model_files(folder: Path) -> None:
    """Fail at load, naming the file, when ``config.json`` is malformed or a safetensors file is truncated:
    only headers are read (kilobytes), where a full load would fail minutes later with a library traceback."""
    read_config(folder / "config.json")
    for f in sorted(folder.glob("*.safetensors")):
        read_safetensors_header(f)


def read_safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """Return (header dict, byte offset of the data section) of a safetensors file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise FuselabError(f"{path} is not a safetensors file (shorter than 8 bytes); re-download it")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > 100 * 2**20:
            raise FuselabError(f"{path} has a corrupt safetensors header (length {n}); re-download it")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise FuselabError(f"{path} has a corrupt safetensors header; re-download it") from None
    data_start = 8 + n
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if data_start + end > size:
        raise FuselabError(
            f"{path} is truncated: its header describes {data_start + end} bytes but the file has {size}; "
            "the download or a previous write was interrupted; fetch or write it again"
        )
    return header, data_start


def _find_weight_files(path: Path) -> tuple[str, list[Path], dict[str, str] | None]:
    """(format, files, weight_map or None) of the checkpoint in ``path``."""
    for fmt, index_name, single in (
        ("safetensors", "model.safetensors.index.json", "model.safetensors"),
        ("bin", "pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = path / index_name
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            files = sorted({path / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise ModelNotFoundError(
                    f"{path}: {index_name} lists shard {missing[0]}, which is missing; the checkpoint is "
                    "incomplete (re-download it)"
                )
            return fmt, files, weight_map
        if (path / single).is_file():
            return fmt, [path / single], None
    st = sorted(path.glob("*.safetensors"))
    if st:
        return "safetensors", st, None
    raise ModelNotFoundError(
        f"{path} holds no model weights (looked for model.safetensors[.index.json] and "
        "pytorch_model.bin[.index.json]); point to a Hugging Face checkpoint folder"
    )


class Checkpoint:
    """A Hugging Face checkpoint folder (sharded or not; safetensors or pickled ``.bin``)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise ModelNotFoundError(f"{self.path} is not a folder")
        config_file = self.path / "config.json"
        if not config_file.is_file():
            raise ModelNotFoundError(
                f"{self.path} has no config.json; it is not a Hugging Face checkpoint folder"
            )
        self.config: dict[str, Any] = read_config(config_file)
        self.format, self.files, _ = _find_weight_files(self.path)
        self.tensors: dict[str, TensorInfo] = {}
        self._bin_cache: dict[Path, dict[str, torch.Tensor]] = {}
        self._handles: dict[Path, Any] = {}
        for file in self.files:
            if self.format == "safetensors":
                header, data_start = read_safetensors_header(file)
                entries = [(k, v) for k, v in header.items() if k != "__metadata__"]
                entries.sort(key=lambda kv: kv[1]["data_offsets"][0])
                for name, meta in entries:
                    if meta["dtype"] not in SAFETENSORS_DTYPES:
                        raise FuselabError(f"{file}: tensor {name} has unsupported dtype {meta['dtype']}")
                    self._add(
                        TensorInfo(
                            name,
                            SAFETENSORS_DTYPES[meta["dtype"]],
                            tuple(meta["shape"]),
                            file,
                            data_start + meta["data_offsets"][0],
                        )
                    )
            else:
                for name, t in self._load_bin(file).items():
                    self._add(TensorInfo(name, t.dtype, tuple(t.shape), file, -1))

    def _add(self, info: TensorInfo) -> None:
        if info.name in self.tensors:
            raise FuselabError(f"{self.path}: tensor {info.name} is stored twice ({info.file.name})")
        self.tensors[info.name] = info

    def _load_bin(self, file: Path) -> dict[str, torch.Tensor]:
        if file not in self._bin_cache:
            try:
                sd = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as err:  # pickles with code objects are refused by weights_only
                raise FuselabError(
                    f"{file}: cannot be read safely ({type(err).__name__}: {err}); convert the checkpoint "
                    "to safetensors with a trusted tool first"
                ) from None
            if not isinstance(sd, dict):
                raise FuselabError(f"{file} does not hold a state dict")
            self._bin_cache[file] = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
        return self._bin_cache[file]

    # -- metadata -------------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or []
        return archs[0] if archs else str(self.config.get("model_type", "unknown"))

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", "unknown"))

    def text_config(self) -> dict[str, Any]:
        """The language-model part of the config (``text_config`` for multimodal wrappers)."""
        return self.config.get("text_config") or self.config

    @property
    def tie_word_embeddings(self) -> bool:
        cfg = self.text_config()
        return bool(cfg.get("tie_word_embeddings", self.config.get("tie_word_embeddings", True)))

    def num_parameters(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    def dtype_counts(self) -> dict[torch.dtype, int]:
        counts: dict[torch.dtype, int] = {}
        for t in self.tensors.values():
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel
        return counts

    def main_dtype(self) -> torch.dtype:
        """The floating dtype that holds most parameters."""
        counts = {d: n for d, n in self.dtype_counts().items() if d.is_floating_point}
        return max(counts, key=counts.__getitem__) if counts else torch.float32

    # -- data -----------------------------------------------------------------------------------------

    def read(
        self, name: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Read one tensor (converted to ``dtype`` when given) onto ``device``."""
        info = self.tensors[name]
        if self.format == "bin":
            t = self._load_bin(info.file)[name]
            out = t.to(device=device, dtype=dtype or t.dtype, copy=True)
            return out
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        f = self._handles.get(info.file)
        if f is None:
            f = self._handles[info.file] = open(info.file, "rb", buffering=0)  # noqa: SIM115
        f.seek(info.offset)
        got = f.readinto(memoryview(buf.numpy()))
        if got != info.nbytes:
            raise FuselabError(f"{info.file}: short read of tensor {name}; the file is truncated")
        t = buf.view(info.dtype).reshape(info.shape)
        if dtype is not None and dtype != t.dtype:
            t = t.to(device=device, dtype=dtype)
        elif torch.device(device).type != "cpu":
            t = t.to(device)
        return t

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles.clear()
        self._bin_cache.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {self.architecture}, {len(self.tensors)} tensors)"
