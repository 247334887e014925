"""The shipping half of the spool contract, as a type: one process ships a spool at a
time (the holder of its shipper lock, lock.py), and only that process has a session.

    lock = ShipperLock(spool.lock_path)
    if lock.try_acquire():
        with spool.ship(lock) as session:
            session.recover(); items = session.claim(64, now=time.time()) ...

Everything else a spool offers (append, stats, dead letters, marks) any process may
call; claim, ack, retry, release, dead_letter, expedite, next_due and recover only a
session, and each call checks that the lock is still held, so that a session kept past
the lock's release raises instead of shipping beside the next shipper.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Protocol

from ..errors import SpoolError

if TYPE_CHECKING:
    from .base import Spool
    from .records import Claimed, Retry


class Lock(Protocol):
    @property
    def held(self) -> bool: ...


class ShippingSession:
    def __init__(self, spool: "Spool", lock: Lock) -> None:
        self.spool = spool  # for what any process may ask it (stats, out_of_room...)
        self._lock = lock
        self._open = True

    def _shipper(self) -> "Spool":
        if not (self._open and self._lock.held):
            raise SpoolError(f"spool {self.spool.path}: this process no longer ships it "
                             "(its shipping session ended or the shipper lock was released)")
        return self.spool

    def recover(self) -> int:
        """Give back what a dead shipper left claimed; first thing in a session."""
        return self._shipper().recover()

    def claim(self, limit: int, *, now: float, with_key_only: bool = False) -> list["Claimed"]:
        return self._shipper().claim(limit, now=now, with_key_only=with_key_only)

    def ack(self, ids: Iterable[Any]) -> None:
        self._shipper().ack(ids)

    def retry(self, entries: Iterable["Retry"]) -> None:
        self._shipper().retry(entries)

    def release(self, ids: Iterable[Any]) -> None:
        self._shipper().release(ids)

    def dead_letter(self, ids: Iterable[Any], *, status: int | None, reason: str,
                    now: float) -> None:
        self._shipper().dead_letter(ids, status=status, reason=reason, now=now)

    def expedite(self) -> int:
        return self._shipper().expedite()

    def next_due(self, *, with_key_only: bool = False) -> float | None:
        return self._shipper().next_due(with_key_only=with_key_only)

    def close(self) -> None:
        self._open = False

    def __enter__(self) -> "ShippingSession":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
