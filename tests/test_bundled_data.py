"""The conversation data bundled in ``fuselab.data`` (built by ``scripts/build_bundled_data.py``)."""

from __future__ import annotations

import re

import pytest

from fuselab.data.bundled import DOMAINS, SPLITS, bundled_path, load_bundled

HELDOUT_FRACTION = {"chat": 0.10, "code": 0.20}


def documented_counts() -> dict[str, int]:
    """The ``| `name.jsonl` | rows |`` table of the bundled README."""
    text = bundled_path("README.md").read_text(encoding="utf-8")
    return {m[1]: int(m[2]) for m in re.finditer(r"^\| `([a-z]+\.[a-z]+)\.jsonl` \| (\d+) \|$", text, re.M)}


def conversations(rows: list[dict]) -> set[tuple[tuple[str, str], ...]]:
    return {tuple((m["role"], m["content"]) for m in row["messages"]) for row in rows}


@pytest.mark.parametrize("domain", DOMAINS)
@pytest.mark.parametrize("split", SPLITS)
def test_rows_are_well_formed(domain: str, split: str) -> None:
    rows = load_bundled(domain, split)
    assert rows
    for row in rows:
        assert row["domain"] == domain
        assert isinstance(row["id"], str) and row["id"]
        assert isinstance(row["source"], str) and row["source"]
        messages = row["messages"]
        assert len(messages) >= 2 and len(messages) % 2 == 0, row["id"]
        for i, message in enumerate(messages):
            assert set(message) == {"role", "content"}
            assert message["role"] == ("user" if i % 2 == 0 else "assistant"), row["id"]
            assert isinstance(message["content"], str) and message["content"].strip(), row["id"]


@pytest.mark.parametrize("split", SPLITS)
def test_code_rows_keep_what_running_the_tests_needs(split: str) -> None:
    for row in load_bundled("code", split):
        assert row["task_id"] == row["id"]
        assert row["task_id"].startswith("HumanEval/")
        assert "def check(candidate)" in row["test"]
        answer = row["messages"][-1]["content"]
        assert answer.startswith("```python\n") and answer.endswith("```")
        assert f"def {row['entry_point']}(" in answer
        # The answer must be runnable code: compile it (the tests are executed by a later stage).
        compile(answer.removeprefix("```python\n").removesuffix("```"), row["id"], "exec")


def test_chat_keeps_the_category_in_source() -> None:
    for row in load_bundled("chat", "train"):
        assert row["source"].startswith("chatterbot-corpus==1.3.3 english/")
        assert "(category: " in row["source"]


@pytest.mark.parametrize("domain", DOMAINS)
def test_heldout_is_disjoint_from_train(domain: str) -> None:
    train = load_bundled(domain, "train")
    heldout = load_bundled(domain, "heldout")
    train_ids = {row["id"] for row in train}
    heldout_ids = {row["id"] for row in heldout}
    assert len(train_ids) == len(train) and len(heldout_ids) == len(heldout)
    assert not train_ids & heldout_ids
    # No held-out conversation appears verbatim in training either.
    assert not conversations(train) & conversations(heldout)


def test_counts_are_as_documented() -> None:
    documented = documented_counts()
    assert set(documented) == {f"{d}.{s}" for d in DOMAINS for s in SPLITS}
    for name, count in documented.items():
        domain, split = name.split(".")
        assert len(load_bundled(domain, split)) == count, name
    assert documented["code.train"] + documented["code.heldout"] == 164  # all of HumanEval
    for domain, fraction in HELDOUT_FRACTION.items():
        total = documented[f"{domain}.train"] + documented[f"{domain}.heldout"]
        assert documented[f"{domain}.heldout"] == round(fraction * total)


def test_bad_names_are_refused() -> None:
    with pytest.raises(ValueError, match="domain"):
        load_bundled("poetry", "train")
    with pytest.raises(ValueError, match="split"):
        load_bundled("chat", "test")
    with pytest.raises(FileNotFoundError, match="available"):
        bundled_path("nothing.jsonl")
