"""``JsonlSpool``: the Spool contract over a jsonl directory (see the package).

Producers append here (through ``active``); the shipper's side lives in ``shipping``,
the read-only view of the files in ``view``, the dead letters in ``dead``."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from ...errors import SpoolError
from ...events import Event
from ...protocol import describe, encode
from ..base import Spool
from ..records import Claimed, PartialWrite, Retry
from ..files import make_dirs
from ..shared import Shared, shared_for
from .line import to_line
from .checkpoint import CHECKPOINT, Checkpoint
from .. import DEFAULT_ROTATE_BYTES, DEFAULT_ROTATE_SECONDS
from .layout import ACTIVE, SEALED
from .active import ActiveFile, ShortWrite
from .dead import DeadLetters, event_of
from .shipping import Shipping
from .view import CopyIndex, DiskView


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
        self.active = ActiveFile(self.path)  # this process's hold on events.jsonl
        self._shipping: Shipping | None = None
        self.dead = DeadLetters(self.path)
        try:
            make_dirs(self.path)
            Checkpoint.read(self.path / CHECKPOINT)  # refuses a newer format at once
            with self._lock:
                self.active.open()  # now, so that a bad path fails at construction
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

    def _follow(self) -> None:
        """With each size check: let go of an events.jsonl sealed or deleted since
        (see ActiveFile.let_go_if_sealed). Only while no write is under way or queued: never
        from inside this thread's own write (a signal handler's record()), which may
        be using the descriptor, and never making appends wait that would otherwise
        join a group commit; a later check does it."""
        shared = self._sharing()
        if shared.busy or shared.waiting or shared.lock._is_owned():
            return
        with shared.held():
            self.active.let_go_if_sealed()

    def _record(self, event: Event) -> bytes:
        return to_line(event, time.time())

    def _write(self, records: list[bytes], *, sync: bool) -> int:
        data = b"".join(records)
        try:
            fd = self.active.append(data)
            if self._full or sync:
                os.fdatasync(fd)  # once for every line queued meanwhile
        except ShortWrite as short:
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
        fd = self.active.append(data)
        os.fdatasync(fd)

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
                "dead": self.dead.count(),
                "oldest_pending_age_s": None if created is None else max(0.0, now - created),
                "bad_lines": view.checkpoint.bad_lines,
                "checkpoint_rebuilt_at": view.checkpoint.rebuilt_at,
            }
        return self._guard("stats", lambda: self._viewed(read))

    # --- dead letters (dead.py) -------------------------------------------------------

    def requests(self, *, dead: bool = False) -> list[tuple[str, str, str | None, float]]:
        def pending(view: DiskView) -> list[tuple[str, str, str | None, float]]:
            return [(*encode(event), event.api_key, created)
                    for event, created in view.unsettled()]

        def letters() -> list[tuple[str, str, str | None, float]]:
            found = []
            for record in self.dead.read():
                event, created = event_of(record)
                found.append((*encode(event), event.api_key, created))
            return found
        return self._guard("read", letters if dead else lambda: self._viewed(pending))

    def dead_letters(self) -> list[dict[str, Any]]:
        def read() -> list[dict[str, Any]]:
            letters = []
            for record in self.dead.read():
                event, _ = event_of(record)
                letters.append({"id": record["id"], **describe(*encode(event)),
                                "status": record["status"], "reason": record["reason"],
                                "failed_at": record["failed_at"]})
            return letters
        return self._guard("read", read)

    def _append_afresh(self, events: list[Event]) -> None:
        # Fresh lines: due now, aged from now; one write.
        self._write([self._record(event) for event in events], sync=False)

    def retry_dead(self, ids: list[str] | None) -> int:
        return self._guard("dead retry", lambda: self.dead.take(ids, self._append_afresh))

    def purge_dead(self, ids: list[str] | None) -> int:
        return self._guard("dead purge", lambda: self.dead.take(ids))

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
            self.active.close()

