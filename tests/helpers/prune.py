"""Tiny models and an independent brute-force search for the prune tests."""

from __future__ import annotations

import copy

import torch
from transformers import Gemma3TextConfig, LlamaConfig

from helpers.models import random_model, tiny_qwen2_config


def llama_config(layers: int = 4, intermediate: int = 64) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=300,
        num_hidden_layers=layers,
        hidden_size=32,
        intermediate_size=intermediate,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def gemma3_config(layers: int = 4) -> Gemma3TextConfig:
    return Gemma3TextConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_hidden_layers=layers,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"] * (layers // 2),
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def qwen2_config(layers: int = 4):
    return tiny_qwen2_config(layers=layers)


def strong_model(config, seed: int = 0, scale: float = 8.0):
    """A random model whose blocks matter (weights ~0.16 rather than 0.02), so calibration scores differ."""
    model = random_model(config, seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    return model


def zeroed_copy(model, removed):
    """An independent way to remove blocks from a Llama-like model: zero o_proj / down_proj (no biases)."""
    out = copy.deepcopy(model)
    for kind, layer in removed:
        mod = out.model.layers[layer]
        lin = mod.self_attn.o_proj if kind == "attn" else mod.mlp.down_proj
        with torch.no_grad():
            lin.weight.zero_()
            if lin.bias is not None:
                lin.bias.zero_()
    return out


def brute_force_nll(model, removed, chunks: torch.Tensor, batch_size: int = 1) -> float:
    import torch.nn.functional as F

    m = zeroed_copy(model, removed)
    total = 0.0
    with torch.no_grad():
        for ids in chunks.split(batch_size):
            logits = m(input_ids=ids, use_cache=False).logits
            v = logits.shape[-1]
            total += float(
                F.cross_entropy(logits[:, :-1].reshape(-1, v), ids[:, 1:].reshape(-1), reduction="sum")
            )
    return total


def brute_force_search(model, chunks, num_steps: int, unit: str = "block", layers: int = 4) -> list[str]:
    """The paper's Alg. 1 written as plainly as possible, on zeroed-weight copies of the model."""
    if unit == "block":
        cands = [(f"{k}.{i}", [(k, i)]) for k in ("attn", "mlp") for i in range(layers)]
    else:
        cands = [(f"layer.{i}", [("attn", i), ("mlp", i)]) for i in range(layers)]
    removed: list = []
    order = []
    for _ in range(num_steps):
        best, best_nll = None, float("inf")
        for name, blocks in cands:
            if name in order:
                continue
            nll = brute_force_nll(model, removed + blocks, chunks)
            if nll < best_nll:
                best, best_nll = (name, blocks), nll
        order.append(best[0])
        removed += best[1]
    return order


def planted_model(seed: int = 0, harmful=(("mlp", 1), ("attn", 2)), gain: float = 1.0):
    """A 4-layer Llama that predicts its input token (unit-scale tied embeddings, tiny blocks) except for the
    ``harmful`` blocks, which write large noise into the residual stream. On chunks of one repeated token,
    removing a harmful block lowers the NLL a lot and every other candidate stays far worse: the score spread
    a real model has, in which the fast search abandons candidates early."""
    model = random_model(llama_config(), seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0, 1, generator=g)
        model.model.norm.weight.fill_(1.0)
        for kind, i in harmful:
            layer = model.model.layers[i]
            if kind == "mlp":
                layer.post_attention_layernorm.weight.fill_(1.0)
                lins = (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)
            else:
                layer.input_layernorm.weight.fill_(1.0)
                lins = (layer.self_attn.v_proj, layer.self_attn.o_proj)
            for lin in lins:
                lin.weight.normal_(0, gain / lin.weight.shape[1] ** 0.5, generator=g)
    return model


def repeated_token_chunks(n: int = 8, length: int = 12, seed: int = 1) -> torch.Tensor:
    """``n`` chunks, each one random token repeated ``length`` times (for :func:`planted_model`)."""
    return torch.randint(3, 300, (n, 1), generator=torch.Generator().manual_seed(seed)).repeat(1, length)


def assert_cached_decoding_is_exact(model, prompt: torch.Tensor, new_tokens: int = 8) -> None:
    """Decoding with the KV cache equals decoding without it, on the installed transformers:

    - one step by hand on the cache (positions read from the cache) equals the full forward;
    - greedy generation of one row with the cache: every step's logits equal the full forward's on the final
      sequence (no cache at all);
    - greedy generation of a left-padded batch: logits and tokens equal generation without the cache.
    """
    import transformers

    from fuselab.prune.kv_cache import cache_parameter, output_cache, padded_batch

    version = f"transformers {transformers.__version__}"
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        past = output_cache(model(input_ids=prompt[:, :-1], use_cache=True))
        step = model(input_ids=prompt[:, -1:], use_cache=True, **{cache_parameter(model): past}).logits[:, -1]
        full = model(input_ids=prompt, use_cache=False).logits[:, -1]
        assert torch.allclose(step, full, atol=1e-5, rtol=0), f"{version}: one cached step != full forward"

        out = model.generate(prompt, use_cache=True, output_logits=True, return_dict_in_generate=True, **kw)
        full = model(input_ids=out.sequences, use_cache=False).logits
        start = prompt.shape[1] - 1
        for i, logits in enumerate(out.logits):
            gap = float((logits - full[:, start + i]).abs().max())
            assert gap <= 1e-5, (
                f"{version}: cached decoding step {i} differs from the full forward by {gap:.3g}"
            )

        ids, mask = padded_batch(prompt)
        runs = [
            model.generate(
                ids, attention_mask=mask, use_cache=c, output_logits=True, return_dict_in_generate=True, **kw
            )
            for c in (True, False)
        ]
        for i, (a, b) in enumerate(zip(runs[0].logits, runs[1].logits)):
            gap = float((a - b).abs().max())
            assert gap <= 1e-5, f"{version}: padded batch, cached step {i} differs from uncached by {gap:.3g}"
        assert torch.equal(runs[0].sequences, runs[1].sequences), f"{version}: cached tokens != uncached"


def export_tiny(tmp_path, config, removed, **kw):
    """A strong tiny model of ``config`` saved, masked and exported without ``removed``: (model, out, info)."""
    from transformers import AutoConfig

    from fuselab.prune.blocks import BlockMasker, inspect_blocks
    from fuselab.prune.export import export_pruned
    from helpers.models import save_model

    model = strong_model(config)
    src = save_model(model, tmp_path / "src")
    layout = inspect_blocks(model)
    BlockMasker(model, layout).set_removed(removed)
    out = tmp_path / "out"
    out.mkdir()
    info = export_pruned(src, out, AutoConfig.from_pretrained(src), layout, removed, **kw)
    return model, out, info
