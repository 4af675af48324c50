"""Conversation loading, rendering with assistant byte spans, exact token spans, fitting to max length."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fuselab.data.conversations import DataError, LoadReport, load_conversations
from fuselab.data.render import encode, render, render_to_fit
from fuselab.data.token_spans import TextMismatchError, encode_with_spans
from helpers.tokenizers import CHATML_TEMPLATE, byte_level_bpe, metaspace_bpe, wordpiece

ROWS = [
    {"id": "a", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
    {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "2+2?"},
            {"from": "gpt", "value": "4"},
        ]
    },
]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_formats_load_the_same_conversations(tmp_path):
    jsonl = _write_jsonl(tmp_path / "d.jsonl", ROWS)
    (tmp_path / "d.json").write_text(json.dumps(ROWS))
    import pyarrow as pa
    import pyarrow.parquet as pq

    openai_rows = [
        ROWS[0],
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"},
            ]
        },
    ]
    pq.write_table(pa.Table.from_pylist(openai_rows), tmp_path / "d.parquet")
    from datasets import Dataset

    Dataset.from_list(openai_rows).save_to_disk(str(tmp_path / "ds"))
    expected = [m for c in load_conversations(jsonl) for m in c.messages]
    assert expected[-1] == {"role": "assistant", "content": "4"}
    for path in (tmp_path / "d.json", tmp_path / "d.parquet", tmp_path / "ds"):
        got = [m for c in load_conversations(path) for m in c.messages]
        assert got == expected, path


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"messages": [{"role": "assistant", "content": "x"}]}, "wrong role order"),
        (
            {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "  "}]},
            "empty content",
        ),
        (
            {
                "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
                "extra": 1,
            },
            "unknown fields",
        ),
        ({"messages": [{"role": "user", "content": "x"}]}, "no final assistant turn"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "bad role"),
        ({"text": "plain"}, "no messages"),
    ],
)
def test_malformed_rows_name_the_row_or_are_skipped_and_counted(tmp_path, row, reason):
    path = _write_jsonl(tmp_path / "d.jsonl", [ROWS[0], row])
    with pytest.raises(DataError, match=r"d.jsonl row 2:"):  # the second row, counted from 1
        load_conversations(path)
    report = LoadReport()
    convs = load_conversations(path, on_error="skip", report=report)
    assert len(convs) == 1 and report.skipped == {reason: 1}
    assert reason in report.summary()


def test_no_usable_rows_is_an_error(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"messages": []}])
    with pytest.raises(DataError, match="no usable conversations"):
        load_conversations(path, on_error="skip")


@pytest.mark.parametrize(
    "make",
    [lambda: byte_level_bpe(300), lambda: metaspace_bpe(400), lambda: metaspace_bpe(400, style="gemma")],
)
@pytest.mark.parametrize(
    "text",
    [
        "Hello world",
        " two  spaces\n\nnew lines",
        "digits 12345 and 😀 emoji",
        "CJK 你好世界",
        "<|im_start|>user\nHi<|im_end|>\n",
    ],
)
def test_token_spans_tile_the_text_exactly(make, text):
    tok = make()
    spans = encode_with_spans(tok, text)
    data = text.encode()
    real = spans.ends > spans.starts
    # Non-empty spans are contiguous, in order, and cover every byte exactly once.
    assert spans.starts[real][0] == 0 and spans.ends[real][-1] == len(data)
    assert (spans.starts[real][1:] == spans.ends[real][:-1]).all()
    # A token's span holds exactly the text the token decodes to (modulo the space a SentencePiece decoder
    # strips from a lone token; partial UTF-8 byte tokens decode to U+FFFD and are covered by the tiling).
    for tid, a, b in zip(
        spans.ids[spans.n_prefix :], spans.starts[spans.n_prefix :], spans.ends[spans.n_prefix :]
    ):
        decoded = tok.decode([int(tid)])
        if "\ufffd" not in decoded:
            assert decoded.strip() == data[int(a) : int(b)].decode().strip()


def test_tokenizer_that_changes_the_text_is_refused():
    with pytest.raises(Exception, match="WordPiece|does not reproduce"):
        encode_with_spans(wordpiece(300), "Hello World")


def test_metaspace_prefix_space_covers_no_text():
    tok = metaspace_bpe(400)
    spans = encode_with_spans(tok, "Hello")
    assert spans.starts[0] == 0 and spans.ends[-1] == 5


def test_assistant_mask_covers_replies_and_end_of_turn():
    from fuselab.data.conversations import Conversation

    tok = byte_level_bpe(300)
    conv = Conversation(
        "x",
        (
            {"role": "user", "content": "Paris?"},
            {"role": "assistant", "content": "Paris is nice."},
            {"role": "user", "content": "More"},
            {"role": "assistant", "content": "1 2 3"},
        ),
    )
    rendered = render(conv, tok)
    data = rendered.text.encode()
    assert [data[a:b] for a, b in rendered.spans] == [b"Paris is nice.<|im_end|>", b"1 2 3<|im_end|>"]
    enc = encode(tok, rendered)
    supervised_text = b"".join(
        data[a:b] for a, b in zip(enc.spans.starts[enc.supervised], enc.spans.ends[enc.supervised])
    )
    assert supervised_text == b"Paris is nice.<|im_end|>1 2 3<|im_end|>"


def test_long_conversations_are_split_to_fit_every_tokenizer():
    from fuselab.data.conversations import Conversation
    from fuselab.data.render import SplitReport

    tok_a, tok_b = byte_level_bpe(300), metaspace_bpe(400)
    tok_b.chat_template = CHATML_TEMPLATE
    turns = []
    for i in range(6):
        turns += [
            {"role": "user", "content": f"Question {i} about the quick brown fox?"},
            {"role": "assistant", "content": f"Answer {i}: the fox jumps over the lazy dog."},
        ]
    conv = Conversation("long", tuple(turns))
    one = render(Conversation("one", tuple(turns[:2])), tok_a).text
    limit = int(2.5 * max(len(encode_with_spans(t, one)) for t in (tok_a, tok_b)))
    report = SplitReport()
    pieces = render_to_fit([conv], tok_a, [tok_a, tok_b], limit, report)
    assert len(pieces) > 1 and report.split == 1
    for piece in pieces:
        assert max(len(encode_with_spans(t, piece.text)) for t in (tok_a, tok_b)) <= limit
        assert piece.spans
    # Every answer survives, in order, in exactly one piece.
    joined = "".join(p.text for p in pieces)
    assert [joined.find(f"Answer {i}:") for i in range(6)] == sorted(
        joined.find(f"Answer {i}:") for i in range(6)
    )
    # A single reply that cannot fit is truncated (and counted), never silently cut by one tokenizer alone.
    huge = Conversation(
        "huge", ({"role": "user", "content": "Go"}, {"role": "assistant", "content": "fox " * 200})
    )
    report = SplitReport()
    (piece,) = render_to_fit([huge], tok_a, [tok_a, tok_b], limit, report)
    assert report.truncated == 1
    assert max(len(encode_with_spans(t, piece.text)) for t in (tok_a, tok_b)) <= limit


def test_models_see_the_same_text_or_error():
    tok = byte_level_bpe(300)
    text = "same text"
    a = encode_with_spans(tok, text)
    assert int(a.ends[-1]) == len(text.encode())
    with pytest.raises(TextMismatchError):
        from fuselab.data.token_spans import _walk, vocabulary

        _walk(vocabulary(tok), list(tok("other", add_special_tokens=False)["input_ids"]), text.encode())
    assert np.all(a.ends >= a.starts)
