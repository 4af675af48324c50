"""The merged model's tokenizer: which vocabulary it has, how embedding rows follow it, its chat template.

``tokenizer_source`` (or ``tokenizer.source``) picks the output vocabulary, as in mergekit:

- ``base`` (or unset): the base model's; ``MODEL``: that input's; ``union``: the base's, extended with every
  token another input has and the base lacks (appended as added tokens, in input order).
- When every input already has the output's vocabulary (the same token ids), rows are used as they are (also
  any padding rows past the tokenizer, which mergekit drops).
- Otherwise every embedding and head is rebuilt in the output's token order before merging: a token's row is
  the input's own row; for an input that lacks the token, the row of the only input that has it, else the
  base's (when the base is an input and has it), else the mean over the inputs that have it, else zeros.
  ``pad_to_multiple_of`` rounds the row count up; padding rows are the mean of the real ones. The config's
  ``vocab_size`` follows.

``chat_template`` is a built-in name (:mod:`fuselab.merge.chat_templates`), a file, a Jinja template, or ``auto``:
the template most inputs have (ties: the tokenizer source's first).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fuselab.merge.chat_templates import CHAT_TEMPLATES
from fuselab.modeling.checkpoint import Checkpoint
from fuselab.utils.errors import FuselabError, IncompatibleModelsError

VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")


@dataclass
class VocabularyPlan:
    """How the vocabulary-indexed rows of every input map onto the output's token ids."""

    num_tokens: int
    size: int  # rows in the output (num_tokens rounded up by pad_to_multiple_of)
    rows: dict[
        Path, torch.Tensor
    ]  # per input checkpoint: output token id -> its row (−1: it lacks the token)
    tokenizer: Any | None  # the union tokenizer to save; None: copy the tokenizer source's files

    def align(self, tensors: list[torch.Tensor], paths: list[Path], base: int | None) -> list[torch.Tensor]:
        """The inputs' rows of one embedding (or head), rebuilt in the output's token order."""
        index = [self.rows[p] for p in paths]
        present = torch.stack([(r >= 0) & (r < t.shape[0]) for r, t in zip(index, tensors)], dim=1)
        out = [t.index_select(0, r.clamp(0, t.shape[0] - 1).to(t.device)) for r, t in zip(index, tensors)]
        lacking = torch.nonzero(~present.all(dim=1)).squeeze(1)
        if lacking.numel():
            has = present[lacking]
            default = torch.zeros_like(out[0][lacking])
            for m, rows in enumerate(out):
                default.add_(rows[lacking] * has[:, m : m + 1].to(rows.dtype))
            default.div_(has.sum(dim=1, keepdim=True).clamp_min(1).to(default.dtype))
            if base is not None:
                from_base = has[:, base]
                default[from_base] = out[base][lacking[from_base]]
            for m, rows in enumerate(out):
                miss = ~has[:, m]
                rows[lacking[miss]] = default[miss]
        if self.size > self.num_tokens:
            out = [
                torch.cat([r, r.mean(0, keepdim=True).expand(self.size - self.num_tokens, -1)]) for r in out
            ]
        return out


def _load_tokenizer(ckpt: Checkpoint, label: str, source: str) -> Any:
    from transformers import AutoTokenizer

    if not any((ckpt.path / f).is_file() for f in VOCAB_FILES):
        raise FuselabError(
            f"{label} has no tokenizer files; `tokenizer_source: {source}` aligns vocabularies and needs every "
            "model's tokenizer: add its tokenizer, or merge models that share one vocabulary"
        )
    try:
        return AutoTokenizer.from_pretrained(ckpt.path)
    except Exception as err:  # a tokenizer transformers cannot load is refused with what to do instead
        raise IncompatibleModelsError(
            f"{label}: its tokenizer does not load ({type(err).__name__}: {err}); vocabularies cannot be aligned. "
            "Merge models that share one tokenizer, or use `fuselab fusion` for different tokenizers"
        ) from None


def _vocab(tokenizer: Any, ckpt: Checkpoint) -> dict[str, int]:
    """token -> id, without ids past the model's embedding rows (mergekit's "stripped" tokenizer)."""
    limit = int(ckpt.text_config().get("vocab_size") or len(tokenizer))
    return {tok: i for tok, i in tokenizer.get_vocab().items() if i < limit}


def _same_files(ckpts: list[Checkpoint]) -> bool:
    """Every checkpoint has byte-identical tokenizer files and one vocab_size (no tokenizer needs loading)."""
    sizes = {c.text_config().get("vocab_size") for c in ckpts}
    if len(sizes) != 1:
        return False
    for name in VOCAB_FILES:
        present = [(c.path / name).is_file() for c in ckpts]
        if any(present) and not all(present):
            return False
        if all(present) and len({(c.path / name).read_bytes() for c in ckpts}) != 1:
            return False
    return any((ckpts[0].path / f).is_file() for f in VOCAB_FILES)


