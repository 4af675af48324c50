"""Plain, slow reference implementations of the merge formulas, written independently of fuselab's code
(sorting instead of selection, stacking instead of streaming), to test the methods and the engine against."""

from __future__ import annotations

import torch


def topk_keep(score: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the k largest entries; ties towards the lower index (stable sort on descending score)."""
    flat = score.reshape(-1)
    order = torch.sort(-flat, stable=True).indices
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return mask.reshape(score.shape)


def ref_linear(ws, weights, normalize=True):
    out = sum(w * t for w, t in zip(weights, ws))
    return out / sum(weights) if normalize else out


def ref_task_arithmetic(base, ws, weights, normalize=False, lam=1.0):
    d = sum(w * (t - base) for w, t in zip(weights, ws))
    if normalize:
        d = d / sum(weights)
    return base + lam * d


def ref_ties(base, ws, weights, densities, normalize=True, lam=1.0):
    deltas = []
    for t, p in zip(ws, densities):
        d = t - base
        k = d.numel() if p >= 1 else max(1, int(p * d.numel()))
        deltas.append(d * topk_keep(d.abs(), k))
    wd = torch.stack([w * d for w, d in zip(weights, deltas)])
    sign = torch.where(wd.sum(0) >= 0, 1.0, -1.0)
    agree = torch.sign(wd) == sign
    num = (wd * agree).sum(0)
    if normalize:
        w = torch.tensor(weights).reshape(-1, *([1] * base.dim()))
        den = (w * agree).sum(0)
        den[den == 0] = 1
        num = num / den
    return base + lam * num


def ref_sce(base, ws, tau=1.0, applies_to="deltas"):
    deltas = torch.stack([t - base for t in ws])
    if tau < 1:
        var = deltas.var(0, unbiased=False)
        s = int(int((var != 0).sum()) * tau)
        mask = topk_keep(var, s) if s > 0 else torch.zeros_like(var, dtype=torch.bool)
        masked = deltas * mask
    else:
        masked = deltas
    merged_from = masked if applies_to == "deltas" else deltas
    e = masked.double().pow(2).reshape(len(ws), -1).mean(1)
    eta = e / e.sum() if e.sum() > 0 else torch.full_like(e, 1 / len(ws))
    sign = torch.where(merged_from.sum(0) >= 0, 1.0, -1.0)
    agree = (torch.sign(merged_from) == sign).double()
    eta = eta.reshape(-1, *([1] * base.dim()))
    num = (eta * agree * merged_from.double()).sum(0)
    den = (eta * agree).sum(0)
    return base + torch.where(den > 0, num / torch.where(den > 0, den, 1), 0).float()


def ref_varm_matrix(base, ws):
    deltas = [t - base for t in ws]
    var = torch.tensor([float((d.double() ** 2).mean()) for d in deltas])
    w = var / var.sum() if var.sum() > 0 else torch.full_like(var, 1 / len(ws))
    return sum(float(wk) * t for wk, t in zip(w, ws))


def ref_varm_element(base, ws):
    deltas = torch.stack([t - base for t in ws]).double()
    sq = deltas**2
    den = sq.sum(0)
    w = torch.where(den > 0, sq / torch.where(den > 0, den, 1), 1.0 / len(ws))
    return (base.double() + (w * deltas).sum(0)).float()
