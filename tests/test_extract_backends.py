"""Extraction backends for large sources: the vLLM options (checked when the recipe is loaded, passed to vLLM
as given, vLLM imported lazily), what happens when vLLM returns fewer than k log-probs, and the transformers
backend's ``device_map: auto`` (on the CPU here; the GPU check runs it on CUDA)."""

from __future__ import annotations

import sys
import types
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from fuselab.fusion import extract as extract_mod
from fuselab.fusion.config import load_recipe
from fuselab.fusion.extract import (
    ExtractSettings,
    VllmTopK,
    extract,
    topk_from_prompt_logprobs,
    vllm_engine_args,
)
from fuselab.utils.distributed import Ranks
from fuselab.utils.errors import ConfigError, FuselabError
from helpers.fusion import fusion_models, write_conversations


def _recipe_file(tmp_path: Path, **extract) -> Path:
    recipe = {
        "pivot": "p",
        "sources": ["s"],
        "data": {"train": ["bundled:chat.train"], "max_length": 512},
        "extract": extract,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.parametrize(
    ("extract", "message"),
    [
        ({"tensor_parallel_size": 2}, "tensor_parallel_size only apply to backend: vllm"),
        (
            {"gpu_memory_utilization": 0.5, "max_model_len": 1024},
            "gpu_memory_utilization, max_model_len only",
        ),
        ({"backend": "vllm", "gpu_memory_utilization": 1.5}, "less than or equal to 1"),
        ({"backend": "vllm", "gpu_memory_utilization": 0}, "greater than 0"),
        ({"backend": "vllm", "tensor_parallel_size": 0}, "greater than or equal to 1"),
        (
            {"backend": "vllm", "max_model_len": 256},
            "max_model_len \\(256\\) is below data.max_length \\(512\\)",
        ),
        ({"backend": "vllm", "temperature": 2.0}, "raw log-probs"),
        ({"backend": "vllm", "device_map": "auto"}, "use tensor_parallel_size"),
        ({"device_map": "balanced"}, "device_map"),
        ({"device": "cuda:1", "device_map": "auto"}, "CUDA_VISIBLE_DEVICES"),
    ],
)
def test_backend_options_are_checked_when_the_recipe_loads(tmp_path, extract, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe(_recipe_file(tmp_path, **extract))


def test_vllm_options_load_without_vllm_and_reach_the_engine_as_given(tmp_path):
    recipe = load_recipe(
        _recipe_file(
            tmp_path,
            backend="vllm",
            device="cuda",
            k=32,
            tensor_parallel_size=4,
            gpu_memory_utilization=0.8,
            max_model_len=4096,
        )
    )
    assert "vllm" not in sys.modules  # checked at load, imported only by the backend
    settings = ExtractSettings(**recipe.extract.model_dump())
    args = vllm_engine_args(Path("/m"), settings)
    assert args == {
        "model": "/m",
        "dtype": "auto",
        "enable_prefix_caching": False,
        "tensor_parallel_size": 4,
        "max_logprobs": 32,  # vLLM's default cap of 20 would refuse k = 32
        "gpu_memory_utilization": 0.8,
        "max_model_len": 4096,
    }
    # unset options are left to vLLM's defaults
    plain = vllm_engine_args(Path("/m"), ExtractSettings(backend="vllm", device="cuda"))
    assert (
        "gpu_memory_utilization" not in plain and "max_model_len" not in plain and plain["max_logprobs"] == 20
    )
    # the placement is not part of the store's key: existing stores stay valid
    assert settings.store_meta() == replace(settings, tensor_parallel_size=1, max_model_len=None).store_meta()


def test_the_vllm_backend_builds_its_engine_from_those_arguments(monkeypatch):
    made: dict = {}
    fake = types.ModuleType("vllm")
    fake.LLM = lambda **kw: made.update(kw) or SimpleNamespace()
    fake.SamplingParams = lambda **kw: SimpleNamespace(**kw)
    monkeypatch.setitem(sys.modules, "vllm", fake)
    settings = ExtractSettings(backend="vllm", device="cuda", k=5, tensor_parallel_size=2, max_model_len=2048)
    runner = VllmTopK(Path("/m"), settings)
    assert made == vllm_engine_args(Path("/m"), settings) and made["tensor_parallel_size"] == 2
    assert runner.params.prompt_logprobs == 5


def _encoded(ids, supervised):
    from fuselab.data.render import Encoded
    from fuselab.data.token_spans import TokenSpans

    ids = np.asarray(ids)
    n = len(ids)
    return Encoded(TokenSpans(ids, np.arange(n), np.arange(1, n + 1), 0), supervised=np.asarray(supervised))


def test_fewer_than_k_vllm_log_probs_stop_the_extraction_with_the_position():
    """Padding a short row would hand the missing candidates' probability to the tail without a word; the
    extraction stops instead and names the position and the fix."""
    lp = lambda v, r: SimpleNamespace(logprob=v, rank=r)  # noqa: E731
    enc = _encoded([5, 7, 9], [False, True, True])
    short = [None, {7: lp(-0.1, 1), 3: lp(-2.5, 2)}, {9: lp(-0.3, 1)}]  # position 2: one entry for k = 2
    with pytest.raises(FuselabError, match="1 finite top log-probs at prompt position 2, fewer than k = 2"):
        topk_from_prompt_logprobs(short, enc, k=2)
    full = [None, {7: lp(-0.1, 1), 3: lp(-2.5, 2)}, {9: lp(-0.3, 1), 4: lp(-1.5, 2)}]
    assert topk_from_prompt_logprobs(full, enc, k=2).ids.tolist() == [[7, 3], [9, 4]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from fuselab.data.conversations import load_conversations
    from fuselab.data.render import SplitReport, encode, render_to_fit
    from fuselab.modeling.tokenizers import load_tokenizer

    root = tmp_path_factory.mktemp("backends")
    paths = fusion_models(root)
    data = write_conversations(root / "chat.jsonl")
    tok = load_tokenizer(paths["pivot"])
    texts = render_to_fit(load_conversations([data]), tok, [tok], 96, SplitReport())
    return paths["pivot"], texts, [encode(tok, t) for t in texts]


def _npy_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.npy"))}


def test_device_map_auto_gives_the_same_store(tiny, tmp_path):
    """On a machine without GPUs accelerate's map puts every layer on the CPU: the same numbers, the same
    bytes, the same store key; on GPUs the GPU check compares it with the single-device forward."""
    model, texts, encoded = tiny
    base = ExtractSettings(k=4, batch_tokens=256, shard_tokens=40)
    extract(model, texts, tmp_path / "plain", base, show_progress=False, encoded=encoded)
    mapped = replace(base, device_map="auto")
    extract(model, texts, tmp_path / "mapped", mapped, show_progress=False, encoded=encoded)
    assert _npy_bytes(tmp_path / "mapped") == _npy_bytes(tmp_path / "plain")
    assert mapped.store_meta() == base.store_meta()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (ExtractSettings(device_map="auto"), "device_map: auto spreads one model"),
        (ExtractSettings(backend="vllm", device="cuda"), "backend: vllm runs in one process"),
    ],
)
def test_one_process_backends_refuse_several_processes(tiny, tmp_path, monkeypatch, settings, message):
    model, texts, encoded = tiny
    monkeypatch.setattr(extract_mod, "current_ranks", lambda: Ranks(0, 2, 0))
    with pytest.raises(ConfigError, match=message):
        extract(model, texts, tmp_path / "s", settings, show_progress=False, encoded=encoded)
    assert not (tmp_path / "s").exists()
