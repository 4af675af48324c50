#!/usr/bin/env bash
# The GPU check (issue 15): the CUDA paths on tiny random models built on the machine itself (real
# checkpoints are too large to travel): bf16 extraction on CUDA against float32 on the CPU (also with
# device_map: auto), one fusion training step under bf16 autocast, `fuselab merge --device cuda` against the
# CPU merge for every method, the BlockPruner fast search on CUDA against the CPU, one WRPO step.
#
# Usage: scripts/gpu_check.sh [OUT_DIR]   (default: $OUT, else ./gpu-check). Writes OUT_DIR/pytest.log,
# OUT_DIR/figures.jsonl (seconds and peak GPU memory per test), OUT_DIR/nvidia-smi.txt and OUT_DIR/summary.txt.
# Budget: 8 minutes on one GPU (the tests themselves take well under that; `timeout` enforces it).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-gpu-check}}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-.venv/bin/python}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 FUSELAB_PROGRESS=0 GPU_CHECK_OUT="$OUT_DIR"
rm -f "$OUT_DIR/figures.jsonl"

"$PY" - <<'PY'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: torch sees no CUDA GPU (is the CUDA build of torch installed?)")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}, "
      f"bf16 {torch.cuda.is_bf16_supported()}")
PY
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv > "$OUT_DIR/nvidia-smi.txt" || true

start=$(date +%s)
set +e
# -p no:cacheprovider: nothing written into the checkout; -rA: every outcome listed (a skip is a failure here)
timeout 480 "$PY" -m pytest -m gpu tests/test_gpu.py -p no:cacheprovider -rA --durations=0 -q 2>&1 | tee "$OUT_DIR/pytest.log"
rc=${PIPESTATUS[0]}
set -e
elapsed=$(( $(date +%s) - start ))
{
  echo "exit status: $rc (124: over the 8-minute budget)"
  echo "wall time: ${elapsed} s"
  grep -E "passed|failed|skipped|error" "$OUT_DIR/pytest.log" | tail -1
  [ -f "$OUT_DIR/figures.jsonl" ] && cat "$OUT_DIR/figures.jsonl"
} | tee "$OUT_DIR/summary.txt"
if grep -qE "[0-9]+ skipped" "$OUT_DIR/pytest.log"; then
  echo "gpu_check: some GPU tests were skipped; on a GPU machine none should be" >&2
  exit 1
fi
exit "$rc"
