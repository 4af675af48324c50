"""Outputs never destroy inputs, one run writes an output at a time, SIGTERM cleans up, stale temporaries go,
and a merged tokenizer always fits its embedding (issue 16)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fuselab.cli import main
from fuselab.merge import run_merge
from fuselab.utils.atomic import STAMP, atomic_output_dir, check_output_dir, lock_file_for, release_output
from fuselab.utils.errors import (
    IncompatibleModelsError,
    OutputExistsError,
    OutputLockedError,
    OutputNotWritableError,
)
from helpers.merge_models import make_family


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    return make_family(tmp_path_factory.mktemp("family"), fine_tunes=2)


def linear(base: Path, *models: Path) -> dict:
    return {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [{"model": str(m), "parameters": {"weight": 0.5}} for m in models],
    }


def copy_family(family, root: Path) -> dict[str, Path]:
    return {k: Path(shutil.copytree(p, root / k)) for k, p in family.items()}


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# -- --force replaces only fuselab's own outputs, never an input or the current folder -----------------------


def test_force_never_replaces_the_base_model(family, tmp_path):
    fam = copy_family(family, tmp_path)
    before = tree(fam["base"])
    with pytest.raises(OutputExistsError, match="not written by fuselab"):
        run_merge(linear(fam["base"], fam["ft0"]), fam["base"], force=True, show_progress=False)
    (fam["base"] / STAMP).write_text("{}")  # even an input that fuselab wrote (an earlier merge) is refused
    with pytest.raises(OutputExistsError, match="is the input"):
        run_merge(linear(fam["base"], fam["ft0"]), fam["base"], force=True, show_progress=False)
    (fam["base"] / STAMP).unlink()
    assert tree(fam["base"]) == before


def test_force_never_replaces_a_folder_holding_an_input(family, tmp_path):
    fam = copy_family(family, tmp_path / "models")
    (tmp_path / "models" / STAMP).write_text("{}")
    with pytest.raises(OutputExistsError, match="contains the input"):
        run_merge(linear(fam["base"], fam["ft0"]), tmp_path / "models", force=True, show_progress=False)
    assert (fam["base"] / "model.safetensors").is_file()


def test_force_never_replaces_the_current_folder_or_its_parents(family, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work" / "sub"
    work.mkdir(parents=True)
    (work / "notes.txt").write_text("mine")
    (work / STAMP).write_text("{}")  # not even a folder that looks like fuselab's
    recipe = work / "r.yaml"
    recipe.write_text(yaml.safe_dump(linear(family["base"], family["ft0"])))
    monkeypatch.chdir(work)
    for out in (".", "..", str(tmp_path)):
        assert main(["merge", "r.yaml", out, "--force", "--no-progress"]) == 2
        assert "current folder or one of its parents" in capsys.readouterr().err
    assert (work / "notes.txt").read_text() == "mine"


def test_force_replaces_a_fuselab_output(family, tmp_path):
    out = tmp_path / "out"
    run_merge(linear(family["base"], family["ft0"]), out, show_progress=False)
    assert (out / STAMP).is_file()
    run_merge(linear(family["base"], family["ft1"]), out, force=True, show_progress=False)
    assert "ft1" in (out / "fuselab_merge.yaml").read_text()
    legacy = tmp_path / "legacy"  # written before the stamp existed: recognised by its fuselab_*.yaml
    legacy.mkdir()
    (legacy / "fuselab_prune.yaml").write_text("method: shortgpt\n")
    check_output_dir(legacy, force=True)
    release_output(legacy)


# -- one writer per output ------------------------------------------------------------------------------------

HOLDER = """
import sys
from pathlib import Path
from fuselab.utils.atomic import check_output_dir
check_output_dir(Path(sys.argv[1]), False)
print("locked", flush=True)
sys.stdin.read()
"""


def hold_lock(out: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def test_second_run_to_a_locked_output_fails_at_once_and_a_dead_holder_does_not_block(family, tmp_path):
    out = tmp_path / "out"
    proc = hold_lock(out)
    try:
        with pytest.raises(OutputLockedError, match=rf"another fuselab run is writing .*pid {proc.pid}"):
            run_merge(linear(family["base"], family["ft0"]), out, show_progress=False)
        with pytest.raises(OutputLockedError), atomic_output_dir(out):
            pass
        assert not out.exists()
    finally:
        proc.kill()  # SIGKILL: no cleanup runs, the lock file stays behind
        proc.wait()
    assert lock_file_for(out).exists()
    run_merge(linear(family["base"], family["ft0"]), out, show_progress=False)
    assert (out / "model.safetensors").is_file() and not lock_file_for(out).exists()


def test_concurrent_merges_to_one_output_one_fails_clearly(family, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(linear(family["base"], family["ft0"], family["ft1"])))
    cmd = [sys.executable, "-m", "fuselab", "merge", str(recipe), str(tmp_path / "out"), "--no-progress"]
    env = {**os.environ, "FUSELAB_PROGRESS": "0"}
    procs = [subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    results = [(p.wait(), p.stderr.read()) for p in procs if p.stderr is not None]
    ok = [r for r in results if r[0] == 0]
    failed = [r for r in results if r[0] != 0]
    # whichever ran second was refused (by the lock, or by the finished output): never two "successes"
    assert len(ok) == 1 and len(failed) == 1, results
    assert "another fuselab run is writing" in failed[0][1] or "already exists" in failed[0][1]
    assert (tmp_path / "out" / "model.safetensors").is_file()


# -- SIGTERM and stale temporaries ----------------------------------------------------------------------------

SLOW_MERGE = """
import dataclasses, sys, time
from fuselab.cli import main
from fuselab.merge import registry

