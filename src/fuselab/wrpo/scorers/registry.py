"""Registry of scorers (same style as :mod:`fuselab.merge.registry`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import ValidationError

from fuselab.utils.config import StrictModel, format_validation_error
from fuselab.utils.errors import ConfigError


@dataclass
class ScoreItem:
    """One response to score: the prompt as chat messages, the response text and the prompt's row."""

    prompt: list[dict[str, Any]]
    response: str
    row: dict[str, Any] = field(default_factory=dict)


class Scorer(Protocol):
    def score(self, items: list[ScoreItem]) -> list[float]: ...


@dataclass(frozen=True)
class ScorerSpec:
    name: str
    options: type[StrictModel]
    factory: Callable[[Any], Scorer]
    summary: str
    # what the scorer needs of every prompt, checked when the prompts are loaded (before any sampling):
    # called with the prompts (objects with ``row``, ``id``, ``number``, ``source``), raises ConfigError
    check_prompts: Callable[[Sequence[Any]], None] | None = None


_REGISTRY: dict[str, ScorerSpec] = {}


def register_scorer(
    name: str,
    options: type[StrictModel],
    summary: str,
    *,
    check_prompts: Callable[[Sequence[Any]], None] | None = None,
) -> Callable[[Callable[[Any], Scorer]], Callable[[Any], Scorer]]:
    def deco(factory: Callable[[Any], Scorer]) -> Callable[[Any], Scorer]:
        if name in _REGISTRY:
            raise ValueError(f"scorer {name!r} is registered twice")
        _REGISTRY[name] = ScorerSpec(name, options, factory, summary, check_prompts)
        return factory

    return deco


def _ensure_loaded() -> None:
    import fuselab.wrpo.scorers.builtin  # noqa: F401  (registers the built-in scorers)


def scorer_names() -> list[str]:
    _ensure_loaded()
    return sorted(_REGISTRY)


def _spec(config: dict[str, Any]) -> tuple[ScorerSpec, dict[str, Any]]:
    _ensure_loaded()
    if not isinstance(config, dict) or "type" not in config:
        raise ValueError(f"scorer needs `type:`, one of {', '.join(sorted(_REGISTRY))}")
    name = config["type"]
    if name not in _REGISTRY:
        raise ValueError(f"unknown scorer {name!r}; valid scorers: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name], {k: v for k, v in config.items() if k != "type"}


def validate_scorer_config(config: dict[str, Any]) -> dict[str, Any]:
    """Check ``{type: ..., **options}``; return it with defaults filled in. ValueError (for pydantic) if bad."""
    spec, options = _spec(config)
    try:
        parsed = spec.options.model_validate(options)
    except ValidationError as err:
        raise ValueError(format_validation_error(err, spec.options, f"scorer {spec.name}")) from None
    return {"type": spec.name, **parsed.model_dump()}


def check_scorer_prompts(config: dict[str, Any], prompts: Sequence[Any]) -> None:
    """Refuse prompts the configured scorer cannot score (ConfigError naming the rows), before any work."""
    try:
        spec, _ = _spec(config)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if spec.check_prompts is not None:
        spec.check_prompts(prompts)


def build_scorer(config: dict[str, Any]) -> Scorer:
    try:
        spec, options = _spec(config)
        parsed = spec.options.model_validate(options)
    except (ValueError, ValidationError) as err:
        raise ConfigError(str(err)) from None
    return spec.factory(parsed)
