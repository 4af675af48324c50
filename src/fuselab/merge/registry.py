"""Registry of merge methods.

A merge method is a pure function over tensors, registered with the parameters it takes. Input kinds:

- ``inputs="weights"``: the function receives the models' tensors and returns the merged tensor (linear,
  passthrough); a base model is an input only when it is listed.
- ``inputs="deltas"``: the function receives the task vectors δ_k = W_k − W_base and returns the merged task
  vector; the engine adds the base. Every task-vector method (task arithmetic, TIES, DARE, SCE, VaRM, Model
  Stock, breadcrumbs, DELLA) depends on the base only through the deltas, so this keeps each method a few
  lines that a test can check against its formula.
- ``inputs="deltas_if_base"``: deltas when the recipe names a base, the weights otherwise (NuSLERP,
  Multi-SLERP: the geometry is the same either way, only the origin moves).
- ``inputs="base_and_weights"``: the weights of the models besides the base, plus the base's as ``base=``
  (SLERP, which interpolates between the base and one other model).

``min_models`` / ``max_models`` bound how many models are merged (besides the base, for methods that use
one); ``check`` validates parameter combinations (per tensor, before any tensor is read).

Per-model parameters arrive as lists aligned with the inputs; global ones as scalars. Random methods receive
a ``generator`` seeded per tensor, so results do not depend on the order tensors are processed in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from fuselab.utils.errors import ConfigError

REQUIRED = object()
Inputs = Literal["weights", "deltas", "deltas_if_base", "base_and_weights"]

# mergekit's methods that fuselab does not implement, with what to use instead (mergekit 0.1.5's registry).
MERGEKIT_ONLY = {
    "karcher": "use `multislerp` (a weighted spherical mean of several models)",
    "nearswap": "use `slerp` (interpolate towards the other model by `t`)",
    "arcee_fusion": "use `ties` or `sce` (keep the entries that changed most)",
    "ram": "use `ties` with `density: 1` (the closest: each entry is the mean of the deltas that agree in "
    "sign, where RAM averages those that are non-zero)",
    "ramplus_tl": "use `ties` with `density: 1` (the closest: each entry is the mean of the deltas that agree "
    "in sign, where RAM+ averages those that are non-zero, with tensor-local rescaling)",
}


@dataclass(frozen=True)
class Param:
    """One parameter of a merge method."""

    name: str
    type: type  # bool, int, float or str
    default: Any = REQUIRED
    per_model: bool = False
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    help: str = ""

    def check(self, value: Any, where: str) -> Any:
        """Validate and coerce one literal value; raise ConfigError naming ``where``."""
        if value is None and self.default is None:  # an optional parameter left unset
            return None
        if self.type is bool:
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: `{self.name}` must be true or false, got {value!r}")
        elif self.type in (int, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{where}: `{self.name}` must be a number, got {value!r}")
            if self.type is int and float(value) != int(value):
                raise ConfigError(f"{where}: `{self.name}` must be a whole number, got {value!r}")
            value = self.type(value)
            if self.minimum is not None and value < self.minimum:
                raise ConfigError(f"{where}: `{self.name}` must be >= {self.minimum}, got {value}")
            if self.maximum is not None and value > self.maximum:
                raise ConfigError(f"{where}: `{self.name}` must be <= {self.maximum}, got {value}")
        elif self.type is str and not isinstance(value, str):
            raise ConfigError(f"{where}: `{self.name}` must be a string, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise ConfigError(
                f"{where}: `{self.name}` must be one of {', '.join(map(str, self.choices))}; got {value!r}"
            )
        return value


@dataclass(frozen=True)
class GroupStatistic:
    """A statistic a method needs over a *group* of tensors (e.g. all tensors of one decoder layer).

    The engine runs a first streaming pass when :attr:`needed` says so for the resolved parameters, sums
    ``compute(deltas)`` (a float64 tensor of shape [K, ...]) over the tensors of each group, and passes the
    sum to the method as ``group_stat``.
    """

    needed: Callable[[dict[str, Any]], bool]
    group_of: Callable[[str], str]
    compute: Callable[[list[torch.Tensor]], torch.Tensor]


# A cross-parameter check: (resolved keyword arguments of one tensor, labels of the merged models) -> an
# error message, or None when the combination is valid.
ParamCheck = Callable[[dict[str, Any], list[str]], str | None]


@dataclass(frozen=True)
class MergeMethod:
    name: str
    func: Callable[..., torch.Tensor]
    inputs: Inputs
    params: tuple[Param, ...]
    reference: str
    summary: str
    random: bool = False
    group_statistic: GroupStatistic | None = None
    min_models: int = 1
    max_models: int | None = None
    check: ParamCheck | None = None
    _by_name: dict[str, Param] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._by_name.update({p.name: p for p in self.params})

    @property
    def needs_base(self) -> bool:
        return self.inputs in ("deltas", "base_and_weights")

    def uses_base(self, has_base: bool) -> bool:
        """Whether the base is set apart from the merged models (always, never, or when the recipe names one)."""
        return self.needs_base or (self.inputs == "deltas_if_base" and has_base)

    def on_deltas(self, has_base: bool) -> bool:
        """Whether the function receives task vectors (and the engine adds the base back)."""
        return self.inputs == "deltas" or (self.inputs == "deltas_if_base" and has_base)

    def count_text(self) -> str:
        """How many models the method merges, in words (for messages and ``--list-methods``)."""
        lo, hi = self.min_models, self.max_models
        if hi == lo:
            return f"exactly {lo}"
        return f"at least {lo}" if hi is None else f"{lo} to {hi}"

    def param(self, name: str) -> Param | None:
        return self._by_name.get(name)


_REGISTRY: dict[str, MergeMethod] = {}


def register_merge_method(
    name: str,
    *,
    inputs: Inputs,
    params: tuple[Param, ...] = (),
    reference: str,
    summary: str,
    random: bool = False,
    group_statistic: GroupStatistic | None = None,
    min_models: int = 1,
    max_models: int | None = None,
    check: ParamCheck | None = None,
) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Decorator that registers ``func`` as merge method ``name``."""

    def deco(func: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        if name in _REGISTRY:
            raise ValueError(f"merge method {name!r} is registered twice")
        _REGISTRY[name] = MergeMethod(
            name=name,
            func=func,
            inputs=inputs,
            params=params,
            reference=reference,
            summary=summary,
            random=random,
            group_statistic=group_statistic,
            min_models=min_models,
            max_models=max_models,
            check=check,
        )
        return func

    return deco


def _ensure_loaded() -> None:
    import fuselab.merge.methods  # noqa: F401  (registers the built-in methods)


def get_merge_method(name: str) -> MergeMethod:
    _ensure_loaded()
    if name in _REGISTRY:
        return _REGISTRY[name]
    valid = ", ".join(sorted(_REGISTRY))
    if name in MERGEKIT_ONLY:
        raise ConfigError(
            f"merge_method `{name}` is a mergekit method that fuselab does not implement; "
            f"{MERGEKIT_ONLY[name]}. Valid methods: {valid}"
        )
    raise ConfigError(f"unknown merge method {name!r}; valid methods: {valid}")


def merge_method_names() -> list[str]:
    _ensure_loaded()
    return sorted(_REGISTRY)


def all_param_names() -> set[str]:
    """Every parameter name any registered method knows (to tell typos from parameters of other methods)."""
    _ensure_loaded()
    return {p.name for m in _REGISTRY.values() for p in m.params}
