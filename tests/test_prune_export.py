"""Export round trips: the reloaded checkpoint's logits equal the masked model's, and its KV cache works."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from fuselab.modeling.checkpoint import Checkpoint
from fuselab.prune.blocks import Block
from fuselab.prune.loading import load_pruned_model
from helpers.prune import (
    assert_cached_decoding_is_exact,
    export_tiny,
    gemma3_config,
    llama_config,
    qwen2_config,
)


def _same_logits_and_cached_generation(model, reloaded):
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=0)
    assert_cached_decoding_is_exact(reloaded, ids[:1])


@pytest.mark.parametrize("config_fn", [llama_config, gemma3_config])
def test_whole_layers_give_a_stock_checkpoint(tmp_path, config_fn):
    removed = {Block("attn", 1), Block("mlp", 1), Block("attn", 2), Block("mlp", 2)}
    model, out, info = export_tiny(tmp_path, config_fn(), removed)
    assert info.format == "stock" and info.kept_layers == [0, 3]
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 2
    if "layer_types" in config:
        assert config["layer_types"] == ["sliding_attention", "full_attention"]  # layers 0 and 3
    names = set(Checkpoint(out).tensors)
    assert not any(n.startswith("model.layers.2.") for n in names)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    _same_logits_and_cached_generation(model, reloaded)


@pytest.mark.parametrize("config_fn", [qwen2_config, gemma3_config])
def test_partial_removal_fuselab_format(tmp_path, config_fn):
    removed = {Block("attn", 0), Block("mlp", 2), Block("attn", 3), Block("mlp", 3)}
    model, out, info = export_tiny(tmp_path, config_fn(), removed)
    assert info.format == "fuselab" and info.kept_layers == [0, 1, 2]
    names = set(Checkpoint(out).tensors)
    assert not any(n.startswith("model.layers.0.self_attn.") for n in names)
    assert not any(n.startswith("model.layers.2.mlp.") for n in names)
    assert "model.layers.0.mlp.up_proj.weight" in names
    with pytest.raises(Exception):  # noqa: B017 - stock transformers must refuse, not fill weights at random
        AutoModelForCausalLM.from_pretrained(out)
    _same_logits_and_cached_generation(model, load_pruned_model(out))


def test_partial_removal_decilm_format(tmp_path):
    removed = {Block("attn", 0), Block("mlp", 2)}
    model, out, info = export_tiny(tmp_path, llama_config(intermediate=256), removed)
    assert info.format == "decilm"
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["DeciLMForCausalLM"] and config["model_type"] == "nemotron-nas"
    blocks = config["block_configs"]
    assert blocks[0]["attention"] == {"no_op": True, "replace_with_linear": False, "n_heads_in_group": None}
    assert blocks[2]["ffn"]["no_op"] and blocks[2]["ffn"]["ffn_mult"] is None
    assert blocks[1]["attention"]["n_heads_in_group"] == 2 and blocks[1]["ffn"]["ffn_mult"] == 12.0
    names = set(Checkpoint(out).tensors)
    assert "model.layers.0.input_layernorm.weight" not in names  # vLLM builds no norm for a no-op block
    assert "model.layers.2.post_attention_layernorm.weight" not in names
    remote = AutoConfig.from_pretrained(out, trust_remote_code=True)  # the shipped configuration_decilm.py
    assert remote.block_configs[0].attention.no_op and remote.num_hidden_layers == 4
    _same_logits_and_cached_generation(model, load_pruned_model(out))


def test_decilm_never_for_non_llama_and_unfit_width(tmp_path):
    _, _, info = export_tiny(tmp_path, llama_config(intermediate=64), {Block("attn", 1)})
    assert info.format == "fuselab" and "multiple of 256" in info.decilm_note
