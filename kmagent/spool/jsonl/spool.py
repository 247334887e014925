"""``JsonlSpool``: the Spool contract over a jsonl directory (see the package).

Producers append here; the shipper's side lives in ``shipping``, the read-only view of
the files in ``view``."""


from __future__ import annotations

import errno
import fcntl
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

from ...errors import SpoolError
from ...events import Event
from ...protocol import describe, encode
from ..base import Spool
from ..records import Claimed, PartialWrite, Retry, unknown_ids
from ..files import (FLOCK_WAIT_S, flock_within, flocked, make_dirs, open_file,
                     write_atomically)
from ..shared import Shared, shared_for
from .line import from_line, to_line
from .checkpoint import CHECKPOINT, Checkpoint
from .. import DEFAULT_ROTATE_BYTES, DEFAULT_ROTATE_SECONDS
from .layout import ACTIVE, DEAD, DEAD_LOCK, SEALED, TORN_END, dump_line
from .shipping import Shipping
from .view import CopyIndex, DiskView

_T = TypeVar("_T")


class _ShortWrite(OSError):
    """write() stopped short (disk full): the first ``written`` bytes of the data, whole
    lines, are in the file ``fd`` holds; nothing of the rest can ever be read as a line."""

    def __init__(self, written: int, fd: int) -> None:
        super().__init__(errno.ENOSPC, "short write (disk full?)")
        self.written = written
        self.fd = fd


