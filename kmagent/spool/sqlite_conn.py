"""One SQLite connection per process per spool file, shared by every handle.

SQLite locks the database with POSIX advisory locks, and those belong to the process:
closing *any* descriptor of the file drops every lock the process holds on it, a live
connection's included ("How To Corrupt An SQLite Database File", 2.2). A connection
that lost its lock writes into a WAL that another process may checkpoint and delete
under it. So nothing here opens or closes the database, -wal or -shm files but SQLite
itself, and a process has exactly one connection to a spool file however many
``Client``s, ``KM``s, ``status()`` calls or compat instances it makes: two would be
safe for SQLite, but one is cheaper and lets them all group-commit together.

fork(): the child inherits the parent's connection and SQLite's per-process lock
bookkeeping, but not the kernel's locks. A new connection in the child would trust that
bookkeeping and believe it holds locks it does not. So the child never uses what it
inherited: before it opens the file itself, it closes its inherited copy, which clears
that bookkeeping (closing takes no lock from the parent: locks are per process, and
SQLite deletes the WAL on close only when no other process holds the database).
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import SpoolDamaged, SpoolError
from .files import FILE_MODE, FLOCK_WAIT_S, flock_within, make_dirs, open_file
from .shared import Shared, hold_across_fork
from .space import filesystem_bytes
from . import sqlite_schema
from .sqlite_schema import FORMAT_VERSION

BUSY_TIMEOUT_S = 5.0  # how long a writer waits for another before SpoolError
SYNC_LEVELS = {"normal": "NORMAL", "full": "FULL"}
# The WAL is checkpointed (and, once reset, cut back) at about 1 % of its filesystem,
# between 16 and SQLite's default 1,000 pages: on a small filesystem a 4 MiB WAL would
# take the room the shipper needs to free the rest.
WAL_SHARE, WAL_PAGES = 0.01, (16, 1000)
DAMAGED_CODES = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def is_damaged(exc: BaseException) -> bool:
    """Whether SQLite says the file itself is damaged (not busy, full or read-only)."""
    return isinstance(exc, sqlite3.DatabaseError) and (
        (getattr(exc, "sqlite_errorcode", 0) & 0xFF) in DAMAGED_CODES
        or "malformed" in str(exc) or "not a database" in str(exc))


def spool_error(path: Path, what: str, exc: sqlite3.Error) -> SpoolError:
    """The SpoolError for ``exc``: SpoolDamaged if the file is damaged."""
    message = f"spool {path}: {what}: {exc}"
    return SpoolDamaged(message, str(path)) if is_damaged(exc) else SpoolError(message)


class Connection(Shared):
    """This process's connection to one spool file, and the handles using it."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.users = 0
        self.synchronous = "NORMAL"
        self.conn = _connect(path)
        self.identity = _identity(path)

    def want(self, synchronous: str) -> None:
        """The strongest durability any handle asked for applies to all of them."""
        if synchronous == "FULL" and self.synchronous != "FULL":
            with self.held():
                self.conn.execute("PRAGMA synchronous = FULL")
                self.synchronous = "FULL"


_open: dict[str, Connection] = {}  # path -> this process's connection
_inherited: list[Connection] = []  # a forked child's copies of its parent's
# Connections to a file deleted or replaced since (an operator's rm): never used again,
# and kept open rather than closed under a thread that may still be writing to them.
_retired: list[Connection] = []
# Re-entrant so that a signal handler opening a spool while its thread is in here is
# refused at once (SpoolError) instead of waiting for itself forever.
_registry = threading.RLock()


def _identity(path: Path) -> tuple[int, int] | None:
    """Which file ``path`` names now (by name: nothing is opened)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def join(path: Path, durability: str) -> Connection:
    """The process's connection to ``path`` (opened on first use), counted as used."""
    if _registry._is_owned():
        raise SpoolError(f"spool {path}: opened from a signal handler while this thread "
                         "was opening or closing it; nothing done")
    with _registry:
        shared = _open.get(str(path))
        if shared is not None and _identity(path) != shared.identity:
            _retire(shared)  # the file was deleted or replaced: open what is there now
            shared = None
        if shared is None:
            _close_inherited(path)
            with opening(path):
                shared = _open[str(path)] = Connection(path)
        shared.users += 1
    shared.want(SYNC_LEVELS[durability])
    return shared


