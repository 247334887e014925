"""The spool contract every backend implements (SQLite and newline-JSON).

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
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

from ..errors import SpoolError, SpoolFull
from ..events import Event
from .files import append_to, sidecar
from .records import Claimed, PartialWrite, Retry, Waiting
from .shared import Shared
from .space import free_bytes, is_disk_full, keep_free_bytes

if TYPE_CHECKING:
    from .session import ShippingSession

# How often a producer re-measures the spool's size (max_bytes) and the filesystem's
# free space (keep_free); in between it adds what it wrote itself, and measures again
# early once that nears the room left (other processes may overshoot by what they
# write meanwhile: the reserve is there for that, among others).
SIZE_CHECK_S = 0.5


class Spool(abc.ABC):
    """A durable FIFO of events with claim / ack / retry / dead-letter.

    Handles share per process what ``_sharing()`` gives them (one per spool file for
    SQLite: its one connection; see ``Shared``); a forked child makes its own on first
    use. The lock is held across fork().

    Group commit: an appending thread queues its record, then takes the lock and
    writes every record queued by then in one transaction (SQLite) or one write()
    (jsonl), synced once with ``durability = "full"``. Threads that queued meanwhile find
    their record written when they get the lock and return at once. Alone, a thread
    writes just its own record; under contention, one commit serves many.

    Re-entrant appends (a signal handler or a logging hook calling record() while its
    thread is already inside the spool) never wait for themselves: the record is
    written at once if its thread is between writes, else SpoolError is raised at once.
    """

    path: Path
    # What one write adds on disk at least, whatever its records' size (SQLite: a WAL
    # frame), for the free-space estimate between measurements.
    WRITE_COST = 0

    def __init__(self, *, max_bytes: int | None = None, when_full: str = "error",
                 keep_free: int | str | None = None) -> None:
        self.max_bytes = max_bytes
        self.when_full = when_full
        self._keep_free_setting = keep_free
        self._keep_free: int | None = None  # resolved once the directory exists
        self._size = 0
        self._room = 0  # free bytes above the reserve, when last measured
        self._written = 0  # bytes this handle wrote since then
        self._size_at = -SIZE_CHECK_S  # monotonic time of the last measurement
        self._shared = self._share()

    def _share(self) -> Shared:
        """The process's shared state for this spool (backends may share it wider)."""
        return Shared()

    def _sharing(self) -> Shared:
        shared = self._shared
        if shared.stale:  # forked since: the parent's, never to be touched here
            shared = self._shared = self._share()
        return shared

    @property
    def _lock(self) -> threading.RLock:
        return self._sharing().lock

    @property
    def _waiting(self) -> deque[Waiting]:
        return self._sharing().waiting

    def _holding(self):
        """``with self._holding():`` the lock, marked busy (see ``Shared.held``)."""
        return self._sharing().held()

    def append(self, event: Event) -> None:
        """Store one event durably (per ``durability``) before returning; at
        ``max_bytes`` raise SpoolFull or, with ``when_full = "drop"``, drop and count."""
        full = self._full_now()
        if full:
            if self.when_full == "drop":
                self._count_drop()
                return
            raise SpoolFull(f"{full}: is the daemon running and the host reachable?")
        record = self._record(event)
        shared = self._shared
        if shared.stale:
            shared = self._sharing()
        lock = shared.lock
        if lock._is_owned():
            return self._append_reentrant(shared, record)
        # Only ever `with lock`: a signal handler that raises can run between any two
        # calls, and would leak a lock taken by acquire() before its try (the with
        # statement takes it and arms the release in one step).
        if not shared.busy:
            with lock:
                if not shared.waiting:
                    # Nobody was writing: nobody to group with; the common case, cheap.
                    shared.busy = True
                    try:
                        self._wrote(self._write([record], sync=False))
                    finally:
                        shared.busy = False
                    return
                slot = Waiting(record)
                shared.waiting.append(slot)
                self._write_waiting(shared, slot)
        else:
            # Somebody is writing: queue, so that the next holder writes us with its own.
            slot = Waiting(record)
            shared.waiting.append(slot)
            with lock:
                if not slot.written:  # not by an earlier lock holder: write the queue
                    self._write_waiting(shared, slot)
        if slot.error is not None:
            raise slot.error

    def _append_reentrant(self, shared: Shared, record: Any) -> None:
        """This thread already holds the lock (we are in a signal handler or a hook
        that interrupted it): waiting would deadlock. Between writes nothing is half
        done, so write now; inside one, a nested write could be rolled back with it."""
        if shared.busy:
            raise SpoolError(f"spool {self.path}: record() called while this thread was "
                             "writing to the spool (from a signal handler?); not stored")
        with shared.held():
            self._wrote(self._write([record], sync=False))

    def _write_waiting(self, shared: Shared, own: Waiting) -> None:
        batch: list[Waiting] = []
        started = False
        shared.busy = True
        try:
            while shared.waiting:
                batch.append(shared.waiting.popleft())
            if not any(entry is own for entry in batch):
                # Popped by a holder that was interrupted before writing it (a signal
                # handler raising): ours to write now.
                batch.append(own)
            started = True
            self._wrote(self._write([entry.record for entry in batch], sync=False))
        except PartialWrite as exc:
            for n, entry in enumerate(batch):
                entry.error = None if n < exc.stored else exc
        except SpoolError as exc:  # the write failed: for every append in it
            for entry in batch:
                entry.error = exc
        except BaseException:
            # Anything else is this thread's own (a signal handler raising, even an
            # ordinary Exception), never the others': once the write may have begun,
            # they must not write theirs again, nor believe it surely stored.
            if started:
                for entry in batch:
                    entry.error = SpoolError(f"spool {self.path}: interrupted while "
                                             "writing; the event may or may not be stored")
                    entry.written = True
            raise
        finally:
            shared.busy = False
        for entry in batch:
            entry.written = True

    def append_many(self, events: list[Event]) -> None:
        """Store ``events`` together and durably (synced to disk, whatever
        ``durability`` says) before returning: for imports, whose source is removed next."""
        if not events:
            return
        full = self._full_now()
        if full:
            raise SpoolFull(full)
        records = [self._record(event) for event in events]
        with self._holding():
            self._wrote(self._write(records, sync=True))

    def _wrote(self, added: int) -> None:
        self._size += added
        self._written += added + self.WRITE_COST

    @property
    def keep_free(self) -> int:
        """The reserve, in bytes: free space on the spool's filesystem that producers
        never take (``[spool] keep_free``; see ``space``)."""
        if self._keep_free is None:
            self._keep_free = keep_free_bytes(self._keep_free_setting, self.spool_dir)
        return self._keep_free

    def _full_now(self) -> str | None:
        """Why a new event must be refused now (max_bytes, or the reserve), or None."""
        now = time.monotonic()
        if now - self._size_at >= SIZE_CHECK_S or 2 * self._written >= self._room:
            self._follow()
            try:
                if self.max_bytes is not None:
                    self._size = self.size_on_disk()
                self._room = free_bytes(self.spool_dir) - self.keep_free
            except OSError as exc:  # the spool's directory removed by hand, say
                raise SpoolError(f"spool {self.path}: cannot measure its size: "
                                 f"{exc.strerror or exc}") from exc
            self._written = 0
            self._size_at = now
        if self.max_bytes is not None and self._size >= self.max_bytes:
            return f"spool {self.path} is at its max_bytes ({self.max_bytes} bytes)"
        if self._written >= self._room:
            return (f"spool {self.path}: its filesystem is down to the {self.keep_free} "
                    "bytes it keeps free ([spool] keep_free)")
        return None

    def out_of_room(self, exc: BaseException) -> bool:
        """Whether ``exc`` failed for want of room: by what it says, or, as SQLite can
        say "disk I/O error" on a full disk (making the -shm, say), by the filesystem."""
        return is_disk_full(exc) or self.space_low()

    def space_low(self) -> bool:
        """Whether the filesystem is near the reserve (under twice it): time for the
        shipper to give back what it can (seal files, vacuum)."""
        return self._free_under(2 * self.keep_free)

    def in_reserve(self) -> bool:
        """Whether the filesystem is down into the reserve itself (another program took
        the rest; the ballast is given up): the shipper's last room to work in."""
        return self._free_under(self.keep_free)

    def _free_under(self, size: int) -> bool:
        try:
            return free_bytes(self.spool_dir) < size
        except OSError:
            return True  # cannot tell: take the careful path

    backend = "sqlite"  # what sidecar() names files for (a subclass says its own)

    def sidecar(self, name: str) -> Path:
        """The file ``name`` beside the spool's own (files.sidecar): lock, figures..."""
        return sidecar(self.path, self.backend, name)

    @property
    def drops_path(self) -> Path:
        """One byte per event dropped by ``when_full = "drop"``: its size is the count."""
        return self.sidecar("dropped")

    def _count_drop(self) -> None:
        try:
            append_to(self.drops_path, b"\n")
        except OSError as exc:
            raise SpoolError(f"spool {self.path}: cannot count a dropped event: "
                             f"{exc.strerror}") from exc

    def dropped_total(self) -> int:
        try:
            return os.stat(self.drops_path).st_size
        except FileNotFoundError:
            return 0

    def _follow(self) -> None:
        """Now and then (with the size check): notice a spool file replaced by hand."""

    @abc.abstractmethod
    def _record(self, event: Event) -> Any:
        """What the backend stores for ``event`` (built before the lock is taken)."""

    @abc.abstractmethod
    def _write(self, records: list[Any], *, sync: bool) -> int:
        """Store ``records`` at once, under ``_lock``, durably per ``durability`` (and
        synced to disk if ``sync``); returns about how many bytes they added."""

    @abc.abstractmethod
    def size_on_disk(self) -> int:
        """What the spool's pending content takes on disk, in bytes (for max_bytes)."""

    def maintain(self) -> None:
        """Housekeeping the shipper runs now and then (e.g. giving free pages back)."""

    def rotate(self) -> None:
        """Cheap housekeeping the shipper runs every turn, whether or not it claims (an
        outage claims little): jsonl seals the active file once it is due."""

    @abc.abstractmethod
    def claim(self, limit: int, *, now: float, with_key_only: bool = False) -> list[Claimed]:
        """Up to ``limit`` pending events due by ``now``, oldest first, marked in flight.

        ``with_key_only`` skips events that carry no API key of their own.
        """

    @abc.abstractmethod
    def ack(self, ids: Iterable[Any]) -> None:
        """These were delivered: forget them."""

    @abc.abstractmethod
    def retry(self, entries: Iterable[Retry]) -> None:
        """These ``(id, due, error)`` failed: pending again, not claimed before ``due``."""

    @abc.abstractmethod
    def release(self, ids: Iterable[Any]) -> None:
        """These were not sent (shutdown): pending again at once."""

    @abc.abstractmethod
    def dead_letter(self, ids: Iterable[Any], *, status: int | None, reason: str,
                    now: float) -> None:
        """These can never be delivered: move them to the dead letters."""

    @abc.abstractmethod
    def requests(self, *, dead: bool = False) -> list[tuple[str, str, str | None, float]]:
        """``(path, query, api_key, created)`` of every pending event (in flight
        included), or of every dead letter, oldest first; read only (``kmagent export``)."""

    @abc.abstractmethod
    def dead_letters(self) -> list[dict[str, Any]]:
        """Every dead letter: ``id`` (an opaque string), ``path``, ``person``, ``event``,
        ``properties``, ``status``, ``reason``, ``failed_at``; oldest first."""

    @abc.abstractmethod
    def retry_dead(self, ids: list[str] | None) -> int:
        """Put these dead letters (None: all) back to pending; returns how many.
        Unknown ids raise KeyError before anything changes."""

    @abc.abstractmethod
    def purge_dead(self, ids: list[str] | None) -> int:
        """Delete these dead letters (None: all); returns how many. Unknown ids raise
        KeyError before anything changes."""

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
    def watch_target(self) -> tuple[Path, Callable[[str], bool]]:
        """The directory to watch, and which file names in it a change to wakes the
        shipper: those producers write (SQLite: the database, its -wal, or its -journal
        when WAL is unavailable), never the daemon's own files beside them (lock,
        figures, ballast, salvage state, their temp files), or it would wake itself."""
        return self.path.parent, frozenset(
            self.path.name + suffix for suffix in ("", "-wal", "-journal")).__contains__

    @property
    def spool_dir(self) -> Path:
        """The directory holding the spool's files (its filesystem is the one measured)."""
        return self.path.parent

    @property
    def ballast_path(self) -> Path:
        """The shipper's spare room on the spool's filesystem (see ``space.Ballast``)."""
        return self.sidecar("ballast")

    @property
    def lock_path(self) -> Path:
        """The file whose flock makes its holder the spool's only shipper."""
        return self.sidecar("lock")

    @property
    def figures_path(self) -> Path:
        """Where the running daemon publishes its figures for ``kmagent status``."""
        return self.sidecar("figures.json")

    def ship(self, lock: Any) -> "ShippingSession":
        """This process's shipping session of the spool (session.py): ``lock``, the
        spool's ShipperLock, must be held, and stays the condition of every call."""
        from .session import ShippingSession
        if not lock.held:
            raise SpoolError(f"spool {self.path}: only the holder of its shipper lock "
                             "may ship it")
        return ShippingSession(self, lock)

    def __enter__(self) -> "Spool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
