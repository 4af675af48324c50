"""What is in a checkpoint folder, read from headers and small JSON files only.

``fuselab info`` must answer "what is this model, and will it combine with that one?" in seconds, whatever
the size of the checkpoint, so nothing here loads weights: tensor names, shapes and dtypes come from the
safetensors headers (:class:`fuselab.modeling.checkpoint.Checkpoint`), the rest from ``config.json``,
``generation_config.json`` and the tokenizer files.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fuselab.modeling.catalog import MARKER_FILE, read_marker
from fuselab.modeling.checkpoint import Checkpoint
from fuselab.modeling.tokenizers import TokenizerFamily, tokenizer_family
from fuselab.utils.errors import FuselabError

SPECIAL_ROLES = ("bos_token", "eos_token", "pad_token", "unk_token")
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


@dataclass
class ModelInfo:
    """A checkpoint's identity and the facts that decide whether it can be merged or fused with another."""

    path: str
    architecture: str
    model_type: str
    num_parameters: int  # as stored: a tied embedding is stored, and counted, once
    dtypes: dict[str, int]  # dtype name -> parameters stored in it
    num_layers: int | None
    hidden_size: int | None
    vocab_size: int | None  # config.vocab_size (rows of the embedding matrix)
    embedding_rows: int | None  # rows of the stored input embedding, when found
    tokenizer_size: int | None  # len(tokenizer): base vocabulary plus added tokens
    vocab_note: str | None  # set when the config, embedding and tokenizer sizes disagree
    tokenizer_family: TokenizerFamily | None
    special_tokens: dict[str, str | None]
    special_token_ids: dict[str, int | None]
    additional_special_tokens: list[str]
    chat_template: str | None  # where the chat template comes from, or None when there is none
    generation_eos_token_ids: list[int]
    tie_word_embeddings: bool
    disk_bytes: int
    num_shards: int
    format: str
    num_tensors: int
    provenance: dict[str, Any] | None = field(default=None)  # the fuselab marker of converted catalog models

    @property
    def has_chat_template(self) -> bool:
        return self.chat_template is not None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["tokenizer_family"] = self.tokenizer_family.to_dict() if self.tokenizer_family else None
        data["has_chat_template"] = self.has_chat_template
        return data

    def to_text(self) -> str:
        """Human-readable summary, one fact per line."""
        fam = str(self.tokenizer_family) if self.tokenizer_family else "unknown (no tokenizer files)"
        specials = ", ".join(
            f"{role.removesuffix('_token')}={tok!r}"
            + (f" ({self.special_token_ids.get(role)})" if tok else "")
            for role, tok in self.special_tokens.items()
        )
        dtypes = ", ".join(f"{name} {_count(n)}" for name, n in self.dtypes.items())
        rows = [
            ("path", self.path),
            ("architecture", f"{self.architecture} (model_type {self.model_type})"),
            ("parameters", f"{_count(self.num_parameters)} ({self.num_parameters:,})"),
            ("dtypes", dtypes or "-"),
            ("layers", _opt(self.num_layers)),
            ("hidden size", _opt(self.hidden_size)),
            ("vocabulary", self._vocab_text()),
            ("tied embeddings", "yes (stored once)" if self.tie_word_embeddings else "no"),
            ("tokenizer", fam),
            ("special tokens", specials or "-"),
        ]
        if self.additional_special_tokens:
            shown = self.additional_special_tokens[:8]
            more = len(self.additional_special_tokens) - len(shown)
            rows.append(("additional", ", ".join(shown) + (f" (+{more} more)" if more > 0 else "")))
        rows += [
            ("chat template", self.chat_template or "none"),
            ("generation eos", ", ".join(map(str, self.generation_eos_token_ids)) or "-"),
            ("on disk", f"{_bytes(self.disk_bytes)} in {self.num_shards} {self.format} shard(s), "
                        f"{self.num_tensors} tensors"),
        ]  # fmt: skip
        if self.provenance:
            p = self.provenance
            pkgs = ", ".join(dict.fromkeys(f"{x['package']}=={x['version']}" for x in p.get("packages", [])))
            rows.append(("converted from", f"{p.get('upstream')} via {pkgs} on {p.get('converted_at')}"))
            rows.append(("licence", str(p.get("licence"))))
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)

    def _vocab_text(self) -> str:
        parts = [f"config {_opt(self.vocab_size)}"]
        if self.embedding_rows is not None and self.embedding_rows != self.vocab_size:
            parts.append(f"embedding {self.embedding_rows}")
        parts.append(f"tokenizer {_opt(self.tokenizer_size)}")
        text = ", ".join(parts)
        return f"{text}  [!] {self.vocab_note}" if self.vocab_note else text


