"""Run by ``accelerate launch --num_processes 2 --cpu`` in tests/test_wrpo_train.py.

Usage: python wrpo_ddp.py CONFIG.json OUT_DIR RECORD_DIR. Trains with fuselab.wrpo.train.run_train and records,
per rank, the example indices of every training batch its loss saw.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from fuselab.wrpo import trainer as wrpo_trainer
from fuselab.wrpo.config import TrainConfig
from fuselab.wrpo.train import run_train


def main() -> None:
    cfg_path, out_dir, record_dir = sys.argv[1:4]
    rank = int(os.environ.get("RANK", "0"))
    seen: list[int] = []
    original = wrpo_trainer.WRPOTrainer.compute_loss

    def recording(self, model, inputs, *args, **kwargs):
        if model.training:
            seen.extend(int(i) for i in inputs["index"])
        return original(self, model, inputs, *args, **kwargs)

    wrpo_trainer.WRPOTrainer.compute_loss = recording
    cfg = TrainConfig.model_validate(json.loads(Path(cfg_path).read_text()))
    result = run_train(cfg, out_dir)
    Path(record_dir, f"rank{rank}.json").write_text(
        json.dumps({"seen": seen, "world": int(os.environ.get("WORLD_SIZE", "1")), "steps": result.steps})
    )


if __name__ == "__main__":
    main()
