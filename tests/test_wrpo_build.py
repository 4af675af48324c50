"""``fuselab wrpo build`` end to end on tiny models, and the reward-model / LLM-judge / python scorers."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForSequenceClassification

from fuselab.cli import main as cli_main
from fuselab.utils.errors import ConfigError
from fuselab.wrpo.config import BuildConfig
from fuselab.wrpo.data import TokenizeOptions, tokenize_rows
from fuselab.wrpo.sampling import load_tokenizer
from fuselab.wrpo.scorers import ScoreItem, build_scorer
from fuselab.wrpo.scorers.builtin import parse_judge_score
from helpers.models import tiny_llama_config
from helpers.tokenizers import byte_level_bpe
from helpers.wrpo import build_recipe, tiny_chat_model, write_jsonl


def length_score(prompt, response, row, modulo=5):
    """A deterministic toy scorer for the build tests (imported by the `python` scorer)."""
    return float(len(response) % modulo)


def nan_score(prompt, response, row):
    return float("nan")


def inf_score(prompt, response, row):
    return float("inf")


def raising_score(prompt, response, row):
    raise KeyError("no reference answer")


def text_score(prompt, response, row):
    return "good"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("wrpo-build")
    tiny_chat_model(root / "target", seed=1)
    tiny_chat_model(root / "source", seed=2)
    write_jsonl(root / "prompts.jsonl", [{"id": f"q{i}", "prompt": f"hello {i} quick fox"} for i in range(6)])
    return root


def _recipe(root, **over):
    d = build_recipe(root, "test_wrpo_build:length_score", batch_size=4, share=0.34, **over)
    return BuildConfig.model_validate(d)


def test_build_writes_preference_and_sft_data(models, tmp_path):
    from fuselab.wrpo.build import run_build

    out = tmp_path / "data"
    r = run_build(_recipe(models), out)
    assert (r.prompts, r.sft_rows) == (6, 2)
    stats = json.loads((out / "build_stats.json").read_text())
    assert stats["wrpo_prompts"] == 4 and stats["sft_trained"] and stats["target_sampled_from"] == "sft-model"
    assert stats["selection"].get("kept", 0) == r.wrpo_rows
    assert r.wrpo_rows + stats["selection"].get("dropped_target_all_equal", 0) == 4
    rows = [json.loads(x) for x in (out / "wrpo.jsonl").read_text().splitlines()]
    samples = {
        json.loads(x)["id"]: json.loads(x)
        for x in (out / "samples" / "target.samples.jsonl").read_text().splitlines()
    }
    for row in rows:
        assert set(row) >= {"prompt", "chosen", "rejected", "source_chosen", "source_model", "scores"}
        s = row["scores"]
        assert s["wt"] > s["l"]
        texts = samples[row["id"]]["responses"]
        assert row["chosen"][0]["content"] in texts and row["rejected"][0]["content"] in texts
        assert s["wt"] == max(length_score(None, t, None) for t in texts)
    sft = [json.loads(x) for x in (out / "sft.jsonl").read_text().splitlines()]
    assert all(x["completion"][0]["role"] == "assistant" for x in sft)
    AutoModelForCausalLM.from_pretrained(out / "sft-model")
    # the rows feed training directly
    tokenize_rows(rows, load_tokenizer(models / "target"), TokenizeOptions(128, 64))
    assert "WRPO preference data" in (out / "README.md").read_text()


def test_build_resumes_without_resampling(models, tmp_path, monkeypatch):
    from fuselab.wrpo import build, sampling

    cfg = _recipe(models, sft={"share": 0.0})
    out = tmp_path / "data"
    calls = []
    real = sampling.generate

    def failing_after_sources(path, prompts, n, cfg_, **kw):
        calls.append(str(path))
        if "target" in str(path):
            raise RuntimeError("interrupted")
        return real(path, prompts, n, cfg_, **kw)

    monkeypatch.setattr(sampling, "generate", failing_after_sources)
    with pytest.raises(RuntimeError):
        build.run_build(cfg, out)
    assert not out.exists() and list((tmp_path / ".data.work" / "samples").glob("source-0.*/samples/*.jsonl"))
    monkeypatch.setattr(
        sampling, "generate", lambda path, *a, **kw: (calls.append(str(path)), real(path, *a, **kw))
    )
    build.run_build(cfg, out)
    assert sum("source" in c for c in calls) == 1  # the source was not sampled again
    assert not (tmp_path / ".data.work").exists()


def test_cli_build_lists_scorers(capsys):
    assert cli_main(["wrpo", "build", "x.yaml", "out", "--list-scorers"]) == 0
    out = capsys.readouterr().out
    for name in ("execution", "reward_model", "llm_judge", "python"):
        assert f"{name}:" in out


# ------------------------------------------------------------------------------------------------ scorers


def test_reward_model_scorer_matches_the_model_head(tmp_path):
    tok = byte_level_bpe()
    cfg = tiny_llama_config(vocab_size=len(tok))
    cfg.num_labels, cfg.pad_token_id = 1, tok.pad_token_id
    torch.manual_seed(0)
    rm = LlamaForSequenceClassification(cfg).eval()
    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    scorer = build_scorer({"type": "reward_model", "model": str(tmp_path / "rm"), "batch_size": 2})
    prompt = [{"role": "user", "content": "hello"}]
    items = [ScoreItem(prompt, r) for r in ("fox", "the quick brown fox jumps", "dog")]
    got = scorer.score(items)
    for it, g in zip(items, got):  # one at a time, unpadded
        text = tok.apply_chat_template(
            [*prompt, {"role": "assistant", "content": it.response}], tokenize=False
        )
        ids = tok(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            assert g == pytest.approx(rm(**ids).logits[0, 0].item(), abs=1e-4)


def test_llm_judge_scorer_talks_to_a_local_openai_endpoint():
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.path, body, self.headers.get("Authorization")))
            answer = body["messages"][1]["content"]
            reply = "Score: 8" if "good" in answer else "I would say 3 out of 10"
            data = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *a):
            pass

    srv = HTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        scorer = build_scorer(
            {"type": "llm_judge", "base_url": f"http://127.0.0.1:{srv.server_port}/v1", "model": "judge"}
        )
        got = scorer.score(
            [ScoreItem([{"role": "user", "content": "q"}], r) for r in ("a good answer", "meh")]
        )
    finally:
        srv.shutdown()
    assert got == [8.0, 3.0]
    assert (
        seen[0][0] == "/v1/chat/completions"
        and seen[0][1]["model"] == "judge"
        and seen[0][1]["temperature"] == 0
    )


def test_llm_judge_refuses_remote_endpoints_unless_allowed():
    with pytest.raises(ConfigError, match="allow_remote"):
        build_scorer({"type": "llm_judge", "base_url": "https://api.example.com/v1", "model": "m"})
    assert parse_judge_score("Score: 7.5/10") == 7.5
    assert parse_judge_score("no idea") != parse_judge_score("no idea")  # NaN


@pytest.mark.parametrize(
    ("function", "expected"),
    [
        ("nan_score", "no usable rows: every one of the 18 source scores is NaN or infinite: scorer python"),
        ("inf_score", "no usable rows: every one of the 18 source scores is NaN or infinite"),
        ("raising_score", "scorer python failed on prompt 'q0': KeyError: 'no reference answer'"),
        ("text_score", "scorer python returned 'good' (str) for response 1 of prompt 'q0'"),
    ],
)
def test_build_with_a_scorer_that_scores_nothing_is_an_error(models, tmp_path, capsys, function, expected):
    # It used to exit 0 with an empty wrpo.jsonl (NaN / inf) or a traceback (raises / not a number).
    from fuselab.wrpo.build import run_build

    recipe = _recipe(
        models,
        scorer={"type": "python", "function": f"test_wrpo_build:{function}"},
        sft={"share": 0.34, "train": False},
    )
    with pytest.raises(ConfigError) as err:
        run_build(recipe, tmp_path / "data")
    assert expected in str(err.value)
    assert not (tmp_path / "data").exists()


def test_build_says_why_when_every_prompt_is_dropped(models, tmp_path):
    from fuselab.wrpo.build import run_build

    recipe = _recipe(
        models,
        scorer={"type": "python", "function": "test_wrpo_build:length_score", "options": {"modulo": 1}},
        sft={"share": 0.34, "train": False},
    )
    with pytest.raises(
        ConfigError, match="every prompt was dropped .*dropped_target_all_equal: 4.*all_equal: keep"
    ):
        run_build(recipe, tmp_path / "data")