def describe_checkpoint(path: str | Path) -> ModelInfo:
    """Describe the checkpoint folder ``path`` without loading any weights."""
    path = Path(path)
    with Checkpoint(path) as ckpt:
        cfg = ckpt.text_config()
        tie = ckpt.tie_word_embeddings
        embed_rows = _embedding_rows(ckpt)
        tok = _read_tokenizer(path)
        vocab_size = _int(cfg.get("vocab_size"))
        return ModelInfo(
            path=str(path),
            architecture=ckpt.architecture,
            model_type=ckpt.model_type,
            num_parameters=_num_parameters(ckpt, tie),
            dtypes={str(d).removeprefix("torch."): n for d, n in ckpt.dtype_counts().items()},
            num_layers=_first_int(cfg, "num_hidden_layers", "n_layer", "num_layers"),
            hidden_size=_first_int(cfg, "hidden_size", "n_embd", "d_model"),
            vocab_size=vocab_size,
            embedding_rows=embed_rows,
            tokenizer_size=tok.size,
            vocab_note=_vocab_note(vocab_size, embed_rows, tok.size),
            tokenizer_family=tok.family,
            special_tokens=tok.specials,
            special_token_ids={role: tok.ids.get(t) if t else None for role, t in tok.specials.items()},
            additional_special_tokens=tok.additional,
            chat_template=_chat_template_source(path, tok.config),
            generation_eos_token_ids=_generation_eos(path, ckpt.config),
            tie_word_embeddings=tie,
            disk_bytes=sum(f.stat().st_size for f in path.iterdir() if f.is_file()),
            num_shards=len(ckpt.files),
            format=ckpt.format,
            num_tensors=len(ckpt.tensors),
            provenance=read_marker(path) if (path / MARKER_FILE).is_file() else None,
        )


# -- parameters and embeddings --------------------------------------------------------------------------------

_EMBED_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")


def _embedding_tensor(ckpt: Checkpoint) -> str | None:
    for name in ckpt.tensors:
        if name.endswith(_EMBED_SUFFIXES):
            return name
    return None


def _embedding_rows(ckpt: Checkpoint) -> int | None:
    name = _embedding_tensor(ckpt)
    return ckpt.tensors[name].shape[0] if name else None


def embedding_rows(ckpt: Checkpoint) -> tuple[str, int] | None:
    """(name, rows) of the input embedding, or None where none is recognised."""
    name = _embedding_tensor(ckpt)
    return (name, ckpt.tensors[name].shape[0]) if name else None


def check_config_vocab_size(
    ckpt: Checkpoint, label: object, found: dict[str, tuple[str, int] | None]
) -> None:
    """Refuse a checkpoint whose ``config.vocab_size`` disagrees with the rows of the tensors in ``found``
    (role -> (name, rows), e.g. ``{"embedding": embedding_rows(ckpt)}``; None entries are skipped):
    transformers builds the model from that size, so the mismatch would fail late and obscurely."""
    from fuselab.utils.errors import IncompatibleModelsError

    size = ckpt.text_config().get("vocab_size")
    for role, f in found.items():
        if f is not None and isinstance(size, int) and f[1] != size:
            raise IncompatibleModelsError(
                f"{label}: config.json says vocab_size {size}, but its {role} `{f[0]}` has {f[1]} rows; set "
                f"`vocab_size` to {f[1]} in {ckpt.path / 'config.json'} (or re-export the model)"
            )


def tokenizer_id_bound(path: Path) -> int | None:
    """One more than the largest token id of the tokenizer in ``path`` (None without a ``tokenizer.json``):
    the embedding rows a model needs so that every id the tokenizer can emit has a row."""
    ids = _read_tokenizer(Path(path)).ids
    return max(ids.values()) + 1 if ids else None


