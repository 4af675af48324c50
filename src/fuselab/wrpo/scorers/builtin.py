"""The built-in scorers (registered on import)."""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import re
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlparse

from pydantic import Field, field_validator

from fuselab.utils.config import StrictModel
from fuselab.utils.errors import ConfigError, FuselabError
from fuselab.wrpo.sandbox import SandboxLimits, choose_isolation
from fuselab.wrpo.scorers.execution import row_prompt_text, run_tests
from fuselab.wrpo.scorers.registry import ScoreItem, register_scorer

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------- execution


class ExecutionOptions(StrictModel):
    timeout_s: float = Field(5.0, gt=0, description="wall-clock seconds per response (CPU seconds too)")
    memory_mb: int = Field(512, ge=64, description="address-space limit of the test process")
    file_size_mb: int = Field(8, ge=1)
    partial_credit: bool = Field(True, description="score the share of asserts passed (else 1/0)")
    unsafe_exec: bool = Field(
        False,
        description=(
            "where user namespaces are unavailable, run generated code without OS isolation (rlimits, "
            "timeout and the in-process guard only) instead of refusing; same as --unsafe-exec or "
            "FUSELAB_UNSAFE_EXEC=1. Never used where the namespace sandbox works"
        ),
    )


class ExecutionScorer:
    def __init__(self, options: ExecutionOptions) -> None:
        # Decided here, before any model is sampled: refuse now rather than after hours of sampling.
        isolation = choose_isolation(options.unsafe_exec)
        self.options = options
        self.limits = SandboxLimits(
            timeout_s=options.timeout_s,
            memory_mb=options.memory_mb,
            file_size_mb=options.file_size_mb,
            isolation=isolation,
        )

    def score(self, items: list[ScoreItem]) -> list[float]:
        out = []
        for it in items:
            test, entry = it.row.get("test"), it.row.get("entry_point")
            if not test or not entry:
                raise ConfigError(
                    "scorer execution needs prompts with `test` (defining check(candidate)) and "
                    f"`entry_point`; prompt {it.row.get('id', '?')!r} has neither"
                )
            outcome = run_tests(
                it.response,
                test,
                entry,
                prompt_text=row_prompt_text(it.row),
                limits=self.limits,
                partial_credit=self.options.partial_credit,
            )
            out.append(outcome.score)
        return out


def _has_text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def check_execution_prompts(prompts: Sequence[Any]) -> None:
    """Every prompt needs ``test`` (code defining ``check(candidate)``) and ``entry_point`` (the function's
    name): refused when the prompts are loaded, naming the rows (1-based), not after sampling every model."""
    bad = []
    for p in prompts:
        missing = [k for k in ("test", "entry_point") if not _has_text(p.row.get(k))]
        if missing:
            bad.append((p, missing))
    if not bad:
        return
    sources = sorted({p.source for p, _ in bad if p.source})
    shown = ", ".join(
        f"{p.number or '?'} (id {p.id!r}: no {' or '.join(f'`{k}`' for k in missing)})"
        for p, missing in bad[:10]
    )
    more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
    where = f"{', '.join(sources)} " if sources else ""
    raise ConfigError(
        f"scorer execution runs each prompt's tests, but {len(bad)} of the {len(prompts)} prompts have none: "
        f"{where}row{'s' if len(bad) > 1 else ''} {shown}{more}. Add `test` (code defining "
        "check(candidate)) and `entry_point` (the name of the function to test) to those rows, drop them, "
        "or use a scorer that needs no tests (reward_model, llm_judge or python)"
    )


@register_scorer(
    "execution",
    ExecutionOptions,
    "run the prompt's tests in a sandboxed subprocess",
    check_prompts=check_execution_prompts,
)
def _execution(options: ExecutionOptions) -> ExecutionScorer:
    return ExecutionScorer(options)


# ------------------------------------------------------------------------------------------ reward model


class RewardModelOptions(StrictModel):
    model: str = Field(description="a sequence-classification reward model (folder, catalog name or hub id)")
    batch_size: int = Field(8, ge=1)
    max_length: int = Field(2048, ge=8)
    device: str = "auto"
    dtype: str = "auto"


class RewardModelScorer:
    """Score = the reward head's output for the chat-rendered (prompt, response); for a model with several
    labels, the log-probability of the last label (the "good" class by convention)."""

    def __init__(self, options: RewardModelOptions) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from fuselab.modeling.resolve import resolve_model
        from fuselab.wrpo.sampling import pick_device, pick_dtype

        path = resolve_model(options.model)
        self.device = pick_device(options.device)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=pick_dtype(options.dtype, self.device)
        ).to(self.device)
        self.model.eval()
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.options = options
        self._torch = torch

    def _text(self, it: ScoreItem) -> str:
        conv = [*it.prompt, {"role": "assistant", "content": it.response}]
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(conv, tokenize=False)
        return "\n\n".join(m["content"] for m in conv)

    def score(self, items: list[ScoreItem]) -> list[float]:
        torch = self._torch
        out: list[float] = []
        for i in range(0, len(items), self.options.batch_size):
            texts = [self._text(it) for it in items[i : i + self.options.batch_size]]
            enc = self.tokenizer(
                texts,
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self.options.max_length,
                add_special_tokens=False,
            ).to(self.device)
            with torch.no_grad():
                logits = self.model(**enc).logits.float()
            if logits.shape[-1] == 1:
                vals = logits[:, 0]
            else:
                vals = torch.log_softmax(logits, dim=-1)[:, -1]
            out.extend(float(v) for v in vals.cpu())
        return out


