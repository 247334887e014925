"""The SQLite spool: WAL, one row per event, atomic claims.

Durability: in WAL mode a commit is in the OS once ``INSERT`` returns, so it survives
the process being SIGKILLed (``synchronous=NORMAL``); ``FULL`` also fsyncs the WAL on
every commit, so it survives power loss. The producer's INSERT runs on a bare sqlite3
connection: it is the hot path (ARCHITECTURE.md, "SQLite").

Rows are deleted once delivered, so the table holds only pending work, oldest first by
rowid. A fresh row is due at once (``due = 0``) and enters no index, so the producer's
INSERT costs little more than a bare one. ``lease`` marks rows a shipper has in flight
and ``due > 0`` rows waiting out a backoff; each kind has a partial index, and both are
few (the in-flight window; the failures the outage gate lets through), so a claim, which
walks the rowid order past them, costs O(batch + window + backoffs), not O(backlog).
"""

from __future__ import annotations

import itertools
import os
import secrets
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterable

from ..errors import SpoolError
from ..events import Event
from ..protocol import describe, encode
from . import sqlite_conn
from .base import Spool
from .records import Claimed, Retry, unknown_ids
from .shared import CLOSED
from .sqlite_conn import BUSY_TIMEOUT_S
from .sqlite_conn import spool_error

# A fresh event is due at once (due = 0): only retries carry a wall-clock time, so a
# clock that jumps backwards never holds back events that were never tried.
INSERT = "INSERT INTO events (path, query, api_key, created, due) VALUES (?, ?, ?, ?, 0)"
# A claim gives its rows a lease no other claim has: ack, retry, release and
# dead-letter then touch a row only while it carries the lease of the claim that sent it
# (ids are reused once the table empties; a settle repeated after a spool error must not
# touch a newer event that took an old id).
CLAIMED = "SELECT id FROM events WHERE lease IS NULL AND due <= ? {key_filter} ORDER BY id LIMIT ?"
CLAIM = ("UPDATE events SET lease = ?, attempts = attempts + 1 WHERE id IN (" + CLAIMED + ")"
         " RETURNING id, path, query, api_key, created, attempts")
# Before 3.35 (RHEL 9 has 3.34, Ubuntu 20.04 3.31) there is no RETURNING: the same
# UPDATE, then the rows read back by their lease, in one transaction.
CLAIM_NO_RETURNING = ("UPDATE events SET lease = ?, attempts = attempts + 1 WHERE id IN ("
                      + CLAIMED + ")")
LEASED = "SELECT id, path, query, api_key, created, attempts FROM events WHERE lease = ?"
HAS_RETURNING = sqlite3.sqlite_version_info >= (3, 35, 0)
IDS_PER_STATEMENT = 500  # under SQLITE_MAX_VARIABLE_NUMBER (999 before 3.32)

# Leases: unique within a spool's life (one shipper at a time, and recover() clears
# them all when the next starts), random so that two shippers in turn never meet.
_leases = itertools.count(secrets.randbits(52))


def _busy(exc: BaseException) -> bool:
    """SQLite gave up waiting for another writer. Its busy handler counts its sleeps,
    not the time gone, and a signal (a profiler's itimer) cuts every sleep short: so the
    wait is bounded here again, by the clock."""
    return isinstance(exc, sqlite3.OperationalError) and (
        "locked" in str(exc) or "busy" in str(exc))


