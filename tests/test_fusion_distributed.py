"""Data-parallel top-k extraction: ``accelerate launch --num_processes 2 fuselab fusion extract`` (gloo on the
CPU, as the training tests run it) writes the same store, byte for byte, as one process; a rank killed after
its first shard is resumed without recomputing what was finished; a later run with any number of processes
takes over complete shard folders and never one planned differently."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from fuselab.cli import main
from fuselab.fusion import extract as extract_mod
from fuselab.fusion.config import FusionRecipe
from fuselab.fusion.store import TopKStoreWriter, shard_entry
from fuselab.fusion.workspace import Workspace
from fuselab.utils.distributed import Ranks
from helpers.distributed import accelerate_launch, fuselab_exe, launch_cli, recorded
from helpers.fusion import fusion_models, fusion_recipe, write_conversations

HELPER = Path(__file__).parent / "helpers" / "extract_ranks.py"
ONE_THREAD = {"FUSELAB_THREADS": "1"}  # the same kernels in every process, so the numbers can be compared


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fusion-ranks")
    paths = fusion_models(root)
    data = write_conversations(root / "chat.jsonl")
    # 5 shards for the pivot and 6 for the source: two ranks get unequal shares
    recipe = fusion_recipe(paths, data, sources=[str(paths["src_a"])], extract={"shard_tokens": 20})
    recipe_path = root / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe))
    return root, recipe_path


@pytest.fixture(scope="module")
def reference(setup):
    """The store tree one process writes (run in this process, on one thread)."""
    root, recipe_path = setup
    mp = pytest.MonkeyPatch()
    mp.setenv("FUSELAB_THREADS", "1")
    try:
        assert (
            main(["fusion", "extract", str(recipe_path), "--workdir", str(root / "single"), "--no-progress"])
            == 0
        )
    finally:
        mp.undo()
    return tree(root / "single" / "topk")


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def launch(setup, workdir: Path, record: Path | None, port: int, env: dict[str, str] | None = None):
    """``accelerate launch`` of ``fuselab fusion extract`` on two processes: the installed console script,
    as users run it, or (``record``) the helper that records who computed what."""
    _, recipe_path = setup
    cli = ["fusion", "extract", recipe_path, "--workdir", workdir, "--no-progress"]
    return launch_cli(cli, record, HELPER, port=port, env={**ONE_THREAD, **(env or {})})


def test_two_processes_write_the_single_process_store_byte_for_byte(setup, reference, tmp_path):
    work = tmp_path / "ddp"
    proc = launch(setup, work, None, port=29561)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert tree(work / "topk") == reference
    assert proc.stdout.count("supervised tokens") == 2  # one report (rank 0's), one line per model
    assert "[2 processes]" in proc.stdout


def test_a_rank_killed_after_its_first_shard_resumes(setup, reference, tmp_path):
    work = tmp_path / "crash"
    first = launch(setup, work, tmp_path / "rec1", port=29563, env={"KILL_RANK": "1"})
    assert first.returncode != 0, first.stdout
    before = recorded(tmp_path / "rec1")
    assert len(before[1]) == 1  # rank 1 died right after its first shard
    store, killed_shard = before[1][0]
    manifest = json.loads((work / "topk" / store / "manifest.json").read_text())
    assert not manifest["complete"] and (work / "topk" / store / killed_shard).is_dir()

    second = launch(setup, work, tmp_path / "rec2", port=29565)
    assert second.returncode == 0, second.stderr[-3000:]
    after = recorded(tmp_path / "rec2")
    # each rank computed only its own shards (n mod 2 == rank), and the killed rank's shard on disk was kept
    for rank, shards in after.items():
        assert shards and all(int(name.split("-")[1]) % 2 == rank for _, name in shards)
    assert len(set(after[0]) | set(after[1])) == len(after[0]) + len(after[1])
    assert (store, killed_shard) not in after[1]
    finished_first = {s for shards in before.values() for s in shards}
    assert not finished_first & (set(after[0]) | set(after[1]))  # nothing finished was computed again
    assert tree(work / "topk") == reference
    assert not list((work / "topk").rglob(".shard-*"))  # leftovers of the killed run are gone


def _workspace(setup, workdir: Path, **extract) -> Workspace:
    _, recipe_path = setup
    raw = yaml.safe_load(recipe_path.read_text())
    raw["extract"].update(extract)
    return Workspace(FusionRecipe.model_validate(raw), workdir, show_progress=False)


def test_one_process_takes_over_the_shards_another_rank_finished(setup, reference, tmp_path, monkeypatch):
    """A crashed two-process run left only rank 1's shard-00001 (no manifest, not even rank 0's): one process
    computes every other shard and the store is the same as a fresh one."""
    monkeypatch.setenv("FUSELAB_THREADS", "1")
    ws = _workspace(setup, tmp_path / "w")
    pivot_dir = ws.store_dir(ws.pivot)
    pivot_dir.mkdir(parents=True)
    shutil.copytree(
        Path(setup[0]) / "single" / "topk" / pivot_dir.name / "shard-00001", pivot_dir / "shard-00001"
    )
    computed: list[list[int]] = []
    real = extract_mod.token_batches

    def counting(indices, *a, **kw):
        computed.append(list(indices))
        return real(indices, *a, **kw)

    monkeypatch.setattr(extract_mod, "token_batches", counting)
    from fuselab.utils.hardware import configure_threads

    configure_threads()
    summary = ws.extract([ws.pivot])[ws.pivot]
    assert summary.resumed_shards == 1
    plan = extract_mod.plan_shards(ws.encoded(ws.pivot), ws.extract_settings().shard_tokens)
    assert computed == [s for n, s in enumerate(plan) if n != 1]
    assert tree(pivot_dir) == {
        k.split("/", 1)[1]: v for k, v in reference.items() if k.startswith(pivot_dir.name + "/")
    }


def test_a_shard_planned_differently_is_never_taken_over(setup, tmp_path):
    """``shard_tokens`` is not part of the store's key; a rerun with another value must recompute, not mix
    shards of two plans (which would drop or duplicate examples)."""
    ws = _workspace(setup, tmp_path / "w")
    ws.extract([ws.pivot])
    ws2 = _workspace(setup, tmp_path / "w", shard_tokens=45)
    assert ws2.store_dir(ws.pivot) == ws.store_dir(ws.pivot)
    manifest = json.loads((ws.store_dir(ws.pivot) / "manifest.json").read_text())
    manifest["complete"] = False  # as if interrupted, so that the second plan's run opens it
    (ws.store_dir(ws.pivot) / "manifest.json").write_text(json.dumps(manifest))
    ws2.extract([ws.pivot])
    plan = extract_mod.plan_shards(ws2.encoded(ws.pivot), 45)
    manifest = json.loads((ws.store_dir(ws.pivot) / "manifest.json").read_text())
    assert [s["name"] for s in manifest["shards"]] == [f"shard-{n:05d}" for n in range(len(plan))]
    assert sorted(p.name for p in ws.store_dir(ws.pivot).glob("shard-*")) == [
        s["name"] for s in manifest["shards"]
    ]
    store = ws2.store(ws.pivot)
    assert len(store) == len(ws2.texts())
    for n, indices in enumerate(plan):
        assert shard_entry(ws.store_dir(ws.pivot), f"shard-{n:05d}", indices, store.k) is not None


def test_shard_entry_rejects_incomplete_or_foreign_folders(tmp_path):
    import numpy as np

    from fuselab.fusion.store import ExampleTopK, write_shard_files

    rows = [
        ExampleTopK(np.zeros((n, 3), np.int32), np.zeros((n, 3), np.float16), np.zeros(n, np.float16))
        for n in (2, 4)
    ]
    entry = write_shard_files(tmp_path, "shard-00000", [7, 3], rows, 3)
    assert (
        shard_entry(tmp_path, "shard-00000", [7, 3], 3)
        == entry
        == {"name": "shard-00000", "examples": 2, "tokens": 6}
    )
    assert shard_entry(tmp_path, "shard-00000", [3, 7], 3) is None  # another plan's shard
    assert shard_entry(tmp_path, "shard-00000", [7, 3], 4) is None  # another k
    assert shard_entry(tmp_path, "shard-00001", [7, 3], 3) is None  # missing
    (tmp_path / "shard-00000" / "logp.npy").unlink()
    assert shard_entry(tmp_path, "shard-00000", [7, 3], 3) is None  # not whole


def test_the_main_rank_records_shards_in_shard_order(tmp_path):
    """Rank 1's shard may land first; the finished manifest is in shard order all the same."""
    import numpy as np

    from fuselab.fusion.store import ExampleTopK, write_shard_files

    row = ExampleTopK(np.zeros((1, 2), np.int32), np.zeros((1, 2), np.float16), np.zeros(1, np.float16))
    writer = TopKStoreWriter(tmp_path, {"k": 2}, leftovers=["shard-00000"])
    plan = [("shard-00000", [0]), ("shard-00001", [1])]
    write_shard_files(tmp_path, "shard-00001", [1], [row], 2)  # "rank 1"
    assert writer.adopt(plan) == ["shard-00000"]
    writer.write_shard("shard-00000", [0], [row], {})
    assert writer.adopt(plan) == []
    writer.finish({})
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [s["name"] for s in manifest["shards"]] == ["shard-00000", "shard-00001"] and manifest["complete"]


