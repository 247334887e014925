"""The jsonl shipper's state: open files, read position, unsettled lines, checkpoint.

It exists only in the process that holds the shipper lock (see kmagent.lock)."""

from __future__ import annotations

import heapq
import itertools
import json
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from ...protocol import encode
from ..base import Claimed, append_to, fsync_dir, write_atomically
from ..files import flock_within
from .line import BadLine, from_line, origin_of, with_origin
from .checkpoint import CHECKPOINT, Checkpoint, DamagedCheckpoint, Position
from .layout import (ACTIVE, BAD, DEAD, MAX_AHEAD, MAX_LINE_BYTES, READ_CHUNK, SEALED,
                     ClaimId, active_seq, copies_in, count_lines, dump_line, file_head,
                     sealed_name)

if TYPE_CHECKING:
    from .spool import JsonlSpool

log = logging.getLogger("kmagent.spool")

# Leases, never the same twice in a process (a shipper started anew included).
_leases = itertools.count(1)


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



class Shipping:
    """The shipper's state: open files, read position, unsettled lines, checkpoint."""

    def __init__(self, spool: JsonlSpool) -> None:
        self.spool = spool
        self.dir = spool.path
        self.unsaved = False  # the checkpoint in memory is ahead of the one on disk
        try:
            self.ckpt = Checkpoint.load(self.dir / CHECKPOINT)
        except DamagedCheckpoint as exc:
            self.ckpt = self._rebuilt(exc)
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
        # Read, not yet parsed into a claimable item nor set aside: normally only for an
        # instant, but a set-aside that failed (a full disk) leaves its line here, and
        # every claim tries it again until it is written.
        self.unclassified: dict[Position, _Line] = {}
        # Where reading stopped at an unfinished line in the active file, and the file's
        # size then: no new complete line can exist until that size changes.
        self.stalled: tuple[int, int] | None = None
        if self.ckpt.moving is not None:  # a shipper died in the middle of a move
            try:
                self._finish_move()
            except BaseException:
                self.close()
                raise

    def _rebuilt(self, damage: DamagedCheckpoint) -> Checkpoint:
        """A checkpoint in place of a damaged one: the damaged file kept aside (never
        deleted: it is evidence), and delivery started again from the oldest file
        present, at its start. Every line present is sent again rather than any lost;
        Kissmetrics drops the identical requests."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        aside = self.dir / f"{CHECKPOINT}.damaged-{stamp}"
        for n in itertools.count(1):
            if not aside.exists():
                break
            aside = self.dir / f"{CHECKPOINT}.damaged-{stamp}.{n}"
        os.rename(self.dir / CHECKPOINT, aside)
        log.error("%s; kept it as %s and rebuilt the checkpoint: every event still in the "
                  "spool is sent again from the oldest file on (the host drops identical "
                  "requests)", damage, aside.name)
        self.unsaved = True  # saved with the first claim, once there is room
        return Checkpoint(rebuilt_at=time.time())

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
            self.unclassified[pos] = line
        return line

    def _trim(self) -> Position:
        """Drop settled lines from the front; returns the first unsettled position."""
        while self.order and self.order[0].settled:
            self.order.popleft()
        return self.order[0].id if self.order else self.read_pos

    # --- the Spool operations ---

    def claim(self, limit: int, now: float, with_key_only: bool) -> list[Claimed]:
        if self.unsaved:
            self._save()  # one that failed (a full disk): nothing else would retry it
        self._maybe_rotate(now)
        for line in list(self.unclassified.values()):
            if self._classify(line, with_key_only):
                heapq.heappush(self.ready, (0.0, line.id))
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
            if not line.settled and self._classify(line, with_key_only):
                out.append(self._take(line))

    def _classify(self, line: _Line, with_key_only: bool) -> bool:
        """Parse a line just read: a bad one is set aside (an OSError leaves it to be
        tried again), one without a key waits for one; True if it can be claimed."""
        try:
            if not line.raw.endswith(b"\n"):  # a sealed file's torn tail
                raise BadLine("torn: the file ends before this line's newline")
            event, created = from_line(line.raw)
        except BadLine as exc:
            self._set_aside(line, str(exc))  # raises, on a full disk: tried again later
            del self.unclassified[line.id]
            self.settle([line.id])
            return False
        path, query = encode(event)
        line.item = Claimed(line.id, path, query, event.api_key, created, 0)
        del self.unclassified[line.id]
        if with_key_only and event.api_key is None:
            self.keyless.add(line.id)
            return False
        return True

    def _unblock(self, with_key_only: bool) -> None:
        """Keep the checkpoint moving past lines that wait long (a transient failure
        that never ends, an event with no key while the agent has none) while the
        lines behind them flow: once at least half the read-ahead past the oldest
        waiting line is delivered (or being sent), that line is moved (see _move):
        written again at the end of the active file, the same line plus its origin, so
        the same request. Without this, one such line would stop the reader for good,
        and sealed files would pile up. The waiting lines at the front move together,
        as long as half the read-ahead past each still flows.

        Only lines that flow count: when everything waits (an outage, or past 2,048
        events without a key), moving would free nothing and only rewrite the disk,
        so nothing moves, and the reader stops once the read-ahead is full. Each move
        of a line so needs that many deliveries past it: bounded, never a loop."""
        if self.ckpt.moving is not None:
            self._finish_move()  # one a failed write left unfinished: finished first
        if not self.order or self.order[0].settled or self.order[0].id in self.in_flight \
                or len(self.order) <= MAX_AHEAD // 2:
            return  # nothing waits at the front, or too little is read to tell
        flowing = sum(1 for line in self.order
                      if line.settled or line.id in self.in_flight)
        stuck = []
        for line in self.order:
            if flowing < MAX_AHEAD // 2:
                break
            if line.settled:
                flowing -= 1
                continue
            if line.id in self.in_flight or line.item is None:
                break  # being sent, it settles soon; not parsed yet: next claim
            if line.id in self.keyless and not with_key_only:
                break  # a key is configured now: this claim takes it
            stuck.append(line)
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
        append_to(self.dir / BAD, dump_line(record))
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
            append_to(self.dir / DEAD, b"".join(dump_line(r) for r in records), sync=True)
        self.settle(ids)

    def settle(self, ids: list[Position]) -> None:
        """Delivered, dead or set aside: advance the checkpoint and persist it."""
        if not ids:
            return  # nothing changed: no checkpoint to write (and fsync)
        for pos in ids:
            line = self.lines.pop(pos, None)
            self.in_flight.discard(pos)
            self.keyless.discard(pos)
            self.unclassified.pop(pos, None)
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
        self.unsaved = True
        write_atomically(self.dir / CHECKPOINT, self.ckpt.dump())
        self.unsaved = False
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
