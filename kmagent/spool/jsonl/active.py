"""This process's hold on ``events.jsonl``, the active file producers append to.

One descriptor per process (a forked child opens its own), one ``write()`` per append
under an flock of the file, and the two hazards of appending by name: the shipper seals
(renames) the file under us, which the inode we hold tells; and a disk too full for the
whole write, which leaves only whole lines behind (``ShortWrite``). The caller holds
the spool's in-process lock around every call."""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path
from typing import Callable, TypeVar

from ...errors import SpoolError
from ..files import FLOCK_WAIT_S, flock_within, open_file
from .layout import ACTIVE, TORN_END

_T = TypeVar("_T")


class ShortWrite(OSError):
    """write() stopped short (disk full): the first ``written`` bytes of the data, whole
    lines, are in the file ``fd`` holds; nothing of the rest can ever be read as a line."""

    def __init__(self, written: int, fd: int) -> None:
        super().__init__(errno.ENOSPC, "short write (disk full?)")
        self.written = written
        self.fd = fd


class ActiveFile:
    """``events.jsonl`` of the spool in ``directory``, as this process appends to it."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._name = str(directory / ACTIVE)  # a str: os.stat skips __fspath__
        self._fd: int | None = None
        self._held = (0, 0)  # (inode, device) of the file self._fd holds
        self._end = -1  # where our last complete line ended in the file we hold
        self._pid = -1

    def open(self) -> int:
        """Our descriptor of it, opened (created) if we have none."""
        if self._pid != os.getpid():  # a forked child opens its own descriptor
            self._fd, self._pid, self._end = None, os.getpid(), -1
        if self._fd is None:
            self._fd = open_file(self._name, os.O_RDWR | os.O_APPEND | os.O_CREAT)
            held = os.fstat(self._fd)
            self._held = (held.st_ino, held.st_dev)
        return self._fd

    def _held_size(self, fd: int) -> int | None:
        """The size of the file ``fd`` holds, or None if it is no longer events.jsonl.
        One stat of the name: if it is still our inode, its size is our file's."""
        try:
            current = os.stat(self._name)
        except FileNotFoundError:
            return None
        if (current.st_ino, current.st_dev) != self._held:
            return None
        return current.st_size

    def let_go_if_sealed(self) -> None:
        """Close our descriptor if the file is no longer at that name: once the shipper
        deletes a sealed file, a descriptor kept open anywhere keeps its blocks from the
        disk, and on a full disk a producer that is refused never writes again to
        notice. Never from inside a write (the caller makes sure)."""
        fd = self._fd
        if fd is not None and self._pid == os.getpid() and self._held_size(fd) is None:
            self._fd, self._end = None, -1
            os.close(fd)

    def end(self) -> tuple[int, int]:
        """(inode, size) of events.jsonl, measured under its lock, so that no short
        write is cut back below it: whatever is appended next lies at or after it."""
        return self._under_lock(lambda fd, size: (self._held[0], size))

    def append(self, data: bytes) -> int:
        """Append ``data`` (one or more whole lines) in one write(); the descriptor
        written to (to sync).

        A short write (disk full) is cut back, still under the lock, to the end of its
        last whole line and raised as ShortWrite: the whole lines are stored (the
        shipper, which reads without the lock, may have read them already; it never
        takes a line of the active file before its newline is there, so the torn rest
        was not read). Should the cut fail, the torn rest stays unfinished until the
        next writer ends it with TORN_END, which makes it a bad line: a write that
        raised never becomes a line that is sent."""
        return self._under_lock(lambda fd, size: self._append_locked(fd, size, data))

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def _under_lock(self, act: Callable[[int, int], _T]) -> _T:
        """``act(fd, size)`` with events.jsonl flocked and ``size`` its size under the
        lock; reopened first if it was sealed under us."""
        while True:
            fd = self.open()
            try:  # locked inside the try: a handler raising right after must not leak it
                if not flock_within(fd):
                    raise SpoolError(
                        f"spool {self.directory}: {ACTIVE} stayed locked by another writer "
                        f"for {FLOCK_WAIT_S:g} s (a stopped process?); not stored")
                size = self._held_size(fd)
                if size is not None:
                    return act(fd, size)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)  # held or not: harmless
            os.close(fd)  # sealed under us: reopen events.jsonl
            self._fd, self._end = None, -1

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
            raise ShortWrite(max(0, whole - (len(line) - len(data))), fd)
        self._end = size + written
        return fd
