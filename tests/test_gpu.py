"""The CUDA paths, on tiny random models built here (real checkpoints are too large to travel to a GPU
machine): bf16 extraction on CUDA against float32 on the CPU, ``device_map: auto``, one fusion training step
under bf16 autocast, ``fuselab merge --device cuda`` against the CPU merge for every method, the BlockPruner
fast search on CUDA against the CPU, one WRPO step. Marked ``gpu`` and skipped without CUDA;
``scripts/gpu_check.sh`` runs them and records time and peak GPU memory per test (``GPU_CHECK_OUT``)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU (run scripts/gpu_check.sh there)"
    ),
]


@pytest.fixture(autouse=True)
def _figures(request):
    """Time and peak GPU memory of each test, appended to $GPU_CHECK_OUT/figures.jsonl when set."""
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    yield
    out = os.environ.get("GPU_CHECK_OUT")
    if out:
        row = {
            "test": request.node.name,
            "seconds": round(time.perf_counter() - start, 2),
            "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1),
            "gpu": torch.cuda.get_device_name(0),
        }
        with open(Path(out) / "figures.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


@pytest.fixture(scope="module")
def fusion_setup(tmp_path_factory):
    from helpers.fusion import fusion_models, write_conversations

    root = tmp_path_factory.mktemp("gpu-fusion")
    return root, fusion_models(root), write_conversations(root / "chat.jsonl")


def _texts(model: Path, data: Path):
    from fuselab.data.conversations import load_conversations
    from fuselab.data.render import SplitReport, encode, render_to_fit
    from fuselab.modeling.tokenizers import load_tokenizer

    tok = load_tokenizer(model)
    texts = render_to_fit(load_conversations([data]), tok, [tok], 96, SplitReport())
    return texts, [encode(tok, t) for t in texts]


BF16_TOL = 0.1  # log-prob error of a bf16 forward on these tiny models (8 mantissa bits through 2 layers)


@pytest.mark.parametrize("device_map", [None, "auto"])
def test_bf16_extraction_on_cuda_agrees_with_float32_on_the_cpu(fusion_setup, tmp_path, device_map):
    from fuselab.fusion.extract import ExtractSettings, extract
    from fuselab.fusion.store import TopKStore

    _, paths, data = fusion_setup
    for name in ("pivot", "src_a", "src_b"):
        texts, encoded = _texts(paths[name], data)
        cpu = ExtractSettings(k=5, device="cpu", dtype="float32", batch_tokens=256)
        gpu = ExtractSettings(k=5, device="cuda", dtype="bfloat16", batch_tokens=256, device_map=device_map)
        extract(paths[name], texts, tmp_path / f"{name}-cpu", cpu, show_progress=False, encoded=encoded)
        extract(paths[name], texts, tmp_path / f"{name}-gpu", gpu, show_progress=False, encoded=encoded)
        a, b = TopKStore(tmp_path / f"{name}-cpu"), TopKStore(tmp_path / f"{name}-gpu")
        assert b.meta["dtype"] == "bfloat16" and b.meta["device"] == "cuda"
        for i in range(len(texts)):
            ra, rb = a[i], b[i]
            la, lb = ra.logp.astype(np.float32), rb.logp.astype(np.float32)
            np.testing.assert_allclose(lb, la, atol=BF16_TOL, rtol=0)
            np.testing.assert_allclose(
                rb.gold_nll.astype(np.float32), ra.gold_nll.astype(np.float32), atol=BF16_TOL
            )
            # a rank's id must agree where float32 separates it from its neighbours by more than bf16 error
            # (the last rank's lower neighbour is not stored, so it is left out)
            gaps = np.minimum(
                np.pad(-np.diff(la, axis=1), ((0, 0), (1, 0)), constant_values=np.inf),
                np.pad(-np.diff(la, axis=1), ((0, 0), (0, 1)), constant_values=np.inf),
            )[:, :-1]
            clear = gaps > 2 * BF16_TOL
            assert (np.asarray(ra.ids)[:, :-1][clear] == np.asarray(rb.ids)[:, :-1][clear]).all()


def test_one_fusion_training_step_under_bf16_autocast(fusion_setup, tmp_path):
    from fuselab.fusion.config import FusionRecipe, TrainConfig
    from fuselab.fusion.train import train
    from fuselab.fusion.workspace import Workspace
    from helpers.fusion import fusion_recipe

    _, paths, data = fusion_setup
    recipe = FusionRecipe.model_validate(
        fusion_recipe(paths, data, extract={"k": 5, "device": "cuda", "dtype": "bfloat16"})
    )
    ws = Workspace(recipe, tmp_path / "w", show_progress=False)
    ws.extract()
    ws.build_targets()
    target = next(iter(ws.target_groups()))
    cfg = TrainConfig(lam=0.5, learning_rate=1e-3, max_steps=1, batch_size=2, logging_steps=1, bf16=True)
    summary = train(ws.targets_dir(target), tmp_path / "out", cfg, show_progress=False)
    assert summary["steps"] == 1 and np.isfinite(summary["train_loss"])


def _merge_recipe(method, models: list[str], base: str) -> dict | None:
    values = {"weight": 0.5, "density": 0.6, "t": 0.4, "epsilon": 0.05, "gamma": 0.01, "select_topk": 0.5}
    from fuselab.merge.registry import REQUIRED

    params = {}
    for p in method.params:
        if p.default is REQUIRED:
            if p.name not in values:
                return None
            params[p.name] = values[p.name]
    count = len(models) if method.max_models is None else min(len(models), method.max_models)
    recipe = {
        "merge_method": method.name,
        "models": [{"model": m} for m in models[:count]],
        "dtype": "float32",
    }
    if method.needs_base or method.inputs == "deltas_if_base":
        recipe["base_model"] = base
    if params:
        recipe["parameters"] = params
    return recipe


def test_merge_on_cuda_equals_the_cpu_merge_for_every_method(tmp_path):
    from safetensors.torch import load_file

    from fuselab.merge.engine import run_merge
    from fuselab.merge.registry import get_merge_method, merge_method_names
    from helpers.merge_models import make_family

    family = make_family(tmp_path / "family")
    models = [str(family[f"ft{i}"]) for i in range(3)]
    merged, skipped = [], []
    for name in merge_method_names():
        method = get_merge_method(name)
        recipe = _merge_recipe(method, models, str(family["base"]))
        if recipe is None or method.min_models > len(recipe["models"]):
            skipped.append(name)
            continue
        out = {}
        for device in ("cpu", "cuda"):
            out[device] = tmp_path / f"{name}-{device}"
            run_merge(recipe, out[device], device=device, force=True, show_progress=False, seed=7)
        a, b = load_file(out["cpu"] / "model.safetensors"), load_file(out["cuda"] / "model.safetensors")
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")
        merged.append(name)
    assert not skipped, f"methods without a recipe in this check: {skipped}"
    assert merged


def test_blockpruner_fast_search_selects_the_same_blocks_on_cuda(tmp_path):
    import copy

    from fuselab.prune.blocks import BlockMasker, inspect_blocks
    from fuselab.prune.runner import CalibrationRunner
    from fuselab.prune.search import StopRule, block_candidates, greedy_search
    from helpers.prune import llama_config, strong_model

    chunks = torch.randint(3, 300, (3, 12), generator=torch.Generator().manual_seed(1))
    cpu_model = strong_model(llama_config())
    picks = {}
    for device, model in (("cpu", cpu_model), ("cuda", copy.deepcopy(cpu_model).to("cuda"))):
        layout = inspect_blocks(model)
        runner = CalibrationRunner(model, layout, chunks.to(device), 1)
        masker = BlockMasker(model, layout)
        try:
            rounds = greedy_search(
                runner, masker, block_candidates(layout), StopRule(num_blocks=4), True, show_progress=False
            )
        finally:
            masker.set_removed(set())
        picks[device] = ([r.removed for r in rounds], [r.nll for r in rounds])
    assert picks["cuda"][0] == picks["cpu"][0]
    np.testing.assert_allclose(picks["cuda"][1], picks["cpu"][1], rtol=1e-4)


def test_one_wrpo_step(tmp_path):
    from fuselab.wrpo.config import TrainConfig
    from fuselab.wrpo.train import run_train
    from helpers.wrpo import preference_rows, tiny_chat_model, write_jsonl

    tiny_chat_model(tmp_path / "m")
    write_jsonl(tmp_path / "data.jsonl", preference_rows(8))
    cfg = TrainConfig.model_validate(
        {
            "model": str(tmp_path / "m"),
            "data": {"path": str(tmp_path / "data.jsonl"), "max_length": 128, "max_prompt_length": 64},
            "loss": {"beta": 0.1, "alpha": 0.4},
            "reference": {"cache_dir": str(tmp_path / "cache")},
            "training": {"learning_rate": 1e-3, "max_steps": 1, "per_device_train_batch_size": 2},
        }
    )
    result = run_train(cfg, tmp_path / "out")
    assert result.steps == 1
    logs = [e for e in json.loads((tmp_path / "out" / "log_history.json").read_text()) if "loss" in e]
    assert logs and all(np.isfinite(e["loss"]) for e in logs)
