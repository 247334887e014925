"""How the jsonl shipper follows the spool's files and reads their lines in order.

Part of ``Shipping`` (see shipping), and like it only ever used under the shipper lock.

Every file has a sequence number, never given to two files: a sealed file carries its
own in its name; events.jsonl is known again by the checkpoint's record of it (its
inode and a fingerprint of its first bytes), and any other file found there gets a
number no file ever had. What operators do to events.jsonl is noticed here:

- deleted or replaced (another inode at the name): what the old file held is still
  read through the shipper's descriptor, to its end, as a sealed file; the file now at
  the name is a new file;
- truncated in place (logrotate's ``copytruncate``: the same inode, now shorter than
  where the shipper had read to, or with other first bytes): from where the shipper
  had read, it is a new file, read from its start. What the old content held past
  that point was never read and is gone from the spool (it is in the operator's copy).
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from ..records import Claimed
from ..files import fsync_dir
from ..files import FLOCK_WAIT_S, flock_within
from .checkpoint import Checkpoint, Fingerprint, Position
from .layout import (ACTIVE, HEAD_BYTES, MAX_AHEAD, MAX_LINE_BYTES, READ_CHUNK, SEALED,
                     active_seq, count_lines, fingerprint, fingerprint_of, next_seq,
                     same_head, sealed_name)

if TYPE_CHECKING:
    from .spool import JsonlSpool

log = logging.getLogger("kmagent.spool")

# How often the shipper looks whether space is short (the filesystem's free space, the
# spool's size against max_bytes), to seal the active file early.
PRESSURE_CHECK_S = 1.0


@dataclass
class _File:
    seq: int
    ino: int
    fd: int
    sealed: bool
    seen: float = field(default_factory=time.time)
    # The fingerprint of its first bytes (the active file's, taken when first read),
    # to notice that it was truncated in place and written anew.
    head: Fingerprint | None = None
    # Where the file ends for the shipper, when not at its size: one truncated in place
    # holds lines of the next file past it.
    end: int | None = None
    # Of a sealed file: how much of its start has been given back (Shipping.
    # _give_back_settled).
    punched: int = 0


@dataclass
class _Line:
    """A line read and not yet settled."""

    id: Position
    raw: bytes
    item: Claimed | None = None  # None until parsed
    due: float = 0.0
    settled: bool = False
    lease: int = 0  # that of its latest claim


class Reading:
    """The files, the read position and the lines read (part of Shipping)."""

    spool: JsonlSpool
    dir: Path
    ckpt: Checkpoint
    files: dict[int, _File]
    read_pos: Position
    settled_ahead: set[Position]
    order: deque[_Line]
    lines: dict[Position, _Line]
    unclassified: dict[Position, _Line]
    # Where reading stopped at an unfinished line in the active file, and the file's
    # size then: no new complete line can exist until that size changes.
    stalled: tuple[int, int] | None
    # When the active file was first found replaced while a writer held its flock.
    _replaced_at: dict[int, float]
    _pressure_checked: float  # monotonic time space was last measured

    def _open_files(self) -> None:
        """Open every file present and start where the checkpoint says. Settled
        positions and line counts of files that are gone are forgotten: no other file
        ever gets their numbers, so they could only ever mislead."""
        self.files, self._replaced_at = {}, {}
        self._pressure_checked = -PRESSURE_CHECK_S
        for name in sorted(os.listdir(self.dir)):
            match = SEALED.match(name)
            if match:
                seq = int(match.group(1))
                if seq < self.ckpt.seq:
                    os.unlink(self.dir / name)  # settled; a crash came before its deletion
                else:
                    self._open(seq, self.dir / name, sealed=True)
        self._discover_active()
        self.ckpt.last_seq = max([self.ckpt.last_seq, *self.files])
        first = min(self.files, default=self.ckpt.seq)
        if self.ckpt.seq not in self.files and first > self.ckpt.seq:
            self.ckpt.seq, self.ckpt.offset = first, 0  # its file was settled, or deleted
        self.ckpt.ahead = [p for p in self.ckpt.ahead if p[0] in self.files]
        self.ckpt.lines = {s: n for s, n in self.ckpt.lines.items() if s in self.files}
        self.read_pos = (self.ckpt.seq, self.ckpt.offset)

    def _open(self, seq: int, path: Path, *, sealed: bool) -> _File:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        entry = _File(seq, os.fstat(fd).st_ino, fd, sealed)
        self.files[seq] = entry
        return entry

    def _active(self) -> _File | None:
        return next((f for f in self.files.values() if not f.sealed), None)

    def _size(self, entry: _File) -> int:
        return entry.end if entry.end is not None else os.fstat(entry.fd).st_size

    def _discover_active(self) -> None:
        if self._active() is not None:
            return
        try:
            fd = os.open(self.dir / ACTIVE, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        ino = os.fstat(fd).st_ino
        seq = active_seq(self.ckpt, self.files, ino, fd)
        self.ckpt.last_seq = max(self.ckpt.last_seq, seq)
        self.files[seq] = _File(seq, ino, fd, sealed=False, head=fingerprint(fd))

    def _follow_active(self) -> _File | None:
        """The active file, after noticing what was done to events.jsonl by hand (see
        the module); None when there is none (or it is to be looked at next turn)."""
        active = self._active()
        if active is None:
            return None
        try:
            current = os.stat(self.dir / ACTIVE).st_ino
        except FileNotFoundError:
            current = None
        if current != active.ino:
            # Deleted or replaced. A producer that found it still at the name holds its
            # flock while it writes: once we hold the flock, no line can be added, and
            # reading it to its end through our descriptor misses none. One stopped in
            # the middle of its write is waited for as producers wait for each other.
            if flock_within(active.fd, 0.05):
                fcntl.flock(active.fd, fcntl.LOCK_UN)
            elif time.monotonic() - self._replaced_at.setdefault(active.seq, time.monotonic()) \
                    < FLOCK_WAIT_S:
                return None  # look again next turn
            active.sealed = True
            log.warning("%s was deleted or replaced by hand; what it held is read to its "
                        "end, then the file now there", ACTIVE)
            return None
        seq, offset = self.read_pos
        if (seq == active.seq and os.fstat(active.fd).st_size < offset) or (
                active.head is not None and not same_head(active.fd, active.head)):
            self._truncated(active)
            return self._active()
        return active

    def _truncated(self, active: _File) -> None:
        """``active`` was truncated in place: it ends, for us, where we had read to; what
        the file holds now is a new file (a new number), read from its start."""
        seq, offset = self.read_pos
        active.sealed = True
        active.end = offset if seq == active.seq else 0  # else not reached yet
        fresh = _File(next_seq(self.ckpt, self.files), active.ino, os.dup(active.fd),
                      sealed=False)
        self.files[fresh.seq] = fresh
        self.ckpt.last_seq = fresh.seq
        if seq == active.seq:
            self.read_pos, self.stalled = (fresh.seq, 0), None
        log.warning("%s was truncated in place (logrotate copytruncate?): read again from "
                    "its start; what it held past what had been read is not shipped (it "
                    "is in the copy, if one was made)", ACTIVE)

    def _maybe_rotate(self, now: float) -> None:
        """Seal the active file once it is rotate_bytes large (see rotate_limit) or
        rotate_seconds old, or early when space is short (see _pressed) and part of it
        is delivered."""
        active = self._follow_active()
        if active is None:
            return
        size = os.fstat(active.fd).st_size
        old = size > 0 and now - active.seen >= self.spool.rotate_seconds
        pressed = size > 0 and self._pressed(active)
        if size < self.spool.rotate_limit and not old and not pressed:
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
        if pressed:
            self._save()  # deletes it at once if every line in it is settled already

    def _pressed(self, active: _File) -> bool:
        """Whether to seal ``active`` early: the filesystem is near the reserve, or the
        spool near max_bytes (which counts every file whole), and the first line not
        yet delivered is in it, past its start. A file is deleted only once sealed and
        settled, so what was delivered of the active file would otherwise stay on the
        disk until rotate_seconds; a file is never sealed for want of space while
        nothing of it is delivered (an outage), which would only make files. Measured
        at most every PRESSURE_CHECK_S."""
        seq, offset = self._trim()
        if seq != active.seq or offset == 0:
            return False
        now = time.monotonic()
        if now - self._pressure_checked < PRESSURE_CHECK_S:
            return False
        self._pressure_checked = now
        spool = self.spool
        if spool.space_low():
            return True
        return spool.max_bytes is not None and spool.size_on_disk() >= spool.max_bytes // 2

    def _chunk(self, entry: _File, offset: int) -> tuple[bytes, int]:
        """The bytes of ``entry`` from ``offset`` (a chunk, more for one long line), and
        where the last newline in them is (-1: none)."""
        size = READ_CHUNK
        while True:
            want = size if entry.end is None else max(0, min(size, entry.end - offset))
            data = os.pread(entry.fd, want, offset)
            cut = data.rfind(b"\n")
            if cut >= 0 or len(data) < size or size >= MAX_LINE_BYTES:
                return data, cut
            size *= 4  # one line longer than the chunk

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
            data, cut = self._chunk(entry, offset)
            if entry.sealed and data[:1] == b"\0":
                # A hole (the settled start of the file given back: see Shipping.
                # _give_back_settled), met again when a checkpoint is rebuilt; or NUL
                # bytes a crash left. No event is in it: passed over.
                skip = len(data) - len(data.lstrip(b"\0"))
                self.read_pos = (seq, offset + skip)
                log.warning("%s: passed over %d NUL bytes at offset %d (a settled start "
                            "given back, or damage)", sealed_name(seq), skip, offset)
                continue
            if offset == 0 and entry.head is None and not entry.sealed:
                entry.head = fingerprint_of(data[:HEAD_BYTES])  # what it is as first read
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
            self.unclassified[pos] = line
        return line

    def _trim(self) -> Position:
        """Drop settled lines from the front; returns the first unsettled position."""
        while self.order and self.order[0].settled:
            self.order.popleft()
        return self.order[0].id if self.order else self.read_pos

    def _past_sealed(self, pos: Position) -> Position:
        """A position at the end of a sealed, fully read file means the next file's start."""
        entry = self.files.get(pos[0])
        if entry is not None and entry.sealed and pos[1] >= self._size(entry):
            later = [s for s in self.files if s > pos[0]]
            return (min(later) if later else pos[0] + 1, 0)
        return pos

    def _unread(self) -> bool:
        """Whether a complete line (or a sealed file's torn tail) waits to be read."""
        seq, offset = self.read_pos
        if seq not in self.files:
            self._discover_active()
        entry = self.files.get(seq)
        if entry is not None:
            size = self._size(entry)
            if size > offset and (entry.sealed or self.stalled != (seq, size)):
                return True
        if not any(s > seq for s in self.files):
            self._discover_active()
        return any(s > seq for s in self.files)
