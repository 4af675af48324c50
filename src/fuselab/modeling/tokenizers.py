"""Which family a tokenizer belongs to, read from its backend rather than guessed from class names.

Cross-tokenizer alignment has to turn tokens back into text pieces, and how that works depends on the
family: byte-level BPE (GPT-2, Llama-3, Qwen) writes a space as ``Ġ`` and covers every byte with its
256-symbol alphabet; SentencePiece-style tokenizers (Llama-2, Gemma, T5) write a space as ``▁`` and, with
``byte_fallback``, spell unknown characters as ``<0xNN>`` byte tokens; WordPiece (BERT) marks word-internal
pieces with ``##``. Class names (``GemmaTokenizer``, ``TokenizersBackend``, ``Qwen2Tokenizer``...) say
nothing reliable about this, and in transformers 5 many models load as a generic backend class, so
:func:`tokenizer_family` reads the tokenizer's own description: ``tokenizer.json`` (model type,
``byte_fallback``, normalizer/pre-tokenizer/decoder, including nested ``Sequence`` s), or, when there is no
``tokenizer.json``, the SentencePiece ``tokenizer.model`` protobuf (parsed here, without the ``protobuf``
package).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from fuselab.utils.errors import FuselabError, ModelNotFoundError

Kind = Literal["byte-level BPE", "SentencePiece/Metaspace", "WordPiece", "other"]

BYTE_LEVEL_SPACE = "Ġ"  # what GPT-2's byte-to-unicode table maps the space byte 0x20 to
METASPACE = "▁"  # U+2581, SentencePiece's space marker

# Files that can carry a vocabulary (tokenizer_config.json alone cannot).
VOCAB_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
    "tokenizer.tiktoken",
)


@dataclass(frozen=True)
class TokenizerFamily:
    """How a tokenizer turns text into tokens, as far as aligning two tokenizers needs to know."""

    kind: Kind
    model: str  # backend model: "BPE", "Unigram", "WordPiece", "WordLevel", ... or "unknown"
    byte_fallback: bool  # unknown characters become <0xNN> byte tokens (SentencePiece style)
    space_marker: str | None  # "Ġ" (byte-level), "▁" (SentencePiece) or None
    continuation_prefix: str | None = None  # "##" for WordPiece: marks pieces that continue a word

    @property
    def is_byte_level(self) -> bool:
        return self.kind == "byte-level BPE"

    @property
    def is_sentencepiece(self) -> bool:
        return self.kind == "SentencePiece/Metaspace"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        extras = [self.model]
        if self.space_marker:
            extras.append(f"space marker {self.space_marker!r}")
        if self.byte_fallback:
            extras.append("byte fallback")
        if self.continuation_prefix:
            extras.append(f"continuation prefix {self.continuation_prefix!r}")
        return f"{self.kind} ({', '.join(extras)})"


def tokenizer_family(source: Any) -> TokenizerFamily:
    """Detect the family of a tokenizer.

    ``source`` may be a folder (``tokenizer.json`` is read, else ``tokenizer.model``), a path to either
    file, a parsed ``tokenizer.json`` dict, a ``tokenizers.Tokenizer``, or a transformers tokenizer (fast
    ones expose their backend; SentencePiece-based ones their ``sp_model``).
    """
    if isinstance(source, dict):
        return family_from_tokenizer_json(source)
    if isinstance(source, (str, os.PathLike)):
        return _family_from_path(Path(source))
    backend = getattr(source, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        return family_from_tokenizer_json(json.loads(backend.to_str()))
    if hasattr(source, "to_str") and hasattr(source, "get_vocab_size"):  # tokenizers.Tokenizer
        return family_from_tokenizer_json(json.loads(source.to_str()))
    sp_model = getattr(source, "sp_model", None)
    if sp_model is not None and hasattr(sp_model, "serialized_model_proto"):
        return family_from_sentencepiece(sp_model.serialized_model_proto())
    name = getattr(source, "name_or_path", None)
    if name and Path(name).is_dir():
        return _family_from_path(Path(name))
    raise FuselabError(
        f"cannot tell the family of a {type(source).__name__}: it exposes neither a tokenizers backend nor a "
        "SentencePiece model; pass the tokenizer's folder instead"
    )


def _family_from_path(path: Path) -> TokenizerFamily:
    if path.is_dir():
        for name in ("tokenizer.json", "tokenizer.model", "spiece.model"):
            if (path / name).is_file():
                return _family_from_path(path / name)
        raise ModelNotFoundError(
            f"{path} has no tokenizer.json or tokenizer.model; cannot tell the tokenizer family"
        )
    if not path.is_file():
        raise ModelNotFoundError(f"{path} does not exist")
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as err:
            raise FuselabError(f"{path} is not valid JSON ({err}); the tokenizer file is corrupt") from None
        return family_from_tokenizer_json(data)
    return family_from_sentencepiece(path.read_bytes())


# -- tokenizer.json -------------------------------------------------------------------------------------------


def family_from_tokenizer_json(data: dict[str, Any]) -> TokenizerFamily:
    """The family described by a parsed ``tokenizer.json``."""
    model = data.get("model") or {}
    model_type = str(model.get("type") or _guess_model_type(model))
    byte_fallback = bool(model.get("byte_fallback", False))
    parts = [
        *_components(data.get("normalizer")),
        *_components(data.get("pre_tokenizer")),
        *_components(data.get("decoder")),
    ]
    types = {p.get("type") for p in parts}
    wordpiece_prefix = model.get("continuing_subword_prefix") if model_type == "WordPiece" else None
    if "ByteLevel" in types:
        kind: Kind = "byte-level BPE" if model_type == "BPE" else "other"
        return TokenizerFamily(kind, model_type, byte_fallback, BYTE_LEVEL_SPACE)
    marker = _metaspace_marker(parts)
    if marker is not None:
        return TokenizerFamily("SentencePiece/Metaspace", model_type, byte_fallback, marker)
    if model_type == "WordPiece" or "WordPiece" in types:
        prefix = wordpiece_prefix or _decoder_prefix(parts) or "##"
        return TokenizerFamily("WordPiece", model_type, byte_fallback, None, prefix)
    return TokenizerFamily("other", model_type, byte_fallback, None)


def _components(node: Any) -> Iterator[dict[str, Any]]:
    """A normalizer/pre-tokenizer/decoder and, depth first, everything nested in its ``Sequence`` s."""
    if not isinstance(node, dict):
        return
    yield node
    for key in ("normalizers", "pretokenizers", "decoders"):
        for child in node.get(key) or []:
            yield from _components(child)


def _metaspace_marker(parts: list[dict[str, Any]]) -> str | None:
    """``▁`` (or a custom replacement) from a Metaspace step or a ``Replace`` between space and a marker.

    Llama-2 and Gemma tokenizers have no Metaspace step: their normalizer replaces " " with "▁" and their
    decoder replaces "▁" with " ", so both forms count.
    """
    for p in parts:
        if p.get("type") == "Metaspace":
            return str(p.get("replacement") or METASPACE)
    for p in parts:
        if p.get("type") != "Replace":
            continue
        pattern = (p.get("pattern") or {}).get("String")
        content = p.get("content")
        if pattern == " " and isinstance(content, str) and len(content) == 1 and content != " ":
            return content
        if content == " " and isinstance(pattern, str) and len(pattern) == 1 and pattern != " ":
            return pattern
    return None


def _decoder_prefix(parts: list[dict[str, Any]]) -> str | None:
    for p in parts:
        if p.get("type") == "WordPiece":
            return p.get("prefix")
    return None


def _guess_model_type(model: dict[str, Any]) -> str:
    """Old tokenizer.json files may omit ``model.type``; infer it from the fields present."""
    if "merges" in model:
        return "BPE"
    if isinstance(model.get("vocab"), list):
        return "Unigram"
    if "continuing_subword_prefix" in model or "max_input_chars_per_word" in model:
        return "WordPiece"
    return "unknown"


# -- SentencePiece tokenizer.model ----------------------------------------------------------------------------

_SPM_MODEL_TYPES = {1: "Unigram", 2: "BPE", 3: "Word", 4: "Char"}
_SPM_PIECE_BYTE = 6  # ModelProto.SentencePiece.Type.BYTE


def family_from_sentencepiece(proto: bytes) -> TokenizerFamily:
    """The family of a serialized SentencePiece ``ModelProto`` (the ``tokenizer.model`` file).

    Reads ``trainer_spec.model_type`` (field 2.3) and ``trainer_spec.byte_fallback`` (field 2.35), and also
    counts byte pieces, which is what byte fallback means in practice.
    """
    model_type = 1  # the proto default: UNIGRAM
    byte_fallback = False
    has_byte_pieces = False
    try:
        for number, value in _proto_fields(proto):
            if number == 1 and isinstance(value, bytes) and not has_byte_pieces:
                has_byte_pieces = any(n == 3 and v == _SPM_PIECE_BYTE for n, v in _proto_fields(value))
            elif number == 2 and isinstance(value, bytes):
                for n, v in _proto_fields(value):
                    if n == 3 and isinstance(v, int):
                        model_type = v
                    elif n == 35 and isinstance(v, int):
                        byte_fallback = bool(v)
    except (IndexError, ValueError):
        raise FuselabError("the SentencePiece model is not a valid ModelProto; the file is corrupt") from None
    return TokenizerFamily(
        "SentencePiece/Metaspace",
        _SPM_MODEL_TYPES.get(model_type, "unknown"),
        byte_fallback or has_byte_pieces,
        METASPACE,
    )


def _proto_fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of a protobuf message: ints for varints, bytes for the rest."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
            yield number, value
        elif wire == 2:
            n, i = _varint(buf, i)
            if i + n > len(buf):
                raise ValueError("truncated field")
            yield number, buf[i : i + n]
            i += n
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            yield number, buf[i : i + width]
            i += width
        else:
            raise ValueError(f"unsupported wire type {wire}")


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


# -- loading --------------------------------------------------------------------------------------------------


def tokenizer_files(path: str | Path) -> list[str]:
    """The vocabulary-bearing tokenizer files present in ``path``."""
    path = Path(path)
    return [name for name in VOCAB_FILES if (path / name).is_file()]


def load_tokenizer(path: str | Path, **kwargs: Any) -> Any:
    """``AutoTokenizer.from_pretrained(path)`` from local files, with an error that says what is missing."""
    path = Path(path)
    if not path.is_dir():
        raise ModelNotFoundError(f"{path} is not a folder; cannot load a tokenizer from it")
    if not tokenizer_files(path):
        raise ModelNotFoundError(
            f"{path} has no tokenizer files (looked for {', '.join(VOCAB_FILES)}); copy the tokenizer of "
            "the model it came from into the folder (e.g. `tokenizer.save_pretrained(folder)`)"
        )
    from transformers import AutoTokenizer

    kwargs.setdefault("local_files_only", True)
    try:
        return AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise FuselabError(f"cannot load the tokenizer in {path}: {type(err).__name__}: {err}") from None
