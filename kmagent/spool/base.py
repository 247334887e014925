"""The spool contract every backend implements (SQLite and newline-JSON).

Producers only ``append``. The one shipper (see ``kmagent.lock``) claims ready events,
and for each claimed event later calls exactly one of ``ack`` (delivered: forget it),
``retry`` (back to pending, not before a given time), ``release`` (back to pending at
once, on shutdown) or ``dead_letter``. Whatever a shipper had claimed when it died is
given back by ``recover`` when the next shipper starts, so a claim is never lost.
"""

from __future__ import annotations

import abc
import errno
import fcntl
import os
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from ..errors import SpoolError, SpoolFull
from ..events import Event

# Spool files are never world-readable (they hold events, maybe API keys); the group
# may write, so that app users in the spool's group can append (see the README).
FILE_MODE = 0o660
DIR_MODE = 0o770


def open_file(path: Path, flags: int) -> int:
    """os.open; a file it creates gets the spool's mode whatever the umask, so that in a
    shared spool directory every app user of the group can append to it."""
    flags |= os.O_CLOEXEC
    if flags & os.O_CREAT:
        try:
            fd = os.open(path, flags | os.O_EXCL, FILE_MODE)
        except FileExistsError:
            pass
        else:
            try:
                os.fchmod(fd, FILE_MODE)
            except OSError:
                pass
            return fd
    return os.open(path, flags, FILE_MODE)


def append_to(path: Path, data: bytes, *, sync: bool = False) -> None:
    """Append ``data`` to ``path`` (created with the spool's mode) in one write. A short
    write (disk full) is undone and raised: a half record must not stand for a whole."""
    fd = open_file(path, os.O_RDWR | os.O_APPEND | os.O_CREAT)
    try:
        size = os.fstat(fd).st_size
        try:
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(errno.ENOSPC, "short write (disk full?)")
            if sync:
                os.fsync(fd)
        except OSError:
            try:
                os.ftruncate(fd, size)
            except OSError:
                pass
            raise
    finally:
        os.close(fd)


