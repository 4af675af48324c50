"""Tiny real tokenizers, trained in a fraction of a second on a small corpus.

Different families on purpose, so that code which must work across tokenizers is really exercised:

- :func:`byte_level_bpe`: GPT-2-style byte-level BPE (``Ġ`` space marker), ChatML specials and template;
- :func:`metaspace_bpe`: SentencePiece-style BPE (``▁`` space marker, ``byte_fallback`` with ``<0xNN>``
  tokens), either with a Metaspace pre-tokenizer or Gemma's Replace-normalizer layout and turn tokens;
- :func:`wordpiece`: BERT-style WordPiece (``##`` continuation prefix);
- :func:`sentencepiece_model`: a real SentencePiece ``tokenizer.model`` file (no tokenizer.json).
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CORPUS = [
    "Hello, how are you today? I am fine, thank you.",
    "The quick brown fox jumps over the lazy dog 123 times.",
    "def add(a, b):\n    return a + b\n",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 1000.",
    "Merging models in parameter space needs the same architecture.",
] * 4

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_level_bpe(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """GPT-2-style byte-level BPE with ChatML special tokens and a chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def save_tokenizer(tok: PreTrainedTokenizerFast, path: str | Path) -> Path:
    path = Path(path)
    tok.save_pretrained(path)
    return path


BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]

GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]


def metaspace_bpe(vocab_size: int = 400, style: str = "metaspace") -> PreTrainedTokenizerFast:
    """SentencePiece-style BPE: ``▁`` for spaces, ``byte_fallback`` with the 256 ``<0xNN>`` byte tokens.

    ``style="metaspace"`` uses a Metaspace pre-tokenizer and decoder (Llama-2 converted by tokenizers);
    ``style="gemma"`` has no Metaspace step but a ``Replace(" ", "▁")`` normalizer and a
    ``Sequence[Replace("▁", " "), ByteFallback, Fuse]`` decoder, like Gemma's tokenizer.json, and Gemma's
    turn tokens.
    """
    import json

    if style not in ("metaspace", "gemma"):
        raise ValueError(f"unknown style {style!r}")
    specials = GEMMA_SPECIALS if style == "gemma" else ["<unk>", "<s>", "</s>"]
    # Train merges on the corpus, then rebuild the model with the byte tokens right after the specials (as
    # SentencePiece lays them out) and byte_fallback switched on.
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    _metaspace_pipeline(trainer_tok, style)
    trainer_tok.train_from_iterator(
        CORPUS,
        trainer=trainers.BpeTrainer(
            vocab_size=max(vocab_size - len(BYTE_TOKENS), 100), special_tokens=specials, show_progress=False
        ),
    )
    trained = json.loads(trainer_tok.to_str())["model"]
    vocab: dict[str, int] = {}
    for token in [*specials, *BYTE_TOKENS, *sorted(trained["vocab"], key=trained["vocab"].get)]:
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    _metaspace_pipeline(tok, style)
    tok.add_special_tokens(specials)
    if style == "gemma":
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _metaspace_pipeline(tok: Tokenizer, style: str) -> None:
    from tokenizers import normalizers

    if style == "gemma":
        tok.normalizer = normalizers.Replace(" ", "▁")
        tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
        tok.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(prepend_scheme="first")])


def wordpiece(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """BERT-style WordPiece (``##`` continuation prefix, lower-casing normalizer)."""
    from tokenizers import normalizers

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.train_from_iterator(
        CORPUS,
        trainer=trainers.WordPieceTrainer(
            vocab_size=vocab_size, special_tokens=specials, show_progress=False
        ),
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]"
    )


def sentencepiece_model(path: str | Path, model_type: str = "bpe", byte_fallback: bool = True) -> Path:
    """Train a real SentencePiece ``tokenizer.model`` (a few hundred pieces) and write it to ``path``."""
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 3),
        model_writer=buf,
        vocab_size=320 if byte_fallback else 60,
        model_type=model_type,
        byte_fallback=byte_fallback,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    path = Path(path)
    path.write_bytes(buf.getvalue())
    return path


def byte_bpe_from_merges(merges: list[tuple[str, str]], *, split: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE whose only merges are ``merges`` (texts, e.g. ``(":", "\\n")``), for hand-made cases.

    ``split``: GPT-2's pre-tokenizer regex (SmolLM2-like: ``:`` and ``\\n`` never merge, ``\\n   `` does);
    without it the whole text is one pre-token, so any merge applies (Qwen-like ``:\\n``).
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_map = {b: c for c, b in _byte_level_map().items()}

    def piece(text: str) -> str:
        return "".join(byte_map[b] for b in text.encode())

    vocab = {t: i for i, t in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>", *sorted(alphabet)])}
    pairs = []
    for a, b in merges:
        pa, pb = piece(a), piece(b)
        pairs.append((pa, pb))
        vocab.setdefault(pa + pb, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def _byte_level_map() -> dict[str, int]:
    from fuselab.data.token_spans import _byte_decoder

    return _byte_decoder()
