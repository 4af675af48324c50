"""The export round trip on the real SmolLM2-135M-Instruct (slow: uses the converted model in ~/.cache)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from fuselab.modeling.resolve import resolve_model
from fuselab.prune.blocks import Block, BlockMasker, inspect_blocks
from fuselab.prune.export import export_pruned
from fuselab.prune.kv_cache import cache_parameter, output_cache, verify_cached_decoding
from fuselab.prune.loading import load_pruned_model


@pytest.mark.slow
def test_smollm2_decilm_export_round_trip(tmp_path):
    src = resolve_model("smollm2-135m-instruct")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    layout = inspect_blocks(model)
    assert layout.layers[0].params == {
        "attn": 576 * 576 * 2 + 2 * 576 * 192 + 576,
        "mlp": 3 * 576 * 1536 + 576,
        "shared": 0,
    }
    removed = {Block("attn", 0), Block("mlp", 5), Block("attn", 7), Block("mlp", 7)}
    BlockMasker(model, layout).set_removed(removed)
    info = export_pruned(src, tmp_path, AutoConfig.from_pretrained(src), layout, removed)
    assert info.format == "decilm" and len(info.kept_layers) == 29
    config = json.loads((tmp_path / "config.json").read_text())
    assert (
        config["block_configs"][0]["attention"]["no_op"]
        and config["block_configs"][1]["ffn"]["ffn_mult"] == 4.0
    )
    reloaded = load_pruned_model(tmp_path)
    ids = torch.tensor([[1, 504, 3458, 282, 4469, 314, 7042, 30, 378, 3458, 282, 4469, 314]])
    with torch.no_grad():
        want = model(input_ids=ids).logits
        assert torch.allclose(reloaded(input_ids=ids).logits, want, atol=1e-4, rtol=0)
        past = output_cache(reloaded(input_ids=ids[:, :-1], use_cache=True))
        step = reloaded(input_ids=ids[:, -1:], use_cache=True, **{cache_parameter(reloaded): past}).logits[
            :, -1
        ]
    assert torch.allclose(step, want[:, -1], atol=1e-3, rtol=0)
    # greedy generation of a left-padded batch, with and without the cache (what `fuselab prune` verifies)
    assert verify_cached_decoding(reloaded, ids, torch.float32)["same_tokens"]


@pytest.mark.slow
def test_smollm2_pruned_export_through_the_lm_eval_bridge(tmp_path):
    pytest.importorskip("lm_eval")
    from fuselab.evaluate.harness import evaluate_checkpoint, run_lm_eval
    from fuselab.modeling.tokenizers import load_tokenizer

    src = resolve_model("smollm2-135m-instruct")
    tok = load_tokenizer(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    dense = run_lm_eval(model, tok, ["fuselab_code_body"])
    assert dense.tasks["fuselab_code_body"].headline > 0.45  # a real model beats chance (0.25) clearly

    layout = inspect_blocks(model)
    removed = {Block("attn", 3), Block("mlp", 20), Block("attn", 25), Block("mlp", 25)}
    BlockMasker(model, layout).set_removed(removed)
    export_pruned(src, tmp_path, AutoConfig.from_pretrained(src), layout, removed)
    in_memory = run_lm_eval(model, tok, ["fuselab_chat_reply"], limit=10, log_samples=True)
    exported = evaluate_checkpoint(tmp_path, ["fuselab_chat_reply"], limit=10, log_samples=True)

    def logliks(r):
        return [float(x[0][0]) for s in r.samples["fuselab_chat_reply"] for x in s["resps"]]

    assert logliks(exported) == pytest.approx(logliks(in_memory), abs=2e-3)