class SqliteSpool(Spool):
    """A spool in one SQLite file; safe across threads, processes and forks."""

    # Each commit appends at least one page, and its frame header, to the WAL.
    WRITE_COST = 4096 + 24

    def __init__(self, path: Path, *, durability: str = "normal",
                 max_bytes: int | None = None, when_full: str = "error",
                 keep_free: int | str | None = None,
                 use_returning: bool | None = None) -> None:
        # Resolved: a symlinked path must lead to the same lock file, or two shippers
        # could work one spool at once, and to the process's one connection.
        self.path = Path(path).resolve()
        self._durability = durability
        self._use_returning = HAS_RETURNING if use_returning is None else use_returning
        super().__init__(max_bytes=max_bytes, when_full=when_full,  # opens: fails early
                         keep_free=keep_free)

    # --- connection -------------------------------------------------------------------

    def _share(self) -> sqlite_conn.Connection:
        return sqlite_conn.join(self.path, self._durability)

    def _follow(self) -> None:
        sqlite_conn.follow(self._shared)

    def _connection(self) -> sqlite3.Connection:
        return self._sharing().conn

    def _run(self, what: str, fn, *args):
        """Run ``fn(conn, *args)`` under the lock; sqlite3 errors become SpoolError."""
        with self._holding() as shared:
            conn = shared.conn
            deadline = time.monotonic() + BUSY_TIMEOUT_S
            while True:
                try:
                    return fn(conn, *args)
                except BaseException as exc:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    if _busy(exc) and time.monotonic() < deadline:
                        continue  # rolled back whole: the same transaction again
                    if isinstance(exc, sqlite3.Error):
                        raise spool_error(self.path, f"{what} failed", exc) from exc
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
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        while True:
            try:
                if len(records) == 1 and not sync:
                    conn.execute(INSERT, records[0])  # alone: one autocommitted statement
                else:
                    self._insert_together(conn, records, sync)
                break
            except sqlite3.Error as exc:
                if _busy(exc) and time.monotonic() < deadline:
                    continue  # nothing was stored: try again
                raise spool_error(self.path, "cannot append", exc) from exc
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
                conn.execute(f"PRAGMA synchronous = {self._sharing().synchronous}")

    def size_on_disk(self) -> int:
        # Live pages, and the WAL beside them: pages freed by delivered rows are reused
        # (and given back to the OS by maintain()), so they do not count; the WAL,
        # which only a checkpoint empties, does.
        def measure(conn: sqlite3.Connection) -> int:
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            free = conn.execute("PRAGMA freelist_count").fetchone()[0]
            size = conn.execute("PRAGMA page_size").fetchone()[0]
            return (pages - free) * size
        try:
            wal = os.stat(f"{self.path}-wal").st_size  # by name: nothing is opened
        except FileNotFoundError:
            wal = 0
        return self._run("measure", measure) + wal

    def maintain(self) -> None:
        """Give delivered rows' room back: checkpoint first (a vacuum writes to the WAL,
        which needs room; a checkpoint lets the WAL start over), then free up to 1,000
        pages, then checkpoint again, which is when the file is cut shorter."""
        def checkpoint(conn: sqlite3.Connection) -> None:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

        def vacuum(conn: sqlite3.Connection) -> None:
            conn.execute("PRAGMA incremental_vacuum(1000)").fetchall()
        self._run("checkpoint", checkpoint)
        self._run("maintain", vacuum)
        self._run("checkpoint", checkpoint)

    # --- shipper ------------------------------------------------------------------------

    def claim(self, limit: int, *, now: float, with_key_only: bool = False) -> list[Claimed]:
        key_filter = "AND api_key IS NOT NULL" if with_key_only else ""
        lease = next(_leases)

        def take(conn: sqlite3.Connection) -> list[tuple]:
            if self._use_returning:
                return conn.execute(CLAIM.format(key_filter=key_filter),
                                    (lease, now, limit)).fetchall()
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(CLAIM_NO_RETURNING.format(key_filter=key_filter), (lease, now, limit))
            rows = conn.execute(LEASED, (lease,)).fetchall()
            conn.execute("COMMIT")
            return rows
        rows = self._run("claim", take)
        rows.sort()  # by id: RETURNING has no defined order
        # The id a claim hands out is (row id, lease): see CLAIM.
        return [Claimed((row[0], lease), *row[1:]) for row in rows]

    def _leased(self, sql: str, ids: Iterable[Any], *params: Any) -> None:
        """``sql`` ("... WHERE") for the rows ``ids`` name, each only while it carries
        its claim's lease. One statement per lease and chunk, not executemany: each of
        its steps gives up the GIL and must win it back from the busy senders (~ms)."""
        by_lease: dict[int, list[int]] = {}
        for row_id, lease in ids:
            by_lease.setdefault(lease, []).append(row_id)
        if not by_lease:
            return

        statements = [(f"{sql} lease = ? AND id IN ({','.join('?' * len(chunk))})",
                       (*params, lease, *chunk))
                      for lease, row_ids in by_lease.items()
                      for chunk in (row_ids[at:at + IDS_PER_STATEMENT]
                                    for at in range(0, len(row_ids), IDS_PER_STATEMENT))]

        def run(conn: sqlite3.Connection) -> None:
            if len(statements) == 1:  # the common case: one autocommitted statement
                conn.execute(*statements[0])
                return
            conn.execute("BEGIN IMMEDIATE")
            for statement in statements:
                conn.execute(*statement)
            conn.execute("COMMIT")
        self._run("update", run)

    def ack(self, ids: Iterable[Any]) -> None:
        self._leased("DELETE FROM events WHERE", ids)

    def retry(self, entries: Iterable[Retry]) -> None:
        self._many("UPDATE events SET lease = NULL, due = ?, last_error = ? "
                   "WHERE id = ? AND lease = ?",
                   [(due, error, *i) for i, due, error in entries])

    def release(self, ids: Iterable[Any]) -> None:
        self._leased("UPDATE events SET lease = NULL WHERE", ids)

    def dead_letter(self, ids: Iterable[Any], *, status: int | None, reason: str,
                    now: float) -> None:
        rows = [(now, status, reason, *i) for i in ids]

        def run(conn: sqlite3.Connection) -> None:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(
                "INSERT INTO dead (path, query, api_key, created, attempts, failed_at, "
                "status, reason) SELECT path, query, api_key, created, attempts, ?, ?, ? "
                "FROM events WHERE id = ? AND lease = ?", rows)
            conn.executemany("DELETE FROM events WHERE id = ? AND lease = ?",
                             [r[3:] for r in rows])
            conn.execute("COMMIT")
        if rows:
            self._run("dead-letter", run)

    def expedite(self) -> int:
        return self._run("expedite", lambda c: c.execute(
            "UPDATE events SET due = 0 WHERE lease IS NULL AND due > 0").rowcount)

    def requests(self, *, dead: bool = False) -> list[tuple[str, str, str | None, float]]:
        def read(conn: sqlite3.Connection) -> list[tuple[str, str, str | None, float]]:
            rows = _table(conn, "dead" if dead else "events").rows_where(
                select="path, query, api_key, created", order_by="id")
            return [(row["path"], row["query"], row["api_key"], row["created"])
                    for row in rows]
        return self._run("read", read)

    def dead_letters(self) -> list[dict[str, Any]]:
        def read(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = _table(conn, "dead").rows_where(order_by="created, id")
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
        """In chunks that halve on a full disk, down to one row: the leases of a whole
        window in one transaction can need more room than the reserve holds, and a
        shipper killed on a full disk would leave its successor unable to start."""
        total, chunk = 0, IDS_PER_STATEMENT
        while True:
            try:
                given_back = self._run("recover", lambda c: c.execute(
                    "UPDATE events SET lease = NULL WHERE id IN (SELECT id FROM events "
                    "WHERE lease IS NOT NULL LIMIT ?)", (chunk,)).rowcount)
            except SpoolError as exc:
                if chunk == 1 or not self.out_of_room(exc):
                    raise
                chunk //= 2
                continue
            total += given_back
            if given_back < chunk:
                return total

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
            events = _table(conn, "events")
            conn.execute("BEGIN")  # one snapshot for all figures
            try:
                pending = events.count_where()
                in_flight = events.count_where("lease IS NOT NULL")
                dead = _table(conn, "dead").count_where()
                # ids grow with time, so the lowest id is the oldest event: O(1).
                oldest = next(events.rows_where(select="created", order_by="id", limit=1),
                              None)
            finally:
                conn.execute("COMMIT")
            return {
                "pending": pending,
                "in_flight": in_flight,
                "dead": dead,
                "oldest_pending_age_s": None if oldest is None
                else max(0.0, now - oldest["created"]),
            }
        return self._run("stats", read)

    def close(self) -> None:
        shared, self._shared = self._shared, CLOSED
        if shared is not CLOSED:
            sqlite_conn.leave(shared)


def _table(conn: sqlite3.Connection, name: str):
    """``name`` as a sqlite-utils table, for reading: inspection (status, export, dead
    letters) goes through sqlite-utils; the producer's INSERT and the claim do not."""
    import sqlite_utils  # here: ~0.1 s to import, which the producer side never pays
    db = sqlite_utils.Database(conn, recursive_triggers=False, execute_plugins=False)
    return sqlite_utils.db.Table(db, name)  # not db[name]: that asks for views first
