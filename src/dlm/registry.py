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


class ComponentRegistry(Generic[T]):
    """Every component of one kind (objectives, samplers), each registered under a name for the
    forward processes it serves. Names are per process: ``nelbo`` is one objective for masked
    diffusion and another for uniform-state diffusion, ``ancestral`` a sampler for each.

    >>> SAMPLERS = ComponentRegistry("sampler")
    >>> @SAMPLERS.register("ancestral", processes=("masked",))
    ... class MaskedAncestral: ...
    >>> SAMPLERS.get("ancestral", "masked") is MaskedAncestral
    True

    ``for_process(p)`` is the view a family reads (a :class:`Registry` of the names that serve
    ``p``); ``entries()`` lists every (name, process, component) for the contract tests.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[tuple[str, str], T] = {}

    def register(self, name: str, processes: tuple[str, ...]) -> Callable[[T], T]:
        if not processes:
            raise ValueError(f"{self.kind} '{name}' must declare the processes it serves")

        def add(item: T) -> T:
            for process in processes:
                if (name, process) in self._items:
                    raise ValueError(f"{self.kind} '{name}' is registered twice for process '{process}'")
                self._items[(name, process)] = item
            return item

        return add

    def entries(self) -> list[tuple[str, str, T]]:
        return [(name, process, item) for (name, process), item in sorted(self._items.items())]

    def names(self, process: str | None = None) -> list[str]:
        return sorted({name for name, p in self._items if process is None or p == process})

    def get(self, name: str, process: str) -> T:
        return self.for_process(process).get(name)

    def for_process(self, process: str, kind: str | None = None) -> "ProcessView[T]":
        """The components that serve ``process``, read live (named ``kind`` in errors)."""
        return ProcessView(self, process, kind or f"{process} {self.kind}")


class ProcessView(Generic[T]):
    """The part of a :class:`ComponentRegistry` that serves one process: ``get(name)``,
    ``names()``, ``in`` — what a family reads. Live: a component registered later shows."""

    def __init__(self, parent: ComponentRegistry[T], process: str, kind: str):
        self.parent, self.process, self.kind = parent, process, kind

    def get(self, name: str) -> T:
        if (name, self.process) in self.parent._items:
            return self.parent._items[(name, self.process)]
        choices = ", ".join(self.names())
        elsewhere = sorted(p for n, p in self.parent._items if n == name)
        hint = f" ('{name}' serves the {', '.join(elsewhere)} process)" if elsewhere else ""
        raise DlmError(f"unknown {self.kind} '{name}' (choose from: {choices}){hint}")

    def names(self) -> list[str]:
        return self.parent.names(self.process)

    def __contains__(self, name: str) -> bool:
        return (name, self.process) in self.parent._items
