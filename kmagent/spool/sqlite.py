"""The SQLite spool: WAL, one row per event, atomic claims.

Durability: in WAL mode a commit is in the OS once ``INSERT`` returns, so it survives
the process being SIGKILLed (``synchronous=NORMAL``); ``FULL`` also fsyncs the WAL on
every commit, so it survives power loss. The producer's INSERT runs on a bare sqlite3
connection: it is the hot path (DESIGN.md, "Measured facts").

Rows are deleted once delivered, so the table holds only pending work, oldest first by
rowid. A fresh row is due at once (``due = 0``) and enters no index, so the producer's
INSERT costs little more than a bare one. ``lease`` marks rows a shipper has in flight
and ``due > 0`` rows waiting out a backoff; each kind has a partial index, and both are
few (the in-flight window; the failures the outage gate lets through), so a claim, which
walks the rowid order past them, costs O(batch + window + backoffs), not O(backlog).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterable

from ..errors import SpoolError
from ..events import Event
from ..protocol import describe, encode
from .base import Claimed, Spool, make_dirs, open_file, unknown_ids

FORMAT_VERSION = 1  # stored as PRAGMA user_version
BUSY_TIMEOUT_S = 5.0  # how long a writer waits for another before SpoolError

SCHEMA = (
    """CREATE TABLE events (
        id INTEGER PRIMARY KEY,
        path TEXT NOT NULL,
        query TEXT NOT NULL,
        api_key TEXT,
        created REAL NOT NULL,
        due REAL NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        lease INTEGER,
        last_error TEXT)""",
    "CREATE INDEX events_backoff ON events(due) WHERE due > 0 AND lease IS NULL",
    "CREATE INDEX events_leased ON events(lease) WHERE lease IS NOT NULL",
    # Without a key of its own the agent claims only events that carry one; this keeps
    # that claim cheap however many keyless events wait (keyless rows never enter it).
    "CREATE INDEX events_keyed ON events(id) WHERE api_key IS NOT NULL AND lease IS NULL",
    """CREATE TABLE dead (
        id INTEGER PRIMARY KEY,
        path TEXT NOT NULL,
        query TEXT NOT NULL,
        api_key TEXT,
        created REAL NOT NULL,
        attempts INTEGER NOT NULL,
        failed_at REAL NOT NULL,
        status INTEGER,
        reason TEXT NOT NULL)""",
)

# A fresh event is due at once (due = 0): only retries carry a wall-clock time, so a
# clock that jumps backwards never holds back events that were never tried.
INSERT = "INSERT INTO events (path, query, api_key, created, due) VALUES (?, ?, ?, ?, 0)"
CLAIM = """UPDATE events SET lease = ?, attempts = attempts + 1
    WHERE id IN (SELECT id FROM events WHERE lease IS NULL AND due <= ? {key_filter}
                 ORDER BY id LIMIT ?)
    RETURNING id, path, query, api_key, created, attempts"""


# Connections a forked child inherited. SQLite forbids using them across fork(); closing
# one would run SQLite's cleanup on state shared with the parent (its WAL index
# mapping, its file descriptors), so they are kept, never used.
_inherited: list[sqlite3.Connection] = []


class SqliteSpool(Spool):
    """A spool in one SQLite file; safe across threads, processes and forks."""

    def __init__(self, path: Path, *, durability: str = "normal",
                 max_bytes: int | None = None, when_full: str = "error") -> None:
        super().__init__(max_bytes=max_bytes, when_full=when_full)
        # Resolved: a symlinked path must lead to the same lock file, or two shippers
        # could work one spool at once.
        self.path = Path(path).resolve()
        self._synchronous = {"normal": "NORMAL", "full": "FULL"}[durability]
        self._conn: sqlite3.Connection | None = None
        self._pid = -1
        self._connection()  # open now so a bad path fails at construction

    # --- connection -------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        # A forked child must not share its parent's handle (SQLite forbids it): reopen.
        if self._pid != os.getpid():
            if self._conn is not None:
                _inherited.append(self._conn)
            self._conn = self._open()
            self._pid = os.getpid()
        return self._conn

    def _open(self) -> sqlite3.Connection:
        try:
            make_dirs(self.path.parent)
            # Created by us, with the spool's mode: SQLite would make it world-readable,
            # and gives its -wal and -shm files the database file's mode.
            os.close(open_file(self.path, os.O_RDWR | os.O_CREAT))
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                   check_same_thread=False)
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > FORMAT_VERSION:
                conn.close()
                raise SpoolError(
                    f"spool {self.path}: format {version} is newer than this kmagent "
                    f"understands ({FORMAT_VERSION}); upgrade kmagent")
            if version < FORMAT_VERSION:
                self._create(conn)
            conn.execute(f"PRAGMA synchronous = {self._synchronous}")
            return conn
        except sqlite3.Error as exc:
            raise SpoolError(f"spool {self.path}: cannot open: {exc}") from None
        except OSError as exc:
            raise SpoolError(f"spool {self.path}: cannot open: {exc.strerror}") from None

    @staticmethod
    def _create(conn: sqlite3.Connection) -> None:
        # Both must come before the first table: auto_vacuum lets the file shrink as
        # delivered rows go (PRAGMA incremental_vacuum); WAL is persistent.
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("BEGIN IMMEDIATE")  # two processes creating at once: one wins
        try:
            if conn.execute("PRAGMA user_version").fetchone()[0] == 0:
                for statement in SCHEMA:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {FORMAT_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _run(self, what: str, fn, *args):
        """Run ``fn(conn, *args)`` under the lock; sqlite3 errors become SpoolError."""
        with self._lock:
            conn = self._connection()
            try:
                return fn(conn, *args)
            except BaseException as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise SpoolError(f"spool {self.path}: {what} failed: {exc}") from None
                raise

    def _many(self, sql: str, rows: list[tuple]) -> None:
        def run(conn: sqlite3.Connection) -> None:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(sql, rows)
            conn.execute("COMMIT")
        if rows:
            self._run("update", run)

    # --- producer -----------------------------------------------------------------------

    def _record(self, event: Event) -> tuple[str, str, str | None, float]:
        return (*encode(event), event.api_key, time.time())

    def _write(self, records: list[tuple[str, str, str | None, float]], *, sync: bool) -> int:
        conn = self._connection()
        try:
            if len(records) == 1 and not sync:
                conn.execute(INSERT, records[0])  # alone: one autocommitted statement
            else:
                self._insert_together(conn, records, sync)
        except sqlite3.Error as exc:
            raise SpoolError(f"spool {self.path}: cannot append: {exc}") from None
        # The rows and their index entries, roughly.
        return len(records[0][1]) + 40 if len(records) == 1 else \
            sum(len(record[1]) + 40 for record in records)

    def _insert_together(self, conn: sqlite3.Connection, records: list[tuple], sync: bool) -> None:
        """One transaction; with ``sync``, its commit is synced whatever the durability."""
        if sync:
            conn.execute("PRAGMA synchronous = FULL")
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(INSERT, records)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        finally:
            if sync:
                conn.execute(f"PRAGMA synchronous = {self._synchronous}")

    def size_on_disk(self) -> int:
        # Live pages only: pages freed by delivered rows are reused (and given back to
        # the OS by maintain()), so they do not count against max_bytes.
        def measure(conn: sqlite3.Connection) -> int:
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            free = conn.execute("PRAGMA freelist_count").fetchone()[0]
            size = conn.execute("PRAGMA page_size").fetchone()[0]
            return (pages - free) * size
        return self._run("measure", measure)

    def maintain(self) -> None:
        def run(conn: sqlite3.Connection) -> None:
            conn.execute("PRAGMA incremental_vacuum(1000)").fetchall()
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        self._run("maintain", run)

    # --- shipper ------------------------------------------------------------------------

    def claim(self, limit: int, *, now: float, with_key_only: bool = False) -> list[Claimed]:
        sql = CLAIM.format(key_filter="AND api_key IS NOT NULL" if with_key_only else "")
        rows = self._run("claim", lambda c: c.execute(sql, (os.getpid(), now, limit)).fetchall())
        rows.sort()  # by id: RETURNING has no defined order
        return [Claimed(*row) for row in rows]

    def _each(self, sql: str, ids: Iterable[Any]) -> None:
        """One statement over a list of ids. Not executemany: each of its steps gives up
        the GIL and must win it back from the busy sender threads (~ms each)."""
        ids = list(ids)
        if ids:
            self._run("update", lambda c: c.execute(
                sql + " WHERE id IN (SELECT value FROM json_each(?))", (json.dumps(ids),)))

    def ack(self, ids: Iterable[Any]) -> None:
        self._each("DELETE FROM events", ids)

    def retry(self, entries: Iterable[tuple[Any, float, str | None]]) -> None:
        self._many("UPDATE events SET lease = NULL, due = ?, last_error = ? WHERE id = ?",
                   [(due, error, i) for i, due, error in entries])

    def release(self, ids: Iterable[Any]) -> None:
        self._each("UPDATE events SET lease = NULL", ids)

    def dead_letter(self, ids: Iterable[Any], *, status: int | None, reason: str,
                    now: float) -> None:
        rows = [(now, status, reason, i) for i in ids]

        def run(conn: sqlite3.Connection) -> None:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(
                "INSERT INTO dead (path, query, api_key, created, attempts, failed_at, "
                "status, reason) SELECT path, query, api_key, created, attempts, ?, ?, ? "
                "FROM events WHERE id = ?", rows)
            conn.executemany("DELETE FROM events WHERE id = ?", [(r[3],) for r in rows])
            conn.execute("COMMIT")
        if rows:
            self._run("dead-letter", run)

    def expedite(self) -> int:
        return self._run("expedite", lambda c: c.execute(
            "UPDATE events SET due = 0 WHERE lease IS NULL AND due > 0").rowcount)

    def requests(self, *, dead: bool = False) -> list[tuple[str, str, str | None, float]]:
        table = "dead" if dead else "events"
        return self._run("read", lambda c: c.execute(
            f"SELECT path, query, api_key, created FROM {table} ORDER BY id").fetchall())

    def dead_letters(self) -> list[dict[str, Any]]:
        import sqlite_utils  # inspection only: the daemon side may import it

        def read(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = sqlite_utils.Database(conn)["dead"].rows_where(order_by="created, id")
            return [{"id": str(row["id"]), **describe(row["path"], row["query"]),
                     "status": row["status"], "reason": row["reason"],
                     "failed_at": row["failed_at"]} for row in rows]
        return self._run("read", read)

    def _select_dead(self, conn: sqlite3.Connection, ids: list[str] | None) -> list[int]:
        known = [row[0] for row in conn.execute("SELECT id FROM dead ORDER BY id")]
        unknown_ids(ids, map(str, known))
        return known if ids is None else [int(i) for i in ids]

    def retry_dead(self, ids: list[str] | None) -> int:
        def run(conn: sqlite3.Connection) -> int:
            conn.execute("BEGIN IMMEDIATE")
            chosen = [(i,) for i in self._select_dead(conn, ids)]
            # A fresh start: due now, and its age counts from now (max_age).
            conn.executemany(
                "INSERT INTO events (path, query, api_key, created, due) "
                "SELECT path, query, api_key, ?, 0 FROM dead WHERE id = ?",
                [(time.time(), i) for (i,) in chosen])
            conn.executemany("DELETE FROM dead WHERE id = ?", chosen)
            conn.execute("COMMIT")
            return len(chosen)
        return self._run("dead retry", run)

    def purge_dead(self, ids: list[str] | None) -> int:
        def run(conn: sqlite3.Connection) -> int:
            conn.execute("BEGIN IMMEDIATE")
            chosen = [(i,) for i in self._select_dead(conn, ids)]
            conn.executemany("DELETE FROM dead WHERE id = ?", chosen)
            conn.execute("COMMIT")
            return len(chosen)
        return self._run("dead purge", run)

    def recover(self) -> int:
        return self._run("recover", lambda c: c.execute(
            "UPDATE events SET lease = NULL WHERE lease IS NOT NULL").rowcount)

    def next_due(self, *, with_key_only: bool = False) -> float | None:
        key_filter = " AND api_key IS NOT NULL" if with_key_only else ""

        def read(conn: sqlite3.Connection) -> float | None:
            # A fresh row is due now; it lies after the few leased and backed-off ones.
            fresh = conn.execute("SELECT 1 FROM events WHERE lease IS NULL AND due = 0"
                                 + key_filter + " LIMIT 1").fetchone()
            if fresh:
                return 0.0
            return conn.execute("SELECT min(due) FROM events WHERE due > 0 AND lease IS NULL"
                                + key_filter).fetchone()[0]
        return self._run("read", read)

    def mark(self) -> int:
        # Every event so far has an id at most this. (Ids can come back once the newest
        # row is delivered; such a later event then counts as pending at the mark too,
        # which makes a flush wait for it as well: harmless.)
        return self._run("read", lambda c: c.execute(
            "SELECT coalesce(max(id), 0) FROM events").fetchone()[0])

    def pending_through(self, mark: int) -> int:
        return self._run("read", lambda c: c.execute(
            "SELECT count(*) FROM events WHERE id <= ?", (mark,)).fetchone()[0])

    def stats(self, now: float) -> dict[str, Any]:
        def read(conn: sqlite3.Connection) -> dict[str, Any]:
            conn.execute("BEGIN")  # one snapshot for all figures
            try:
                pending = conn.execute("SELECT count(*) FROM events").fetchone()[0]
                in_flight = conn.execute(
                    "SELECT count(*) FROM events WHERE lease IS NOT NULL").fetchone()[0]
                dead = conn.execute("SELECT count(*) FROM dead").fetchone()[0]
                # ids grow with time, so the lowest id is the oldest event: O(1).
                oldest = conn.execute(
                    "SELECT created FROM events ORDER BY id LIMIT 1").fetchone()
            finally:
                conn.execute("COMMIT")
            return {
                "pending": pending,
                "in_flight": in_flight,
                "dead": dead,
                "oldest_pending_age_s": None if oldest is None else max(0.0, now - oldest[0]),
            }
        return self._run("stats", read)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                if self._pid == os.getpid():
                    self._conn.close()
                else:
                    _inherited.append(self._conn)
            self._conn = None
            self._pid = -1
