"""A named registry of pluggable functions (alignment strategies, vocabulary mappings, fusion functions...).

Looking up an unknown name raises a :class:`ConfigError` that lists the valid names, so a typo in a recipe says
what would have worked.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from fuselab.utils.errors import ConfigError

F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        def deco(fn: F) -> F:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = fn
            return fn

        return deco

    def names(self) -> list[str]:
        return sorted(self._items)

    def get(self, name: str) -> F:
        try:
            return self._items[name]
        except KeyError:
            raise ConfigError(f"unknown {self.kind} {name!r}; valid: {', '.join(self.names())}") from None

    def __contains__(self, name: str) -> bool:
        return name in self._items
