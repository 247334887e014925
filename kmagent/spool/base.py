"""The spool contract every backend implements (SQLite now; newline-JSON next).

Producers only ``append``. The one shipper (see ``kmagent.lock``) claims ready events,
and for each claimed event later calls exactly one of ``ack`` (delivered: forget it),
``retry`` (back to pending, not before a given time), ``release`` (back to pending at
once, on shutdown) or ``dead_letter``. Whatever a shipper had claimed when it died is
given back by ``recover`` when the next shipper starts, so a claim is never lost.
"""

from __future__ import annotations

import abc
import os
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from ..events import Event


@dataclass(frozen=True, slots=True)
class Claimed:
    """A claimed event, ready to send: the stored request and what the shipper needs."""

    id: Any  # opaque to everything but its backend
    path: str
    query: str  # without _k: the key is added when it is sent
    api_key: str | None
    created: float
    attempts: int  # including this one


_live: "weakref.WeakSet[Spool]" = weakref.WeakSet()
_held_at_fork: list[threading.Lock] = []


def _before_fork() -> None:
    # Hold every spool's lock across fork(): then no thread is inside SQLite or in the
    # middle of a write for a spool at the instant of the fork, so the child inherits
    # no lock (SQLite's own mutexes included) held by a thread it does not have.
    # Our code never holds two spool locks at once, so taking them all cannot deadlock.
    for spool in list(_live):
        spool._lock.acquire()
        _held_at_fork.append(spool._lock)


def _after_fork() -> None:
    while _held_at_fork:
        _held_at_fork.pop().release()


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork,
                    after_in_child=_after_fork)


class Spool(abc.ABC):
    """A durable FIFO of events with claim / ack / retry / dead-letter.

    Producer handles are per process: a backend checks ``os.getpid()`` and reopens in a
    forked child; ``_lock`` serialises threads and is held across fork().
    """

    path: Path

    def __init__(self) -> None:
        self._lock = threading.Lock()
        _live.add(self)

    @abc.abstractmethod
    def append(self, event: Event) -> None:
        """Store one event durably (per ``durability``) before returning."""

    @abc.abstractmethod
    def claim(self, limit: int, *, now: float, with_key_only: bool = False) -> list[Claimed]:
        """Up to ``limit`` pending events due by ``now``, oldest first, marked in flight.

        ``with_key_only`` skips events that carry no API key of their own.
        """

    @abc.abstractmethod
    def ack(self, ids: Iterable[Any]) -> None:
        """These were delivered: forget them."""

    @abc.abstractmethod
    def retry(self, entries: Iterable[tuple[Any, float, str | None]]) -> None:
        """These ``(id, due, error)`` failed: pending again, not claimed before ``due``."""

    @abc.abstractmethod
    def release(self, ids: Iterable[Any]) -> None:
        """These were not sent (shutdown): pending again at once."""

    @abc.abstractmethod
    def dead_letter(self, ids: Iterable[Any], *, status: int | None, reason: str,
                    now: float) -> None:
        """These can never be delivered: move them to the dead letters."""

    @abc.abstractmethod
    def expedite(self) -> int:
        """Make every event waiting out a backoff due at once (a manual flush)."""

    @abc.abstractmethod
    def recover(self) -> int:
        """Give back what a dead shipper had in flight; returns how many events."""

    @abc.abstractmethod
    def next_due(self, *, with_key_only: bool = False) -> float | None:
        """When the earliest pending, unclaimed event becomes due (None when none)."""

    @abc.abstractmethod
    def mark(self) -> Any:
        """An opaque position: every event appended so far is at or before it."""

    @abc.abstractmethod
    def pending_through(self, mark: Any) -> int:
        """How many events at or before ``mark`` are still pending (claimed included)."""

    @abc.abstractmethod
    def stats(self, now: float) -> dict[str, Any]:
        """``pending``, ``in_flight``, ``dead``, ``oldest_pending_age_s``; fast at any size."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the backend's handles; the object may not be used afterwards."""

    @property
    def watch_target(self) -> tuple[Path, str]:
        """The directory to watch and the prefix of the spool's file names in it."""
        return self.path.parent, self.path.name

    @property
    def lock_path(self) -> Path:
        """The file whose flock makes its holder the spool's only shipper."""
        return self.path.with_name(self.path.name + ".lock")

    def __enter__(self) -> "Spool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
