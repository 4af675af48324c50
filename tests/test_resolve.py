"""resolve_model: folder, catalog name, hub id (offline: local hub cache only), or a clear error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fuselab.modeling import fetch as fetch_module
from fuselab.modeling import resolve as resolve_module
from fuselab.modeling.catalog import MARKER_FILE, cached_model_path, get_entry
from fuselab.modeling.resolve import resolve_model
from fuselab.utils.errors import ModelNotFoundError

SMOL = "smollm2-135m-instruct"


pytestmark = pytest.mark.usefixtures("cache")  # a private FUSELAB_CACHE (conftest.py)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    import huggingface_hub.constants

    root = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))
    return root


def _fake_converted(name: str) -> Path:
    path = cached_model_path(name)
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / MARKER_FILE).write_text(json.dumps({"gguf_sha256": get_entry(name).gguf_sha256}))
    return path


def _fake_hub_snapshot(hub: Path, repo_id: str, files: dict[str, str]) -> Path:
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, text in files.items():
        (snapshot / name).write_text(text)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def test_local_folder(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    assert resolve_model(tmp_path / "m") == tmp_path / "m"
    assert resolve_model(str(tmp_path / "m")) == tmp_path / "m"


def test_local_folder_without_config(tmp_path):
    with pytest.raises(
        ModelNotFoundError, match=r"not a Hugging Face checkpoint folder: config\.json is missing"
    ):
        resolve_model(tmp_path)


def test_local_file_is_refused_with_a_hint(tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ModelNotFoundError, match=r"is a file; .*fuselab models fetch"):
        resolve_model(gguf)


def test_folder_wins_over_catalog_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / SMOL).mkdir()
    (tmp_path / SMOL / "config.json").write_text("{}")
    assert resolve_model(SMOL) == Path(SMOL)


def test_catalog_name_cached(cache):
    path = _fake_converted(SMOL)
    assert resolve_model(SMOL) == path
    assert resolve_model(SMOL, fetch=False) == path


def test_catalog_name_not_cached_without_fetch():
    with pytest.raises(ModelNotFoundError, match=f"run `fuselab models fetch {SMOL}`"):
        resolve_model(SMOL, fetch=False)


def test_catalog_name_not_cached_fetches(monkeypatch):
    calls = []

    def fake_fetch(name, *, force=False):
        calls.append(name)
        return _fake_converted(name)

    monkeypatch.setattr(fetch_module, "fetch_model", fake_fetch)
    assert resolve_model(SMOL) == cached_model_path(SMOL)
    assert calls == [SMOL]


def test_hub_id_from_the_offline_cache(hub_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = _fake_hub_snapshot(hub_cache, "some-org/tiny-model", {"config.json": "{}"})
    assert resolve_model("some-org/tiny-model") == snapshot


def test_hub_id_not_cached_offline(hub_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model("some-org/absent-model")
    msg = str(err.value)
    assert "not a local folder" in msg and SMOL in msg and "local hub cache (HF_HUB_OFFLINE=1)" in msg


def test_hub_snapshot_without_config(hub_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _fake_hub_snapshot(hub_cache, "some-org/dataset-like", {"README.md": "hi"})
    with pytest.raises(ModelNotFoundError, match=r"has no config\.json"):
        resolve_model("some-org/dataset-like")


def test_hub_is_asked_only_for_model_files(monkeypatch, tmp_path):
    import huggingface_hub

    seen = {}

    def fake_snapshot(repo_id, **kwargs):
        seen.update(kwargs, repo_id=repo_id)
        (tmp_path / "config.json").write_text("{}")
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert resolve_model("org/name") == tmp_path
    assert seen["repo_id"] == "org/name" and seen["local_files_only"] is False
    assert "*.safetensors" in seen["allow_patterns"] and "*.bin" not in seen["allow_patterns"]
    assert not any(p.endswith(".py") for p in seen["allow_patterns"])


def test_nothing_matches():
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model("no such model")
    msg = str(err.value)
    assert "not an existing folder" in msg and "not a hub id" in msg
    for name in ("gemma-3-270m", "qwen2.5-coder-0.5b-instruct", SMOL):
        assert name in msg


def test_misspelt_catalog_name_gets_a_suggestion():
    with pytest.raises(ModelNotFoundError, match="did you mean 'gemma-3-270m'"):
        resolve_model("gemma3-270m")


def test_hub_id_shape():
    assert resolve_module.HUB_ID.match("Qwen/Qwen2.5-0.5B")
    assert resolve_module.HUB_ID.match("org/name_v1.2")
    for bad in ("name", "/abs/path", "./rel/path", "a/b/c", "org/", "~/x"):
        assert not resolve_module.HUB_ID.match(bad)
