"""Strict configuration models and YAML loading with readable errors.

Every command has one pydantic model for its recipe. Unknown keys are errors (a misspelt key that is
silently ignored is the most common way a run does something other than what its author meant).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from fuselab.utils.boundary import read_text
from fuselab.utils.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


class StrictModel(BaseModel):
    """Base of every config model: unknown keys are errors, values are validated on load."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _field_names(model_cls: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Names of the fields valid at ``loc`` (the parent of the offending key), for the error message."""
    cls: Any = model_cls
    for part in loc:
        if isinstance(part, int) or cls is None:
            continue
        fields = getattr(cls, "model_fields", None)
        if not fields or part not in fields:
            return []
        cls = _inner_model(fields[part].annotation)
    fields = getattr(cls, "model_fields", None)
    return sorted(fields) if fields else []


def _inner_model(annotation: Any) -> type[BaseModel] | None:
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def format_validation_error(err: ValidationError, model_cls: type[BaseModel], source: str) -> str:
    lines = [f"{source}: invalid {model_cls.__name__}:"]
    for e in err.errors():
        loc = tuple(e["loc"])
        where = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            valid = _field_names(model_cls, loc[:-1])
            hint = f" (valid keys here: {', '.join(valid)})" if valid else ""
            lines.append(f"  - {where}: unknown key{hint}")
        elif e["type"] == "missing":
            lines.append(f"  - {where}: required key is missing")
        else:
            msg = e["msg"]
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, ") :]
            lines.append(f"  - {where}: {msg} (got {e.get('input')!r})")
    return "\n".join(lines)


def validate_config(model_cls: type[M], data: Any, source: str = "config") -> M:
    """Validate ``data`` against ``model_cls``; raise :class:`ConfigError` with every problem listed."""
    if data is None:
        raise ConfigError(f"{source}: the file is empty; write a {model_cls.__name__} recipe")
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys at the top level, got {type(data).__name__}")
    try:
        return model_cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, model_cls, source)) from None


def load_yaml(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist")
    try:
        return yaml.safe_load(read_text(path))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None


def load_config(model_cls: type[M], path: str | Path) -> M:
    """Read a YAML recipe and validate it against ``model_cls``."""
    return validate_config(model_cls, load_yaml(path), source=str(path))


def check_scheduler_name(name: str) -> str:
    """``name`` if transformers knows it as a learning-rate scheduler (``SchedulerType``), else a ValueError
    listing the valid names: a misspelt scheduler used to fail only when training started."""
    from transformers.trainer_utils import SchedulerType

    valid = [s.value for s in SchedulerType]
    if name not in valid:
        raise ValueError(f"unknown learning-rate scheduler {name!r}; valid: {', '.join(valid)}")
    return name


def dump_yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, allow_unicode=True)
