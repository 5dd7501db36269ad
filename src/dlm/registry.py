"""Name → class registries: the only place where a string becomes a component."""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

from dlm.errors import DlmError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named set of components of one kind (processes, objectives, samplers, …).

    >>> SCHEDULES = Registry("schedule")
    >>> @SCHEDULES.register("loglinear")
    ... class LogLinear: ...
    >>> SCHEDULES.get("loglinear") is LogLinear
    True
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(item: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = item
            return item

        return add

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            choices = ", ".join(sorted(self._items))
            raise DlmError(f"unknown {self.kind} '{name}' (choose from: {choices})") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items
