"""Explicit fusion end to end on tiny models with different tokenizers: extract, resume, align, train."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from fuselab.cli import main
from fuselab.fusion.config import FusionRecipe
from fuselab.fusion.workspace import FusedTargets, Workspace
from helpers.distributed import accelerate_launch
from helpers.fusion import fusion_models, fusion_recipe, write_conversations


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fusion")
    paths = fusion_models(root)
    data = write_conversations(root / "chat.jsonl")
    return root, paths, data


def workspace(root, paths, data, name="w", **overrides) -> Workspace:
    recipe = FusionRecipe.model_validate(fusion_recipe(paths, data, **overrides))
    return Workspace(recipe, root / name, show_progress=False)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_extraction_equals_the_full_forward(setup, temperature):
    from transformers import AutoModelForCausalLM

    root, paths, data = setup
    ws = workspace(root, paths, data, f"w-t{temperature}", extract={"temperature": temperature})
    ws.extract()
    for name in ws.names:
        store = ws.store(name)
        model = AutoModelForCausalLM.from_pretrained(ws.paths[name])
        for i, enc in enumerate(ws.encoded(name)):
            pos = enc.predicting_positions()
            with torch.no_grad():
                logits = model(input_ids=torch.from_numpy(enc.ids)[None]).logits[0].float()
            logp_t = torch.log_softmax(logits / temperature, -1)[pos]
            top = logp_t.topk(store.k + 1, -1).values.numpy()
            row = store[i]
            # The stored values are the full-vocabulary log-probs of the stored ids, in descending order,
            # and they are the k largest (up to float16 rounding: near-ties may swap under batching).
            exact = np.take_along_axis(logp_t.numpy(), np.asarray(row.ids, np.int64), 1)
            np.testing.assert_allclose(row.logp.astype(np.float32), exact, rtol=2e-3, atol=2e-3)
            np.testing.assert_allclose(row.logp.astype(np.float32), top[:, : store.k], rtol=2e-3, atol=2e-3)
            assert (np.diff(row.logp.astype(np.float32), axis=1) <= 0).all()
            gold = torch.log_softmax(logits, -1)[pos, torch.from_numpy(enc.ids[pos + 1])]
            np.testing.assert_allclose(row.gold_nll.astype(np.float32), -gold.numpy(), rtol=2e-3, atol=2e-3)
    meta = json.loads((ws.store_dir(ws.pivot) / "manifest.json").read_text())
    assert meta["complete"] and meta["summary"]["bytes_per_token"] < 80  # k=5 here: 32 B + npy headers


def test_interrupted_extraction_resumes_without_recomputing_finished_shards(setup, monkeypatch):
    from fuselab.fusion import extract as extract_mod
    from fuselab.fusion.store import TopKStoreWriter

    root, paths, data = setup
    ws = workspace(root, paths, data, "w-resume")
    calls: list[int] = []
    real_call = extract_mod.TransformersTopK.__call__

    def counting(self, batch):
        calls.append(len(batch))
        return real_call(self, batch)

    monkeypatch.setattr(extract_mod.TransformersTopK, "__call__", counting)
    real_write = TopKStoreWriter.write_shard

    def crash_on_second(self, name, *a, **kw):
        if name == "shard-00001":
            raise KeyboardInterrupt("simulated crash")
        return real_write(self, name, *a, **kw)

    monkeypatch.setattr(TopKStoreWriter, "write_shard", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        ws.extract([ws.pivot])
    store_dir = ws.store_dir(ws.pivot)
    manifest = json.loads((store_dir / "manifest.json").read_text())
    assert [s["name"] for s in manifest["shards"]] == ["shard-00000"] and not manifest["complete"]
    assert not list(store_dir.glob(".shard-*"))
    with pytest.raises(Exception, match="incomplete"):
        ws.store(ws.pivot)
    first_run = sum(calls)
    calls.clear()
    monkeypatch.setattr(TopKStoreWriter, "write_shard", real_write)
    summary = Workspace(ws.recipe, ws.workdir, show_progress=False).extract([ws.pivot])[ws.pivot]
    assert summary.resumed_shards == 1
    shards = json.loads((store_dir / "manifest.json").read_text())["shards"]
    assert sum(calls) == len(ws.texts()) - shards[0]["examples"] and first_run >= shards[0]["examples"]
    assert len(ws.store(ws.pivot)) == len(ws.texts())


def _fusion_loss(model_path: Path, targets: FusedTargets) -> float:
    from transformers import AutoModelForCausalLM

    from fuselab.fusion.loss import fusion_loss
    from fuselab.fusion.train import FusedDataset, FusionCollator

    model = AutoModelForCausalLM.from_pretrained(model_path)
    batch = FusionCollator(0)([FusedDataset(targets)[i] for i in range(len(targets))])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return float(
        fusion_loss(logits, batch["labels"], batch["target_ids"], batch["target_logp"], lam=0.0).loss
    )


@pytest.mark.parametrize(
    ("sequence", "vocab", "function", "mode"),
    [
        ("offsets", "exact", "mince", "pairwise"),
        ("mined", "mined", "mince_token", "pairwise"),
        ("offsets", "statistics", "avgce", "multi"),
    ],
)
def test_align_and_train_lower_the_fusion_loss(setup, sequence, vocab, function, mode):
    from fuselab.fusion.train import train

    root, paths, data = setup
    ws = workspace(
        root,
        paths,
        data,
        "w",
        align={"sequence": sequence, "vocab": vocab},
        fuse={"function": function, "mode": mode, "include_pivot": False},
        train={"lam": 0.0, "max_steps": 6, "learning_rate": 2e-2},
    )
    ws.extract()
    stats = ws.build_targets()
    assert len(stats) == (2 if mode == "pairwise" else 1)
    target = next(iter(ws.target_groups()))
    src = ws.target_groups()[target][0]
    s = stats[target]["sources"][src]
    assert sum(s["coverage"].values()) > 0 and s["projection"]["projected"] > 0
    assert s["projection"]["positions"] == s["projection"]["projected"] + sum(
        v for k, v in s["projection"].items() if k.startswith("fallback")
    )
    targets = FusedTargets.open(ws.targets_dir(target))
    before = _fusion_loss(ws.paths[ws.pivot], targets)
    out = root / f"trained-{sequence}-{function}"
    summary = train(ws.targets_dir(target), out, ws.recipe.train, show_progress=False)
    after = _fusion_loss(out, targets)
    assert summary["steps"] == 6 and after < before - 0.05
    assert {"clm_loss", "fusion_loss"} <= set(summary["log_history"][0])
    assert (out / "README.md").exists() and not (out.parent / (out.name + ".work")).exists()


def test_cli_runs_the_stages_and_writes_loadable_models(setup, tmp_path):
    from transformers import AutoModelForCausalLM

    root, paths, data = setup
    recipe_path = tmp_path / "recipe.yaml"
    recipe = fusion_recipe(paths, data, workdir=str(root / "w-cli"), train={"max_steps": 2})
    recipe_path.write_text(yaml.safe_dump(recipe))
    assert main(["fusion", "extract", str(recipe_path), "--no-progress"]) == 0
    assert main(["fusion", "align", str(recipe_path), "--no-progress"]) == 0
    out = tmp_path / "models"
    assert main(["fusion", "train", str(recipe_path), str(out), "--no-progress"]) == 0
    targets = sorted(p.name for p in out.iterdir())
    assert targets == ["pivot+src_a", "pivot+src_b"]
    for t in targets:
        model = AutoModelForCausalLM.from_pretrained(out / t)
        assert model.config.vocab_size == 300
        assert (out / t / "fuselab_fusion.yaml").exists() and "pivot+" in (out / t / "README.md").read_text()
    # A second run refuses to overwrite; an unknown key in the recipe is a clear error.
    assert main(["fusion", "train", str(recipe_path), str(out), "--no-progress"]) == 2
    recipe["train"]["lamda"] = 0.5
    recipe_path.write_text(yaml.safe_dump(recipe))
    assert main(["fusion", "extract", str(recipe_path)]) == 2


def test_two_process_training_with_accelerate(setup, tmp_path):
    root, paths, data = setup
    ws = workspace(root, paths, data, "w-ddp")
    ws.extract()
    ws.build_targets()
    target = next(iter(ws.target_groups()))
    script = tmp_path / "run.py"
    script.write_text(
        "import sys\n"
        "from fuselab.fusion.config import TrainConfig\n"
        "from fuselab.fusion.train import train\n"
        "cfg = TrainConfig(lam=0.5, learning_rate=1e-3, max_steps=2, batch_size=2, logging_steps=1,\n"
        "                  save_steps=100, log_example_ids=True, warmup_ratio=0.0)\n"
        "train(sys.argv[1], sys.argv[2], cfg, show_progress=False)\n"
    )
    out = tmp_path / "ddp-out"
    proc = accelerate_launch([script, ws.targets_dir(target), out], port=29541)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = [[int(x) for x in (out / f"examples_seen.rank{r}.txt").read_text().split()] for r in (0, 1)]
    assert seen[0] and seen[1] and not set(seen[0]) & set(seen[1])
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)


def test_group_by_length_trains_on_length_buckets(setup, tmp_path):
    """Every batch the Trainer builds is a bucket of the length-sorted set: padding only where neighbouring
    lengths differ (fuselab.fusion.batching), and every example once per epoch."""
    import numpy as np

    from fuselab.fusion.batching import padded_tokens
    from fuselab.fusion.config import TrainConfig
    from fuselab.fusion.train import train

    root, paths, data = setup
    ws = workspace(root, paths, data, "w-buckets")
    ws.extract()
    ws.build_targets()
    target = next(iter(ws.target_groups()))
    lengths = np.diff(FusedTargets.open(ws.targets_dir(target)).tok_offsets).tolist()
    n, bs = len(lengths), 2
    cfg = TrainConfig(
        lam=0.5, learning_rate=1e-3, epochs=1, batch_size=bs, logging_steps=1, save_steps=100,
        log_example_ids=True, warmup_ratio=0.0, group_by_length=True,
    )  # fmt: skip
    out = tmp_path / "bucketed"
    train(ws.targets_dir(target), out, cfg, show_progress=False)
    batches = [
        [int(x) for x in line.split()] for line in (out / "examples_seen.rank0.txt").read_text().splitlines()
    ]
    order = [i for b in batches for i in b]
    assert sorted(order) == list(range(n))
    best = padded_tokens(lengths, sorted(range(n), key=lambda i: -lengths[i]), bs)
    assert padded_tokens(lengths, order, bs) == best
    assert max(lengths[i] for i in batches[0]) == max(lengths)  # the longest batch first


@pytest.mark.parametrize(
    "save_steps, minutes, expected", [(100, 1e-9, [1, 2, 3]), (100, 60.0, []), (2, None, [2])]
)
def test_checkpoints_by_wall_time_and_never_on_the_last_step(
    setup, tmp_path, monkeypatch, save_steps, minutes, expected
):
    """``save_minutes``: a checkpoint at every step once the time is due (here at once), none when the training
    is shorter than the interval; by step count as before; never on the last step, where transformers would
    write one (the finished model follows it)."""
    from fuselab.fusion.config import TrainConfig
    from fuselab.fusion.train import train

    root, paths, data = setup
    ws = workspace(root, paths, data, "w-timed")
    ws.extract()
    ws.build_targets()
    target = next(iter(ws.target_groups()))
    monkeypatch.setenv("FUSELAB_KEEP_CHECKPOINTS", "1")
    cfg = TrainConfig(
        lam=0.5, learning_rate=1e-3, max_steps=4, batch_size=2, logging_steps=1, save_steps=save_steps,
        save_minutes=minutes, save_total_limit=None, warmup_ratio=0.0,
    )  # fmt: skip
    out = tmp_path / "timed"
    summary = train(ws.targets_dir(target), out, cfg, show_progress=False)
    assert summary["steps"] == 4
    work = out.with_name(out.name + ".work")
    steps = sorted(int(p.name.split("-")[1]) for p in work.glob("checkpoint-*"))
    assert steps == expected