method = registry.get_merge_method("task_arithmetic")
calls = {"n": 0}

def slow(*args, **kwargs):
    calls["n"] += 1
    if calls["n"] == 3:
        print("merging", flush=True)
        time.sleep(60)
    return method.func(*args, **kwargs)

registry._REGISTRY["task_arithmetic"] = dataclasses.replace(method, func=slow)
sys.exit(main(["merge", sys.argv[1], sys.argv[2], "--no-progress"]))
"""


def test_sigterm_mid_merge_removes_the_temporary_folder(family, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(linear(family["base"], family["ft0"])))
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_MERGE, str(recipe), str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "merging"
    assert [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # the merge is under way
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=60)
    assert rc == 143, proc.stderr.read() if proc.stderr else ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]  # no temporary, no lock, no output


def test_stale_temporaries_of_dead_runs_are_removed_live_ones_kept(family, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = [tmp_path / f".out.tmp-{dead.pid}-0123abcd", tmp_path / ".out.old-89abcdef"]
        for d in stale:
            d.mkdir()
            (d / "model.safetensors").write_bytes(b"\0" * 4096)
        running = tmp_path / f".out.tmp-{live.pid}-fedcba98"
        running.mkdir()
        other = tmp_path / f".other.tmp-{dead.pid}-0123abcd"  # another output's: not ours to judge
        other.mkdir()
        run_merge(linear(family["base"], family["ft0"]), tmp_path / "out", show_progress=False)
        assert not any(d.exists() for d in stale)
        assert running.is_dir() and other.is_dir()
    finally:
        live.kill()
        live.wait()


# -- the merged tokenizer fits the merged embedding -----------------------------------------------------------


def _add_token(folder: Path, token_id: int) -> None:
    f = folder / "tokenizer.json"
    data = json.loads(f.read_text())
    data["added_tokens"].append(
        {
            "id": token_id,
            "content": "<|beyond|>",
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
    )
    f.write_text(json.dumps(data))


def test_tokenizer_larger_than_the_merged_embedding_is_refused(family, tmp_path):
    fam = copy_family(family, tmp_path)
    for p in fam.values():  # identical tokenizer files everywhere: no vocabulary plan, the rows stay 300
        _add_token(p, 304)
    for extra in ({}, {"tokenizer_source": "base"}):
        with pytest.raises(
            IncompatibleModelsError, match=r"token ids up to 304, but the merged embedding has 300"
        ):
            run_merge({**linear(fam["base"], fam["ft0"]), **extra}, tmp_path / "o", show_progress=False)
    assert not (tmp_path / "o").exists()
    out = tmp_path / "fits"  # the fix the message names works: a tokenizer_source that fits
    recipe = {**linear(fam["base"], fam["ft0"]), "tokenizer_source": str(family["base"])}
    run_merge(recipe, out, show_progress=False)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 300


def test_config_vocab_size_that_disagrees_with_the_weights_is_refused(family, tmp_path):
    fam = copy_family(family, tmp_path)
    cfg = json.loads((fam["ft0"] / "config.json").read_text())
    cfg["vocab_size"] = 310
    (fam["ft0"] / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(IncompatibleModelsError, match=r"vocab_size 310, but its embedding .* has 300 rows"):
        run_merge(linear(fam["base"], fam["ft0"]), tmp_path / "o", show_progress=False)


def test_lock_stays_out_of_the_way_of_a_finished_output(tmp_path):
    with atomic_output_dir(tmp_path / "x") as tmp:
        (tmp / "a.txt").write_text("a")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == [STAMP, "a.txt"]


def test_secondary_ranks_do_not_lock(tmp_path, monkeypatch):
    proc = hold_lock(tmp_path / "x")  # rank 0 of the same run holds it
    monkeypatch.setenv("RANK", "1")
    try:
        check_output_dir(tmp_path / "x", False)
    finally:
        proc.kill()
        proc.wait()


def test_readonly_parent_is_named(tmp_path):
    if os.geteuid() == 0:  # root writes anywhere but in /proc
        with pytest.raises(OutputNotWritableError, match=r"cannot create the parent folder of /proc/"):
            check_output_dir(Path("/proc/fuselab-test/out"), False)
        return
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(OutputNotWritableError, match=r"cannot write in .*ro .*choose an output folder"):
            check_output_dir(ro / "out", False)
    finally:
        ro.chmod(0o755)
