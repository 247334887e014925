"""What passes through the spool contract besides events: a claimed event, a retry, an
append queued for group commit, a group write cut short; and the check of ids given to
``dead retry`` and ``dead purge``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, NamedTuple

from ..errors import SpoolError


@dataclass(frozen=True, slots=True)
class Claimed:
    """A claimed event, ready to send: the stored request and what the shipper needs."""

    id: Any  # opaque to everything but its backend
    path: str
    query: str  # without _k: the key is added when it is sent
    api_key: str | None
    created: float
    attempts: int  # including this one


class Waiting:
    """One append queued for group commit: its record and, once the lock holder that
    wrote it has finished, what became of it."""

    __slots__ = ("record", "error", "written")

    def __init__(self, record: Any) -> None:
        self.record = record
        self.error: BaseException | None = None  # raised by the append that queued it
        self.written = False  # handled by a holder: not to be written again


class Retry(NamedTuple):
    """A claimed event that failed, to be claimable again at ``due`` (wall clock)."""

    id: Any
    due: float
    error: str | None  # what the last attempt came to (never the API key)


class PartialWrite(SpoolError):
    """A group write stopped short (disk full): the first ``stored`` records are stored
    whole, the rest are not."""

    def __init__(self, message: str, stored: int) -> None:
        super().__init__(message)
        self.stored = stored


def unknown_ids(wanted: list[str] | None, known: Iterable[str]) -> None:
    """Raise KeyError naming the ids in ``wanted`` that are not in ``known``."""
    if wanted is not None:
        missing = sorted(set(wanted) - set(known))
        if missing:
            raise KeyError(", ".join(missing))
