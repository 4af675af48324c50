#!/usr/bin/env python
"""The one-command FuseChat pipeline against its own SFT-only baseline, and what a rerun costs.

    .venv/bin/python benchmarks/fuse_pipeline.py                       # configs/demo.yaml, fresh work folder
    .venv/bin/python benchmarks/fuse_pipeline.py --recipe configs/demo.yaml --keep outputs/bench-fuse

What a user would otherwise do with the same data and compute is plain SFT of the target; `fuselab fuse`
trains that baseline (λ = 1, same tokens, same steps) in the same run, so the quality comparison is a ratio of
held-out NLL per assistant token, fused / SFT, per domain (below 1 = fusion helped). Also reported: wall time
of every stage, the peak resident memory of the whole run (ru_maxrss of the child process), and the wall time
of an immediate rerun, which must find every stage cached. The reference FuseChat needs six hand-run scripts
and has no cache, so its rerun costs a full run.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="configs/demo.yaml")
    ap.add_argument("--keep", help="output folder to keep (default: a temporary folder, deleted)")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args(argv)
    fuselab = str(Path(sys.executable).with_name("fuselab"))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.keep or Path(tmp) / "out").absolute()
        work = out.with_name(out.name + ".work")
        cmd = [fuselab, "fuse", args.recipe, str(out), "--workdir", str(work), "--no-progress"]
        first = run(cmd)
        peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        rerun = run(cmd)
        runs = [json.loads(line) for line in (work / "runs.jsonl").read_text().splitlines()]
        results = json.loads((out / "results.json").read_text())
    fused = results["fused_model"]
    figures = {
        "recipe": args.recipe,
        "wall_s": round(first, 1),
        "stage_s": runs[-2]["stage_seconds"],
        "peak_mib": round(peak_mib),
        "rerun_s": round(rerun, 1),
        "rerun_ran": {k: v for k, v in runs[-1]["ran"].items() if v},
        "nll_per_token": {
            name: {d: round(s["per_token"], 4) for d, s in dom.items()}
            for name, dom in results["heldout"].items()
        },
        "nll_per_byte": {
            name: {d: round(s["per_byte"], 4) for d, s in dom.items()}
            for name, dom in results["heldout"].items()
        },
        "fused_over_sft": {
            d: round(v["fused"] / v["baseline"], 4) for d, v in results["fused_vs_baseline"].items()
        },
        "fused_beats_sft": {d: v["beats_baseline"] for d, v in results["fused_vs_baseline"].items()},
    }
    print(f"fuselab fuse {args.recipe}: {figures['wall_s']} s, peak {figures['peak_mib']} MiB")
    for stage, s in figures["stage_s"].items():
        print(f"  {stage:9s} {s:8.1f} s")
    print(f"rerun: {figures['rerun_s']} s; stages that ran again: {figures['rerun_ran'] or 'none'}")
    print(
        f"{'model':28s} "
        + " ".join(f"{d + ' NLL/tok':>14s} {d + ' NLL/byte':>14s}" for d in results["fused_vs_baseline"])
    )
    for name in figures["nll_per_token"]:
        cells = []
        for d in figures["nll_per_token"][name]:
            cells += [
                f"{figures['nll_per_token'][name][d]:14.4f}",
                f"{figures['nll_per_byte'][name][d]:14.4f}",
            ]
        print(f"{name:28s} " + " ".join(cells))
    for d, ratio in figures["fused_over_sft"].items():
        print(f"{fused} / SFT baseline, {d}: {ratio:.4f} ({'fused better' if ratio < 1 else 'SFT better'})")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
