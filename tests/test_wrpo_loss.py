"""WRPO loss, its DPO special cases, its gradient and the α schedule, against independent computations."""

from __future__ import annotations

import math

import pytest
import torch

from fuselab.wrpo.data import TokenizeOptions, WRPOCollator, tokenize_rows
from fuselab.wrpo.forward import forward_logps
from fuselab.wrpo.loss import dpo_loss, gradient_coefficients, sequence_logps, wrpo_loss
from fuselab.wrpo.schedule import alpha_at
from helpers.wrpo import brute_logp, preference_rows, reference_dpo, tiny_chat_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("wrpo-loss") / "m"
    model, tok = tiny_chat_model(path)
    examples, _ = tokenize_rows(preference_rows(4), tok, TokenizeOptions(256, 128))
    batch = WRPOCollator(tok.pad_token_id)(examples)
    return model, tok, examples, batch


def _random_logps(b=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    pol = -50 - 30 * torch.rand((b, 3), generator=g, dtype=torch.float64)
    ref = pol + torch.randn((b, 3), generator=g, dtype=torch.float64) * 3
    return pol, ref


def test_loss_is_log2_at_initialisation(tiny):
    model, _, _, batch = tiny
    with torch.no_grad():
        logps = forward_logps(model, batch)
    loss, m = wrpo_loss(logps, logps.clone(), alpha=0.37, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    for k in ("rewards/source_chosen", "rewards/target_chosen", "rewards/rejected", "rewards/margins"):
        assert m[k].item() == 0.0
    assert m["sigmoid_neg_z"].item() == pytest.approx(0.5)


@pytest.mark.parametrize("alpha,pair", [(0.0, 1), (1.0, 0)])
def test_alpha_0_and_1_are_dpo(alpha, pair):
    pol, ref = _random_logps()
    beta = 0.3
    loss, _ = wrpo_loss(pol, ref, alpha=alpha, beta=beta)
    expected = reference_dpo(pol[:, pair], pol[:, 2], ref[:, pair], ref[:, 2], beta)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert dpo_loss(pol[:, pair], pol[:, 2], ref[:, pair], ref[:, 2], beta).item() == pytest.approx(
        expected.item(), rel=1e-6
    )


def test_alpha_0_and_1_are_dpo_on_a_tiny_model(tiny):
    model, _, _, batch = tiny
    with torch.no_grad():
        pol = forward_logps(model, batch)
    ref = pol + torch.tensor([[1.5, -0.5, 0.7]]) * torch.arange(1, 5)[:, None]
    for alpha, pair in ((0.0, 1), (1.0, 0)):
        loss, _ = wrpo_loss(pol, ref, alpha, beta=0.2)
        assert loss.item() == pytest.approx(
            reference_dpo(pol[:, pair], pol[:, 2], ref[:, pair], ref[:, 2], 0.2).item(), rel=1e-5
        )


def test_wrpo_mixes_inside_the_sigmoid_not_the_average_of_two_dpo_losses():
    pol, ref = _random_logps(seed=3)
    loss, _ = wrpo_loss(pol, ref, alpha=0.5, beta=0.5)
    h = pol - ref
    by_hand = -torch.nn.functional.logsigmoid(0.5 * (0.5 * h[:, 0] + 0.5 * h[:, 1] - h[:, 2])).mean()
    average = 0.5 * (
        dpo_loss(pol[:, 0], pol[:, 2], ref[:, 0], ref[:, 2], 0.5)
        + dpo_loss(pol[:, 1], pol[:, 2], ref[:, 1], ref[:, 2], 0.5)
    )
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-9)
    assert abs(loss.item() - average.item()) > 1e-3


def test_label_smoothing_is_conservative_dpo():
    pol, ref = _random_logps(seed=4)
    eps, beta, alpha = 0.2, 0.1, 0.3
    loss, _ = wrpo_loss(pol, ref, alpha, beta, label_smoothing=eps)
    h = pol - ref
    z = beta * (alpha * h[:, 0] + (1 - alpha) * h[:, 1] - h[:, 2])
    by_hand = (-(1 - eps) * torch.log(torch.sigmoid(z)) - eps * torch.log(torch.sigmoid(-z))).mean()
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-6)


def test_gradient_wrt_logps_matches_closed_form():
    pol, ref = _random_logps(b=6, seed=1)
    pol.requires_grad_(True)
    loss, _ = wrpo_loss(pol, ref, alpha=0.3, beta=0.2)
    loss.backward()
    expected = gradient_coefficients(pol.detach(), ref, 0.3, 0.2)
    torch.testing.assert_close(pol.grad, expected.to(pol.grad.dtype), rtol=1e-5, atol=1e-9)


def test_parameter_gradient_on_tiny_model_matches_chain_rule(tiny):
    """∇θ L from one batched forward equals Σ_k c_k ∇θ log π(y_k|x) from separate unpadded forwards."""
    model, _, examples, batch = tiny
    model = model.double()
    try:
        with torch.no_grad():
            ref = forward_logps(model, batch).detach() + torch.tensor([[0.4, -0.3, 0.2]], dtype=torch.float64)
        alpha, beta = 0.25, 0.5
        model.zero_grad()
        pol = forward_logps(model, batch)
        loss, _ = wrpo_loss(pol, ref, alpha, beta)
        loss.backward()
        auto = {n: p.grad.clone() for n, p in model.named_parameters()}
        coef = gradient_coefficients(pol.detach(), ref, alpha, beta)
        model.zero_grad()
        total = 0
        for i, ex in enumerate(examples):
            for k, col in enumerate(("ws", "wt", "l")):
                total = total + coef[i, k] * brute_logp(model, ex["prompt_ids"], ex[f"{col}_ids"])
        total.backward()
        for n, p in model.named_parameters():
            torch.testing.assert_close(auto[n], p.grad, rtol=1e-6, atol=1e-10, msg=n)
    finally:
        model.float()


def test_sequence_logps_ignore_padding_and_prompt(tiny):
    model, _, examples, batch = tiny
    with torch.no_grad():
        logps = forward_logps(model, batch)
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        no_offset = sequence_logps(full, batch["input_ids"], batch["completion_mask"])
    b = len(examples)
    for i, ex in enumerate(examples):
        for k, col in enumerate(("ws", "wt", "l")):
            with torch.no_grad():
                ref = brute_logp(model, ex["prompt_ids"], ex[f"{col}_ids"]).item()
            assert logps[i, k].item() == pytest.approx(ref, abs=2e-4)
            assert no_offset[k * b + i].item() == pytest.approx(ref, abs=2e-4)


def test_schedule_values():
    # spec Appendix A: T = 312, α_final = 0.1
    got = [alpha_at(s, 312, 0.1) for s in (0, 1, 156, 311, 312, 400)]
    assert got == pytest.approx([0.0, 0.1 / 312, 0.05, 0.1 * 311 / 312, 0.1, 0.1])
    assert alpha_at(311, 312, 0.1, reach_final=True) == pytest.approx(0.1)
    assert alpha_at(0, 312, 0.1, reach_final=True) == 0.0
    assert alpha_at(5, 10, 0.7, kind="constant") == 0.7
    assert alpha_at(5, 10, 0.2, kind="cosine") == pytest.approx(0.1)
    assert alpha_at(0, 10, 0.2, kind="cosine") == 0.0
    with pytest.raises(ValueError, match="unknown alpha schedule"):
        alpha_at(0, 10, 0.1, kind="step")  # type: ignore[arg-type]