def test_round_robin_owns_every_shard_once():
    for count in (1, 2, 3, 8):
        owners = [[r for r in range(count) if Ranks(r, count, r).owns(n)] for n in range(20)]
        assert all(len(o) == 1 for o in owners)
        assert [o[0] for o in owners] == [n % count for n in range(20)]


def _fuse_recipe(setup, tmp_path: Path) -> Path:
    _, recipe_path = setup
    raw = yaml.safe_load(recipe_path.read_text())
    data = raw["data"]["train"][0]
    raw["output"] = str(tmp_path / "out")
    raw["evaluate"] = {"heldout": {"chat": [data]}, "prompts": ["Say hello."], "max_new_tokens": 4}
    path = tmp_path / "fuse.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_fuse_until_extract_under_two_processes_writes_the_single_process_stores(
    setup, tmp_path, monkeypatch
):
    """The extract stage of ``fuselab fuse`` is the same data-parallel extraction."""
    recipe = _fuse_recipe(setup, tmp_path)
    monkeypatch.setenv("FUSELAB_THREADS", "1")
    assert (
        main(["fuse", str(recipe), "--until", "extract", "--workdir", str(tmp_path / "w1"), "--no-progress"])
        == 0
    )
    cli = ["fuse", recipe, "--until", "extract", "--workdir", tmp_path / "w2", "--no-progress"]
    proc = accelerate_launch([fuselab_exe(), *cli], port=29567, env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert tree(tmp_path / "w2" / "topk") == tree(tmp_path / "w1" / "topk")
    assert proc.stdout.count("stopped after extract") == 1  # one report, from rank 0
    assert not (tmp_path / "w2" / "targets").exists()  # nothing after the extract stage ran


def test_fuse_under_several_processes_runs_only_the_extract_stage(setup, tmp_path, monkeypatch):
    from fuselab.pipelines.config import load_recipe
    from fuselab.pipelines.fuse import FusePipeline
    from fuselab.utils import distributed
    from fuselab.utils.errors import ConfigError

    pipe = FusePipeline(
        load_recipe(_fuse_recipe(setup, tmp_path)), workdir=tmp_path / "w", show_progress=False
    )
    monkeypatch.setattr(distributed, "current_ranks", lambda: Ranks(0, 2, 0))
    with pytest.raises(ConfigError, match="--until extract"):
        pipe.run()
    with pytest.raises(ConfigError, match="no --from"):
        pipe.run("extract", until="extract")
    assert not (tmp_path / "w" / "topk").exists()  # refused before any work
