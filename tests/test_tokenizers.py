"""Tokenizer family detection reads the backend (tokenizer.json / tokenizer.model), never class names."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer

from fuselab.modeling.tokenizers import (
    TokenizerFamily,
    family_from_sentencepiece,
    family_from_tokenizer_json,
    load_tokenizer,
    tokenizer_family,
    tokenizer_files,
)
from fuselab.utils.errors import FuselabError, ModelNotFoundError
from helpers.tokenizers import byte_level_bpe, metaspace_bpe, save_tokenizer, sentencepiece_model, wordpiece

BYTE_LEVEL = TokenizerFamily("byte-level BPE", "BPE", False, "Ġ")
SPM_BPE = TokenizerFamily("SentencePiece/Metaspace", "BPE", True, "▁")


@pytest.fixture(scope="module")
def tokenizers_by_style():
    return {
        "byte-level": byte_level_bpe(),
        "metaspace": metaspace_bpe(style="metaspace"),
        "gemma": metaspace_bpe(style="gemma"),
        "wordpiece": wordpiece(),
    }


@pytest.mark.parametrize(
    ("style", "expected"),
    [
        ("byte-level", BYTE_LEVEL),
        ("metaspace", SPM_BPE),
        ("gemma", SPM_BPE),
        ("wordpiece", TokenizerFamily("WordPiece", "WordPiece", False, None, "##")),
    ],
)
def test_family_of_each_builder(tokenizers_by_style, tmp_path, style, expected):
    tok = tokenizers_by_style[style]
    # the same answer from the object, its backend, its saved folder and its tokenizer.json
    assert tokenizer_family(tok) == expected
    assert tokenizer_family(tok.backend_tokenizer) == expected
    folder = save_tokenizer(tok, tmp_path / style)
    assert tokenizer_family(folder) == expected
    assert tokenizer_family(str(folder / "tokenizer.json")) == expected


def test_family_properties_and_text():
    assert BYTE_LEVEL.is_byte_level and not BYTE_LEVEL.is_sentencepiece
    assert SPM_BPE.is_sentencepiece and not SPM_BPE.is_byte_level
    assert str(SPM_BPE) == "SentencePiece/Metaspace (BPE, space marker '▁', byte fallback)"
    assert SPM_BPE.to_dict() == {
        "kind": "SentencePiece/Metaspace",
        "model": "BPE",
        "byte_fallback": True,
        "space_marker": "▁",
        "continuation_prefix": None,
    }


def test_nested_sequences_are_searched():
    # Qwen2 layout: ByteLevel inside a pre-tokenizer Sequence, after a regex Split
    data = {
        "model": {"type": "BPE", "byte_fallback": False, "vocab": {}, "merges": []},
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": "\\s+"}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
            ],
        },
        "decoder": {"type": "ByteLevel"},
    }
    assert family_from_tokenizer_json(data) == BYTE_LEVEL


def test_llama2_layout_with_prepend_and_replace_only():
    # Llama-2 tokenizer.json: Sequence[Prepend("▁"), Replace(" ", "▁")] normalizer, no pre-tokenizer
    data = {
        "model": {"type": "BPE", "byte_fallback": True, "vocab": {}, "merges": []},
        "normalizer": {
            "type": "Sequence",
            "normalizers": [
                {"type": "Prepend", "prepend": "▁"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
            ],
        },
        "pre_tokenizer": None,
        "decoder": None,
    }
    assert family_from_tokenizer_json(data) == SPM_BPE


def test_unigram_metaspace_and_custom_marker():
    data = {
        "model": {"type": "Unigram", "vocab": [["<unk>", 0.0]], "byte_fallback": False},
        "pre_tokenizer": {"type": "Metaspace", "replacement": "_", "prepend_scheme": "always"},
        "decoder": {"type": "Metaspace", "replacement": "_"},
    }
    assert family_from_tokenizer_json(data) == TokenizerFamily(
        "SentencePiece/Metaspace", "Unigram", False, "_"
    )


def test_unknown_layouts_are_other():
    word_level = {"model": {"type": "WordLevel", "vocab": {"a": 0}}, "pre_tokenizer": {"type": "Whitespace"}}
    assert family_from_tokenizer_json(word_level) == TokenizerFamily("other", "WordLevel", False, None)
    # a model without "type" (old files) is inferred from its fields
    assert family_from_tokenizer_json({"model": {"vocab": {}, "merges": []}}).model == "BPE"
    byte_level_unigram = {"model": {"type": "Unigram", "vocab": []}, "decoder": {"type": "ByteLevel"}}
    assert family_from_tokenizer_json(byte_level_unigram) == TokenizerFamily("other", "Unigram", False, "Ġ")


@pytest.mark.parametrize(("model_type", "expected_model"), [("bpe", "BPE"), ("unigram", "Unigram")])
def test_sentencepiece_model_file(tmp_path, model_type, expected_model):
    path = sentencepiece_model(tmp_path / "tokenizer.model", model_type=model_type)
    expected = TokenizerFamily("SentencePiece/Metaspace", expected_model, True, "▁")
    assert tokenizer_family(path) == expected
    assert tokenizer_family(tmp_path) == expected  # a folder without tokenizer.json falls back to it


def test_sentencepiece_without_byte_fallback(tmp_path):
    path = sentencepiece_model(tmp_path / "tokenizer.model", byte_fallback=False)
    assert family_from_sentencepiece(path.read_bytes()).byte_fallback is False


def test_sentencepiece_processor_object(tmp_path):
    import sentencepiece as spm

    path = sentencepiece_model(tmp_path / "tokenizer.model")

    class SlowTokenizer:  # stands in for a SentencePiece-based (slow) transformers tokenizer
        sp_model = spm.SentencePieceProcessor(model_file=str(path))

    assert tokenizer_family(SlowTokenizer()).is_sentencepiece


def test_corrupt_sentencepiece_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"\x0a\xff\xff\xff\xff\x0f")  # a length-delimited field running past the end
    with pytest.raises(FuselabError, match="not a valid ModelProto"):
        tokenizer_family(bad)


def test_tokenizer_json_preferred_over_model(tmp_path):
    save_tokenizer(byte_level_bpe(), tmp_path)
    sentencepiece_model(tmp_path / "tokenizer.model")
    assert tokenizer_family(tmp_path) == BYTE_LEVEL


def test_raw_tokenizers_object_and_dict():
    tok = byte_level_bpe()
    raw = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    assert tokenizer_family(raw) == BYTE_LEVEL
    assert tokenizer_family(json.loads(raw.to_str())) == BYTE_LEVEL


def test_errors(tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"no tokenizer\.json or tokenizer\.model"):
        tokenizer_family(tmp_path)
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        tokenizer_family(tmp_path / "missing.json")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(FuselabError, match="not valid JSON"):
        tokenizer_family(tmp_path)
    with pytest.raises(FuselabError, match="cannot tell the family of a object"):
        tokenizer_family(object())


def test_load_tokenizer_round_trip(tmp_path):
    folder = save_tokenizer(metaspace_bpe(style="gemma"), tmp_path / "tok")
    assert tokenizer_files(folder) == ["tokenizer.json"]
    tok = load_tokenizer(folder)
    text = "Hello world, 世界 🙂"
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text
    assert tokenizer_family(tok) == SPM_BPE


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not a folder"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="has no tokenizer files"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(FuselabError, match="cannot load the tokenizer"):
        load_tokenizer(tmp_path)