def flocked(path: Path, *, create: bool = False, wait: bool = True) -> int:
    """``path`` open (created with the spool's mode if ``create``) and held under an
    exclusive flock; closing the descriptor releases it. BlockingIOError if another
    holds it and not ``wait``."""
    fd = open_file(path, os.O_RDWR | os.O_CREAT) if create else open_file(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        raise
    return fd


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: temp file, fsync, rename, fsync of the directory."""
    tmp = path.with_name(path.name + ".tmp")
    fd = open_file(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def make_dirs(path: Path) -> None:
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)


# How often a producer re-measures the spool's size for max_bytes; in between it adds
# what it wrote itself (other processes may overshoot the cap by what they write then).
SIZE_CHECK_S = 0.5


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


def _after_fork_in_child() -> None:
    # Appends that other threads of the parent had queued are the parent's to write;
    # written here too, they would be stored twice.
    for spool in list(_live):
        spool._waiting.clear()
    _after_fork()


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork,
                    after_in_child=_after_fork_in_child)


class PartialWrite(SpoolError):
    """A group write stopped short (disk full): the first ``stored`` records are stored
    whole, the rest are not."""

    def __init__(self, message: str, stored: int) -> None:
        super().__init__(message)
        self.stored = stored


class Spool(abc.ABC):
    """A durable FIFO of events with claim / ack / retry / dead-letter.

    Producer handles are per process: a backend checks ``os.getpid()`` and reopens in a
    forked child; ``_lock`` serialises threads and is held across fork().

    Group commit: an appending thread queues its record, then takes ``_lock`` and
    writes every record queued by then in one transaction (SQLite) or one write()
    (jsonl), synced once with ``durability = "full"``. Threads that queued meanwhile find
    their record written when they get the lock and return at once. Alone, a thread
    writes just its own record; under contention, one commit serves many.
    """

    path: Path

    def __init__(self, *, max_bytes: int | None = None, when_full: str = "error") -> None:
        self._lock = threading.Lock()
        self.max_bytes = max_bytes
        self.when_full = when_full
        self._size = 0
        self._size_at = -SIZE_CHECK_S  # monotonic time of the last measurement
        # Records waiting to be written: [record, error, written]. Appends and pops of a
        # deque are atomic, so queueing takes no lock; only the lock holder pops.
        self._waiting: deque[list[Any]] = deque()
        _live.add(self)

    def append(self, event: Event) -> None:
        """Store one event durably (per ``durability``) before returning; at
        ``max_bytes`` raise SpoolFull or, with ``when_full = "drop"``, drop and count."""
        if self.max_bytes is not None and self._full_now():
            if self.when_full == "drop":
                self._count_drop()
                return
            raise SpoolFull(f"spool {self.path} is at its max_bytes ({self.max_bytes} "
                            "bytes): is the daemon running and the host reachable?")
        record = self._record(event)
        if self._lock.acquire(blocking=False):
            # Nobody is writing: nobody to group with; the common case, kept cheap.
            try:
                if not self._waiting:
                    self._size += self._write([record], sync=False)
                    return
                slot = [record, None, False]
                self._waiting.append(slot)
                self._write_waiting(slot)
            finally:
                self._lock.release()
        else:
            slot = [record, None, False]
            self._waiting.append(slot)
            with self._lock:
                if not slot[2]:  # not written by an earlier lock holder: write the queue
                    self._write_waiting(slot)
        if slot[1] is not None:
            raise slot[1]

    def _write_waiting(self, own: list[Any]) -> None:
        batch: list[list[Any]] = []
        started = False
        try:
            while self._waiting:
                batch.append(self._waiting.popleft())
            if not any(entry is own for entry in batch):
                # Popped by a holder that was interrupted before writing it (a signal
                # handler raising): ours to write now.
                batch.append(own)
            started = True
            self._size += self._write([entry[0] for entry in batch], sync=False)
        except PartialWrite as exc:
            for n, entry in enumerate(batch):
                entry[1] = None if n < exc.stored else exc
        except Exception as exc:
            for entry in batch:
                entry[1] = exc
        except BaseException:
            # Interrupted (a signal handler raising) once the write may have begun: the
            # others must not write theirs again, nor believe it surely stored.
            if started:
                for entry in batch:
                    entry[1] = SpoolError(f"spool {self.path}: interrupted while writing; "
                                          "the event may or may not be stored")
                    entry[2] = True
            raise
        for entry in batch:
            entry[2] = True

    def append_many(self, events: list[Event]) -> None:
        """Store ``events`` together and durably (synced to disk, whatever
        ``durability`` says) before returning: for imports, whose source is removed next."""
        if events and self.max_bytes is not None and self._full_now():
            raise SpoolFull(f"spool {self.path} is at its max_bytes ({self.max_bytes} bytes)")
        if events:
            records = [self._record(event) for event in events]
            with self._lock:
                self._size += self._write(records, sync=True)

    def _full_now(self) -> bool:
        now = time.monotonic()
        if now - self._size_at >= SIZE_CHECK_S:
            self._size = self.size_on_disk()
            self._size_at = now
        return self._size >= self.max_bytes

    @property
    def drops_path(self) -> Path:
        """One byte per event dropped by ``when_full = "drop"``: its size is the count."""
        return self.path.with_name(self.path.name + ".dropped")

    def _count_drop(self) -> None:
        try:
            append_to(self.drops_path, b"\n")
        except OSError as exc:
            raise SpoolError(f"spool {self.path}: cannot count a dropped event: "
                             f"{exc.strerror}") from None

    def dropped_total(self) -> int:
        try:
            return os.stat(self.drops_path).st_size
        except FileNotFoundError:
            return 0

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
    def watch_target(self) -> tuple[Path, str]:
        """The directory to watch and the prefix of the spool's file names in it."""
        return self.path.parent, self.path.name

    @property
    def lock_path(self) -> Path:
        """The file whose flock makes its holder the spool's only shipper."""
        return self.path.with_name(self.path.name + ".lock")

    @property
    def figures_path(self) -> Path:
        """Where the running daemon publishes its figures for ``kmagent status``."""
        return self.lock_path.with_name(self.lock_path.name + ".figures.json")

    def __enter__(self) -> "Spool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def unknown_ids(wanted: list[str] | None, known: Iterable[str]) -> None:
    """Raise KeyError naming the ids in ``wanted`` that are not in ``known``."""
    if wanted is not None:
        missing = sorted(set(wanted) - set(known))
        if missing:
            raise KeyError(", ".join(missing))
