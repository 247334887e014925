"""One shipper per spool: an flock the kernel drops when its holder dies.

The holder writes its pid into the lock file so that others can say who ships
(``kmagent run`` waiting for a flush, ``status``'s ``daemon_pid``). flock, not POSIX
fcntl locks: those vanish when *any* descriptor of the file closes in the process.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from .spool.files import open_file


class ShipperLock:
    """The right to claim from one spool."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None
        self._signed = False

    @property
    def held(self) -> bool:
        return self._fd is not None

    def try_acquire(self) -> bool:
        """Take the lock if it is free; never blocks."""
        if self._fd is not None:
            return True
        fd = open_file(self.path, os.O_RDWR | os.O_CREAT)  # the spool's mode, any umask
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
                return False
            raise
        self._fd, self._signed = fd, False
        self.sign()
        return True

    def sign(self) -> None:
        """Write our pid into the lock file, if not done yet. It is for others (status,
        reload); the lock is what counts, so a full disk only defers it: the daemon
        calls this every turn until it succeeds (once room is given back)."""
        if self._fd is None or self._signed:
            return
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)
            self._signed = True
        except OSError:
            pass

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
            except OSError:
                pass
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def holder(self) -> int | None:
        """The pid of the process holding the lock, or None if nobody ships."""
        if self._fd is not None:
            return os.getpid()
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                text = os.pread(fd, 32, 0).decode(errors="replace").strip()
                return int(text) if text.isdigit() else None
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)
