"""The fusion loss against hand computation and against the plain causal-LM loss."""

from __future__ import annotations

import math

import pytest
import torch

from fuselab.fusion.loss import IGNORE, fusion_loss
from helpers.models import random_model, tiny_llama_config


def _one_position(logits_row, target):
    """Batch of one sequence of two tokens: position 0 predicts token 1 (label 2)."""
    logits = torch.zeros(1, 2, len(logits_row))
    logits[0, 0] = torch.tensor(logits_row)
    labels = torch.tensor([[IGNORE, 2]])
    ids = torch.tensor([[t for t, _ in target]])
    logp = torch.tensor([[math.log(p) for _, p in target]])
    return logits, labels, ids, logp


def test_loss_matches_hand_computation():
    z = [1.0, 2.0, 0.5, -1.0]
    logits, labels, ids, logp = _one_position(z, [(1, 0.5), (2, 0.3)])
    lse = math.log(sum(math.exp(v) for v in z))
    lp = [v - lse for v in z]
    clm = -lp[2]
    ce_bucket = -(0.5 * lp[1] + 0.3 * lp[2]) - 0.2 * math.log(1 - math.exp(lp[1]) - math.exp(lp[2]))
    ce_renorm = -(0.625 * lp[1] + 0.375 * lp[2])
    out = fusion_loss(logits, labels, ids, logp, lam=0.9, tail="bucket")
    assert float(out.clm) == pytest.approx(clm, rel=1e-6)
    assert float(out.fuse) == pytest.approx(ce_bucket, rel=1e-6)
    assert float(out.loss) == pytest.approx(0.9 * clm + 0.1 * ce_bucket, rel=1e-6)
    out = fusion_loss(logits, labels, ids, logp, lam=0.0, tail="renormalize")
    assert float(out.loss) == pytest.approx(ce_renorm, rel=1e-6)
    entropy = -(0.625 * math.log(0.625) + 0.375 * math.log(0.375))
    out = fusion_loss(logits, labels, ids, logp, lam=0.0, tail="renormalize", kind="kl")
    assert float(out.loss) == pytest.approx(ce_renorm - entropy, rel=1e-5)


def test_bucket_target_is_matched_exactly_by_its_own_distribution():
    """With the tail as a class, the minimiser over the student is the teacher itself (KL = 0)."""
    p = torch.tensor([0.5, 0.3, 0.1, 0.1])
    logits, labels, ids, logp = _one_position(p.log().tolist(), [(0, 0.5), (1, 0.3)])
    out = fusion_loss(logits, labels, ids, logp, lam=0.0, kind="kl", tail="bucket")
    assert float(out.loss) == pytest.approx(0.0, abs=1e-6)


def test_padded_targets_are_ignored():
    logits, labels, ids, logp = _one_position([0.1, 0.2, 0.3], [(1, 0.6)])
    ids_p = torch.cat([ids, torch.tensor([[-1]])], 1)
    logp_p = torch.cat([logp, torch.tensor([[-math.inf]])], 1)
    a = fusion_loss(logits, labels, ids, logp, lam=0.3)
    b = fusion_loss(logits, labels, ids_p, logp_p, lam=0.3)
    assert float(a.loss) == pytest.approx(float(b.loss), rel=1e-7)


def test_lambda_one_is_the_plain_causal_lm_loss():
    model = random_model(tiny_llama_config(100), seed=0)
    ids = torch.randint(3, 100, (3, 12))
    mask = torch.ones_like(ids)
    mask[2, 8:] = 0
    labels = ids.clone()
    labels[:, :4] = IGNORE
    labels[mask == 0] = IGNORE
    n = int((labels[:, 1:] != IGNORE).sum())
    t_ids = torch.randint(0, 100, (n, 5))
    t_logp = torch.log_softmax(torch.randn(n, 5), -1) - 0.5
    with torch.no_grad():
        hf = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        logits = model(input_ids=ids, attention_mask=mask).logits
    ours = fusion_loss(logits, labels, t_ids, t_logp, lam=1.0)
    assert float(ours.loss) == pytest.approx(float(hf), rel=1e-5)
    # And the gradients agree too.
    model.zero_grad()
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    g_hf = model.model.embed_tokens.weight.grad.clone()
    model.zero_grad()
    fusion_loss(
        model(input_ids=ids, attention_mask=mask).logits, labels, t_ids, t_logp, lam=1.0
    ).loss.backward()
    torch.testing.assert_close(model.model.embed_tokens.weight.grad, g_hf, rtol=1e-4, atol=1e-7)


