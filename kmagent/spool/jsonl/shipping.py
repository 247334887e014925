"""The jsonl shipper's state: open files, read position, unsettled lines, checkpoint.

It exists only in the process that holds the shipper lock (see kmagent.lock). Its
parts: ``reading`` (which file is which, and the lines in order), ``moves`` (lines that
wait long, out of the reader's way), and here the claims and their outcomes.

Every write it makes can fail for want of space, and none leaves a state that nothing
revisits: a line is settled in memory only once its dead letter or set-aside is
written, a checkpoint that could not be saved is saved by the next claim, a set-aside
that failed is tried again by the next claim, a move cut short is finished by the next.
"""

from __future__ import annotations

import heapq
import itertools
import json
import logging
import os
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Iterable

from ...protocol import encode
from ..records import Claimed
from ..files import append_to, write_atomically
from ..files import punch_hole
from ..space import is_disk_full
from .checkpoint import CHECKPOINT, Checkpoint, DamagedCheckpoint, Position
from .layout import BAD, MAX_AHEAD, ClaimId, dump_line, sealed_name
from .line import BadLine, from_line
from .moves import Moves
from .reading import Reading, _Line

if TYPE_CHECKING:
    from .spool import JsonlSpool

log = logging.getLogger("kmagent.spool")

# Leases, never the same twice in a process (a shipper started anew included).
_leases = itertools.count(1)

# bad.jsonl keeps this much of each bad line, and grows to about this size before it
# becomes bad.jsonl.1 (replacing the one before): set-asides never fill the disk.
BAD_KEEP_BYTES = 4096
BAD_MAX_BYTES = 64 * 1024 * 1024
# How far the checkpoint moves into a sealed file before its settled start is given back
# (at every 4 KiB page while space is low).
PUNCH_STEP = 1 << 20
DEAD_BATCH = 64  # dead letters per write (see _write_dead_letters)