class JsonlSpool(Spool):
    """A spool in a directory of newline-JSON files; see the module's description."""

    backend = "jsonl"

    def __init__(self, path: Path, *, durability: str = "normal",
                 rotate_bytes: int = DEFAULT_ROTATE_BYTES,
                 rotate_seconds: float = DEFAULT_ROTATE_SECONDS,
                 max_bytes: int | None = None, when_full: str = "error",
                 keep_free: int | str | None = None) -> None:
        self.path = Path(path).resolve()  # one lock file per spool, whatever the path
        super().__init__(max_bytes=max_bytes, when_full=when_full, keep_free=keep_free)
        self._full = durability == "full"
        self.rotate_bytes = rotate_bytes
        self.rotate_seconds = rotate_seconds
        self._active_path = self.path / ACTIVE
        self._active_name = str(self._active_path)  # a str: os.stat skips __fspath__
        self._fd: int | None = None
        self._held = (0, 0)  # (inode, device) of the file self._fd holds
        self._end = -1  # where our last complete line ended in the file we hold
        self._pid = -1
        self._shipping: Shipping | None = None
        try:
            make_dirs(self.path)
            Checkpoint.read(self.path / CHECKPOINT)  # refuses a newer format at once
            with self._lock:
                self._active_fd()  # open now so a bad path fails at construction
        except OSError as exc:
            raise SpoolError(f"spool {self.path}: cannot open: {exc.strerror}") from exc

    def _share(self) -> Shared:
        # One lock for every handle of this directory in the process, so that a signal
        # handler recording through another Client is seen as re-entrant: with locks of
        # their own, its flock of events.jsonl would wait for its own thread's.
        return shared_for(str(self.path))

    @property
    def rotate_limit(self) -> int:
        """The size at which the shipper seals the active file: rotate_bytes, but never
        more than a quarter of the reserve. A sealed file's room comes back only once
        every line of it is settled, and settling costs room first (dead letters, the
        checkpoint): on a disk another program filled, that room is the reserve (the
        ballast given up), so one file's whole worth of dead letters must fit in it."""
        return max(4096, min(self.rotate_bytes, self.keep_free // 4))

    @property
    def spool_dir(self) -> Path:
        return self.path

    @property
    def watch_target(self) -> tuple[Path, Callable[[str], bool]]:
        # What producers write: events.jsonl, and the sealed files they rotate it to;
        # not checkpoint.json, dead letters, the lock, figures or ballast (the shipper's).
        return self.path, lambda name: name == ACTIVE or SEALED.match(name) is not None

    # --- producer -----------------------------------------------------------------------

    def _active_fd(self) -> int:
        if self._pid != os.getpid():  # a forked child opens its own descriptor
            self._fd, self._pid, self._end = None, os.getpid(), -1
        if self._fd is None:
            self._fd = open_file(self._active_path, os.O_RDWR | os.O_APPEND | os.O_CREAT)
            held = os.fstat(self._fd)
            self._held = (held.st_ino, held.st_dev)
        return self._fd

    def _held_size(self, fd: int) -> int | None:
        """The size of the file ``fd`` holds, or None if it is no longer events.jsonl.
        One stat of the name: if it is still our inode, its size is our file's."""
        try:
            current = os.stat(self._active_name)
        except FileNotFoundError:
            return None
        if (current.st_ino, current.st_dev) != self._held:
            return None
        return current.st_size

    def _follow(self) -> None:
        """With each size check: let go of an events.jsonl sealed or deleted since
        (see _let_go_of_sealed). Only while no write is under way or queued: never
        from inside this thread's own write (a signal handler's record()), which may
        be using the descriptor, and never making appends wait that would otherwise
        join a group commit; a later check does it."""
        shared = self._sharing()
        if shared.busy or shared.waiting or shared.lock._is_owned():
            return
        with shared.held():
            self._let_go_of_sealed()

    def _let_go_of_sealed(self) -> None:
        """Close our descriptor of events.jsonl if the file is no longer at that name:
        once the shipper deletes a sealed file, a descriptor kept open anywhere keeps
        its blocks from the disk, and on a full disk a producer that is refused never
        writes again to notice. The caller holds the lock, outside any write."""
        fd = self._fd
        if fd is not None and self._pid == os.getpid() and self._held_size(fd) is None:
            self._fd, self._end = None, -1
            os.close(fd)

    def _record(self, event: Event) -> bytes:
        return to_line(event, time.time())

    def _write(self, records: list[bytes], *, sync: bool) -> int:
        data = b"".join(records)
        try:
            fd = self._append_bytes(data)
            if self._full or sync:
                os.fdatasync(fd)  # once for every line queued meanwhile
        except _ShortWrite as short:
            # The lines written whole are stored (the shipper may already be reading
            # them), and their appends return; the rest were cut away.
            stored, end = 0, 0
            for record in records:
                end += len(record)
                if end > short.written:
                    break
                stored += 1
            if stored and (self._full or sync):
                try:
                    os.fdatasync(short.fd)
                except OSError as exc:
                    raise SpoolError(f"spool {self.path}: cannot append: "
                                     f"{exc.strerror}") from exc
            raise PartialWrite(f"spool {self.path}: cannot append: short write (disk "
                               "full?)", stored) from short
        except OSError as exc:
            raise SpoolError(f"spool {self.path}: cannot append: {exc.strerror}") from exc
        return len(data)

    def size_on_disk(self) -> int:
        """Every file in the directory, whole (event files, dead letters, bad lines,
        the checkpoint...), but the ballast: what the spool takes from the disk. The
        shipper seals the active file early under pressure, so that what was delivered
        of it is freed (see reading.Reading._pressed)."""
        total, ballast = 0, self.ballast_path.name
        with os.scandir(self.path) as entries:
            for entry in entries:
                if entry.name == ballast:
                    continue
                try:
                    if entry.is_file(follow_symlinks=False):
                        total += entry.stat(follow_symlinks=False).st_size
                except FileNotFoundError:
                    continue  # deleted since listed (a sealed file, delivered)
        return total

    def _requeue(self, data: bytes) -> None:
        """Append the copies of lines the shipper moves (whole lines) and sync them: the
        caller settles the old copies next, so the new ones must be on disk first."""
        fd = self._append_bytes(data)
        os.fdatasync(fd)

    def _active_end(self) -> tuple[int, int]:
        """(inode, size) of events.jsonl, measured under its lock, so that no short
        write is cut back below it: whatever is appended next lies at or after it."""
        return self._under_active_lock(lambda fd, size: (self._held[0], size))

    def _under_active_lock(self, act: Callable[[int, int], _T]) -> _T:
        """``act(fd, size)`` with events.jsonl flocked and ``size`` its size under the
        lock; reopened first if it was sealed under us."""
        while True:
            fd = self._active_fd()
            try:  # locked inside the try: a handler raising right after must not leak it
                self._lock_active(fd)
                size = self._held_size(fd)
                if size is not None:
                    return act(fd, size)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)  # sealed under us: reopen events.jsonl
            self._fd, self._end = None, -1

    def _lock_active(self, fd: int) -> None:
        """flock ``fd`` (the caller's finally unlocks it, held or not: harmless)."""
        if not flock_within(fd):
            raise SpoolError(f"spool {self.path}: {ACTIVE} stayed locked by another "
                             f"writer for {FLOCK_WAIT_S:g} s (a stopped process?); not stored")

    def _append_bytes(self, data: bytes) -> int:
        """Append ``data`` (one or more whole lines) to events.jsonl in one write().

        A short write (disk full) is cut back, still under the lock, to the end of its
        last whole line and raised as _ShortWrite: the whole lines are stored (the
        shipper, which reads without the lock, may have read them already; it never
        takes a line of the active file before its newline is there, so the torn rest
        was not read). Should the cut fail, the torn rest stays unfinished until the
        next writer ends it with TORN_END, which makes it a bad line: a write that
        raised never becomes a line that is sent."""
        return self._under_active_lock(lambda fd, size: self._append_locked(fd, size, data))

    def _append_locked(self, fd: int, size: int, data: bytes) -> int:
        line = data
        # If the file ends where our own last line did, it ends in a newline;
        # otherwise look: a torn fragment (a writer killed mid-line, a cut
        # that failed) must neither get ours glued on nor be completed.
        if size and size != self._end and os.pread(fd, 1, size - 1) != b"\n":
            line = TORN_END + data
        written = os.write(fd, line)
        if written != len(line):
            self._end = -1
            whole = line.rfind(b"\n", 0, written) + 1
            try:
                os.ftruncate(fd, size + whole)
            except OSError:
                pass  # see above: the next writer ends it
            raise _ShortWrite(max(0, whole - (len(line) - len(data))), fd)
        self._end = size + written
        return fd

    # --- shipper --------------------------------------------------------------------------

    def _ship(self) -> "Shipping":
        if self._shipping is None:
            self._shipping = Shipping(self)
        return self._shipping

    def recover(self) -> int:
        def start() -> int:
            if self._shipping is not None:
                self._shipping.close()
                self._shipping = None  # not used again, even if the next cannot start
            self._shipping = Shipping(self)  # finishes a move a crash cut short
            return 0  # claims live only in the shipper's memory: nothing to give back
        return self._guard("recover", start)

    def claim(self, limit: int, *, now: float, with_key_only: bool = False) -> list[Claimed]:
        return self._guard("claim", lambda: self._ship().claim(limit, now, with_key_only))

    # ack, retry, release and dead_letter take claim ids (ClaimId) and touch a line
    # only while it carries that claim's lease.

    def ack(self, ids: Iterable[Any]) -> None:
        self._guard("ack", lambda: self._ship().ack(ids))

    def retry(self, entries: Iterable[Retry]) -> None:
        self._guard("retry", lambda: self._ship().give_back([(i, due) for i, due, _ in entries]))

    def release(self, ids: Iterable[Any]) -> None:
        self._guard("release", lambda: self._ship().give_back([(i, 0.0) for i in ids]))

    def dead_letter(self, ids: Iterable[Any], *, status: int | None, reason: str,
                    now: float) -> None:
        self._guard("dead-letter", lambda: self._ship().dead_letter(ids, status, reason, now))

    def expedite(self) -> int:
        return self._guard("expedite", lambda: self._ship().expedite())

    def maintain(self) -> None:
        if self._shipping is not None:  # only a shipper has anything to give back
            self._guard("maintain", self._shipping.maintain)

    def rotate(self) -> None:
        if self._shipping is not None:
            self._guard("rotate", lambda: self._shipping._maybe_rotate(time.time()))

    def next_due(self, *, with_key_only: bool = False) -> float | None:
        return self._guard("read", lambda: self._ship().next_due(with_key_only))

    def _viewed(self, fn: Callable[["DiskView"], Any]) -> Any:
        """``fn`` of a fresh view of the files; the shipper may rename or delete one
        between the listing and the reading, so a vanished file means: look again."""
        for attempt in range(5):
            try:
                return fn(DiskView(self.path))
            except FileNotFoundError:
                if attempt == 4:
                    raise

    def mark(self) -> Any:
        return self._guard("read", lambda: self._viewed(lambda view: view.end()))

    # Where moved copies lie past a mark (see CopyIndex); made on first use.
    _copies: "CopyIndex | None" = None

    def pending_through(self, mark: Any) -> int:
        if self._copies is None:
            self._copies = CopyIndex()
        copies = self._copies
        return self._guard("read", lambda: self._viewed(lambda view: view.pending(mark, copies)))

    def stats(self, now: float) -> dict[str, Any]:
        def read(view: "DiskView") -> dict[str, Any]:
            created = view.oldest_created()
            return {
                "pending": view.pending(),
                # The shipper knows; anyone else reads its last checkpoint.
                "in_flight": len(self._shipping.in_flight) if self._shipping
                else view.checkpoint.in_flight,
                "dead": self._count_dead(),
                "oldest_pending_age_s": None if created is None else max(0.0, now - created),
                "bad_lines": view.checkpoint.bad_lines,
                "checkpoint_rebuilt_at": view.checkpoint.rebuilt_at,
            }
        return self._guard("stats", lambda: self._viewed(read))

    # --- dead letters: <dir>/dead.jsonl, one JSON object per line ---------------------

    @contextmanager
    def _dead_locked(self) -> Iterator[None]:
        fd = flocked(self.path / DEAD_LOCK, create=True)
        try:
            yield
        finally:
            os.close(fd)

    def _count_dead(self) -> int:
        try:
            return (self.path / DEAD).read_bytes().count(b"\n")
        except FileNotFoundError:
            return 0

    def _read_dead(self) -> list[dict[str, Any]]:
        try:
            text = (self.path / DEAD).read_bytes()
        except FileNotFoundError:
            return []
        records: dict[str, dict[str, Any]] = {}
        for line in text.split(b"\n"):
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a record torn by a full disk: its event was not settled
            # A crash between writing a dead letter and settling its line writes it
            # twice on the next run: one id, one letter.
            records.setdefault(record["id"], record)
        # In the order the events were recorded (the spool's), as on SQLite, not in the
        # order concurrent sends happened to fail.
        return sorted(records.values(), key=lambda r: tuple(map(int, r["id"].split(":"))))

    def requests(self, *, dead: bool = False) -> list[tuple[str, str, str | None, float]]:
        def pending(view: DiskView) -> list[tuple[str, str, str | None, float]]:
            return [(*encode(event), event.api_key, created)
                    for event, created in view.unsettled()]

        def letters() -> list[tuple[str, str, str | None, float]]:
            found = []
            for record in self._read_dead():
                event, created = _dead_event(record)
                found.append((*encode(event), event.api_key, created))
            return found
        return self._guard("read", letters if dead else lambda: self._viewed(pending))

    def dead_letters(self) -> list[dict[str, Any]]:
        def read() -> list[dict[str, Any]]:
            letters = []
            for record in self._read_dead():
                event, _ = _dead_event(record)
                letters.append({"id": record["id"], **describe(*encode(event)),
                                "status": record["status"], "reason": record["reason"],
                                "failed_at": record["failed_at"]})
            return letters
        return self._guard("read", read)

    def _take_dead(self, ids: list[str] | None, requeue: bool) -> int:
        with self._dead_locked():
            records = self._read_dead()
            unknown_ids(ids, (r["id"] for r in records))
            chosen = [r for r in records if ids is None or r["id"] in ids]
            if requeue and chosen:  # fresh lines: due now, aged from now; one write
                self._write([self._record(_dead_event(r)[0]) for r in chosen], sync=False)
            kept = b"".join(dump_line(r) for r in records if r not in chosen)
            write_atomically(self.path / DEAD, kept)
        return len(chosen)

    def retry_dead(self, ids: list[str] | None) -> int:
        return self._guard("dead retry", lambda: self._take_dead(ids, requeue=True))

    def purge_dead(self, ids: list[str] | None) -> int:
        return self._guard("dead purge", lambda: self._take_dead(ids, requeue=False))

    def _guard(self, what: str, fn):
        with self._holding():
            try:
                return fn()
            except OSError as exc:
                raise SpoolError(f"spool {self.path}: {what} failed: {exc}") from exc

    def close(self) -> None:
        with self._holding():
            if self._shipping is not None:
                self._shipping.close()
                self._shipping = None
            if self._fd is not None and self._pid == os.getpid():
                os.close(self._fd)
            self._fd = None


def _dead_event(record: dict[str, Any]) -> tuple[Event, float]:
    """The event a dead-letter record holds (its original line, as an object), and
    when that line was written."""
    return from_line(json.dumps(record["line"]).encode())