@register_scorer("reward_model", RewardModelOptions, "a sequence-classification reward model")
def _reward_model(options: RewardModelOptions) -> RewardModelScorer:
    return RewardModelScorer(options)


# --------------------------------------------------------------------------------------------- LLM judge

JUDGE_SYSTEM = (
    "You are a strict judge of answers written by AI assistants. Rate how helpful, correct and complete the "
    "answer is for the user's request, on a scale from 1 (useless) to 10 (excellent). Reply with only "
    "'Score: <number>'."
)
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


class JudgeOptions(StrictModel):
    base_url: str = Field("http://127.0.0.1:8000/v1", description="OpenAI-compatible endpoint (…/v1)")
    model: str = Field(description="model name the endpoint serves")
    api_key_env: str | None = Field(None, description="environment variable holding the API key, if any")
    allow_remote: bool = Field(False, description="allow a non-loopback base_url (sends the data there)")
    timeout_s: float = Field(60.0, gt=0)
    max_tokens: int = Field(16, ge=1)
    system_prompt: str = JUDGE_SYSTEM

    @field_validator("base_url")
    @classmethod
    def _http(cls, v: str) -> str:
        if urlparse(v).scheme not in ("http", "https"):
            raise ValueError("base_url must start with http:// or https://")
        return v.rstrip("/")


SCORE_RE = re.compile(r"(-?\d+(?:\.\d+)?)")


def parse_judge_score(text: str) -> float:
    """The number after 'Score:' (or the first number) in a judge reply; NaN when there is none."""
    m = re.search(r"score\s*[:=]\s*(-?\d+(?:\.\d+)?)", text, re.IGNORECASE) or SCORE_RE.search(text)
    return float(m.group(1)) if m else math.nan


class JudgeScorer:
    """Asks the judge for a 1–10 rating per response (temperature 0). Unparsable replies score NaN, and the
    selection step ignores NaN samples (counted as ``unscored``)."""

    def __init__(self, options: JudgeOptions) -> None:
        host = urlparse(options.base_url).hostname or ""
        if host not in LOOPBACK and not options.allow_remote:
            raise ConfigError(
                f"scorer llm_judge: base_url {options.base_url} is not on this machine; prompts and "
                "responses would be sent there. Set allow_remote: true to allow it"
            )
        self.options = options
        self.key = os.environ.get(options.api_key_env, "") if options.api_key_env else ""

    def _ask(self, it: ScoreItem) -> float:
        question = "\n\n".join(f"[{m['role']}]\n{m['content']}" for m in it.prompt)
        body = {
            "model": self.options.model,
            "temperature": 0,
            "max_tokens": self.options.max_tokens,
            "messages": [
                {"role": "system", "content": self.options.system_prompt},
                {"role": "user", "content": f"Request:\n{question}\n\nAnswer:\n{it.response}"},
            ],
        }
        req = urllib.request.Request(
            self.options.base_url + "/chat/completions",
            data=json.dumps(body).encode(),
            headers={
                "Content-Type": "application/json",
                **({"Authorization": f"Bearer {self.key}"} if self.key else {}),
            },
            method="POST",
        )
        try:
            with urllib.request.urlopen(req, timeout=self.options.timeout_s) as resp:
                data = json.loads(resp.read().decode())
        except (urllib.error.URLError, TimeoutError, OSError) as err:
            raise FuselabError(
                f"scorer llm_judge: request to {self.options.base_url} failed ({err}); is the server running?"
            ) from None
        try:
            text = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise FuselabError(
                f"scorer llm_judge: unexpected reply from {self.options.base_url}: {data!r:.200}"
            ) from None
        return parse_judge_score(str(text))

    def score(self, items: list[ScoreItem]) -> list[float]:
        return [self._ask(it) for it in items]


@register_scorer("llm_judge", JudgeOptions, "an LLM judge behind an OpenAI-compatible endpoint")
def _judge(options: JudgeOptions) -> JudgeScorer:
    return JudgeScorer(options)


# ------------------------------------------------------------------------------------------------ python


class PythonOptions(StrictModel):
    function: str = Field(
        description="`package.module:function`, called as f(prompt_messages, response, row)"
    )
    options: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for the function")

    @field_validator("function")
    @classmethod
    def _form(cls, v: str) -> str:
        if v.count(":") != 1:
            raise ValueError("function must look like package.module:function")
        return v


class PythonScorer:
    def __init__(self, options: PythonOptions) -> None:
        mod, name = options.function.split(":")
        try:
            self.fn = getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError) as err:
            raise ConfigError(f"scorer python: cannot load {options.function}: {err}") from None
        self.kwargs = options.options

    def score(self, items: list[ScoreItem]) -> list[float]:
        # Returned as they are: the build checks them and names a value that is not a number.
        return [self.fn(it.prompt, it.response, it.row, **self.kwargs) for it in items]


@register_scorer("python", PythonOptions, "a Python function module:function(prompt, response, row)")
def _python(options: PythonOptions) -> PythonScorer:
    return PythonScorer(options)
