"""Builds the data of fuselab's bundled lm-eval tasks (``harness_tasks/``) from the bundled held-out data.

The paper's zero-shot tasks (PIQA, WinoGrande, HellaSwag, ARC; BlockPruner §4.1) are hub datasets, which
fuselab cannot fetch offline. These two small tasks measure the same kind of thing, log-likelihood ranking of
candidate continuations, on real text that ships with fuselab (``fuselab/data/bundled``, held-out splits,
so nothing a ``fuselab`` stage trained or calibrated on):

- ``fuselab_chat_reply`` (90 items): the first user turn of a held-out ChatterBot conversation; the choices
  are its real first reply and the first replies of 3 other held-out conversations (HellaSwag-like).
- ``fuselab_code_body`` (33 items): a held-out HumanEval function signature and docstring; the choices are
  its canonical body and the bodies of 3 other held-out problems.

Distractors and the answer position come from ``random.Random`` seeded with the item id, so the files are
reproducible; ``python -m fuselab.evaluate.harness_data`` rewrites them and the tests check they are current.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

from fuselab.data.bundled import load_bundled

TASKS_DIR = Path(__file__).with_name("harness_tasks")
NUM_CHOICES = 4
_CODE = re.compile(r"```python\n(.*?)```", re.S)


def _pick(rng: random.Random, own: str, pool: list[str], k: int) -> list[str]:
    others = sorted({p for p in pool if p != own})
    return rng.sample(others, k)


def _mc_row(item_id: str, question: str, answer: str, pool: list[str]) -> dict[str, Any]:
    rng = random.Random(item_id)
    choices = _pick(rng, answer, pool, NUM_CHOICES - 1)
    label = rng.randrange(NUM_CHOICES)
    choices.insert(label, answer)
    return {"id": item_id, "question": question, "choices": choices, "label": label}


def chat_reply_rows() -> list[dict[str, Any]]:
    convs = load_bundled("chat", "heldout")
    pairs = [(c["id"], c["messages"][0]["content"], c["messages"][1]["content"]) for c in convs]
    pool = [a for _, _, a in pairs]
    return [_mc_row(i, q, a, pool) for i, q, a in pairs]


def _split_code(row: dict[str, Any]) -> tuple[str, str]:
    prompt = _CODE.search(row["messages"][0]["content"])
    full = _CODE.search(row["messages"][1]["content"])
    if not prompt or not full or not full.group(1).startswith(prompt.group(1)):
        raise ValueError(f"{row['id']}: the reply does not extend the prompt's code")
    return prompt.group(1), full.group(1)[len(prompt.group(1)) :]


def code_body_rows() -> list[dict[str, Any]]:
    rows = load_bundled("code", "heldout")
    pairs = [(r["id"], *_split_code(r)) for r in rows]
    pool = [b for _, _, b in pairs]
    return [_mc_row(i, p, b, pool) for i, p, b in pairs]


BUILDERS = {"chat_reply.jsonl": chat_reply_rows, "code_body.jsonl": code_body_rows}


def render(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write_task_data(out: Path = TASKS_DIR) -> list[Path]:
    written = []
    for name, build in BUILDERS.items():
        path = out / name
        path.write_text(render(build()), encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":
    for p in write_task_data():
        print(p)
