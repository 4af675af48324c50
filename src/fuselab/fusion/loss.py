"""The fusion training loss: ``λ·L_CLM + (1−λ)·L_fuse`` (FuseLLM eq. 5; FuseChat §5).

L_fuse is the cross-entropy (or KL) of the student's full-vocabulary softmax against the fused *sparse*
target: with z the student logits at a supervised position and (u_r, q_r) the target's ids and probabilities,

    log p_θ(u_r) = z[u_r] − logsumexp(z)          (a gather, never a vocabulary-sized target tensor)
    CE = −Σ_r q_r · log p_θ(u_r)  [ − q_tail · log(1 − Σ_r p_θ(u_r)) ]

Both terms share one ``logsumexp`` per position, so CLM + fusion costs about what CLM alone does; the
reference builds dense [B, L, V] targets in the collator (FuseChat spec §9.2 items 7–8).

``tail`` decides what happens to the probability mass outside the kept top-k (the stored log-probs are
normalised over the full vocabulary, so Σ q_r ≤ 1):

- ``renormalize`` (the reference): q is rescaled to sum to one over the kept ids, which makes the target
  over-confident (spec §2.3);
- ``bucket`` (default): the missing mass becomes one more class, "any other token", so the student is asked to
  match the teacher's probabilities themselves, not their ratios.

λ = 1 is plain supervised fine-tuning: the loss is then exactly the causal-LM loss over supervised tokens.

``kind="alm"`` replaces the token-level term by Approximate Likelihood Matching (Minixhofer et al., NeurIPS
2025, arXiv 2503.20083; :func:`alm_loss`): on chunks of text between byte boundaries both tokenisations share
(:mod:`fuselab.fusion.align.chunks`), the student's chunk likelihood is matched to the teacher's as two
Bernoulli distributions ``{p, 1 − p}``, whatever the segmentation inside the chunk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

IGNORE = -100


@dataclass
class FusionLossOutput:
    loss: torch.Tensor
    clm: torch.Tensor
    fuse: torch.Tensor
    positions: int


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 − exp(x))`` for x < 0, accurate on both sides of log(1/2)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def alm_loss(
    student_logp: torch.Tensor,
    chunk_ids: torch.Tensor,
    teacher_chunk_logp: torch.Tensor,
    *,
    temperature: float = 1.0,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Binary cross-entropy between teacher and student chunk likelihoods, averaged over chunks.

    ``student_logp`` [N]: the student's log-probability of each gold token; ``chunk_ids`` [N]: the chunk each
    position belongs to (−1: none); ``teacher_chunk_logp`` [C]: the teacher's log-likelihood of each chunk.
    With ``t = log p_teacher / T − ε`` and ``s = Σ_{i ∈ chunk} log p_student(i) / T − ε`` (ε keeps both below 0),

        ALM = −[ exp(t) · s + (1 − exp(t)) · log(1 − exp(s)) ]

    (tokenkit's ``binary_ce`` "binarised" f-divergence). It is minimised at s = t: where the teacher is sure of
    a chunk it is the chunk's NLL, where it is unsure it stops the student from being surer.
    """
    c = teacher_chunk_logp.shape[0]
    if c == 0:
        return student_logp.sum() * 0.0
    dtype = torch.promote_types(student_logp.dtype, torch.float32)  # float32 at least
    valid = chunk_ids >= 0
    s = torch.zeros(c, dtype=dtype, device=student_logp.device)
    s = s.index_add(0, chunk_ids[valid], student_logp[valid].to(dtype))
    t = teacher_chunk_logp.to(dtype) / temperature - eps
    s = s / temperature - eps
    return (-(torch.exp(t) * s + (-torch.expm1(t)) * log1mexp(s))).mean()


