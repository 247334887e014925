"""The newline-JSON spool: a directory of append-only files, a checkpoint, no database.

    <dir>/events.jsonl              the active file: producers append here
    <dir>/events.0000000007.jsonl   sealed files, in order: renamed from events.jsonl
    <dir>/checkpoint.json           how far delivery reaches (temp + fsync + rename)
    <dir>/dead.jsonl, bad.jsonl     dead letters; lines set aside as not valid events
    <dir>/shipper.lock              the one-shipper lock

Producers append one whole line per ``write()`` under an exclusive ``flock`` of the
active file, after checking (under the lock) that the file they hold is still
``events.jsonl``: the shipper seals it by ``rename`` under the same lock, never by copy
and truncate, so a producer that raced a rotation notices the new inode and reopens.
Before writing, a producer looks at the file's last byte: if a writer died mid-line,
it ends the torn fragment with a NUL and a newline (TORN_END) and starts its own line
on a fresh one, so the fragment becomes one bad line that is set aside, even one that
lacked only its newline, and nothing is glued to it. A line is only ever read whole,
newline included: a sealed file's unfinished tail is a bad line too.

The shipper reads lines in order and keeps the checkpoint: the position of the first
line not yet settled (delivered, dead-lettered or set aside), plus the settled lines
beyond it, since acknowledgements arrive out of order. So after a crash only what was
in flight is sent again. Each line's request is derived from the line alone by the
pure encoder, so a resend is byte-identical. A sealed file is deleted once the
checkpoint has moved past it.

A line that keeps failing is moved out of the reader's way: copied to the end of the
active file with its origin (``_o``: where it was first written), and its old copy
settled. A mark (``kmagent flush``) counts such a copy as the line it was first: before
the mark if the original was. The move is recorded in the checkpoint before the copy is
written, so one that a crash cuts short is finished by the next shipper, which looks
for the copy: the line is neither lost nor doubled.
"""

from __future__ import annotations

import errno
import fcntl
import heapq
import itertools
import json
import os
import re
import time
import zlib
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple

from ..config import DEFAULT_ROTATE_BYTES, DEFAULT_ROTATE_SECONDS
from ..errors import SpoolError
from ..events import Event
from ..protocol import describe, encode
from .base import (Claimed, PartialWrite, Spool, append_to, flocked, fsync_dir, make_dirs,
                   open_file, unknown_ids, write_atomically)
from .files import FLOCK_WAIT_S, flock_within
from .shared import Shared, shared_for
from .jsonl_line import (ORIGIN_KEY, BadLine, created_of, from_line, origin_of, to_line,
                         with_origin)

ACTIVE = "events.jsonl"
SEALED = re.compile(r"^events\.(\d{10})\.jsonl$")
CHECKPOINT = "checkpoint.json"
DEAD = "dead.jsonl"
DEAD_LOCK = "dead.lock"  # the shipper appends, `kmagent dead` rewrites: one at a time
BAD = "bad.jsonl"
CHECKPOINT_VERSION = 1

# How many lines the shipper reads past the first unsettled one. Bounds its memory and
# the checkpoint's size however long an outage lasts.
MAX_AHEAD = 4096
READ_CHUNK = 1 << 16
MAX_LINE_BYTES = 16 * 1024 * 1024  # longer is garbage (a valid event is far smaller)

Position = tuple[int, int]  # (file sequence number, byte offset)

# What a writer puts before its line when the file does not end in a newline (a writer
# killed mid-line, or a short write that could not be cut back): the NUL makes the torn
# fragment invalid JSON whatever it holds, so it is set aside as a bad line; a bare
# newline could make a whole line of an object that lacked only its newline.
TORN_END = b"\x00\n"


class ClaimId(NamedTuple):
    """What a claim hands out as ``Claimed.id``: the line and the claim's lease. Each
    claim gives its line a fresh lease, and a settle applies only while the line still
    carries it, so that late or repeated news of an older claim never touches a newer
    one. Shown as the line's position, as its dead letter is."""

    pos: Position
    lease: int

    def __str__(self) -> str:
        return f"{self.pos[0]}:{self.pos[1]}"


# Leases, never the same twice in a process (a shipper started anew included).
_leases = itertools.count(1)


def sealed_name(seq: int) -> str:
    return f"events.{seq:010d}.jsonl"


def count_lines(fd: int, start: int, end: int) -> int:
    """Newlines in bytes [start, end) of a file."""
    count, offset = 0, start
    while offset < end:
        chunk = os.pread(fd, min(1 << 20, end - offset), offset)
        if not chunk:
            break
        count += chunk.count(b"\n")
        offset += len(chunk)
    return count


