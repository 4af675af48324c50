"""Render conversations to text once, mark the assistant bytes, and fit every tokenizer's length limit.

All models of a fusion read the *same* rendered text (the reference renders each model with a different
separator and pairs rows by index; FuseChat spec §9.2 items 11–13). The assistant mask comes from the
character spans of the assistant messages in that text, not from re-tokenising pieces with per-template
offsets, so it is right for any chat template and any tokenizer.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fuselab.data.conversations import Conversation, DataError
from fuselab.data.token_spans import TokenSpans, char_to_byte_offsets, encode_with_spans


@dataclass(frozen=True)
class RenderedText:
    """A conversation rendered by a chat template, with the byte spans of its supervised (assistant) parts."""

    id: str
    text: str
    spans: tuple[tuple[int, int], ...]  # byte spans [start, end) of assistant replies (+ end-of-turn token)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "text": self.text, "spans": [list(s) for s in self.spans]}

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> RenderedText:
        return cls(id=row["id"], text=row["text"], spans=tuple((int(a), int(b)) for a, b in row["spans"]))

    @property
    def supervised_bytes(self) -> int:
        return sum(b - a for a, b in self.spans)


def render(conversation: Conversation, tokenizer: Any, *, id_suffix: str = "") -> RenderedText:
    """Render with ``tokenizer``'s chat template and locate every assistant reply in the result."""
    messages = list(conversation.messages)
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"the tokenizer {getattr(tokenizer, 'name_or_path', '')} has no chat template; render with another "
            "model's template (template: <model>) or add one to its tokenizer_config.json"
        )
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    return RenderedText(
        id=conversation.id + id_suffix,
        text=text,
        spans=tuple(assistant_byte_spans(text, messages, _end_markers(tokenizer), conversation.id)),
    )


def _end_markers(tokenizer: Any) -> tuple[str, ...]:
    """Special-token strings that may close an assistant turn (longest first)."""
    names = [t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values()]
    if tokenizer.eos_token:
        names.append(tokenizer.eos_token)
    return tuple(sorted({n for n in names if n}, key=len, reverse=True))


def assistant_byte_spans(
    text: str, messages: Sequence[dict[str, str]], end_markers: Sequence[str], conv_id: str = ""
) -> list[tuple[int, int]]:
    """Byte spans of the assistant replies in ``text``, found in order.

    A span covers the reply and, when one follows directly, the special token that closes the turn
    (``<|im_end|>``, ``<end_of_turn>``...), so the student also learns to stop. Templates that trim
    whitespace around a reply are handled by searching for the stripped content as well.
    """
    offsets = char_to_byte_offsets(text)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for message in messages:
        content = message["content"]
        start = text.find(content, cursor)
        if start < 0:
            content = content.strip()
            start = text.find(content, cursor)
        if start < 0:
            raise DataError(
                f"conversation {conv_id}: the chat template changed a {message['role']} message beyond "
                f"trimming, so it cannot be found in the rendered text: {content[:60]!r}"
            )
        end = start + len(content)
        cursor = end
        if message["role"] != "assistant":
            continue
        for marker in end_markers:
            if text.startswith(marker, end):
                end += len(marker)
                break
        spans.append((int(offsets[start]), int(offsets[end])))
    return spans


@dataclass
class SplitReport:
    conversations: int = 0
    pieces: int = 0
    split: int = 0
    truncated: int = 0
    dropped: Counter[str] = field(default_factory=Counter)

    def summary(self) -> str:
        text = (
            f"{self.conversations} conversations -> {self.pieces} texts ({self.split} split at turn boundaries, "
            f"{self.truncated} replies truncated)"
        )
        if self.dropped:
            text += "; dropped: " + ", ".join(f"{n} {r}" for r, n in self.dropped.items())
        return text


