"""Pluggable scorers for ``fuselab wrpo build``: a number per (prompt, response), higher is better.

A scorer is registered with a strict options model and a factory. Recipes name it under ``scorer.type``;
unknown names and options are errors listing the valid ones. Built in:

- ``execution``: run the prompt's executable tests (HumanEval ``check``) in :mod:`fuselab.wrpo.sandbox`;
- ``reward_model``: a sequence-classification reward model (``AutoModelForSequenceClassification``);
- ``llm_judge``: an LLM judge behind an OpenAI-compatible endpoint (loopback by default);
- ``python``: any ``module:function`` taking ``(prompt_messages, response, row)`` and returning a float.
"""

from fuselab.wrpo.scorers.registry import (
    ScoreItem,
    Scorer,
    build_scorer,
    check_scorer_prompts,
    register_scorer,
    scorer_names,
    validate_scorer_config,
)

__all__ = [
    "ScoreItem",
    "Scorer",
    "build_scorer",
    "check_scorer_prompts",
    "register_scorer",
    "scorer_names",
    "validate_scorer_config",
]