class Shipping(Reading, Moves):
    """The shipper's state: open files, read position, unsettled lines, checkpoint."""

    def __init__(self, spool: JsonlSpool) -> None:
        self.spool = spool
        self.dir = spool.path
        self.unsaved = False  # the checkpoint in memory is ahead of the one on disk
        try:
            self.ckpt = Checkpoint.load(self.dir / CHECKPOINT)
        except DamagedCheckpoint as exc:
            self.ckpt = self._rebuilt(exc)
        if self.unsaved or not (self.dir / CHECKPOINT).exists():
            # No record of the numbers files had: none is given again that a dead
            # letter's id names (the sealed files' names keep theirs).
            self.ckpt.last_seq = max(self.ckpt.last_seq, self.spool.dead.highest_file_number())
        self.stalled: tuple[int, int] | None = None
        self._open_files()
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
        # Dead letters not yet written (see _write_dead_letters): their lines stay in
        # flight, so nothing claims them again; after a restart they are sent again,
        # and the host refuses them again.
        self.dead_waiting: dict[Position, dict[str, Any]] = {}
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

    # --- the Spool operations ---

    def claim(self, limit: int, now: float, with_key_only: bool) -> list[Claimed]:
        if self.unsaved:
            self._save()  # one that failed (a full disk): nothing else would retry it
        self._maybe_rotate(now)
        self._write_dead_letters(or_later=True)
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
                # Given back, it is pending again, not dead: a dead letter still
                # waiting for room must not be written for it later.
                self.dead_waiting.pop(claim_id[0], None)
                self.wait([(claim_id[0], due)])

    def _set_aside(self, line: _Line, reason: str) -> None:
        """Record a bad line in bad.jsonl: where it was, why, its length and its start
        (a torn fragment can be megabytes: its start says what it was)."""
        record = {"file": sealed_name(line.id[0]), "offset": line.id[1], "reason": reason,
                  "bytes": len(line.raw), "cut": len(line.raw) > BAD_KEEP_BYTES,
                  "line": line.raw[:BAD_KEEP_BYTES].decode("utf-8", errors="replace")}
        path = self.dir / BAD
        try:
            if os.stat(path).st_size >= BAD_MAX_BYTES:
                os.replace(path, path.with_name(BAD + ".1"))  # the older one goes
        except FileNotFoundError:
            pass
        append_to(path, dump_line(record))
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
        for pos in self.leased(ids):
            self.dead_waiting[pos] = {"id": f"{pos[0]}:{pos[1]}", "status": status,
                                      "reason": reason, "failed_at": now,
                                      "line": json.loads(self.lines[pos].raw)}
        # Without room they wait here, written once there is: a full disk must not fail
        # the shipper's settle (the acks with it are what frees room).
        self._write_dead_letters(or_later=True)

    def _write_dead_letters(self, *, or_later: bool = False, everything: bool = False) -> None:
        """Write the dead letters waiting, then settle their lines. Once the filesystem
        is down into the reserve (another program filled it; the ballast is given up),
        only those that move the checkpoint on (the first unsettled lines): room comes
        back only behind the checkpoint, and dead letters from further on would spend
        the room the checkpoint needs to move, until none is left. ``or_later``: a
        disk-full error leaves them waiting rather than raising (a claim must go on:
        what it claims is what frees room). ``everything``: at close, all, if they fit."""
        if not self.dead_waiting:
            return
        due = sorted(self.dead_waiting)
        if not everything and self.spool.in_reserve():
            due = []
            for line in self.order:
                if line.settled:
                    continue
                if line.id not in self.dead_waiting:
                    break
                due.append(line.id)
            if not due:
                return
        # In batches, each settled once written: thousands can wait, and one write of
        # them all may never fit where a few at a time do (and free room as they go).
        for start in range(0, len(due), DEAD_BATCH):
            batch = due[start:start + DEAD_BATCH]
            try:
                self.spool.dead.add([self.dead_waiting[pos] for pos in batch])
            except OSError as exc:
                if or_later and is_disk_full(exc):
                    return
                raise
            for pos in batch:
                del self.dead_waiting[pos]
            self.settle(batch)

    def settle(self, ids: list[Position]) -> None:
        """Delivered, dead or set aside: advance the checkpoint and persist it."""
        if not ids:
            if self.unsaved:
                self._save()  # outcomes recorded again after a save that failed
            return  # nothing changed: no checkpoint to write (and fsync)
        for pos in ids:
            line = self.lines.pop(pos, None)
            self.in_flight.discard(pos)
            self.keyless.discard(pos)
            self.unclassified.pop(pos, None)
            if line is not None:
                line.settled = True
        self._save()

    def _save(self) -> None:
        head = self._trim()
        if head == self.read_pos:
            head = self.read_pos = self._past_sealed(head)
        self.settled_ahead = {p for p in self.settled_ahead if p >= head}
        ahead = sorted({line.id for line in self.order if line.settled} | self.settled_ahead)
        seq, offset = head
        self.ckpt.seq, self.ckpt.offset = seq, offset
        active = self._active()
        if active is not None:
            # Its fingerprint as first read: taken now, it could be of what a truncation
            # put there since, and a restart would take that for the file it knows.
            self.ckpt.active = (active.seq, active.ino, active.head)
        self.ckpt.ahead = ahead
        self.ckpt.in_flight = len(self.in_flight)
        self.ckpt.lines = {s: n for s, n in self.ckpt.lines.items() if s >= seq}
        self.unsaved = True
        write_atomically(self.dir / CHECKPOINT, self.ckpt.dump())
        self.unsaved = False
        deleted = False
        for old in [s for s in self.files if s < seq and self.files[s].sealed]:
            entry = self.files.pop(old)
            os.close(entry.fd)
            try:
                os.unlink(self.dir / sealed_name(old))
            except FileNotFoundError:
                pass
            deleted = True
        if deleted:
            self.spool.active.let_go_if_sealed()  # its own handle may still hold one open
        self._give_back_settled(seq, offset)

    def _give_back_settled(self, seq: int, offset: int) -> None:
        """Free the blocks of the settled start of the oldest file, if sealed: room would
        otherwise come back only once the whole file is settled, and a file sealed in a
        burst (or after an outage, or while the daemon was stopped) can hold most of the
        disk. Nothing reads a sealed file before the checkpoint again but a checkpoint
        rebuilt, whose reader passes over the hole (Reading._read): settled lines only."""
        entry = self.files.get(seq)
        if entry is None or not entry.sealed or offset - entry.punched < 4096:
            return
        if offset - entry.punched >= PUNCH_STEP or self.spool.space_low():
            if punch_hole(self.dir / sealed_name(seq), offset):
                entry.punched = offset - offset % 4096
            else:
                entry.punched = offset  # not here: try again one step further on

    def maintain(self) -> None:
        """Now and then, and at once on a full disk: save a checkpoint a failed write
        left unsaved (which deletes the files it settles), and seal the active file
        early if that lets delivered content go (see Reading._maybe_rotate)."""
        if self.unsaved:
            self._save()
        self._maybe_rotate(time.time())
        self._write_dead_letters(or_later=True)

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

    def close(self) -> None:
        try:  # what waits in memory would otherwise be sent (and refused) again
            self._write_dead_letters(or_later=True, everything=True)
        except OSError:
            pass
        for entry in self.files.values():
            os.close(entry.fd)
        self.files.clear()
