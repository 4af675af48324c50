"""The WRPO loss (Yang et al., "Weighted-Reward Preference Optimization for Implicit Model Fusion",
ICLR 2025, arXiv 2412.03187, §3; shared/spec/wrpo.md §2) and the DPO loss it generalises.

Everything here is a pure function of *summed* response log-probabilities, so tests can check it against
hand-computed values and autograd without a model:

    h_k = log π_θ(y_k|x) − log π_ref(y_k|x)              k ∈ {ws, wt, l}
    z   = β · (α·h_ws + (1−α)·h_wt − h_l)
    L   = mean( −(1−ε)·log σ(z) − ε·log σ(−z) )           (ε = label smoothing, cDPO; 0 in the paper)

β multiplies the combined margin, which equals α·r_ws + (1−α)·r_wt − r_l with r = β·h. α = 0 is DPO on
(y_wt, y_l) and α = 1 is DPO on (y_ws, y_l); WRPO is *not* the mean of those two losses (the mixing is
inside the sigmoid).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Column order of the [B, 3] log-prob tensors everywhere in this package.
COLUMNS = ("ws", "wt", "l")
WS, WT, L = 0, 1, 2


def wrpo_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    alpha: float,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """WRPO loss over a batch.

    Args:
        policy_logps: [B, 3] summed response log-probs under the policy, columns (y_ws, y_wt, y_l).
        ref_logps: [B, 3] the same under the frozen reference (no gradient).
        alpha: fusion coefficient α ∈ [0, 1] for this optimiser step (see :mod:`fuselab.wrpo.schedule`).
        beta: β, the KL-regularisation strength of the implicit reward.
        label_smoothing: ε of conservative DPO; 0 reproduces the paper.

    Returns:
        The scalar loss (mean over the batch, computed in float32) and detached per-batch metrics: the
        three implicit rewards, the weighted chosen reward, margins, element-wise accuracies and σ(−z),
        the per-example weight every gradient term shares (spec §2.2).
    """
    if policy_logps.shape != ref_logps.shape or policy_logps.ndim != 2 or policy_logps.shape[1] != 3:
        raise ValueError(
            f"expected [B, 3] log-probs for (y_ws, y_wt, y_l), got {tuple(policy_logps.shape)} "
            f"and {tuple(ref_logps.shape)}"
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    dtype = torch.promote_types(policy_logps.dtype, torch.float32)  # float32 at least (spec §9.13)
    h = policy_logps.to(dtype) - ref_logps.to(dtype).detach()
    weights = torch.tensor([alpha, 1.0 - alpha, -1.0], dtype=h.dtype, device=h.device)
    z = beta * (h @ weights)
    losses = -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    loss = losses.mean()
    with torch.no_grad():
        r = beta * h.detach()
        r_w = alpha * r[:, WS] + (1.0 - alpha) * r[:, WT]
        metrics = {
            "alpha": torch.tensor(float(alpha)),
            "rewards/chosen": r_w.mean(),
            "rewards/source_chosen": r[:, WS].mean(),
            "rewards/target_chosen": r[:, WT].mean(),
            "rewards/rejected": r[:, L].mean(),
            "rewards/margins": (r_w - r[:, L]).mean(),
            "rewards/source_margins": (r[:, WS] - r[:, L]).mean(),
            "rewards/target_margins": (r[:, WT] - r[:, L]).mean(),
            # Element-wise [B] comparisons (the reference code broadcast [B] against [B, 1]; spec §9.2).
            "rewards/accuracies": (r_w > r[:, L]).float().mean(),
            "rewards/source_accuracies": (r[:, WS] > r[:, L]).float().mean(),
            "rewards/target_accuracies": (r[:, WT] > r[:, L]).float().mean(),
            "logps/source_chosen": policy_logps[:, WS].detach().float().mean(),
            "logps/target_chosen": policy_logps[:, WT].detach().float().mean(),
            "logps/rejected": policy_logps[:, L].detach().float().mean(),
            "sigmoid_neg_z": torch.sigmoid(-z.detach()).mean(),
        }
    return loss, metrics


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Plain DPO (Rafailov et al. 2023): mean −log σ(β[(π_c − ref_c) − (π_r − ref_r)]), for comparisons."""
    z = beta * (
        (policy_chosen.float() - ref_chosen.float()) - (policy_rejected.float() - ref_rejected.float())
    )
    return (-(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)).mean()


def gradient_coefficients(
    policy_logps: torch.Tensor, ref_logps: torch.Tensor, alpha: float, beta: float
) -> torch.Tensor:
    """dL/d(log π(y_k|x)) in closed form, [B, 3] (spec §2.2): −(β/B)·σ(−z)·(α, 1−α, −1).

    Used by tests against autograd, and documents why α scales the push-up on the source response.
    """
    dtype = torch.promote_types(policy_logps.dtype, torch.float32)
    h = policy_logps.to(dtype) - ref_logps.to(dtype)
    z = beta * (alpha * h[:, WS] + (1 - alpha) * h[:, WT] - h[:, L])
    w = torch.sigmoid(-z) * beta / h.shape[0]
    return -w[:, None] * torch.tensor([alpha, 1 - alpha, -1.0], dtype=h.dtype)


def sequence_logps(
    logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor, offset: int = 0
) -> torch.Tensor:
    """Summed log-probs of the completion tokens of each row, in float32, without a full log-softmax copy.

    Args:
        logits: [N, K, V] logits of the *last* K positions of the sequences (K = L − offset; ``offset`` lets
            callers skip the language-model head over leading prompt positions).
        input_ids: [N, L] token ids.
        completion_mask: [N, L] 1 on tokens whose log-prob counts (response tokens), 0 elsewhere.
        offset: position of ``logits[:, 0]`` in the full sequence.

    Position t of the logits predicts token t+1, so token j is scored by logits at j−1.
    """
    n, k, _ = logits.shape
    targets = input_ids[:, offset + 1 : offset + k + 1]
    mask = completion_mask[:, offset + 1 : offset + k + 1].to(torch.float32)
    logits = logits[:, : targets.shape[1]]
    # Row by row keeps the float32 copy to one sequence's [K, V] at a time.
    out = []
    for i in range(n):
        row = logits[i].to(torch.promote_types(logits.dtype, torch.float32))
        tok = row.gather(-1, targets[i].unsqueeze(-1)).squeeze(-1) - torch.logsumexp(row, dim=-1)
        out.append((tok * mask[i]).sum())
    return torch.stack(out)
