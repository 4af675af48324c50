"""Data-parallel ``fuselab wrpo build``: ``accelerate launch --num_processes 2`` (gloo on the CPU, as the
fusion extraction tests run it) writes the same OUT_DIR, byte for byte, as one process; a rank killed after
its first piece is resumed without redoing what was finished; a batch's seed does not depend on who samples
it. Also the load-time checks of a build: vLLM's engine options (checked by fusion extraction's rule),
vLLM under several processes, prompts without tests for the execution scorer, and empty prompts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from fuselab.cli import main
from fuselab.utils.errors import ConfigError
from fuselab.wrpo.config import BuildConfig, SamplingConfig
from helpers.distributed import launch_cli, recorded
from helpers.wrpo import build_recipe, tiny_chat_model, write_jsonl

TESTS = Path(__file__).parent
HELPER = TESTS / "helpers" / "wrpo_build_ranks.py"
# the same kernels in every process, so the numbers can be compared; the python scorer below is imported
# from this file
ENV = {"FUSELAB_THREADS": "1", "PYTHONPATH": str(TESTS)}


def length_score(prompt, response, row):
    """A deterministic toy scorer (imported by the `python` scorer, in every process)."""
    return float(len(response) % 5)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("wrpo-ranks")
    tiny_chat_model(root / "target", seed=1)
    tiny_chat_model(root / "source", seed=2)
    write_jsonl(root / "prompts.jsonl", [{"id": f"q{i}", "prompt": f"hello {i} quick fox"} for i in range(7)])
    # 4 source pieces (2 prompts each) and 3 target pieces: two ranks get unequal shares
    recipe = build_recipe(root, "test_wrpo_distributed:length_score", batch_size=2, share=0.3)
    path = root / "build.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return root, path


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes, less what records when and how long (the time taken,
    the output stamp)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or p.name == ".fuselab-output.json":
            continue
        data = p.read_bytes()
        if p.name == "build_stats.json":
            stats = json.loads(data)
            assert stats.pop("seconds") >= 0
            data = json.dumps(stats).encode()
        elif p.name == "README.md" and p.parent == folder:
            data = b"\n".join(line for line in data.splitlines() if b"`seconds`" not in line)
        out[str(p.relative_to(folder))] = data
    return out


@pytest.fixture(scope="module")
def reference(setup):
    """OUT_DIR as one process writes it (run in this process, on one thread)."""
    root, recipe = setup
    mp = pytest.MonkeyPatch()
    mp.setenv("FUSELAB_THREADS", "1")
    try:
        from fuselab.utils.hardware import configure_threads

        configure_threads()
        assert main(["wrpo", "build", str(recipe), str(root / "single")]) == 0
    finally:
        mp.undo()
        configure_threads()
    return tree(root / "single")


def launch(setup, out: Path, record: Path | None, port: int, env: dict[str, str] | None = None):
    """``accelerate launch`` of ``fuselab wrpo build`` on two processes: the installed console script, as
    users run it, or (``record``) the helper that records who wrote which piece."""
    _, recipe = setup
    cli = ["wrpo", "build", recipe, out]
    return launch_cli(cli, record, HELPER, port=port, env={**ENV, **(env or {})})


def test_two_processes_write_the_single_process_build_byte_for_byte(setup, reference, tmp_path):
    proc = launch(setup, tmp_path / "data", None, port=29571)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = tree(tmp_path / "data")
    assert set(got) == set(reference)
    assert {k for k in got if got[k] != reference[k]} == set()
    # every part of the build is there: the SFT model the target was sampled from, samples of both models
    stats = json.loads(reference["build_stats.json"])
    assert stats["sft_trained"] and stats["target_sampled_from"] == "sft-model" and stats["wrpo_rows"] > 0
    assert "sft-model/model.safetensors" in got and "samples/target.scores.jsonl" in got
    assert proc.stdout.count("built ") == 1  # one report, from rank 0
    assert not (tmp_path / ".data.work").exists()


def test_a_rank_killed_after_its_first_piece_resumes(setup, reference, tmp_path):
    out = tmp_path / "data"
    first = launch(setup, out, tmp_path / "rec1", port=29573, env={"KILL_RANK": "1"})
    assert first.returncode != 0, first.stdout
    before = recorded(tmp_path / "rec1")
    assert len(before[1]) == 1  # rank 1 died right after its first piece
    assert not out.exists()

    second = launch(setup, out, tmp_path / "rec2", port=29575)
    assert second.returncode == 0, second.stderr[-3000:]
    after = recorded(tmp_path / "rec2")
    # each rank wrote only its own pieces (batch b on rank b mod 2), and nothing finished was written again
    for rank, pieces in after.items():
        assert pieces and all(int(piece) % 2 == rank for _, _, piece in pieces)
    assert len(set(after[0]) | set(after[1])) == len(after[0]) + len(after[1])
    finished_first = {p for pieces in before.values() for p in pieces}
    assert finished_first and not finished_first & (set(after[0]) | set(after[1]))
    assert tree(out) == reference
    assert not (tmp_path / ".data.work").exists()


@pytest.fixture
def one_thread(monkeypatch):
    """torch on one thread, as the reference was made; the usual count again afterwards."""
    from fuselab.utils.hardware import configure_threads

    monkeypatch.setenv("FUSELAB_THREADS", "1")
    configure_threads()
    yield
    monkeypatch.delenv("FUSELAB_THREADS")
    configure_threads()


def test_one_process_takes_over_the_pieces_another_rank_finished(
    setup, reference, tmp_path, monkeypatch, one_thread
):
    """Rank 1 of an earlier two-process run finished its source pieces (batches 1 and 3) and nothing else:
    one process samples only the other batches and writes the same OUT_DIR."""
    from fuselab.utils.distributed import Ranks
    from fuselab.wrpo import build, sampling
    from fuselab.wrpo.config import load_build_config
    from fuselab.wrpo.prompts import load_prompts
    from fuselab.wrpo.scorers import build_scorer

    _, recipe = setup
    cfg = load_build_config(recipe)
    out = tmp_path / "data"
    plan = build.plan_model(
        "source-0", cfg.sources[0].model, load_prompts(cfg.prompts), cfg.sampling.n, cfg.sampling,
        tmp_path / ".data.work" / "samples", cfg.scorer,
    )  # fmt: skip
    build.run_pieces(plan, build_scorer(cfg.scorer), "python", Ranks(1, 2, 1))
    assert sorted(p.name for p in (plan.folder / "samples").iterdir()) == ["00001.jsonl", "00003.jsonl"]
    sampled: list[tuple[str, list[int]]] = []
    real = sampling.generate

    def recording(path, prompts, n, cfg_, **kw):
        sampled.append((Path(path).name, list(kw["only_batches"])))
        return real(path, prompts, n, cfg_, **kw)

    monkeypatch.setattr(sampling, "generate", recording)
    assert main(["wrpo", "build", str(recipe), str(out)]) == 0
    assert sampled == [("source", [0, 2]), ("sft-model", [0, 1, 2])]
    assert tree(out) == reference


# ------------------------------------------------------------------------------ seeds, in one process


def test_a_batch_is_sampled_the_same_whoever_samples_it(setup):
    """Batch b is seeded ``seed + b`` from its place in the whole prompt list: sampling only batch 2 (as
    one rank of several does) gives what sampling every batch gives for it."""
    from fuselab.wrpo.sampling import generate

    root, _ = setup
    cfg = SamplingConfig(n=2, max_new_tokens=5, batch_size=2, temperature=1.0, top_p=1.0, device="cpu")
    prompts = [[{"role": "user", "content": f"hello {i} quick fox"}] for i in range(6)]
    every, alone = {}, {}
    generate(root / "source", prompts, 2, cfg, on_batch=lambda s, r: every.update({s: r}))
    generate(root / "source", prompts, 2, cfg, on_batch=lambda s, r: alone.update({s: r}), only_batches=[2])
    assert list(alone) == [4] and alone[4] == every[4]
    skipped = {}
    generate(
        root / "source", prompts, 2, cfg, on_batch=lambda s, r: skipped.update({s: r}), skip_batches={0, 1, 2}
    )
    assert skipped == {}  # nothing left: nothing sampled (and no model loaded)


# ------------------------------------------------------------------------------- vLLM engine options


def test_sampling_takes_the_vllm_engine_options_checked_as_fusion_extraction_checks_them():
    from fuselab.fusion.config import ExtractConfig
    from fuselab.wrpo.sampling import vllm_engine_args

    cfg = SamplingConfig(
        backend="vllm", tensor_parallel_size=2, gpu_memory_utilization=0.8, max_model_len=4096
    )
    args = vllm_engine_args("/m", cfg)
    assert args == {
        "model": "/m",
        "dtype": "auto",
        "seed": 0,
        "tensor_parallel_size": 2,
        "gpu_memory_utilization": 0.8,
        "max_model_len": 4096,
    }
    assert "gpu_memory_utilization" not in vllm_engine_args("/m", SamplingConfig(backend="vllm"))
    assert SamplingConfig(tensor_parallel_size=4).tensor_parallel_size == 4  # auto may pick vLLM
    # the same bounds as extraction's (the fields are its own)
    for name in ("tensor_parallel_size", "gpu_memory_utilization", "max_model_len"):
        assert SamplingConfig.model_fields[name].metadata == ExtractConfig.model_fields[name].metadata

    with pytest.raises(ValueError) as wrpo_err:
        SamplingConfig(backend="transformers", tensor_parallel_size=2, max_model_len=1024)
    with pytest.raises(ValueError) as fusion_err:
        ExtractConfig(backend="transformers", tensor_parallel_size=2, max_model_len=1024)
    message = "tensor_parallel_size, max_model_len only apply to backend: vllm"
    assert message in str(wrpo_err.value) and message in str(fusion_err.value)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"backend": "transformers", "gpu_memory_utilization": 0.5}, "only apply to backend: vllm"),
        ({"backend": "vllm", "tensor_parallel_size": 0}, "greater than or equal to 1"),
        ({"backend": "vllm", "gpu_memory_utilization": 1.5}, "less than or equal to 1"),
        ({"backend": "vllm", "gpu_memory_utilization": 0}, "greater than 0"),
        ({"backend": "vllm", "max_model_len": 8}, "greater than or equal to 16"),
        ({"backend": "vllm", "max_model_len": 256}, "max_model_len (256) leaves no room for a prompt"),
    ],
)
def test_bad_vllm_options_are_refused_when_the_recipe_loads(setup, tmp_path, options, expected):
    _, recipe = setup
    raw = yaml.safe_load(recipe.read_text())
    raw["target_sampling"] = {"max_new_tokens": 256, **options}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    from fuselab.wrpo.config import load_build_config

    with pytest.raises(ConfigError) as err:
        load_build_config(bad)
    assert "target_sampling" in str(err.value) and expected in str(err.value)


def test_vllm_under_several_processes_is_refused_before_any_work(setup, tmp_path, monkeypatch):
    from fuselab.utils.distributed import Ranks
    from fuselab.wrpo import build, sampling

    _, recipe = setup
    cfg = BuildConfig.model_validate(
        {**yaml.safe_load(recipe.read_text()), "target_sampling": {"backend": "vllm"}}
    )
    monkeypatch.setattr(build, "current_ranks", lambda: Ranks(0, 2, 0))
    monkeypatch.setattr(sampling, "use_vllm", lambda backend: backend == "vllm")
    monkeypatch.setattr(sampling, "generate", lambda *a, **k: pytest.fail("sampled before refusing"))
    with pytest.raises(
        ConfigError, match=r"target_sampling: vLLM runs in one process.*backend: transformers"
    ):
        build.run_build(cfg, tmp_path / "data")


# ------------------------------------------------------------------------------------ load-time checks


def _no_sampling(monkeypatch):
    from fuselab.wrpo import sampling

    monkeypatch.setattr(sampling, "generate", lambda *a, **k: pytest.fail("sampled before refusing"))


def test_execution_scorer_refuses_prompts_without_tests_at_load(setup, tmp_path, monkeypatch, capsys):
    _, recipe = setup
    rows = [
        {
            "id": "a",
            "prompt": "def add(a, b):",
            "test": "def check(c): assert c(1, 2) == 3",
            "entry_point": "add",
        },
        {"id": "b", "prompt": "def sub(a, b):"},
        {
            "id": "c",
            "prompt": "def mul(a, b):",
            "test": "def check(c): assert c(2, 2) == 4",
            "entry_point": "mul",
        },
        {"id": "d", "prompt": "def neg(a):", "test": "def check(c): assert c(1) == -1", "entry_point": ""},
    ]
    prompts = write_jsonl(tmp_path / "code.jsonl", rows)
    raw = yaml.safe_load(recipe.read_text())
    raw.update(prompts={"path": str(prompts)}, scorer={"type": "execution"})
    path = tmp_path / "exec.yaml"
    path.write_text(yaml.safe_dump(raw))
    _no_sampling(monkeypatch)
    from fuselab.wrpo import sandbox

    monkeypatch.setattr(sandbox, "choose_isolation", lambda *a: pytest.fail("scorer built before the check"))
    assert main(["wrpo", "build", str(path), str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err
    assert "2 of the 4 prompts have none" in err
    assert f"{prompts} rows 2 (id 'b': no `test` or `entry_point`), 4 (id 'd': no `entry_point`)" in err
    assert "Add `test` (code defining check(candidate)) and `entry_point`" in err
    assert "reward_model, llm_judge or python" in err
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"prompt": ""}, "empty prompt (`prompt` has no text)"),
        ({"prompt": "   \n"}, "empty prompt (`prompt` has no text)"),
        ({"prompt": []}, "empty prompt (`prompt` is an empty list)"),
        ({"messages": []}, "empty prompt (`messages` is an empty list)"),
        ({"messages": [{"role": "user", "content": " "}]}, "empty prompt (the last user turn has no text)"),
        (
            {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "an answer"}]},
            "empty prompt (the last user turn has no text)",
        ),
        ({"messages": [{"role": "user", "content": None}]}, "message content must be text, got NoneType"),
    ],
)
def test_an_empty_prompt_names_the_file_and_row(setup, tmp_path, monkeypatch, capsys, row, expected):
    _, recipe = setup
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hello"}, {"prompt": "fox"}, row])
    raw = yaml.safe_load(recipe.read_text())
    raw["prompts"] = {"path": str(prompts)}
    path = tmp_path / "empty.yaml"
    path.write_text(yaml.safe_dump(raw))
    _no_sampling(monkeypatch)
    assert main(["wrpo", "build", str(path), str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err
    assert f"error: {prompts} row 3: {expected}" in err
    if "empty prompt" in expected:
        assert "give it a question to answer, or remove the row" in err