def test_target_rows_must_match_supervised_positions():
    logits, labels, ids, logp = _one_position([0.0, 0.0, 0.0], [(1, 0.5)])
    with pytest.raises(ValueError, match="target rows"):
        fusion_loss(logits, labels, torch.cat([ids, ids]), torch.cat([logp, logp]), lam=0.5)


def test_vllm_prompt_logprobs_convert_to_the_store_layout():
    """vLLM returns, per prompt position, {token: Logprob(logprob, rank)} with the top-k plus the actual token."""
    from types import SimpleNamespace

    import numpy as np

    from fuselab.data.render import Encoded
    from fuselab.data.token_spans import TokenSpans
    from fuselab.fusion.extract import topk_from_prompt_logprobs

    ids = np.array([5, 7, 9, 11])
    enc = Encoded(
        TokenSpans(ids, np.arange(4), np.arange(1, 5), 0), supervised=np.array([False, False, True, True])
    )
    lp = lambda v, r: SimpleNamespace(logprob=v, rank=r)  # noqa: E731
    prompt_logprobs = [
        None,
        {7: lp(-0.1, 1), 3: lp(-2.5, 2)},
        {9: lp(-3.0, 5), 1: lp(-0.2, 1), 2: lp(-1.9, 2)},  # gold 9 outside the top-2
        {11: lp(-0.5, 1), 4: lp(-1.0, 2)},
    ]
    row = topk_from_prompt_logprobs(prompt_logprobs, enc, k=2)
    assert row.ids.tolist() == [[1, 2], [11, 4]]
    np.testing.assert_allclose(row.logp.astype(float), [[-0.2, -1.9], [-0.5, -1.0]], rtol=1e-3)
    np.testing.assert_allclose(row.gold_nll.astype(float), [3.0, 0.5], rtol=1e-3)


def _padded_batch(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding
    mask[2, 5:] = 0
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, IGNORE))
    labels[:, :4] = IGNORE  # the prompt
    return ids, mask, labels


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_the_lm_head_on_supervised_positions_alone_gives_the_models_own_logits(family):
    from fuselab.fusion.train import head_splits, supervised_logits
    from helpers.prune import gemma3_config

    config = tiny_llama_config() if family == "llama" else gemma3_config(layers=2)
    if family == "gemma3":
        config.final_logit_softcapping = 3.0  # small enough to matter at these logit scales
    model = random_model(config)
    ids, mask, labels = _padded_batch(config.vocab_size)
    assert head_splits(model, ids, mask, labels)
    full, gold_full, _ = supervised_logits(model, ids, mask, labels, split=False)
    part, gold, outputs = supervised_logits(model, ids, mask, labels, split=True)
    n = int((labels[:, 1:] != IGNORE).sum())
    assert part.shape == (n, config.vocab_size) and outputs is None
    assert torch.equal(gold, gold_full)
    torch.testing.assert_close(part, full, rtol=1e-5, atol=1e-5)
    if family == "gemma3":
        assert float(full.detach().abs().max()) <= 3.0  # the soft-capping was applied, and reproduced


def test_a_model_whose_logits_the_split_does_not_reproduce_keeps_the_full_forward(caplog):
    from fuselab.fusion.train import head_splits

    config = tiny_llama_config()
    model = random_model(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(50.0)  # logits large enough that a soft-cap changes them
    model.config.final_logit_softcapping = 1.0  # the split would cap; Llama's own forward does not
    ids, mask, labels = _padded_batch(config.vocab_size)
    assert not head_splits(model, ids, mask, labels)
    assert "training computes the full logits" in caplog.text
