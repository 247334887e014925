"""The jsonl spool as any process sees it on disk (status, flush's marks, export)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

from ...events import Event
from .line import BadLine, created_of, from_line
from .checkpoint import CHECKPOINT, Checkpoint, Position
from .layout import ACTIVE, SEALED, active_seq, copies_in, count_lines, next_seq

class DiskView:
    """The spool as any process sees it on disk: files in order and the checkpoint.
    What status, flush's progress and marks are computed from."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # Damaged: read as nothing settled yet (see checkpoint), never an error here.
        self.checkpoint = Checkpoint.read(path / CHECKPOINT)
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
            known = [f[0] for f in self.files]
            active = self.checkpoint.active
            if active is not None:
                fd = os.open(path / ACTIVE, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    seq = active_seq(self.checkpoint, known, st.st_ino, fd)
                finally:
                    os.close(fd)
            else:
                seq = next_seq(self.checkpoint, known)
            self.files.append((seq, path / ACTIVE, st))
        self.files.sort(key=lambda f: f[0])
        # Settled positions count only in the files present: those of a file deleted
        # (or truncated) by hand settle nothing in another.
        present = {f[0] for f in self.files}
        self.ahead = {p for p in self.checkpoint.ahead if p[0] in present}

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
        ckpt, ahead = self.checkpoint, self.ahead
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
                copies: "CopyIndex | None" = None) -> int:
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
        settled = sum(1 for p in self.ahead if stop is None or p < stop)
        return max(0, count - settled) + (
            0 if stop is None else self._moved_from_before(stop, copies or CopyIndex()))

    def _moved_from_before(self, stop: Position, copies: "CopyIndex") -> int:
        """Unsettled lines after ``stop`` that are copies of lines from before it."""
        ckpt = self.checkpoint
        head, ahead = (ckpt.seq, ckpt.offset), self.ahead
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


class CopyIndex:
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
