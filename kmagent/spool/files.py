"""File helpers every spool uses: where its files live, modes, appends, flocks, atomic
replacement."""

from __future__ import annotations

import errno
import fcntl
import os
import time
from pathlib import Path

# Spool files are never world-readable (they hold events, maybe API keys); the group
# may write, so that app users in the spool's group can append (see the README).
FILE_MODE = 0o660
DIR_MODE = 0o770


# Names kept from before sidecar() named them: during an upgrade a running daemon of
# the previous version and the new commands (status, reload, flush) must find the same
# lock and figures.
_SQLITE_NAMES = {"figures.json": "lock.figures.json"}
_JSONL_NAMES = {"lock": "shipper.lock", "figures.json": "shipper.lock.figures.json"}


def sidecar(spool_path: Path, backend: str, name: str) -> Path:
    """The file ``name`` ("lock", "dropped", "ballast", "figures.json",
    "salvage.json") of the spool at ``spool_path``: ``spool.db.<name>`` beside a SQLite
    file, ``<name>`` inside a jsonl directory (but for the names kept above). Known
    before the spool is opened."""
    if backend == "jsonl":
        return spool_path / _JSONL_NAMES.get(name, name)
    return spool_path.with_name(f"{spool_path.name}.{_SQLITE_NAMES.get(name, name)}")


def open_file(path: Path, flags: int) -> int:
    """os.open; a file it creates gets the spool's mode whatever the umask, so that in a
    shared spool directory every app user of the group can append to it."""
    flags |= os.O_CLOEXEC
    if flags & os.O_CREAT:
        try:
            fd = os.open(path, flags | os.O_EXCL, FILE_MODE)
        except FileExistsError:
            pass
        else:
            try:
                os.fchmod(fd, FILE_MODE)
            except OSError:
                pass
            return fd
    return os.open(path, flags, FILE_MODE)


def append_to(path: Path, data: bytes, *, sync: bool = False) -> None:
    """Append ``data`` to ``path`` (created with the spool's mode) in one write. A short
    write (disk full) is undone and raised: a half record must not stand for a whole."""
    fd = open_file(path, os.O_RDWR | os.O_APPEND | os.O_CREAT)
    try:
        size = os.fstat(fd).st_size
        try:
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(errno.ENOSPC, "short write (disk full?)")
            if sync:
                os.fsync(fd)
        except OSError:
            try:
                os.ftruncate(fd, size)
            except OSError:
                pass
            raise
    finally:
        os.close(fd)


def flocked(path: Path, *, create: bool = False, wait: bool = True) -> int:
    """``path`` open (created with the spool's mode if ``create``) and held under an
    exclusive flock; closing the descriptor releases it. BlockingIOError if another
    holds it and not ``wait``."""
    fd = open_file(path, os.O_RDWR | os.O_CREAT) if create else open_file(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        raise
    return fd


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes, *, mode: int = FILE_MODE,
                     sync: bool = True) -> None:
    """Replace ``path`` with ``data``: temp file, fsync, rename, fsync of the directory
    (``sync=False``: no fsync, for what a crash may lose, such as published figures).
    The file gets ``mode`` whatever the umask (the spool's own by default).

    Only a temp file written whole and synced is renamed: on a nearly full disk write()
    stores part of the data and says so, and a part renamed into place would replace a
    good file with one nobody can parse. A write that stops (ENOSPC, or storing nothing)
    removes the temp file and raises OSError(ENOSPC); ``path`` is left as it was."""
    tmp = path.with_name(path.name + ".tmp")
    fd = open_file(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        if mode != FILE_MODE:
            os.fchmod(fd, mode)
        view, written = memoryview(data), 0
        while written < len(data):
            count = os.write(fd, view[written:])
            if count <= 0:
                raise OSError(errno.ENOSPC, f"cannot write {path.name}: no space left "
                              f"after {written} of {len(data)} bytes")
            written += count
        if sync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    os.close(fd)
    os.replace(tmp, path)
    if sync:
        fsync_dir(path.parent)


def make_dirs(path: Path) -> None:
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)


# How long a writer waits for another to let go of a file's flock before giving up: a
# writer that is stopped (SIGSTOP, a debugger) must not hang every other one for good.
FLOCK_WAIT_S = 5.0


def flock_within(fd: int, seconds: float = FLOCK_WAIT_S) -> bool:
    """An exclusive flock on ``fd``, waiting at most ``seconds``; False if another
    still holds it then. Uncontended, it costs one flock()."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        pass
    deadline, pause = time.monotonic() + seconds, 0.0001
    while time.monotonic() < deadline:
        time.sleep(pause)
        pause = min(pause * 2, 0.01)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            continue
    return False


_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
_fallocate = None  # libc's fallocate(2), once looked up; False where there is none


def punch_hole(path: Path, length: int) -> bool:
    """Give the filesystem back the blocks of ``path``'s first ``length`` bytes (rounded
    down to whole 4 KiB pages), its size and offsets unchanged: reading them gives NUL
    bytes. Linux fallocate(2) with FALLOC_FL_PUNCH_HOLE (ext4, xfs, btrfs, tmpfs); False
    where the filesystem or the platform cannot, and the file is left as it was."""
    global _fallocate
    length -= length % 4096
    if length <= 0:
        return False
    if _fallocate is None:
        import ctypes
        try:
            # The process's own symbols, libc's among them: find_library would run
            # ldconfig (a subprocess) to find what is loaded already.
            _fallocate = ctypes.CDLL(None, use_errno=True).fallocate
            _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        except (OSError, AttributeError):
            _fallocate = False
    if not _fallocate:
        return False
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, 0, length) == 0
    finally:
        os.close(fd)
