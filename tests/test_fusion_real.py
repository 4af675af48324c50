"""Fusion on the real models (slow): SmolLM2 pivot with the Gemma-3 source on a few bundled code problems.

Uses the user's model cache; Gemma-3-270M is fetched (and converted once) on first use.
"""

from __future__ import annotations

import pytest

from fuselab.fusion.config import FusionRecipe
from fuselab.fusion.workspace import Workspace

pytestmark = pytest.mark.slow


def test_real_models_extract_align_and_project(tmp_path):
    recipe = FusionRecipe.model_validate(
        {
            "pivot": "smollm2-135m-instruct",
            "sources": ["gemma-3-270m"],
            "names": {"smollm2-135m-instruct": "smollm2", "gemma-3-270m": "gemma3"},
            "data": {"train": ["bundled:code.train"], "max_length": 512, "limit": 4},
            "extract": {"k": 10, "batch_tokens": 2048},
        }
    )
    ws = Workspace(recipe, tmp_path / "w", show_progress=False)
    summaries = ws.extract()
    # 62 bytes per supervised token at k = 10, plus the .npy headers of small shards.
    assert all(s.bytes_per_token < 64 + 2000 / max(1, s.tokens) for s in summaries.values())
    stats = ws.build_targets()["smollm2+gemma3"]
    src = stats["sources"]["gemma3"]
    assert src["projection"]["projected"] / src["projection"]["positions"] > 0.8
    assert src["coverage"]["1-1"] > src["coverage"]["crossing"]
    assert src["vocab"]["mapped"] / src["vocab"]["source_ids"] > 0.9
    # Issue 12: the targets in the pivot's own segmentation give the pivot's next token more probability than
    # the mapping before (exact surfaces, dropped mass in the tail), on the same stores.
    old = FusionRecipe.model_validate(
        {
            **recipe.model_dump(),
            "align": {"vocab": "exact", "chain_rule": False, "dropped_mass": "tail"},
            "fuse": {"score": "own"},
        }
    )
    before = Workspace(old, tmp_path / "w", show_progress=False).build_targets()["smollm2+gemma3"]
    new_t, old_t = src["targets"], before["sources"]["gemma3"]["targets"]
    assert new_t["mean q(gold)"] > old_t["mean q(gold)"] + 0.02, (new_t, old_t)
    assert new_t["top-1 is gold"] > old_t["top-1 is gold"]
    assert new_t["mean dropped mass"] < 0.01 < old_t["mean dropped mass"] + old_t["mean tail mass"]
