"""A bounded memo for the names events repeat: an app sends the same few event and
property names over and over, so what is computed from a name (its check, its
percent-encoding, its JSON key) is kept, up to a bound, for apps that do not."""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

V = TypeVar("V")
LIMIT = 4096


class Memo(dict, Generic[V]):
    """``memo[name]`` is ``compute(name)``, computed once per name while fewer than
    ``limit`` are kept (a plain dict lookup when kept: no call on the hot path)."""

    def __init__(self, compute: Callable[[str], V] | None = None, limit: int = LIMIT) -> None:
        super().__init__()
        self.compute = compute
        self.limit = limit

    def __missing__(self, name: str) -> V:
        value = self.compute(name)
        self.remember(name, value)
        return value

    def remember(self, name: str, value: V) -> None:
        if len(self) < self.limit:
            self[name] = value