def build_union(base: Any, base_vocab: dict[str, int], others: list[tuple[Any, dict[str, int]]]) -> Any:
    """The base tokenizer extended with every token the others have and it lacks (mergekit's union).

    Plain tokens come first, in input order and then id order; added (special) tokens after them.
    """
    added = [base.added_tokens_decoder] + [tok.added_tokens_decoder for tok, _ in others]
    added_text = {info.content for decoder in added for info in decoder.values()}
    plain: dict[str, None] = {}
    for tok, vocab in others:
        own_added = {info.content for info in tok.added_tokens_decoder.values()}
        for text, _ in sorted(vocab.items(), key=lambda kv: kv[1]):
            if text not in base_vocab and text not in own_added and text not in added_text:
                plain.setdefault(text)
    if plain:
        base.add_tokens(list(plain))
    seen = set(base.get_vocab())
    for (_, vocab), decoder in zip([(base, base_vocab), *others], added):
        ids = set(vocab.values())
        for i, info in sorted(decoder.items()):
            if i in ids and info.content not in seen:
                base.add_tokens(info)
                seen.add(info.content)
    return base


def plan_vocabulary(
    source: str,
    inputs: list[tuple[Checkpoint, str]],
    base: Checkpoint,
    tokenizer_ckpt: Checkpoint,
    pad_to_multiple_of: int | None,
) -> VocabularyPlan | None:
    """The alignment for ``tokenizer_source: source`` (None when every input already has the output's)."""
    ckpts = list({id(c): c for c, _ in inputs}.values())
    if _same_files([*ckpts, tokenizer_ckpt]):
        return None
    labels = {id(c): label for c, label in inputs}
    tokenizers = {id(c): _load_tokenizer(c, labels[id(c)], source) for c in ckpts}
    vocabs = {k: _vocab(tokenizers[k], c) for k, c in ((id(c), c) for c in ckpts)}
    union = None
    if source == "union":
        base_tok = tokenizers.get(id(base)) or _load_tokenizer(base, str(base.path), source)
        base_vocab = vocabs.get(id(base)) or _vocab(base_tok, base)
        others = [(tokenizers[id(c)], vocabs[id(c)]) for c in ckpts if c is not base]
        union = build_union(base_tok, base_vocab, others)
        out_vocab = union.get_vocab()
    else:
        tok = tokenizers.get(id(tokenizer_ckpt)) or _load_tokenizer(
            tokenizer_ckpt, str(tokenizer_ckpt.path), source
        )
        out_vocab = tok.get_vocab()
    num = max(out_vocab.values()) + 1
    rows: dict[Path, torch.Tensor] = {}
    for c in ckpts:
        r = torch.full((num,), -1, dtype=torch.long)
        own = vocabs[id(c)]
        for text, i in out_vocab.items():
            r[i] = own.get(text, -1)
        rows[c.path] = r
    sizes = {int(c.text_config().get("vocab_size") or 0) for c in ckpts}
    identity = torch.arange(num)
    if len(sizes) == 1 and all(torch.equal(r, identity) for r in rows.values()) and not pad_to_multiple_of:
        return None
    size = num if not pad_to_multiple_of else -(-num // pad_to_multiple_of) * pad_to_multiple_of
    return VocabularyPlan(num, size, rows, union)


# -- chat templates ------------------------------------------------------------------------------------------


def model_chat_template(path: Path) -> str | None:
    """The chat template stored with a model (chat_template.jinja / .json, or in tokenizer_config.json)."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    for name in ("chat_template.json", "tokenizer_config.json"):
        f = path / name
        if f.is_file():
            value = json.loads(f.read_text()).get("chat_template")
            if isinstance(value, list):  # named templates: the default one
                value = next((e.get("template") for e in value if e.get("name") == "default"), None)
            if isinstance(value, str):
                return value
    return None


def resolve_chat_template(value: str | None, tokenizer_dir: Path, model_dirs: list[Path]) -> str | None:
    """The template to store with the output (None: keep the tokenizer source's as it is)."""
    if value is None:
        return None
    if value == "auto":
        dirs = dict.fromkeys([tokenizer_dir, *model_dirs])  # each model counted once, the source first
        found = [t.strip() for t in (model_chat_template(p) for p in dirs) if t]
        return Counter(found).most_common(1)[0][0] if found else None
    if value in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[value]
    if "{{" not in value and "{%" not in value and Path(value).is_file():
        return Path(value).read_text()
    return value
