"""Block discovery, the exactness probe, skipping exactness and parameter accounting."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm

from fuselab.prune.blocks import Block, BlockMasker, inspect_blocks
from fuselab.utils.errors import IncompatibleModelsError
from helpers.prune import gemma3_config, llama_config, qwen2_config, strong_model, zeroed_copy


def test_llama_layout_and_parameter_counts():
    model = strong_model(llama_config())
    layout = inspect_blocks(model)
    assert layout.layers_path == "model.layers" and layout.num_layers == 4
    lay = layout.layers[0]
    assert (lay.attn, lay.mlp) == ("self_attn", "mlp")
    assert lay.attn_norms == ("input_layernorm",) and lay.mlp_norms == ("post_attention_layernorm",)
    # hand count: q (32x32) + k, v (32x16 each, 2 KV heads of 8) + o (32x32) + norm 32; MLP 3 x 32x64 + norm 32
    assert lay.params == {"attn": 32 * 32 * 2 + 2 * 32 * 16 + 32, "mlp": 3 * 32 * 64 + 32, "shared": 0}
    # tied embeddings counted once: 300x32 + final norm 32 + 4 layers
    assert layout.total_params == 300 * 32 + 32 + 4 * (lay.params["attn"] + lay.params["mlp"])
    assert layout.total_params == sum(p.numel() for p in model.parameters())


def test_ratio_accounting():
    layout = inspect_blocks(strong_model(llama_config()))
    a, m = layout.layers[0].params["attn"], layout.layers[0].params["mlp"]
    removed = {Block("attn", 1), Block("mlp", 1), Block("mlp", 3)}
    assert layout.removed_params(removed) == a + 2 * m
    assert layout.ratio(removed) == pytest.approx((a + 2 * m) / layout.total_params)


def test_gemma3_sandwich_norms_belong_to_their_block():
    layout = inspect_blocks(strong_model(gemma3_config()))
    lay = layout.layers[1]
    assert lay.attn_norms == ("input_layernorm", "post_attention_layernorm")
    assert lay.mlp_norms == ("pre_feedforward_layernorm", "post_feedforward_layernorm")
    assert lay.attn_pre == ("input_layernorm",) and lay.attn_post == ("post_attention_layernorm",)


def test_qwen2_biases_counted_with_attention():
    layout = inspect_blocks(strong_model(qwen2_config()))
    assert layout.layers[0].params["attn"] == 32 * 32 * 2 + 2 * 32 * 16 + 32 + 16 + 16 + 32


@pytest.mark.parametrize("removed", [[("attn", 0)], [("mlp", 2)], [("attn", 1), ("mlp", 1), ("mlp", 3)]])
def test_skipping_a_block_equals_zeroing_its_output_projection(removed):
    model = strong_model(llama_config())
    ids = torch.randint(3, 300, (2, 12))
    want = zeroed_copy(model, removed)(input_ids=ids).logits
    layout = inspect_blocks(model)
    BlockMasker(model, layout).set_removed({Block(k, i) for k, i in removed})
    got = model(input_ids=ids).logits
    assert torch.equal(got, want)


def test_masker_restores_the_dense_model():
    model = strong_model(gemma3_config())
    ids = torch.randint(3, 300, (1, 10))
    dense = model(input_ids=ids).logits
    masker = BlockMasker(model, inspect_blocks(model))
    with masker.also_removed([Block("attn", 0), Block("mlp", 3)]):
        assert not torch.equal(model(input_ids=ids).logits, dense)
    assert masker.removed == frozenset()
    assert torch.equal(model(input_ids=ids).logits, dense)


class _PostNormLayer(LlamaDecoderLayer):
    """A post-LN layer: a norm after the residual, so removing a block is not the identity."""

    def forward(self, hidden_states, **kwargs):
        return self.output_norm(super().forward(hidden_states, **kwargs))


def test_probe_refuses_post_layer_norm():
    model = strong_model(llama_config())
    for layer in model.model.layers:
        layer.output_norm = LlamaRMSNorm(32)
        layer.__class__ = _PostNormLayer
    with pytest.raises(IncompatibleModelsError, match="not a pre-norm residual layer"):
        inspect_blocks(model)
