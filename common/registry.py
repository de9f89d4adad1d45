"""A tiny name -> factory registry (in the manner of Opacus' accountant registry)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from fedfuse.common.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Swappable parts chosen by a name in the run config."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def deco(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = factory
            return factory

        return deco

    def get(self, name: str) -> Callable[..., T]:
        try:
            return self._items[name]
        except KeyError:
            raise ConfigError(
                f"Unknown {self.kind} '{name}'. Known: {', '.join(sorted(self._items))}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)
