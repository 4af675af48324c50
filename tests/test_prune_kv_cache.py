"""The KV-cache guard: pruned exports of every format decode with the cache exactly as without it, on the
installed transformers, and a release that stops handing the cache to removed attention blocks is refused
loudly (at load, and by ``fuselab prune``'s export verification) instead of generating with wrong positions."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import fuselab.prune.blocks as blocks_mod
import fuselab.prune.loading as loading_mod
from fuselab.prune.blocks import Block, OutputSpec, ZeroBranch
from fuselab.prune.kv_cache import cache_parameter, check_cache_placeholders
from fuselab.prune.loading import load_pruned_model
from fuselab.prune.run import verify_export
from fuselab.utils.errors import FuselabError
from helpers.prune import (
    assert_cached_decoding_is_exact,
    export_tiny,
    gemma3_config,
    llama_config,
    qwen2_config,
    strong_model,
)

# (export format, config, removed blocks): layer 0 loses its attention wherever the format allows, the case
# where transformers reads the cached length from the removed block's slot.
CASES = {
    "stock-llama": ("stock", lambda: llama_config(), {Block("attn", 1), Block("mlp", 1)}),
    "stock-gemma3": ("stock", gemma3_config, {Block("attn", 0), Block("mlp", 0)}),
    "fuselab-qwen2": ("fuselab", qwen2_config, {Block("attn", 0), Block("mlp", 2)}),
    "fuselab-gemma3": ("fuselab", gemma3_config, {Block("attn", 0), Block("attn", 1)}),
    "decilm-llama": ("decilm", lambda: llama_config(intermediate=256), {Block("attn", 0), Block("mlp", 2)}),
}
PROMPT = torch.randint(3, 300, (1, 10), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_export_format_decodes_the_same_with_and_without_the_cache(tmp_path, case):
    fmt, config_fn, removed = CASES[case]
    _, out, info = export_tiny(tmp_path, config_fn(), removed)
    assert info.format == fmt
    loaded = (
        AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        if fmt == "stock"
        else load_pruned_model(out)
    )
    assert_cached_decoding_is_exact(loaded, PROMPT)


def test_the_stand_in_takes_the_cache_under_the_replaced_modules_own_keyword():
    class New(nn.Module):
        def forward(self, hidden_states, cache=None, **kwargs): ...

    class Old(nn.Module):
        def forward(self, hidden_states, past_key_values=None, **kwargs): ...

    class NoCache(nn.Module):
        def forward(self, hidden_states): ...

    assert [cache_parameter(m()) for m in (New, Old, NoCache)] == ["cache", "past_key_values", None]
    assert ZeroBranch.replacing(New(), "mlp", OutputSpec()).cache_arg is None  # only attention has a slot


@pytest.fixture
def cache_never_arrives(monkeypatch):
    """What happened on transformers 5.24 before the fix: the stand-in looks for the cache under a keyword the
    installed release does not use (the old code read ``past_key_value(s)``; 5.24 passes ``cache``)."""
    monkeypatch.setattr(blocks_mod, "cache_parameter", lambda module: "past_key_value")


def test_loading_refuses_a_release_that_does_not_hand_over_the_cache(tmp_path, cache_never_arrives):
    _, out, _ = export_tiny(tmp_path, qwen2_config(), {Block("attn", 0)})
    with pytest.raises(FuselabError, match=r"transformers .* KV cache does not reach the removed attention"):
        load_pruned_model(out)


def test_loading_refuses_an_attention_without_a_known_cache_argument(tmp_path):
    model = strong_model(qwen2_config())
    branch = ZeroBranch("attn", OutputSpec(2), layer_idx=0, cache_arg=None)
    with pytest.raises(FuselabError, match="cannot tell how the KV cache reaches"):
        check_cache_placeholders(model, [branch], "model")


def test_export_verification_catches_wrong_cached_logits_on_its_own(
    tmp_path, monkeypatch, cache_never_arrives
):
    """Even without the load-time probe, ``fuselab prune``'s verification compares cached and uncached logits
    and refuses the export (the 5.24 failure gave the same greedy tokens on some models, different logits)."""
    monkeypatch.setattr(loading_mod, "check_cache_placeholders", lambda *a, **k: None)
    model, out, _ = export_tiny(tmp_path, qwen2_config(), {Block("attn", 0), Block("mlp", 2)})
    sample = torch.randint(3, 300, (1, 32), generator=torch.Generator().manual_seed(2))
    with pytest.raises(FuselabError, match="decodes differently with and without its KV cache"):
        verify_export(out, model, sample, torch.float32)


def test_export_verification_passes_and_reports_the_gap(tmp_path):
    model, out, _ = export_tiny(tmp_path, qwen2_config(), {Block("attn", 0), Block("mlp", 2)})
    sample = torch.randint(3, 300, (1, 32), generator=torch.Generator().manual_seed(2))
    report = verify_export(out, model, sample, torch.float32)
    assert report["generation_with_cache_matches"] and report["cached_decoding_max_abs_logit_gap"] <= 1e-4


def test_the_suite_guard_itself_fails_when_the_cache_does_not_arrive(
    tmp_path, monkeypatch, cache_never_arrives
):
    monkeypatch.setattr(loading_mod, "check_cache_placeholders", lambda *a, **k: None)
    _, out, _ = export_tiny(tmp_path, qwen2_config(), {Block("attn", 0), Block("mlp", 2)})
    with pytest.raises(AssertionError, match="transformers"):
        assert_cached_decoding_is_exact(load_pruned_model(out), PROMPT)


def test_fuselab_prune_refuses_the_export_when_the_cache_does_not_arrive(
    tmp_path, capsys, cache_never_arrives
):
    from fuselab.cli import main
    from test_prune_cli import _setup

    recipe = _setup(tmp_path, num_blocks=1)  # the first block removed from this model is an attention
    assert main(["prune", str(recipe), "--no-progress"]) != 0
    assert "KV cache" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