def _num_parameters(ckpt: Checkpoint, tied: bool) -> int:
    """Stored parameters; a tied output projection saved alongside its embedding (pickled checkpoints keep
    both names) is counted once, as it is one matrix."""
    total = ckpt.num_parameters()
    embed = _embedding_tensor(ckpt)
    head = next((n for n in ckpt.tensors if n.endswith("lm_head.weight")), None)
    if tied and embed and head and ckpt.tensors[embed].shape == ckpt.tensors[head].shape:
        total -= ckpt.tensors[head].numel
    return total


def _vocab_note(config_size: int | None, embed_rows: int | None, tok_size: int | None) -> str | None:
    rows = embed_rows if embed_rows is not None else config_size
    if config_size is not None and embed_rows is not None and config_size != embed_rows:
        return f"config.vocab_size {config_size} differs from the embedding's {embed_rows} rows"
    if rows is None or tok_size is None or rows == tok_size:
        return None
    if rows > tok_size:
        return f"{rows - tok_size} embedding rows have no token (padded embedding); normal for many models"
    return f"the tokenizer has {tok_size - rows} tokens beyond the embedding; those ids would crash the model"


# -- tokenizer files ------------------------------------------------------------------------------------------


@dataclass
class _TokenizerFacts:
    size: int | None = None
    family: TokenizerFamily | None = None
    config: dict[str, Any] = field(default_factory=dict)
    specials: dict[str, str | None] = field(default_factory=dict)
    additional: list[str] = field(default_factory=list)
    ids: dict[str, int] = field(default_factory=dict)


def _read_tokenizer(path: Path) -> _TokenizerFacts:
    facts = _TokenizerFacts()
    facts.config = _read_json(path / "tokenizer_config.json") or {}
    specials_map = _read_json(path / "special_tokens_map.json") or {}
    tok_json = _read_json(path / "tokenizer.json")
    if tok_json is not None:
        facts.family = tokenizer_family(tok_json)
        facts.ids = _token_ids(tok_json)
        facts.size = len(set(facts.ids.values()))
    elif (path / "tokenizer.model").is_file():
        facts.family = tokenizer_family(path / "tokenizer.model")
    for role in SPECIAL_ROLES:
        facts.specials[role] = _token_text(facts.config.get(role, specials_map.get(role)))
    extra = (
        facts.config.get("extra_special_tokens")
        or facts.config.get("additional_special_tokens")
        or specials_map.get("additional_special_tokens")
        or []
    )
    if isinstance(extra, dict):  # transformers 5 may store named extra tokens
        extra = list(extra.values())
    facts.additional = [t for t in (_token_text(x) for x in extra) if t]
    return facts


def _token_ids(tok_json: dict[str, Any]) -> dict[str, int]:
    vocab = (tok_json.get("model") or {}).get("vocab")
    if isinstance(vocab, dict):
        ids = {str(k): int(v) for k, v in vocab.items()}
    elif isinstance(vocab, list):  # Unigram: [[piece, score], ...], the id is the position
        ids = {str(item[0]): i for i, item in enumerate(vocab)}
    else:
        ids = {}
    for added in tok_json.get("added_tokens") or []:
        ids[str(added["content"])] = int(added["id"])
    return ids


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return str(value) if value is not None else None


def _chat_template_source(path: Path, tok_config: dict[str, Any]) -> str | None:
    for name in CHAT_TEMPLATE_FILES:
        if (path / name).is_file():
            return name
    if (path / "additional_chat_templates").is_dir():
        return "additional_chat_templates/"
    if tok_config.get("chat_template"):
        return "tokenizer_config.json"
    return None


def _generation_eos(path: Path, config: dict[str, Any]) -> list[int]:
    gen = _read_json(path / "generation_config.json") or {}
    eos = gen.get("eos_token_id", config.get("eos_token_id"))
    if eos is None:
        return []
    return [int(e) for e in eos] if isinstance(eos, list) else [int(eos)]


# -- small helpers --------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise FuselabError(f"{path} is not valid JSON ({err}); the checkpoint folder is damaged") from None
    return data if isinstance(data, dict) else None


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _first_int(cfg: dict[str, Any], *keys: str) -> int | None:
    for key in keys:
        if (value := _int(cfg.get(key))) is not None:
            return value
    return None


def _opt(value: object) -> str:
    return "-" if value is None else str(value)


def _count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def _bytes(n: int) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"
