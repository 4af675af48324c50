"""Tokenise a text and know, exactly, which bytes of it every token covers.

Cross-tokenizer fusion needs one fact per token: the byte span of the shared text it stands for. A source
distribution can be reused at a target position only when both models have read *the same prefix* of the
text (FuseChat §3.3, done exactly rather than with ``endswith`` tests), and the assistant mask is defined by
character spans of the rendered conversation.

Spans come from each token's *surface*: the bytes it spells (``Ġ`` → space and GPT-2's byte alphabet for
byte-level BPE; ``▁`` → space and ``<0xNN>`` → one byte for SentencePiece style; an added/special token's
content). Walking the surfaces over the text both produces the spans and proves that the tokenizer reproduces
the text; a tokenizer that changes it (lower-casing, Unicode normalisation) is reported, because then the models
would not see the same text. Spaces that a tokenizer *adds* (Metaspace's prefix ``▁``, ``add_prefix_space``)
cover no byte of the text and are skipped; ``<unk>`` covers the bytes up to the next matching token.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

from fuselab.modeling.tokenizers import tokenizer_family
from fuselab.utils.errors import FuselabError


class TextMismatchError(FuselabError):
    """A tokenizer does not reproduce the text it was given."""


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's ``bytes_to_unicode``: the 256 printable stand-ins of byte-level BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, codes)}


@dataclass(frozen=True)
class Vocabulary:
    """Per-id surfaces of one tokenizer, plus what the span walk needs to know about special ids."""

    surfaces: tuple[bytes, ...]
    special: frozenset[int]  # added/special tokens: matched verbatim, never given a phantom space
    unk_id: int | None
    name: str
    prefix_ids: tuple[int, ...] = ()  # leading special tokens the tokenizer adds to every text (BOS)
    # added tokens flagged ``special`` (control tokens such as <|im_end|>); None: every added token. Gemma also
    # adds ordinary text as tokens ("\n", whitespace runs), which are matched verbatim but spell plain text.
    control: frozenset[int] | None = None

    def __len__(self) -> int:
        return len(self.surfaces)

    def text(self, token_id: int) -> str:
        return self.surfaces[token_id].decode("utf-8", errors="replace")

    @property
    def control_ids(self) -> frozenset[int]:
        """Control tokens: added tokens flagged special (all added tokens when not known)."""
        return self.special if self.control is None else self.control


def vocabulary(tokenizer: Any) -> Vocabulary:
    """Surfaces of every id of ``tokenizer`` (cached on the tokenizer object)."""
    cached = getattr(tokenizer, "_fuselab_vocabulary", None)
    if isinstance(cached, Vocabulary):
        return cached
    family = tokenizer_family(tokenizer)
    if family.kind not in ("byte-level BPE", "SentencePiece/Metaspace"):
        raise FuselabError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '?')} is {family}; cross-tokenizer fusion needs a "
            "byte-level BPE or SentencePiece-style tokenizer (one whose tokens spell the text exactly)"
        )
    size = max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1)
    pieces = tokenizer.convert_ids_to_tokens(list(range(size)))
    decoder = getattr(tokenizer, "added_tokens_decoder", {})
    added = {int(i): t.content for i, t in decoder.items()}
    special = frozenset(added)
    control = frozenset(int(i) for i, t in decoder.items() if getattr(t, "special", True))
    byte_dec = _byte_decoder()
    surfaces: list[bytes] = []
    for i, piece in enumerate(pieces):
        if i in added:
            surfaces.append(added[i].encode())
        elif piece is None:
            surfaces.append(b"")
        elif family.is_byte_level:
            if all(ch in byte_dec for ch in piece):
                surfaces.append(bytes(byte_dec[ch] for ch in piece))
            else:
                surfaces.append(piece.encode())
        else:
            if family.byte_fallback and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                try:
                    surfaces.append(bytes([int(piece[3:5], 16)]))
                    continue
                except ValueError:
                    pass
            surfaces.append(piece.replace("▁", " ").encode())
    vocab = Vocabulary(
        surfaces=tuple(surfaces),
        special=special,
        unk_id=tokenizer.unk_token_id,
        name=str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__),
        prefix_ids=_added_prefix(tokenizer),
        control=control,
    )
    with contextlib.suppress(AttributeError):
        tokenizer._fuselab_vocabulary = vocab
    return vocab


def _added_prefix(tokenizer: Any) -> tuple[int, ...]:
    """The tokens the tokenizer's post-processor puts before every text (BOS), found once on a probe text.

    Tokens it appends (EOS) are not wanted after a rendered conversation and are ignored.
    """
    probe = "fuselab probe"
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    if len(full) > len(plain) and full[len(full) - len(plain) :] == plain:
        return tuple(full[: len(full) - len(plain)])
    return ()


@dataclass(frozen=True)
class TokenSpans:
    """Token ids of a text and the byte span ``[starts[i], ends[i])`` each covers (prefix tokens: empty)."""

    ids: np.ndarray  # int64 [n]
    starts: np.ndarray  # int64 [n]
    ends: np.ndarray  # int64 [n]
    n_prefix: int  # leading special tokens the tokenizer adds (BOS) that cover no text

    def __len__(self) -> int:
        return len(self.ids)


def encode_with_spans(tokenizer: Any, text: str, *, add_bos: bool = True) -> TokenSpans:
    """Tokenise ``text`` (special tokens in it are parsed) and compute exact byte spans.

    ``add_bos`` keeps the leading special tokens the tokenizer adds by itself (e.g. Gemma's ``<bos>``), which
    the model expects; they cover no text.
    """
    vocab = vocabulary(tokenizer)
    plain = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    prefix = list(vocab.prefix_ids) if add_bos else []
    data = text.encode("utf-8")
    starts, ends = _walk(vocab, plain, data)
    n = len(prefix)
    ids = np.asarray(prefix + plain, dtype=np.int64)
    return TokenSpans(
        ids=ids,
        starts=np.concatenate([np.zeros(n, np.int64), starts]),
        ends=np.concatenate([np.zeros(n, np.int64), ends]),
        n_prefix=n,
    )


def _walk(vocab: Vocabulary, ids: list[int], data: bytes) -> tuple[np.ndarray, np.ndarray]:
    starts = np.empty(len(ids), np.int64)
    ends = np.empty(len(ids), np.int64)
    cursor = 0
    for k, tid in enumerate(ids):
        if tid >= len(vocab):
            raise TextMismatchError(f"{vocab.name}: token id {tid} is outside the vocabulary ({len(vocab)})")
        surface = vocab.surfaces[tid]
        if tid == vocab.unk_id:
            end = _unk_end(vocab, ids, k, data, cursor)
            starts[k], ends[k] = cursor, end
            cursor = end
            continue
        if data.startswith(surface, cursor):
            starts[k] = cursor
            cursor += len(surface)
            ends[k] = cursor
            continue
        if tid not in vocab.special and surface.startswith(b" ") and data.startswith(surface[1:], cursor):
            starts[k] = cursor  # an added space (Metaspace prefix / add_prefix_space) covers no text
            cursor += len(surface) - 1
            ends[k] = cursor
            continue
        raise TextMismatchError(
            f"{vocab.name} does not reproduce the text at byte {cursor}: token {k} spells {surface!r} but the "
            f"text has {data[cursor : cursor + max(8, len(surface))]!r}. The tokenizer changes the text (a "
            "normalizer such as lower-casing or Unicode normalisation), so the models would not read the same "
            "text; normalise the data first (e.g. NFC) or leave this model out"
        )
    if cursor != len(data):
        raise TextMismatchError(
            f"{vocab.name} covered {cursor} of {len(data)} bytes of the text; the rest "
            f"({data[cursor : cursor + 20]!r}...) was dropped by the tokenizer"
        )
    return starts, ends


def _unk_end(vocab: Vocabulary, ids: list[int], k: int, data: bytes, cursor: int) -> int:
    """An ``<unk>`` covers the bytes up to where the next token's surface appears (at least one character)."""
    step = 1
    while cursor + step < len(data) and (data[cursor + step] & 0xC0) == 0x80:
        step += 1  # never end inside a UTF-8 character
    if k + 1 >= len(ids):
        return len(data)
    nxt = vocab.surfaces[ids[k + 1]]
    if ids[k + 1] not in vocab.special and nxt.startswith(b" ") and nxt != b" ":
        nxt = nxt[1:]
    found = data.find(nxt, cursor + step) if nxt else -1
    return found if found >= 0 else cursor + step


def char_to_byte_offsets(text: str) -> np.ndarray:
    """``offsets[c]`` = byte offset of character ``c`` in UTF-8 (length ``len(text) + 1``)."""
    lengths = np.fromiter((len(ch.encode("utf-8")) for ch in text), dtype=np.int64, count=len(text))
    return np.concatenate([[0], np.cumsum(lengths)])
