"""Plain, slow reference implementations of the merge formulas, written independently of fuselab's code
(sorting instead of selection, stacking instead of streaming), to test the methods and the engine against."""

from __future__ import annotations

import math

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


# -- spherical methods (float64, one vector at a time, straight from the formulas) ------------------------------


def _slerp_vec(a, b, t, linear_if):
    a64, b64 = a.double(), b.double()
    na, nb = a64.norm(), b64.norm()
    cos = float((a64 @ b64) / (na * nb)) if na > 0 and nb > 0 else 0.0
    cos = max(-1.0, min(1.0, cos))
    if linear_if(cos):
        return (1 - t) * a64 + t * b64
    theta = math.acos(cos)
    return (math.sin((1 - t) * theta) * a64 + math.sin(t * theta) * b64) / math.sin(theta)


def ref_slerp(base, other, t):
    """mergekit's slerp: the whole tensor is one vector; linear where |cos| > 0.9995."""
    out = _slerp_vec(base.reshape(-1), other.reshape(-1), t, lambda c: abs(c) > 0.9995)
    return out.reshape(base.shape).float()


def ref_nuslerp(v0, v1, t, row_wise=False, flatten=True):
    """NuSLERP on explicit vectors: the whole tensor, each row, or each column (row_wise)."""

    def one(a, b):
        return _slerp_vec(a, b, t, lambda c: 1 - c * c <= 1e-16)

    if flatten or v0.dim() == 1:
        return one(v0.reshape(-1), v1.reshape(-1)).reshape(v0.shape).float()
    if row_wise:
        cols = [one(v0[:, j], v1[:, j]) for j in range(v0.shape[1])]
        return torch.stack(cols, dim=1).float()
    return torch.stack([one(v0[i], v1[i]) for i in range(v0.shape[0])]).float()


def ref_multislerp(xs, weights, eps=1e-8):
    """Multi-SLERP as mergekit writes it: tangent-space projection at the normalised mean, exponential map
    back, scaled to the weighted mean norm (float64)."""
    flat = [x.reshape(-1).double() for x in xs]
    w = torch.tensor(weights, dtype=torch.float64)
    w = w / w.sum()
    norms = torch.stack([f.norm() for f in flat])
    units = [f / (n + eps) for f, n in zip(flat, norms)]
    mean = sum(wk * u for wk, u in zip(w, units))
    mean = mean / mean.norm()
    tangent = sum(wk * (u - (u @ mean) * mean) for wk, u in zip(w, units))
    tn = tangent.norm() + eps
    out = mean * torch.cos(tn) + tangent * (torch.sin(tn) / tn)
    return (out * (norms * w).sum()).reshape(xs[0].shape).float()


def ref_model_stock(base, ws, filter_wise=False):
    """Model Stock: t = N cos / (1 + (N − 1) cos) from the mean pairwise cosine of the task vectors."""
    n = len(ws)

    def ratio(deltas):
        cos = []
        for j in range(n):
            for k in range(j + 1, n):
                a, b = deltas[j].double(), deltas[k].double()
                cos.append(float((a @ b) / max(float(a.norm() * b.norm()), 1e-6)))
        c = sum(cos) / len(cos)
        den = 1 + (n - 1) * c
        return 0.0 if abs(den) < 1e-6 else n * c / den

    if filter_wise and base.dim() == 2:
        rows = []
        for i in range(base.shape[0]):
            d = [w[i] - base[i] for w in ws]
            t = ratio(d)
            rows.append(base[i].double() + t * sum(x.double() for x in d) / n)
        return torch.stack(rows).float()
    d = [(w - base).reshape(-1) for w in ws]
    t = ratio(d)
    return (base.double() + t * sum((w - base).double() for w in ws) / n).float()


# -- breadcrumbs and DELLA --------------------------------------------------------------------------------------


def band_keep(delta, density, gamma):
    """Breadcrumbs' mask by sorting: ranks top … top + keep − 1 of |δ| (descending, ties: lower index first)."""
    n = delta.numel()
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    keep = int(density * n)
    top = min(int(gamma * n), n - keep)
    order = torch.sort(-delta.abs().reshape(-1), stable=True).indices
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[top : top + keep]] = True
    return mask.reshape(delta.shape)


def ref_breadcrumbs(base, ws, weights, densities, gammas, ties=False, normalize=False, lam=1.0):
    deltas = [(w - base) * band_keep(w - base, p, g) for w, p, g in zip(ws, densities, gammas)]
    wd = torch.stack([w * d for w, d in zip(weights, deltas)])
    wt = torch.tensor(weights).reshape(-1, *([1] * base.dim()))
    if ties:
        agree = (torch.sign(wd) == torch.where(wd.sum(0) >= 0, 1.0, -1.0)).float()
        num, den = (wd * agree).sum(0), (wt * agree).sum(0)
        den[den == 0] = 1
    else:
        num, den = wd.sum(0), torch.tensor(float(sum(weights)))
    return base + lam * (num / den if normalize else num)


def magprune_probabilities(delta, density, epsilon):
    """DELLA's keep probability of each entry: linear in its magnitude rank within its row (dim 1)."""
    rows = delta.reshape(1, -1) if delta.dim() == 1 else delta
    n = rows.shape[1]
    probs = torch.empty_like(rows, dtype=torch.float64)
    for i in range(rows.shape[0]):
        order = torch.sort(rows[i].abs(), stable=True).indices
        for r, j in enumerate(order.tolist()):
            probs[i, j] = density - epsilon + 2 * epsilon * r / (n - 1)
    return probs.reshape(delta.shape)