def follow(shared: Connection) -> None:
    """If the file ``shared`` has open is no longer the one its path names (deleted or
    replaced by hand), retire it: its handles then join the file that is there now."""
    if shared.stale or _registry._is_owned():
        return
    if _identity(shared.path) != shared.identity:
        with _registry:
            if _open.get(str(shared.path)) is shared:
                _retire(shared)


def retire(path: Path) -> None:
    """The file at ``path`` was put aside (a salvage): this process's handles follow to
    whatever is there now."""
    with _registry:
        shared = _open.get(str(path))
        if shared is not None:
            _retire(shared)


@contextmanager
def opening(path: Path, *, exclusive: bool = False) -> Iterator[None]:
    """Held while a process opens the spool (shared), or while a salvage renames its
    files (exclusive): so that no process ever pairs a fresh database with the damaged
    one's WAL, which SQLite would replay into it. A separate file: its descriptors are
    no business of SQLite's locks."""
    try:
        make_dirs(path.parent)
        fd = open_file(path.with_name(path.name + ".open-lock"), os.O_RDWR | os.O_CREAT)
    except OSError as exc:
        raise SpoolError(f"spool {path}: cannot open: {exc.strerror}") from exc
    try:
        if exclusive:
            if not flock_within(fd):
                raise SpoolError(f"spool {path}: another process kept opening it for "
                                 f"{FLOCK_WAIT_S:g} s; salvage postponed")
        else:
            fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def _retire(shared: Connection) -> None:
    shared.stale = True
    del _open[str(shared.path)]
    _retired.append(shared)


def leave(shared: Connection) -> None:
    """A handle is done; the last one closes the connection."""
    if _registry._is_owned():
        return  # from a signal handler inside join or leave: the count stays up, harmless
    with _registry:
        if shared.stale or _open.get(str(shared.path)) is not shared:
            return  # a parent's, retired, or already closed
        shared.users -= 1
        if shared.users > 0:
            return
        del _open[str(shared.path)]
    with shared.lock:
        shared.conn.close()


def _close_inherited(path: Path) -> None:
    for shared in [s for s in _inherited if s.path == path]:
        _inherited.remove(shared)
        try:
            shared.conn.close()
        except sqlite3.Error:
            pass


def _connect(path: Path) -> sqlite3.Connection:
    try:
        make_dirs(path.parent)
        created = not path.exists()
        conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                               check_same_thread=False)
        if created:
            # The spool's mode whatever the umask, set by name (opening the file would
            # risk the locks, above), before SQLite makes the -wal and -shm files:
            # it gives them the database file's mode.
            try:
                os.chmod(path, FILE_MODE)
            except OSError:
                pass
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            sqlite_schema.writable(conn, path, version)
            if version < FORMAT_VERSION:
                sqlite_schema.install(conn, version)
            conn.execute("PRAGMA synchronous = NORMAL")
            _size_wal(conn, path)
        except BaseException:
            conn.close()
            raise
        return conn
    except sqlite3.Error as exc:
        raise spool_error(path, "cannot open", exc) from exc
    except OSError as exc:
        raise SpoolError(f"spool {path}: cannot open: {exc.strerror}") from exc


def _size_wal(conn: sqlite3.Connection, path: Path) -> None:
    page = conn.execute("PRAGMA page_size").fetchone()[0]
    pages = int(filesystem_bytes(path.parent) * WAL_SHARE / page)
    pages = max(WAL_PAGES[0], min(WAL_PAGES[1], pages))
    conn.execute(f"PRAGMA wal_autocheckpoint = {pages}").fetchall()
    conn.execute(f"PRAGMA journal_size_limit = {pages * page}").fetchall()


def _in_child() -> None:
    # Every connection is stale by now (shared.py). Kept, not closed, until this
    # process opens the same file itself (see the module's description).
    _inherited.extend(_open.values())
    _open.clear()


hold_across_fork(_registry, _in_child)
