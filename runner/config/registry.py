"""One registry for the built-in choices a config names by name alone: strategies and parallel engines.
Models and losses are options naming their class by `_target_` (runner.config.components), as the
user's own objects are.

    STRATEGIES = Registry("backward")

    @STRATEGIES.register("full")
    class Full(Strategy): ...

    STRATEGIES.get("full")   # or ValueError: "backward=nope is unknown: expected one of [...]"
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable


class Registry(Dict[str, Any]):
    """name -> builder (a function or a class), for the config key `key` (model, backward, ...)."""

    def __init__(self, key: str, also: Iterable[str] = ()):
        """`also`: choices handled elsewhere that an error message lists too (loss=custom)."""
        super().__init__()
        self.key, self.also = key, tuple(also)

    def register(self, name: str) -> Callable[[Any], Any]:
        def add(builder):
            if name in self:
                raise ValueError(f"{self.key}={name} is registered twice")
            self[name] = builder
            return builder
        return add

    def get(self, name: str) -> Any:  # type: ignore[override]
        if name not in self:
            raise ValueError(f"{self.key}={name} is unknown: expected one of {sorted([*self, *self.also])}")
        return self[name]