def copies_in(fd: int, start: int, end: int) -> tuple[list[tuple[int, Position]], int]:
    """The moved copies among the complete lines in bytes [start, end) of a file, as
    (offset, origin); and the offset just past the last complete line (where to go on
    from next time). Only lines holding ORIGIN_KEY are parsed."""
    found: list[tuple[int, Position]] = []
    offset, size = start, 1 << 20
    while offset < end:
        want = min(size, end - offset)
        chunk = os.pread(fd, want, offset)
        cut = chunk.rfind(b"\n") + 1
        if not cut:
            if len(chunk) < want or offset + want >= end:
                break  # an unfinished line
            if size < MAX_LINE_BYTES:
                size *= 4  # one line longer than the chunk
                continue
            cut = len(chunk)  # longer is garbage: as the reader, go on past it
        body = chunk[:cut]
        at = body.find(ORIGIN_KEY)
        while at >= 0:
            begin = body.rfind(b"\n", 0, at) + 1
            stop = body.find(b"\n", at) + 1 or len(body)
            origin = origin_of(body[begin:stop])
            if origin is not None:
                found.append((offset + begin, origin))
            at = body.find(ORIGIN_KEY, stop)
        offset += cut
        size = 1 << 20
    return found, offset


def file_head(fd: int) -> int | None:
    """A fingerprint of a file: the CRC of its first line (None until it has one).
    With the inode it tells a file from a new one that reuses a deleted file's inode."""
    first = os.pread(fd, 4096, 0)
    end = first.find(b"\n")
    return None if end < 0 else zlib.crc32(first[:end + 1])


def active_seq(ckpt: "_Checkpoint", sealed: Iterable[int], active_ino: int,
               active_head: int | None) -> int:
    """The sequence number events.jsonl will be sealed under (only the shipper seals):
    the checkpoint's file if it is this one, else the next after every known file."""
    if ckpt.ino == active_ino and ckpt.head in (None, active_head):
        return ckpt.seq
    return max([s + 1 for s in sealed] + [ckpt.seq + (ckpt.ino is not None)])


@dataclass
class _File:
    seq: int
    ino: int
    fd: int
    sealed: bool
    seen: float = field(default_factory=time.time)


@dataclass
class _Line:
    """A line read and not yet settled."""

    id: Position
    raw: bytes
    item: Claimed | None = None  # None until parsed
    due: float = 0.0
    settled: bool = False
    lease: int = 0  # that of its latest claim


@dataclass
class _Checkpoint:
    seq: int = 1
    ino: int | None = None  # inode of file ``seq`` (None: not seen yet)
    head: int | None = None  # and its fingerprint (file_head)
    offset: int = 0
    ahead: list[Position] = field(default_factory=list)
    bad_lines: int = 0
    in_flight: int = 0
    lines: dict[int, int] = field(default_factory=dict)  # seq -> lines, sealed files
    # A move begun (see _Shipping._move): {"after": position, "from": [positions],
    # "origins": [their origins]}; None when none is under way.
    moving: dict[str, Any] | None = None

    @classmethod
    def load(cls, path: Path) -> "_Checkpoint":
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            return cls()
        except ValueError as exc:
            raise SpoolError(f"spool {path.parent}: {CHECKPOINT} is corrupt: {exc}") from None
        if data.get("v", 0) > CHECKPOINT_VERSION:
            raise SpoolError(f"spool {path.parent}: format {data['v']} is newer than this "
                             f"kmagent understands ({CHECKPOINT_VERSION}); upgrade kmagent")
        return cls(seq=data["seq"], ino=data.get("ino"), head=data.get("head"),
                   offset=data["offset"],
                   ahead=[tuple(p) for p in data.get("ahead", [])],
                   bad_lines=data.get("bad_lines", 0),
                   in_flight=data.get("in_flight", 0),
                   lines={int(k): v for k, v in data.get("lines", {}).items()},
                   moving=data.get("moving"))

    def dump(self) -> bytes:
        return json.dumps({
            "v": CHECKPOINT_VERSION, "seq": self.seq, "ino": self.ino, "head": self.head,
            "offset": self.offset,
            "ahead": self.ahead, "bad_lines": self.bad_lines,
            "in_flight": self.in_flight, "lines": self.lines, "moving": self.moving,
        }, separators=(",", ":")).encode()


class _ShortWrite(OSError):
    """write() stopped short (disk full): the first ``written`` bytes of the data, whole
    lines, are in the file ``fd`` holds; nothing of the rest can ever be read as a line."""

    def __init__(self, written: int, fd: int) -> None:
        super().__init__(errno.ENOSPC, "short write (disk full?)")
        self.written = written
        self.fd = fd


