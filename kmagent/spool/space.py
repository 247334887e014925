"""Room on the spool's filesystem: the reserve producers leave free, and the ballast.

The reserve (``[spool] keep_free``): producers refuse new events (SpoolFull, or drop
and count them) once the filesystem's free space falls below it, so the spool never
takes its last bytes: what is left is the shipper's room to work in (a claim, an ack
and a checkpoint all write before anything is freed) and the rest of the system's.

The ballast: a file of the reserve's size that the shipper allocates while there is
room, and gives up the moment a write fails for want of space. It is for a disk that
another program fills to the last byte: the shipper then still has room to deliver,
record what it delivered, and so free the space the delivered events held. It takes
the ballast back once the filesystem has room for it and the reserve again.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
from pathlib import Path

from .files import open_file, sidecar

log = logging.getLogger("kmagent.spool")

# The default reserve: 5 % of the filesystem, at most 64 MiB. A small fixed part of a
# big disk (a disk 99 % full still takes events), a fair part of a small one.
DEFAULT_KEEP_FREE_SHARE = 0.05
DEFAULT_KEEP_FREE_MAX = 64 * 1024 * 1024
# Whatever is configured: the daemon must always find room to record what it delivered
# (a jsonl checkpoint, a SQLite WAL of 16 pages) before it can free anything; with less,
# producers could take the last byte and shipping would stop for good.
MIN_KEEP_FREE = 64 * 1024


def ballast_for(spool_path: Path, backend: str) -> Path:
    """Where the ballast of the spool at ``spool_path`` lives (known before it opens)."""
    return sidecar(spool_path, backend, "ballast")


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still take on the filesystem holding ``path``."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def filesystem_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize


def keep_free_bytes(setting: int | str | None, path: Path) -> int:
    """The reserve in bytes: ``setting`` is a number of bytes, a share like "10%" of
    the filesystem holding ``path``, or None for the default."""
    if setting is None:
        wanted = min(int(filesystem_bytes(path) * DEFAULT_KEEP_FREE_SHARE),
                     DEFAULT_KEEP_FREE_MAX)
    elif isinstance(setting, str):
        wanted = int(filesystem_bytes(path) * float(setting.rstrip("%")) / 100)
    else:
        wanted = int(setting)
    return max(wanted, MIN_KEEP_FREE)


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or what it was raised from) says the filesystem is out of room."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(exc, sqlite3.Error) and (
                getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
                or "disk is full" in str(exc)):
            return True
        if "disk full" in str(exc) or "disk is full" in str(exc) \
                or "No space left" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


class Ballast:
    """The shipper's spare room: a file of ``size`` bytes, really allocated."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size

    @property
    def held(self) -> bool:
        try:
            return os.stat(self.path).st_size >= self.size
        except OSError:
            return False

    def release(self) -> bool:
        """Give the room back to the filesystem; True if there was any to give."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            return False
        except OSError as exc:
            log.error("cannot remove %s to make room: %s", self.path, exc.strerror)
            return False
        log.warning("the disk is full: gave up %d bytes of ballast (%s) to keep shipping",
                    self.size, self.path)
        return True

    def take(self, keep_free: int) -> bool:
        """Allocate the ballast if the filesystem has room for it and for the reserve
        besides; True once it is held."""
        if self.size <= 0 or self.held:
            return self.size > 0
        try:
            if free_bytes(self.path.parent) < self.size + keep_free:
                return False
            fd = open_file(self.path, os.O_WRONLY | os.O_CREAT)
        except OSError:
            return False
        try:
            _allocate(fd, self.size)
        except OSError:
            os.close(fd)
            try:
                os.unlink(self.path)  # half a ballast is no ballast: try again later
            except OSError:
                pass
            return False
        os.close(fd)
        return True


def _allocate(fd: int, size: int) -> None:
    """Real blocks, not a sparse file: a ballast that takes no room gives none back."""
    try:
        os.posix_fallocate(fd, 0, size)
        return
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
    block = b"\0" * (1 << 16)
    written = 0
    while written < size:
        n = os.pwrite(fd, block[:min(len(block), size - written)], written)
        if n <= 0:
            raise OSError(errno.ENOSPC, "short write (disk full?)")
        written += n
    os.fsync(fd)
