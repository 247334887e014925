"""Moving lines that wait long out of the jsonl reader's way. Part of ``Shipping``.

A line that keeps failing, or that waits for an API key the agent does not have, would
hold the checkpoint, and so every sealed file after it, for as long as it waits; and
once the read-ahead is full behind it, the reader. So, while the lines behind it flow,
it is written again at the end of the active file, the same line plus its origin
(``_o``, see line), and its old copy settled: the request sent is byte for byte the same.
"""

from __future__ import annotations

import os
from collections import deque
from typing import TYPE_CHECKING

from .checkpoint import Checkpoint, Position
from .layout import MAX_AHEAD, copies_in
from .line import origin_of, with_origin

if TYPE_CHECKING:
    from .reading import _File, _Line
    from .spool import JsonlSpool


class Moves:
    """Part of Shipping: the moves (see the module)."""

    spool: JsonlSpool
    ckpt: Checkpoint
    files: dict[int, _File]
    order: deque[_Line]
    lines: dict[Position, _Line]
    in_flight: set[Position]
    keyless: set[Position]
    settled_ahead: set[Position]
    read_pos: Position

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
        ino, size = self.spool.active.end()
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
            found, _ = copies_in(entry.fd, start, self._size(entry))
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
