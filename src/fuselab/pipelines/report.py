"""The report of ``fuselab fuse``: Markdown, two PNG plots and ``results.json``.

The comparison that matters is the fused model against an SFT-only baseline trained on the same tokens for
the same steps (λ = 1): that isolates what the sources' distributions added. Models that share the pivot's
tokenizer are compared by NLL per assistant token; sources, whose tokenizers cut the same text differently,
by NLL per assistant byte (both are shown for every model).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from fuselab import __version__


def _nll(ev: dict[str, Any], domain: str, unit: str) -> float | None:
    s = ev["heldout"].get(domain)
    return None if s is None else float(s[f"per_{unit}"])


def _fmt(x: float | None, digits: int = 4) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def running_mean(values: list[float], window: int) -> list[float]:
    """Trailing running mean over ``window`` points (fewer at the start): one batch's loss is noisy, the
    trend is what tells whether a model learns."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_losses(path: Path, logs: dict[str, dict[str, Any]]) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    drawn = False
    for i, (name, log) in enumerate(logs.items()):
        hist = [h for h in log.get("log_history", []) if "loss" in h and "step" in h]
        if not hist:
            continue
        color = f"C{i % 10}"
        window = max(1, min(10, len(hist) // 4))
        steps = [h["step"] for h in hist]
        series = [(axes[0], [h.get("clm_loss", h["loss"]) for h in hist])]
        fus = [h.get("fusion_loss") for h in hist]
        if all(f is not None for f in fus) and any(fus):
            series.append((axes[1], fus))
        for ax, ys in series:
            ax.plot(steps, ys, marker="o", ms=2, lw=0.6, alpha=0.35, color=color)
            ax.plot(steps, running_mean(ys, window), lw=2, color=color, label=f"{name} (mean of {window})")
        drawn = True
    axes[0].set_title("CLM loss (training batches; thin: raw, thick: running mean)")
    axes[1].set_title("fusion loss (cross-entropy to fused targets)")
    for ax in axes:
        ax.set_xlabel("optimiser step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


def plot_nll(
    path: Path, evals: dict[str, dict[str, Any]], domains: list[str], baseline: str | None = None
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(evals)
    fig, axes = plt.subplots(1, len(domains), figsize=(5.5 * len(domains), 4), squeeze=False)
    colors = {
        "pivot": "#999999",
        "baseline": "#4c72b0",
        "target": "#dd8452",
        "merged": "#55a868",
        "source": "#8172b2",
    }
    for ax, domain in zip(axes[0], domains):
        vals = [_nll(evals[n], domain, "byte") or np.nan for n in names]
        ax.bar(range(len(names)), vals, color=[colors.get(evals[n]["kind"], "#333333") for n in names])
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"held-out {domain}: NLL per assistant byte (lower is better)", fontsize=9)
        ref = _nll(evals[baseline], domain, "byte") if baseline in evals else None
        if ref is not None:
            ax.axhline(ref, color=colors["baseline"], ls="--", lw=1, label="SFT-only baseline")
            ax.legend(fontsize=8, loc="upper right")
        finite = [v for v in vals if np.isfinite(v)]
        if finite:
            lo, hi = min(finite), max(finite)
            ax.set_ylim(max(0.0, lo - 0.15 * (hi - lo + 1e-9)), hi + 0.1 * (hi - lo + 1e-9))
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare_with_baseline(fused: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    """The fused model's held-out score against the SFT-only baseline's on one domain: the per-token
    difference, its standard error over the held-out texts (paired, :func:`paired_difference`) and the
    outcome. A gap counts only when it is larger than twice that standard error: below it, which texts were
    held out decides the sign as much as the training does."""
    from fuselab.evaluate.nll import paired_difference

    f, b = fused["nll"] / fused["tokens"], baseline["nll"] / baseline["tokens"]
    delta, se = paired_difference(fused, baseline)
    if se is None:  # an evaluation without per-text figures: the sign alone
        outcome = "better" if delta < 0 else "not better"
    else:
        outcome = "better" if delta < -2 * se else "worse" if delta > 2 * se else "within noise"
    return {
        "fused": f,
        "baseline": b,
        "delta": delta,
        "se": se,
        "outcome": outcome,
        "beats_baseline": outcome == "better",
    }


def verdict_line(verdict: dict[str, dict[str, Any]], baseline: str | None) -> str:
    """One line that says, per domain, whether the fused model beat the SFT-only baseline, by how much and
    with what standard error."""
    if not verdict:
        why = "no SFT-only baseline was trained (`baseline: false`)" if not baseline else "no held-out data"
        return f"**Verdict:** not compared with SFT: {why}."
    parts = []
    for d, v in verdict.items():
        rel = v["delta"] / v["baseline"] if v["baseline"] else 0.0
        pm = f" ± {v['se']:.4f}" if v.get("se") is not None else ""
        parts.append(f"{v['outcome']} on {d} ({v['delta']:+.4f}{pm} NLL/token, {rel:+.2%})")
    wins = [d for d, v in verdict.items() if v["beats_baseline"]]
    head = (
        "fused beats SFT"
        if len(wins) == len(verdict)
        else "fused does not beat SFT"
        if not wins
        else "fused beats SFT on " + ", ".join(wins)
    )
    noise = (
        "± is the standard error of the paired difference over the held-out texts; a difference counts when "
        "it exceeds twice that. "
        if any(v.get("se") is not None for v in verdict.values())
        else ""
    )
    return (
        f"**Verdict: {head}**: " + "; ".join(parts) + f". {noise}One training seed: another seed moves the "
        "difference too (`benchmarks/fusion_quality.py` measures that spread over seeds)."
    )


def write_report(
    folder: Path,
    *,
    recipe: Any,
    pivot: str,
    sources: list[str],
    fused_name: str,
    evals: dict[str, dict[str, Any]],
    logs: dict[str, dict[str, Any]],
    stats: dict[str, dict[str, Any]],
    workdir: Path,
    baseline: str | None,
) -> None:
    domains = list(recipe.evaluate.heldout)
    resolved = recipe.model_dump()
    (folder / "fuselab_fuse.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    has_losses = plot_losses(folder / "loss_curves.png", logs)
    if domains:
        plot_nll(folder / "heldout_nll.png", evals, domains, baseline)

    verdict: dict[str, Any] = {}
    if baseline and baseline in evals and fused_name in evals:
        for d in domains:
            f, b = evals[fused_name]["heldout"].get(d), evals[baseline]["heldout"].get(d)
            if f and b and f.get("tokens") and b.get("tokens"):
                verdict[d] = compare_with_baseline(f, b)
    results = {
        "fused_model": fused_name,
        "heldout": {n: e["heldout"] for n, e in evals.items()},
        "fused_vs_baseline": verdict,
        "training": {
            n: {"steps": lg.get("steps"), "train_loss": lg.get("train_loss")} for n, lg in logs.items()
        },
        "alignment": stats,
    }
    (folder / "results.json").write_text(json.dumps(results, indent=2))

    sources_txt = ", ".join(f"`{s}`" for s in sources)
    mode = recipe.fuse.mode
    how = (
        f"one target per source (pairwise), merged with `{recipe.merge.method}`"
        if mode == "pairwise" and len(sources) > 1
        else "all sources into one target (FuseLLM multi mode)"
        if mode == "multi"
        else "one target"
    )
    L: list[str] = [f"# Fusion report: {fused_name}", "", verdict_line(verdict, baseline), ""]
    L += [
        f"fuselab {__version__}. Pivot `{pivot}` ({recipe.pivot}); sources {sources_txt}. Fusion function "
        f"`{recipe.fuse.function}`, {how}; loss λ·CLM + (1−λ)·{recipe.train.loss.upper()} with λ = {recipe.train.lam}. "
        "The fused model is in [`model/`](model/); the resolved recipe is `fuselab_fuse.yaml`, every figure "
        "below is also in `results.json`.",
        "",
    ]
    if verdict:
        L += ["## Fused model against the SFT-only baseline (same data and steps, λ = 1)", ""]
        L += [
            "| domain | fused NLL/token | SFT baseline | difference | standard error | outcome |",
            "|---|---|---|---|---|---|",
        ]
        for d, v in verdict.items():
            se = f"{v['se']:.4f}" if v.get("se") is not None else "—"
            L.append(
                f"| {d} | {v['fused']:.4f} | {v['baseline']:.4f} | {v['delta']:+.4f} | {se} | {v['outcome']} |"
            )
        L += [
            "",
            "Standard error: of the paired per-text difference over the held-out texts (both models read the "
            "same tokens). It does not include the spread between training seeds.",
            "",
        ]
    if domains:
        L += [
            "## Held-out NLL on assistant tokens",
            "",
            "Every model reads the same texts (rendered with the pivot's chat template); only assistant tokens are "
            "scored. Per-token figures compare models with the pivot's tokenizer; per-byte figures compare all.",
            "",
            "| model | kind | " + " | ".join(f"{d} NLL/token | {d} NLL/byte" for d in domains) + " |",
            "|---|---|" + "---|---|" * len(domains),
        ]
        for n, e in evals.items():
            cells = []
            for d in domains:
                tok = _nll(e, d, "token") if e["kind"] != "source" else None
                cells += [_fmt(tok), _fmt(_nll(e, d, "byte"))]
            L.append(f"| `{n}` | {e['kind']} | " + " | ".join(cells) + " |")
        sizes = {d: evals[pivot]["heldout"][d] for d in domains if d in evals[pivot]["heldout"]}
        L += [
            "",
            "Held-out size: "
            + "; ".join(
                f"{d}: {s['examples']} texts, {s['tokens']} pivot tokens, {s['bytes']} bytes"
                for d, s in sizes.items()
            )
            + ".",
            "",
            "![held-out NLL](heldout_nll.png)",
            "",
        ]
    if has_losses:
        L += ["## Training", "", "| model | optimiser steps | final training loss |", "|---|---|---|"]
        for n, lg in logs.items():
            loss = lg.get("train_loss")
            L.append(f"| `{n}` | {lg.get('steps', '—')} | {_fmt(loss) if loss is not None else '—'} |")
        L += ["", "![loss curves](loss_curves.png)", ""]
    if stats:
        L += ["## Alignment and fusion", ""]
        L += [
            "What each source teaches, per domain: **mean q(gold)** is the target's probability of the pivot's "
            "next token, **top-1 = gold** the share of rows whose most probable target token is it, **dropped** "
            "the source mass with no pivot id (spread over the rest), **chain** the rows whose gold token got "
            "its probability by the chain rule, **fallback** the rows trained on the gold token alone.",
            "",
            "| target | source | domain | rows | projected | mean q(gold) | top-1 = gold | dropped | chain | fallback |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for t, st in stats.items():
            for s, ss in st.get("sources", {}).items():
                per = dict(ss.get("targets_by_domain", {}))
                if "targets" in ss:
                    per["all"] = ss["targets"]
                for d, g in per.items():
                    chain = sum(v for k, v in g.items() if k.startswith("gold path: chain rule"))
                    fallback = sum(v for k, v in g.items() if k.startswith("fallback:"))
                    L.append(
                        f"| `{t}` | `{s}` | {d} | {g.get('positions', 0)} | {g.get('projected share', 0):.1%} | "
                        f"{g.get('mean q(gold)', float('nan')):.3f} | {g.get('top-1 is gold', float('nan')):.1%} | "
                        f"{g.get('mean dropped mass', 0):.4f} | {chain} | {fallback} |"
                    )
        L.append("")
        for t, st in stats.items():
            L.append(f"**{t}**: fused-target choices {json.dumps(st.get('choices', {}))}")
            for s, ss in st.get("sources", {}).items():
                cov = ss.get("coverage", {})
                total = sum(cov.values()) or 1
                L.append(
                    f"- `{s}`: token alignment "
                    + ", ".join(f"{k} {100 * v / total:.1f}%" for k, v in cov.items())
                    + f"; vocabulary {json.dumps(ss.get('vocab', {}))}"
                )
            L.append("")
    prompts = recipe.evaluate.prompts
    if prompts:
        L += ["## Answers (greedy)", ""]
        for i, p in enumerate(prompts):
            L += [f"### Prompt {i + 1}", "", "> " + p.replace("\n", "\n> "), ""]
            L += ["| model | answer |", "|---|---|"]
            for n, e in evals.items():
                ans = e["answers"][i] if i < len(e.get("answers", [])) else ""
                cell = ans.replace("|", "\\|").replace("\n", "<br>") or "*(empty)*"
                L.append(f"| `{n}` | {cell} |")
            L.append("")
    L += [
        "## Provenance",
        "",
        f"- work folder (every stage's cached output): `{workdir}`",
        "- models: " + ", ".join(f"`{n}` = `{e['path']}`" for n, e in evals.items()),
        "",
    ]
    (folder / "report.md").write_text("\n".join(L))
    card = [
        "---",
        yaml.safe_dump(
            {"library_name": "transformers", "tags": ["fuselab", "fusechat", recipe.fuse.function]}
        ).strip(),
        "---",
        f"# {fused_name}",
        "",
        f"`{pivot}` fused with {sources_txt} by fuselab {__version__}: {how}. The model is in `model/`, the "
        "report in `report.md`, the resolved recipe in `fuselab_fuse.yaml`.",
        "",
    ]
    for d, v in verdict.items():
        card.append(f"- held-out {d}: NLL/token {v['fused']:.4f} (SFT-only baseline {v['baseline']:.4f})")
    (folder / "README.md").write_text("\n".join(card) + "\n")