def render_to_fit(
    conversations: Sequence[Conversation],
    template_tokenizer: Any,
    tokenizers: Sequence[Any],
    max_length: int,
    report: SplitReport | None = None,
) -> list[RenderedText]:
    """Render each conversation; split those too long for *any* tokenizer at turn boundaries.

    Like FuseLLM's ``split_long_text`` (and unlike FuseChat v2, which lets every tokenizer truncate on its
    own), pieces are cut so that every model sees the whole piece. A piece keeps the system message; a single
    exchange that still does not fit has its reply truncated (counted). ``max_length`` counts tokens,
    including a BOS a tokenizer adds.
    """
    report = report if report is not None else SplitReport()
    out: list[RenderedText] = []
    for conv in conversations:
        report.conversations += 1
        pieces = _fit(conv, template_tokenizer, tokenizers, max_length, report)
        if len(pieces) > 1:
            report.split += 1
        report.pieces += len(pieces)
        out.extend(pieces)
    if not out:
        raise DataError(f"no text left after fitting to {max_length} tokens ({report.summary()})")
    return out


def _longest(rendered: RenderedText, tokenizers: Sequence[Any]) -> int:
    return max(len(encode_with_spans(tok, rendered.text)) for tok in tokenizers)


def _fit(
    conv: Conversation, template: Any, tokenizers: Sequence[Any], max_length: int, report: SplitReport
) -> list[RenderedText]:
    whole = render(conv, template)
    if _longest(whole, tokenizers) <= max_length:
        return [whole]
    messages = list(conv.messages)
    system = [messages[0]] if messages[0]["role"] == "system" else []
    body = messages[len(system) :]
    exchanges = [body[i : i + 2] for i in range(0, len(body), 2)]
    pieces: list[RenderedText] = []
    current: list[dict[str, str]] = []
    for exchange in exchanges:
        trial = current + exchange
        if current and _fits(conv, system + trial, template, tokenizers, max_length, len(pieces)):
            current = trial
            continue
        if current:
            pieces.append(_render_piece(conv, system + current, template, len(pieces)))
        current = exchange
        if not _fits(conv, system + current, template, tokenizers, max_length, len(pieces)):
            truncated = _truncate_reply(conv, system, current, template, tokenizers, max_length, len(pieces))
            if truncated is None:
                report.dropped["exchanges whose prompt alone exceeds max_length"] += 1
                current = []
                continue
            report.truncated += 1
            current = truncated
    if current:
        pieces.append(_render_piece(conv, system + current, template, len(pieces)))
    return pieces


def _render_piece(conv: Conversation, messages: list[dict[str, str]], template: Any, n: int) -> RenderedText:
    return render(Conversation(id=conv.id, messages=tuple(messages)), template, id_suffix=f"#{n}")


def _fits(conv, messages, template, tokenizers, max_length, n) -> bool:
    return _longest(_render_piece(conv, messages, template, n), tokenizers) <= max_length


def _truncate_reply(
    conv, system, exchange, template, tokenizers, max_length, n
) -> list[dict[str, str]] | None:
    """The longest prefix of the reply (cut at a character boundary, found by bisection) that fits."""
    user, reply = exchange
    lo, hi = 0, len(reply["content"])
    best = None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        trial = [user, {"role": "assistant", "content": reply["content"][:mid]}]
        if reply["content"][:mid].strip() and _fits(
            conv, system + trial, template, tokenizers, max_length, n
        ):
            lo, best = mid, trial
        else:
            hi = mid - 1
    return best


def texts_fingerprint(texts: Sequence[RenderedText]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(json.dumps(t.to_json(), ensure_ascii=False, sort_keys=True).encode())
        h.update(b"\n")
    return h.hexdigest()


@dataclass(frozen=True)
class Encoded:
    """One model's view of a rendered text: tokens, byte spans and which tokens are supervised."""

    spans: TokenSpans
    supervised: np.ndarray  # bool [n]: token t is a training target (an assistant token)

    @property
    def ids(self) -> np.ndarray:
        return self.spans.ids

    def predicting_positions(self) -> np.ndarray:
        """Positions p whose next-token distribution is scored (token p+1 is supervised)."""
        return np.flatnonzero(self.supervised[1:])


def encode(tokenizer: Any, rendered: RenderedText) -> Encoded:
    """Tokenise ``rendered.text`` with exact spans; a token is supervised if it overlaps an assistant span."""
    spans = encode_with_spans(tokenizer, rendered.text)
    supervised = np.zeros(len(spans), dtype=bool)
    nonempty = spans.ends > spans.starts
    for a, b in rendered.spans:
        supervised |= nonempty & (spans.starts < b) & (spans.ends > a)
    return Encoded(spans=spans, supervised=supervised)