def fusion_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    target_ids: torch.Tensor,
    target_logp: torch.Tensor,
    **options: Any,
) -> FusionLossOutput:
    """Loss on a batch.

    ``logits`` [B, L, V] (position t predicts token t+1); ``labels`` [B, L] with ``IGNORE`` on unsupervised
    tokens; ``target_ids``/``target_logp`` [N, K] for the N supervised positions in row-major order (the
    positions t with ``labels[:, t+1] != IGNORE``), padded with id −1 / log-prob −inf. ``options``: those of
    :func:`supervised_fusion_loss` (``lam``, ``kind``, ``tail``; ``kind="alm"`` needs ``chunk_ids`` [N],
    batch-wide chunk indices with −1 for none, and ``chunk_logp`` [C] instead of the targets).
    """
    sup = labels[:, 1:] != IGNORE
    return supervised_fusion_loss(logits[:, :-1][sup], labels[:, 1:][sup], target_ids, target_logp, **options)


def supervised_fusion_loss(
    z: torch.Tensor,
    gold: torch.Tensor,
    target_ids: torch.Tensor,
    target_logp: torch.Tensor,
    *,
    lam: float,
    kind: Literal["ce", "kl", "alm"] = "ce",
    tail: Literal["bucket", "renormalize"] = "bucket",
    chunk_ids: torch.Tensor | None = None,
    chunk_logp: torch.Tensor | None = None,
    alm_temperature: float = 1.0,
) -> FusionLossOutput:
    """:func:`fusion_loss` on the logits of the supervised positions only: ``z`` [N, V] and their gold next
    tokens ``gold`` [N], row-major. Training computes the LM head on those positions alone
    (:func:`fuselab.fusion.train.supervised_logits`), never on prompt or padding positions."""
    z = z.float()  # [N, V]
    n = z.shape[0]
    if target_ids.shape[0] != n:
        raise ValueError(f"{target_ids.shape[0]} target rows for {n} supervised positions")
    if n == 0:
        zero = z.sum() * 0.0
        return FusionLossOutput(zero, zero.detach(), zero.detach(), 0)
    lse = z.logsumexp(-1)
    clm = (lse - z.gather(1, gold[:, None])[:, 0]).mean()
    if lam >= 1.0:
        return FusionLossOutput(clm, clm.detach(), torch.zeros((), device=clm.device), n)
    if kind == "alm":
        if chunk_ids is None or chunk_logp is None:
            raise ValueError("kind 'alm' needs chunk_ids and chunk_logp (targets built by fuselab >= 0.2)")
        student_gold = z.gather(1, gold[:, None])[:, 0] - lse
        fuse = alm_loss(student_gold, chunk_ids, chunk_logp, temperature=alm_temperature)
        loss = lam * clm + (1.0 - lam) * fuse
        return FusionLossOutput(loss, clm.detach(), fuse.detach(), n)
    valid = target_ids >= 0
    student = z.gather(1, target_ids.clamp(min=0)) - lse[:, None]  # log p_θ(u_r)
    q = torch.where(valid, target_logp.float().exp(), torch.zeros((), device=z.device))
    kept = q.sum(-1)
    if tail == "renormalize":
        q = q / kept.clamp(min=1e-12)[:, None]
        ce = -(q * torch.where(valid, student, torch.zeros((), device=z.device))).sum(-1)
        entropy = -(q * torch.where(valid, q.clamp(min=1e-30).log(), torch.zeros((), device=z.device))).sum(
            -1
        )
    elif tail == "bucket":
        ce = -(q * torch.where(valid, student, torch.zeros((), device=z.device))).sum(-1)
        q_tail = (1.0 - kept).clamp(min=0.0)
        s = torch.where(valid, student, torch.full((), -torch.inf, device=z.device)).logsumexp(-1)
        log_rest = torch.log(-torch.expm1(s.clamp(max=-1e-7)))  # log(1 − Σ p_θ(u_r))
        ce = ce - q_tail * log_rest
        entropy = -(q * torch.where(valid, q.clamp(min=1e-30).log(), torch.zeros((), device=z.device))).sum(
            -1
        )
        entropy = entropy - q_tail * q_tail.clamp(min=1e-30).log()
    else:
        raise ValueError(f"unknown tail mode {tail!r}; valid: bucket, renormalize")
    per_pos = ce if kind == "ce" else ce - entropy
    fuse = per_pos.mean()
    loss = lam * clm + (1.0 - lam) * fuse
    return FusionLossOutput(loss, clm.detach(), fuse.detach(), n)