class JsonlSpool(Spool):
    """A spool in a directory of newline-JSON files; see the module's description."""

    def __init__(self, path: Path, *, durability: str = "normal",
                 rotate_bytes: int = DEFAULT_ROTATE_BYTES,
                 rotate_seconds: float = DEFAULT_ROTATE_SECONDS,
                 max_bytes: int | None = None, when_full: str = "error") -> None:
        self.path = Path(path).resolve()  # one lock file per spool, whatever the path
        super().__init__(max_bytes=max_bytes, when_full=when_full)
        self._full = durability == "full"
        self.rotate_bytes = rotate_bytes
        self.rotate_seconds = rotate_seconds
        self._active_path = self.path / ACTIVE
        self._active_name = str(self._active_path)  # a str: os.stat skips __fspath__
        self._fd: int | None = None
        self._held = (0, 0)  # (inode, device) of the file self._fd holds
        self._end = -1  # where our last complete line ended in the file we hold
        self._pid = -1
        self._shipping: _Shipping | None = None
        try:
            make_dirs(self.path)
            _Checkpoint.load(self.path / CHECKPOINT)  # refuses a newer format at once
            with self._lock:
                self._active_fd()  # open now so a bad path fails at construction
        except OSError as exc:
            raise SpoolError(f"spool {self.path}: cannot open: {exc.strerror}") from None

    def _share(self) -> Shared:
        # One lock for every handle of this directory in the process, so that a signal
        # handler recording through another Client is seen as re-entrant: with locks of
        # their own, its flock of events.jsonl would wait for its own thread's.
        return shared_for(str(self.path))

    @property
    def lock_path(self) -> Path:
        return self.path / "shipper.lock"

    @property
    def watch_target(self) -> tuple[Path, str]:
        return self.path, "events."

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

    @property
    def drops_path(self) -> Path:
        return self.path / "dropped"

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
                                     f"{exc.strerror}") from None
            raise PartialWrite(f"spool {self.path}: cannot append: short write (disk "
                               "full?)", stored) from None
        except OSError as exc:
            raise SpoolError(f"spool {self.path}: cannot append: {exc.strerror}") from None
        return len(data)

    def size_on_disk(self) -> int:
        """The event files, less the delivered prefix of the first one."""
        view = _DiskView(self.path)
        total = sum(st.st_size for _, _, st in view.files)
        if view.files and view.files[0][0] == view.checkpoint.seq:
            total -= view.checkpoint.offset
        return total

    def _requeue(self, data: bytes) -> None:
        """Append the copies of lines the shipper moves (whole lines) and sync them: the
        caller settles the old copies next, so the new ones must be on disk first."""
        fd = self._append_bytes(data)
        os.fdatasync(fd)

    def _active_end(self) -> tuple[int, int]:
        """(inode, size) of events.jsonl, measured under its lock, so that no short
        write is cut back below it: whatever is appended next lies at or after it."""
        while True:
            fd = self._active_fd()
            try:  # locked inside the try: a handler raising right after must not leak it
                self._lock_active(fd)
                size = self._held_size(fd)
                if size is not None:
                    return self._held[0], size
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
        while True:
            fd = self._active_fd()
            try:  # locked inside the try: a handler raising right after must not leak it
                self._lock_active(fd)
                size = self._held_size(fd)
                if size is not None:
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
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)  # sealed under us: reopen events.jsonl
            self._fd, self._end = None, -1

    # --- shipper --------------------------------------------------------------------------

    def _ship(self) -> "_Shipping":
        if self._shipping is None:
            self._shipping = _Shipping(self)
        return self._shipping

    def recover(self) -> int:
        def start() -> int:
            if self._shipping is not None:
                self._shipping.close()
                self._shipping = None  # not used again, even if the next cannot start
            self._shipping = _Shipping(self)  # finishes a move a crash cut short
            return 0  # claims live only in the shipper's memory: nothing to give back
        return self._guard("recover", start)

    def claim(self, limit: int, *, now: float, with_key_only: bool = False) -> list[Claimed]:
        return self._guard("claim", lambda: self._ship().claim(limit, now, with_key_only))

    # ack, retry, release and dead_letter take claim ids (ClaimId) and touch a line
    # only while it carries that claim's lease.

    def ack(self, ids: Iterable[Any]) -> None:
        self._guard("ack", lambda: self._ship().ack(ids))

    def retry(self, entries: Iterable[tuple[Any, float, str | None]]) -> None:
        self._guard("retry", lambda: self._ship().give_back([(i, due) for i, due, _ in entries]))

    def release(self, ids: Iterable[Any]) -> None:
        self._guard("release", lambda: self._ship().give_back([(i, 0.0) for i in ids]))

    def dead_letter(self, ids: Iterable[Any], *, status: int | None, reason: str,
                    now: float) -> None:
        self._guard("dead-letter", lambda: self._ship().dead_letter(ids, status, reason, now))

    def expedite(self) -> int:
        return self._guard("expedite", lambda: self._ship().expedite())

    def next_due(self, *, with_key_only: bool = False) -> float | None:
        return self._guard("read", lambda: self._ship().next_due(with_key_only))

    def _viewed(self, fn: Callable[["_DiskView"], Any]) -> Any:
        """``fn`` of a fresh view of the files; the shipper may rename or delete one
        between the listing and the reading, so a vanished file means: look again."""
        for attempt in range(5):
            try:
                return fn(_DiskView(self.path))
            except FileNotFoundError:
                if attempt == 4:
                    raise

    def mark(self) -> Any:
        return self._guard("read", lambda: self._viewed(lambda view: view.end()))

    # Where moved copies lie past a mark (see _CopyIndex); made on first use.
    _copies: "_CopyIndex | None" = None

    def pending_through(self, mark: Any) -> int:
        if self._copies is None:
            self._copies = _CopyIndex()
        copies = self._copies
        return self._guard("read", lambda: self._viewed(lambda view: view.pending(mark, copies)))

    def stats(self, now: float) -> dict[str, Any]:
        def read(view: "_DiskView") -> dict[str, Any]:
            created = view.oldest_created()
            return {
                "pending": view.pending(),
                # The shipper knows; anyone else reads its last checkpoint.
                "in_flight": len(self._shipping.in_flight) if self._shipping
                else view.checkpoint.in_flight,
                "dead": self._count_dead(),
                "oldest_pending_age_s": None if created is None else max(0.0, now - created),
                "bad_lines": view.checkpoint.bad_lines,
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
        def pending(view: _DiskView) -> list[tuple[str, str, str | None, float]]:
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
            kept = b"".join(_dump_line(r) for r in records if r not in chosen)
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
                raise SpoolError(f"spool {self.path}: {what} failed: {exc}") from None

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


def _dump_line(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


class _DiskView:
    """The spool as any process sees it on disk: files in order and the checkpoint.
    What status, flush's progress and marks are computed from."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.checkpoint = _Checkpoint.load(path / CHECKPOINT)
        self.files: list[tuple[int, Path, os.stat_result]] = []  # (seq, path, stat)
        for name in os.listdir(path):
            match = SEALED.match(name)
            if match:
                self._add(int(match.group(1)), path / name)
        try:
            st = os.stat(path / ACTIVE)
        except FileNotFoundError:
            st = None
        if st is not None:
            head = None
            if st.st_ino == self.checkpoint.ino:  # only then does the fingerprint matter
                fd = os.open(path / ACTIVE, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    head = file_head(fd)
                finally:
                    os.close(fd)
            seq = active_seq(self.checkpoint, [f[0] for f in self.files], st.st_ino, head)
            self.files.append((seq, path / ACTIVE, st))
        self.files.sort(key=lambda f: f[0])

    def _add(self, seq: int, path: Path) -> None:
        try:
            self.files.append((seq, path, os.stat(path)))
        except FileNotFoundError:
            pass  # deleted since listed: fully delivered

    def end(self) -> tuple[int, int, int] | None:
        """(inode, size, sequence number) of the newest file: every line so far lies
        before it."""
        if not self.files:
            return None
        seq, _, st = self.files[-1]
        return (st.st_ino, st.st_size, seq)

    def _position_of(self, mark: tuple[int, int, int] | None) -> Position | None:
        if mark is None:
            return None
        for seq, _, st in self.files:
            if st.st_ino == mark[0]:
                return (seq, mark[1])
        # Maybe sealed (renamed) since we listed: look for it under its new name.
        for name in os.listdir(self.path):
            match = SEALED.match(name)
            try:
                if match and os.stat(self.path / name).st_ino == mark[0]:
                    return (int(match.group(1)), mark[1])
            except FileNotFoundError:
                continue
        # That file is gone: every line in it was settled (moved copies of its lines,
        # in later files, still count as before the mark).
        return (mark[2], mark[1])

    def _unsettled_lines(self) -> Iterator[bytes]:
        """Every complete line from the checkpoint on that is not settled yet, in order."""
        ckpt = self.checkpoint
        ahead = set(ckpt.ahead)
        for seq, path, st in self.files:
            if seq < ckpt.seq:
                continue
            offset = ckpt.offset if seq == ckpt.seq else 0
            with open(path, "rb") as fh:
                fh.seek(offset)
                for line in fh:
                    if (seq, offset) not in ahead and line.endswith(b"\n"):
                        yield line
                    offset += len(line)

    def unsettled(self) -> list[tuple[Event, float]]:
        """Every valid unsettled line's event, in order, with when it was written."""
        found = []
        for line in self._unsettled_lines():
            try:
                found.append(from_line(line))
            except BadLine:
                continue  # the shipper sets it aside
        return found

    def pending(self, mark: tuple[int, int, int] | None = None,
                copies: "_CopyIndex | None" = None) -> int:
        """Unsettled complete lines from the checkpoint up to ``mark`` (default: all),
        and after it the unsettled copies of lines moved from before it (``copies``
        remembers where they are between calls)."""
        ckpt = self.checkpoint
        start: Position = (ckpt.seq, ckpt.offset)
        stop = self._position_of(mark) if mark is not None else None
        count = 0
        for seq, path, st in self.files:
            if seq < start[0] or (stop is not None and seq > stop[0]):
                continue
            lo = start[1] if seq == start[0] else 0
            hi = min(st.st_size, stop[1]) if stop is not None and seq == stop[0] else st.st_size
            if lo == 0 and hi == st.st_size and seq in ckpt.lines:
                count += ckpt.lines[seq]
            elif hi > lo:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    count += count_lines(fd, lo, hi)
                    # A sealed file's torn tail is a line too (the reader sets it aside).
                    if path.name != ACTIVE and hi == st.st_size \
                            and os.pread(fd, 1, hi - 1) != b"\n":
                        count += 1
                finally:
                    os.close(fd)
        settled = sum(1 for p in ckpt.ahead if stop is None or p < stop)
        return max(0, count - settled) + (
            0 if stop is None else self._moved_from_before(stop, copies or _CopyIndex()))

    def _moved_from_before(self, stop: Position, copies: "_CopyIndex") -> int:
        """Unsettled lines after ``stop`` that are copies of lines from before it."""
        ckpt = self.checkpoint
        head, ahead = (ckpt.seq, ckpt.offset), set(ckpt.ahead)
        count = 0
        for seq, offset, origin in copies.after(self.files, stop):
            if origin < stop and (seq, offset) >= head and (seq, offset) not in ahead:
                count += 1
        return count

    def oldest_created(self) -> float | None:
        """When the first unsettled line was written (its ``_c``), or None."""
        for line in self._unsettled_lines():
            try:
                obj = json.loads(line)
            except Exception:  # any bad line (even [[[[... nested deep)
                return 0.0  # waits too: its age is unknown, so the oldest
            return created_of(obj) if isinstance(obj, dict) else 0.0
        return None


class _CopyIndex:
    """Where the moved copies lie past a mark, remembered between calls, so that a
    flush that polls ``pending_through`` reads each file's new bytes only once (lines
    are only ever appended, and a cut-back never reaches a complete line)."""

    def __init__(self) -> None:
        # (seq, inode, from offset) -> [offset scanned to, [(offset, origin)...]]
        self._files: dict[tuple[int, int, int], list[Any]] = {}

    def after(self, files: list[tuple[int, Path, os.stat_result]],
              stop: Position) -> Iterator[tuple[int, int, Position]]:
        """(seq, offset, origin) of every copy from ``stop`` on."""
        seen = set()
        for seq, path, st in files:
            if seq < stop[0]:
                continue
            key = (seq, st.st_ino, stop[1] if seq == stop[0] else 0)
            seen.add(key)
            entry = self._files.setdefault(key, [key[2], []])
            if st.st_size > entry[0]:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    found, entry[0] = copies_in(fd, entry[0], st.st_size)
                finally:
                    os.close(fd)
                entry[1].extend(found)
            for offset, origin in entry[1]:
                yield seq, offset, origin
        for key in set(self._files) - seen:
            del self._files[key]  # settled and deleted, or another mark's


class _Shipping:
    """The shipper's state: open files, read position, unsettled lines, checkpoint."""

    def __init__(self, spool: JsonlSpool) -> None:
        self.spool = spool
        self.dir = spool.path
        self.ckpt = _Checkpoint.load(self.dir / CHECKPOINT)
        self.files: dict[int, _File] = {}
        for name in sorted(os.listdir(self.dir)):
            match = SEALED.match(name)
            if match:
                seq = int(match.group(1))
                if seq < self.ckpt.seq:
                    os.unlink(self.dir / name)  # settled; a crash came before its deletion
                else:
                    self._open(seq, self.dir / name, sealed=True)
        self._discover_active()
        first = min(self.files, default=self.ckpt.seq)
        if self.ckpt.seq not in self.files and first > self.ckpt.seq:
            self.ckpt.seq, self.ckpt.offset = first, 0  # its file was settled and deleted
        self.read_pos: Position = (self.ckpt.seq, self.ckpt.offset)
        self.settled_ahead: set[Position] = set(self.ckpt.ahead)
        self.order: deque[_Line] = deque()  # read, not yet behind the checkpoint
        self.lines: dict[Position, _Line] = {}  # unsettled, by id
        self.ready: list[tuple[float, Position]] = []  # heap of (due, id), keyed lines
        self.keyless: set[Position] = set()  # waiting for an API key
        self.in_flight: set[Position] = set()
        # Where reading stopped at an unfinished line in the active file, and the file's
        # size then: no new complete line can exist until that size changes.
        self.stalled: tuple[int, int] | None = None
        if self.ckpt.moving is not None:  # a shipper died in the middle of a move
            try:
                self._finish_move()
            except BaseException:
                self.close()
                raise

    # --- files ---

    def _open(self, seq: int, path: Path, *, sealed: bool) -> _File:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        entry = _File(seq, os.fstat(fd).st_ino, fd, sealed)
        self.files[seq] = entry
        return entry

    def _active(self) -> _File | None:
        return next((f for f in self.files.values() if not f.sealed), None)

    def _discover_active(self) -> None:
        if self._active() is not None:
            return
        try:
            fd = os.open(self.dir / ACTIVE, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        seq = active_seq(self.ckpt, self.files, os.fstat(fd).st_ino, file_head(fd))
        self.files[seq] = _File(seq, os.fstat(fd).st_ino, fd, sealed=False)

    def _maybe_rotate(self, now: float) -> None:
        active = self._active()
        if active is None:
            return
        try:
            current = os.stat(self.dir / ACTIVE).st_ino
        except FileNotFoundError:
            current = None
        if current != active.ino:
            # Deleted or replaced by hand: what it held is still read through our
            # descriptor, as a sealed file; the new events.jsonl comes next.
            active.sealed = True
            return
        size = os.fstat(active.fd).st_size
        old = size > 0 and now - active.seen >= self.spool.rotate_seconds
        if size < self.spool.rotate_bytes and not old:
            return
        fd = os.open(self.dir / ACTIVE, os.O_RDWR | os.O_CLOEXEC)
        try:
            # Producers hold it for microseconds; one that holds it longer (stopped)
            # must not stop shipping: rotate on a later turn.
            if not flock_within(fd, 0.05):
                return
            if os.fstat(fd).st_ino == active.ino:
                os.rename(self.dir / ACTIVE, self.dir / sealed_name(active.seq))
                fsync_dir(self.dir)
        finally:
            os.close(fd)  # drops the flock
        active.sealed = True
        self.ckpt.lines[active.seq] = count_lines(active.fd, 0, os.fstat(active.fd).st_size)

    # --- reading ---

    def _read(self, room: int) -> Iterator[_Line]:
        """Up to ``room`` new complete lines, in order, moving read_pos past them."""
        while room > 0 and len(self.order) < MAX_AHEAD:
            seq, offset = self.read_pos
            entry = self.files.get(seq)
            if entry is None:
                self._discover_active()
                entry = self.files.get(seq)
                if entry is None:
                    later = [s for s in self.files if s > seq]
                    if not later:
                        return
                    self.read_pos = (min(later), 0)
                    continue
            size = READ_CHUNK
            while True:
                data = os.pread(entry.fd, size, offset)
                cut = data.rfind(b"\n")
                if cut >= 0 or len(data) < size or size >= MAX_LINE_BYTES:
                    break
                size *= 4  # one line longer than the chunk
            if cut < 0:
                if not entry.sealed and len(data) < MAX_LINE_BYTES:
                    self.stalled = (seq, offset + len(data))
                    return  # caught up (or a line is being written): wait for more
                if data:  # a torn tail that no writer will finish: one bad line
                    self.read_pos = (seq, offset + len(data))  # before yielding: a
                    room -= 1                                  # failure must not re-read
                    yield self._line((seq, offset), data)
                    continue
                if not entry.sealed:
                    return
                later = [s for s in self.files if s > seq]
                if not later:
                    self._discover_active()
                    later = [s for s in self.files if s > seq]
                    if not later:
                        return
                self.read_pos = (min(later), 0)
                continue
            # Lines end at b"\n" only (as count_lines counts them), never at a lone b"\r".
            for raw in data[:cut].split(b"\n"):
                if room <= 0 or len(self.order) >= MAX_AHEAD:
                    return
                start, offset = offset, offset + len(raw) + 1
                self.read_pos = (seq, offset)
                room -= 1
                yield self._line((seq, start), raw + b"\n")

    def _line(self, pos: Position, raw: bytes) -> _Line:
        line = _Line(pos, raw)
        self.order.append(line)
        if pos in self.settled_ahead:
            line.settled = True  # delivered before a crash: never send it twice
        else:
            self.lines[pos] = line
        return line

    def _trim(self) -> Position:
        """Drop settled lines from the front; returns the first unsettled position."""
        while self.order and self.order[0].settled:
            self.order.popleft()
        return self.order[0].id if self.order else self.read_pos

    # --- the Spool operations ---

    def claim(self, limit: int, now: float, with_key_only: bool) -> list[Claimed]:
        self._maybe_rotate(now)
        self._trim()
        self._unblock(with_key_only)
        out: list[Claimed] = []
        try:
            self._claim_into(out, limit, now, with_key_only)
        except BaseException:
            self.wait([(item.id.pos, 0.0) for item in out])  # nothing taken is left behind
            raise
        return out

    def _claim_into(self, out: list[Claimed], limit: int, now: float,
                    with_key_only: bool) -> None:
        while self.ready and self.ready[0][0] <= now and len(out) < limit:
            _, pos = heapq.heappop(self.ready)
            line = self.lines.get(pos)
            if line is not None and line.item is not None and pos not in self.in_flight \
                    and line.due <= now:
                out.append(self._take(line))
        if not with_key_only:
            for pos in sorted(self.keyless):
                if len(out) >= limit:
                    break
                self.keyless.discard(pos)
                out.append(self._take(self.lines[pos]))
        for line in self._read(limit - len(out)):
            if line.settled:
                continue
            try:
                if not line.raw.endswith(b"\n"):  # a sealed file's torn tail
                    raise BadLine("torn: the file ends before this line's newline")
                event, created = from_line(line.raw)
            except BadLine as exc:
                self._set_aside(line, str(exc))
                self.settle([line.id])
                continue
            path, query = encode(event)
            line.item = Claimed(line.id, path, query, event.api_key, created, 0)
            if with_key_only and event.api_key is None:
                self.keyless.add(line.id)
            else:
                out.append(self._take(line))

    def _unblock(self, with_key_only: bool) -> None:
        """Keep the checkpoint moving past lines that wait long (a transient failure
        that never ends, events with no key while the agent has none): once the lines
        read ahead of the oldest unsettled one fill half the read-ahead, that line is
        moved (see _move): written again at the end of the active file, the same line
        plus its origin, so the same request. Without this, one such line would stop
        the reader, and sealed files would pile up. The lines to move at once (the
        oldest, as long as half the read-ahead stays full) move together."""
        if self.ckpt.moving is not None:
            self._finish_move()  # one a failed write left unfinished: finished first
        stuck, left = [], len(self.order)
        for line in self.order:
            if left < MAX_AHEAD // 2:
                break
            if not line.settled:
                if line.id in self.in_flight or line.item is None or line.id in self.keyless:
                    # Being sent: it settles soon. Waiting for a key: nothing moves it on
                    # but configuring one (moving it would only go round in circles).
                    break
                stuck.append(line)
            left -= 1
        if stuck:
            self._move(stuck)

    def _move(self, lines: list[_Line]) -> None:
        """Write ``lines`` again at the end of the active file, then settle their old
        copies, so that a crash at any point neither loses nor doubles one: the move is
        recorded in the checkpoint first (which lines, and a position the copies will
        lie past), then the copies are written and synced, then the old ones settled.
        A move found unfinished (by the next shipper, or after a write that failed) is
        finished by _finish_move: a line whose copy is there whole is settled, the
        others stay where they were."""
        origins = [origin_of(line.raw) or line.id for line in lines]
        self.ckpt.moving = {"after": list(self._end_now()),
                            "from": [list(line.id) for line in lines],
                            "origins": [list(origin) for origin in origins]}
        self._save()
        try:
            self.spool._requeue(b"".join(with_origin(line.raw, origin)
                                         for line, origin in zip(lines, origins)))
        except OSError:
            self._finish_move()  # the copies written whole (a short write) count
            raise
        self.ckpt.moving = None
        self.settle([line.id for line in lines])

    def _end_now(self) -> Position:
        """A position that whatever is appended from now on lies at or after."""
        ino, size = self.spool._active_end()
        self._discover_active()
        active = self._active()
        if active is not None and active.ino == ino:
            return (active.seq, size)
        # events.jsonl is a file not known yet (replaced by hand): it comes after all.
        return (max(self.files, default=self.ckpt.seq), 0)

    def _finish_move(self) -> None:
        """Finish the move the checkpoint records (see _move): look past its position
        for the copies; the old copy of each line whose new copy is there whole is
        settled (once the new one is synced), and the move forgotten."""
        moving = self.ckpt.moving
        after = tuple(moving["after"])
        sources = {tuple(origin): tuple(source)
                   for source, origin in zip(moving["from"], moving["origins"])}
        moved = set(sources.values())
        self._discover_active()
        done, synced = [], []
        for seq in sorted(s for s in self.files if s >= after[0]):
            entry = self.files[seq]
            start = after[1] if seq == after[0] else 0
            found, _ = copies_in(entry.fd, start, os.fstat(entry.fd).st_size)
            for offset, origin in found:
                pos = (seq, offset)
                if origin in sources and pos not in moved and not self._settled(pos):
                    done.append(sources.pop(origin))
                    if entry not in synced:
                        synced.append(entry)
        for entry in synced:
            os.fdatasync(entry.fd)
        for pos in done:
            if pos not in self.lines:
                self.settled_ahead.add(pos)  # not read yet (a shipper starting)
        self.ckpt.moving = None
        if done:
            self.settle(done)
        else:
            self._save()

    def _settled(self, pos: Position) -> bool:
        """Whether the line at ``pos`` is settled, as far as this shipper knows."""
        if pos in self.settled_ahead:
            return True
        return pos < self.read_pos and pos not in self.lines  # read: unsettled are kept

    def _take(self, line: _Line) -> Claimed:
        item = line.item
        line.lease = next(_leases)
        line.item = item = Claimed(ClaimId(line.id, line.lease), item.path, item.query,
                                   item.api_key, item.created, item.attempts + 1)
        self.in_flight.add(line.id)
        return item

    def _held(self, claim_id: Any) -> bool:
        """Whether the line ``claim_id`` names is in flight under that claim's lease.
        Once settled, given back or claimed anew, it is no longer that claim's."""
        pos, lease = claim_id
        line = self.lines.get(pos)
        return line is not None and line.lease == lease and pos in self.in_flight

    def leased(self, ids: Iterable[Any]) -> list[Position]:
        """The lines of these claim ids that still carry their claim's lease."""
        return list(dict.fromkeys(cid[0] for cid in ids if self._held(cid)))

    def ack(self, ids: Iterable[Any]) -> None:
        self.settle(self.leased(ids))

    def give_back(self, entries: list[tuple[Any, float]]) -> None:
        """retry and release: pending again, due at ``due``, if still the claim's."""
        for claim_id, due in entries:
            if self._held(claim_id):
                self.wait([(claim_id[0], due)])

    def _set_aside(self, line: _Line, reason: str) -> None:
        record = {"file": sealed_name(line.id[0]), "offset": line.id[1], "reason": reason,
                  "line": line.raw.decode("utf-8", errors="replace")}
        append_to(self.dir / BAD, _dump_line(record))
        self.ckpt.bad_lines += 1  # counted once written

    def wait(self, entries: list[tuple[Position, float]]) -> None:
        for pos, due in entries:
            line = self.lines.get(pos)
            if line is None:
                continue
            self.in_flight.discard(pos)
            line.due = due
            heapq.heappush(self.ready, (due, pos))

    def dead_letter(self, ids: Iterable[Any], status: int | None, reason: str,
                    now: float) -> None:
        """(claim ids) Moved to dead.jsonl, if still their claims'."""
        ids = self.leased(ids)
        if not ids:
            return
        records = [{"id": f"{pos[0]}:{pos[1]}", "status": status, "reason": reason,
                    "failed_at": now, "line": json.loads(self.lines[pos].raw)}
                   for pos in ids]
        with self.spool._dead_locked():
            # Synced before the lines are settled (after which they may be deleted).
            append_to(self.dir / DEAD, b"".join(_dump_line(r) for r in records), sync=True)
        self.settle(ids)

    def settle(self, ids: list[Position]) -> None:
        """Delivered, dead or set aside: advance the checkpoint and persist it."""
        if not ids:
            return  # nothing changed: no checkpoint to write (and fsync)
        for pos in ids:
            line = self.lines.pop(pos, None)
            self.in_flight.discard(pos)
            self.keyless.discard(pos)
            if line is not None:
                line.settled = True
        self._save()

    def _past_sealed(self, pos: Position) -> Position:
        """A position at the end of a sealed, fully read file means the next file's start."""
        entry = self.files.get(pos[0])
        if entry is not None and entry.sealed and pos[1] >= os.fstat(entry.fd).st_size:
            later = [s for s in self.files if s > pos[0]]
            return (min(later) if later else pos[0] + 1, 0)
        return pos

    def _save(self) -> None:
        head = self._trim()
        if head == self.read_pos:
            head = self.read_pos = self._past_sealed(head)
        self.settled_ahead = {p for p in self.settled_ahead if p >= head}
        ahead = sorted({line.id for line in self.order if line.settled} | self.settled_ahead)
        seq, offset = head
        entry = self.files.get(seq)
        self.ckpt.seq, self.ckpt.offset = seq, offset
        self.ckpt.ino = entry.ino if entry is not None else None
        self.ckpt.head = file_head(entry.fd) if entry is not None else None
        self.ckpt.ahead = ahead
        self.ckpt.in_flight = len(self.in_flight)
        self.ckpt.lines = {s: n for s, n in self.ckpt.lines.items() if s >= seq}
        write_atomically(self.dir / CHECKPOINT, self.ckpt.dump())
        for old in [s for s in self.files if s < seq and self.files[s].sealed]:
            entry = self.files.pop(old)
            os.close(entry.fd)
            try:
                os.unlink(self.dir / sealed_name(old))
            except FileNotFoundError:
                pass

    def expedite(self) -> int:
        waiting = [line for line in self.lines.values()
                   if line.item is not None and line.id not in self.in_flight and line.due > 0]
        for line in waiting:
            line.due = 0.0
            heapq.heappush(self.ready, (0.0, line.id))
        return len(waiting)

    def next_due(self, with_key_only: bool) -> float | None:
        while self.ready and self.ready[0][1] not in self.lines:
            heapq.heappop(self.ready)  # settled since it was queued
        due = self.ready[0][0] if self.ready else None
        if self.keyless and not with_key_only:
            return 0.0
        if len(self.order) < MAX_AHEAD and self._unread():
            return 0.0
        return due

    def _unread(self) -> bool:
        """Whether a complete line (or a sealed file's torn tail) waits to be read."""
        seq, offset = self.read_pos
        if seq not in self.files:
            self._discover_active()
        entry = self.files.get(seq)
        if entry is not None:
            size = os.fstat(entry.fd).st_size
            if size > offset and (entry.sealed or self.stalled != (seq, size)):
                return True
        if not any(s > seq for s in self.files):
            self._discover_active()
        return any(s > seq for s in self.files)

    def close(self) -> None:
        for entry in self.files.values():
            os.close(entry.fd)
        self.files.clear()
