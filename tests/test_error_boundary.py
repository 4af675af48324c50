"""The CLI's one error boundary and the checks made at load (issue 16): every case a named message with the
file and the fix, no traceback."""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from fuselab.cli import main
from fuselab.data.conversations import load_conversations
from fuselab.modeling.resolve import resolve_model
from fuselab.prune.calibration import read_rows
from fuselab.utils.boundary import explain
from fuselab.utils.errors import ConfigError, FuselabError
from fuselab.utils.hardware import check_device
from fuselab.utils.progress import progress
from fuselab.wrpo.data import read_jsonl
from helpers.merge_models import make_family

LATIN1 = "caf\xe9 cr\xe8me".encode("latin-1")
GOOD_ROW = json.dumps(
    {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
).encode()


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    return make_family(tmp_path_factory.mktemp("family"), fine_tunes=1)


def merge_recipe(tmp_path: Path, family) -> Path:
    r = tmp_path / "r.yaml"
    r.write_text(
        yaml.safe_dump(
            {
                "merge_method": "task_arithmetic",
                "base_model": str(family["base"]),
                "models": [{"model": str(family["ft0"]), "parameters": {"weight": 0.5}}],
            }
        )
    )
    return r


# -- the OS: disk full, read-only --------------------------------------------------------------------------


def test_disk_full_says_disk_full_and_the_path(family, tmp_path, monkeypatch, capsys):
    from fuselab.merge import engine

    def full(self, out, specs):
        (out / "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(engine._Merger, "stream", full)
    out = tmp_path / "out"
    assert main(["merge", str(merge_recipe(tmp_path, family)), str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"disk full while writing {out}" in err and "free space" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]  # no half-written temporary


def test_os_errors_name_the_file():
    e = OSError(errno.ENOSPC, "No space left on device", "/data/work/topk/logp.npy")
    assert explain(e) is not None and "disk full while writing /data/work/topk/logp.npy" in explain(e)
    assert "read-only file system" in (explain(OSError(errno.EROFS, "Read-only", "/ro/x")) or "")
    assert "permission denied for /x/y" in (explain(PermissionError(errno.EACCES, "denied", "/x/y")) or "")
    assert explain(RuntimeError("a bug")) is None  # genuine bugs keep their traceback


# -- files: not UTF-8, malformed config.json, truncated safetensors --------------------------------------


def test_non_utf8_data_files_are_named(tmp_path):
    for suffix in (".jsonl", ".json"):
        f = tmp_path / f"data{suffix}"
        f.write_bytes(GOOD_ROW + b"\n" + b'{"text": "' + LATIN1 + b'"}\n')
        with pytest.raises(FuselabError, match=rf"{f}.* not UTF-8"):
            load_conversations([f])
        with pytest.raises(FuselabError, match=rf"{f} is not UTF-8 text \(line 2"):
            read_jsonl(f)
    txt = tmp_path / "cal.txt"
    txt.write_bytes(LATIN1)
    with pytest.raises(FuselabError, match=rf"{txt} is not UTF-8 text .*iconv"):
        read_rows(str(txt), tokenizer=None)


def test_non_utf8_recipe_is_named(tmp_path, capsys):
    r = tmp_path / "r.yaml"
    r.write_bytes(b"merge_method: linear\n# " + LATIN1 + b"\n")
    assert main(["merge", str(r), str(tmp_path / "o")]) == 2
    assert f"{r} is not UTF-8 text" in capsys.readouterr().err


def test_malformed_config_json_is_named(family, tmp_path, capsys):
    bad = Path(shutil.copytree(family["base"], tmp_path / "bad"))
    (bad / "config.json").write_text('{"model_type": "llama",\n "vocab_size": 300,,}')
    with pytest.raises(FuselabError, match=r"bad/config.json is not valid JSON \(.* line 2"):
        resolve_model(bad)
    assert main(["info", str(bad)]) == 2
    assert "config.json is not valid JSON" in capsys.readouterr().err


def test_truncated_safetensors_is_found_at_load_by_prune_eval(family, tmp_path, capsys):
    bad = Path(shutil.copytree(family["base"], tmp_path / "bad"))
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    data = tmp_path / "t.txt"
    data.write_text("hello world " * 50)
    assert main(["prune-eval", str(bad), "--data", str(data), "--seqlen", "8"]) == 2
    err = capsys.readouterr().err
    assert f"{f} is truncated" in err and "Traceback" not in err


def test_library_errors_get_a_named_message():
    from safetensors import SafetensorError

    assert "corrupt or truncated" in (explain(SafetensorError("Error while deserializing header")) or "")
    # a full disk while a model is saved (the message safetensors gave when `make demo` filled /tmp) is not
    # a corrupt model: no advice to re-download it
    args = argparse.Namespace(output="/tmp/out")
    full = explain(
        SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"), args
    )
    assert full and full.startswith("disk full while writing a .safetensors file under /tmp/out")
    assert "free space" in full and "re-download" not in full
    other = explain(
        SafetensorError("Error while serializing: I/O error: Input/output error (os error 5)"), args
    )
    assert other and "failed" in other and "re-download" not in other
    try:
        json.loads('{"a": 1,}')
    except json.JSONDecodeError as err:
        assert "malformed JSON" in (explain(err) or "")


# -- checks made at load -----------------------------------------------------------------------------------


def test_seqlen_zero_is_refused_by_the_command_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["prune-eval", "some-model", "--data", "x.txt", "--seqlen", "0"])
    assert exit_.value.code == 2
    assert "--seqlen: must be at least 1, got 0" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_refused_before_any_model_loads(tmp_path, capsys):
    recipe = yaml.safe_load(Path("configs/fusion/smollm2-qwen-gemma.yaml").read_text())
    recipe["pivot"] = str(tmp_path / "not-resolved-yet")  # a model would only be resolved after the check
    recipe["sources"] = [str(tmp_path / "nor-this")]
    recipe["names"] = {}
    recipe["extract"]["device"] = "cuda"
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump(recipe))
    assert main(["fusion", "extract", str(r), "--workdir", str(tmp_path / "w"), "--no-progress"]) == 2
    assert "extract.device: cuda was asked for, but no CUDA GPU is visible" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="unknown device 'tpu'"):
        check_device("tpu", "evaluate.device")
    check_device("cpu", "extract.device")


# -- FUSELAB_PROGRESS=0 ------------------------------------------------------------------------------------


def test_fuselab_progress_0_silences_every_bar(monkeypatch):
    monkeypatch.setenv("FUSELAB_PROGRESS", "0")
    assert progress(range(3), disable=False).disable  # a caller's show_progress=True does not win
    # what the CLI does first thing: before tqdm, transformers or the Hub client is imported
    script = (
        "import sys; from fuselab.cli import build_parser\n"
        "assert 'tqdm' not in sys.modules, 'imported before the setting applies'\n"
        "from fuselab.utils.progress import silence_other_bars; silence_other_bars(); build_parser()\n"
        "from tqdm.auto import tqdm; from huggingface_hub.utils import are_progress_bars_disabled\n"
        "print(tqdm(range(3)).disable, are_progress_bars_disabled())"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS")}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True"], out.stderr
