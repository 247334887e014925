"""A damaged SQLite spool: kept aside, and every readable row saved, once.

A spool file can be damaged by a bad disk or a lost lock (see sqlite_conn). Once SQLite
says so, the daemon renames the file (with its -wal and -shm, so that what was
committed stays readable) to ``<spool>.damaged-<UTC time>``, lets a fresh spool take
its place, and copies into it every row it can still read: a damaged page costs the
rows on it, not the spool. Producers that had the old file open notice that its name
now leads elsewhere (they look every half second, with the size check) and follow;
what they wrote into the old file meanwhile is picked up by rescans of it over the
next minute.

The copy survives the daemon's death. It goes in chunks, each committed in the fresh
spool together with how far the copy has come (table ``salvage_progress``), so a
daemon killed at any point leaves a copy that the next one finishes, without copying
a row twice; a damaged copy counts as finished once a "done" line for it is in
``<spool>.salvage.json`` (which also keeps what each salvage saved, for ``status``).
On a full disk the chunks shrink, down to one row, and when even that finds no room
the copy waits for delivered rows to give theirs back, while the daemon ships.

While the files are renamed, nobody opens the spool: every opener holds a shared flock
of ``<spool>.open-lock`` while it opens (an exclusive one here), so no process can pair
the new database with the old WAL, which SQLite would replay into it.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ..errors import SpoolError
from . import sqlite_conn
from .files import append_to
from .space import free_bytes, is_disk_full

log = logging.getLogger("kmagent.spool")

# What each table's rows carry into the fresh spool (ids are new there).
COPIED = {
    "events": ("path, query, api_key, created, attempts, last_error",
               "INSERT INTO events (path, query, api_key, created, attempts, last_error, due)"
               " VALUES (?, ?, ?, ?, ?, ?, 0)"),
    "dead": ("path, query, api_key, created, attempts, failed_at, status, reason",
             "INSERT INTO dead (path, query, api_key, created, attempts, failed_at, status,"
             " reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"),
}
BATCH = 500  # rows read, and at most rows copied, per transaction
PROBE_SPAN = 10_000  # ids probed one by one past a damaged page when the top is unknown
RESCAN_AFTER_S = (1.0, 5.0, 20.0, 60.0)  # for rows written by producers not yet following
ROW_OVERHEAD = 64  # bytes a row costs beyond its text, roughly (a page is 4,096)
COMMIT_OVERHEAD = 3 * 4096  # the pages a commit writes beside the rows' own
ROOM_RETRY_S = 0.2  # how often a copy stopped by a full disk tries again (cheap)
FINISHED_STATES = (None, "done", "removed")  # None: a line from before states existed


def report_path(path: Path) -> Path:
    return path.with_name(path.name + ".salvage.json")


def _report_lines(path: Path) -> list[dict[str, Any]]:
    try:
        lines = report_path(path).read_bytes().splitlines()
    except OSError:
        return []
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line torn by a full disk
        if isinstance(record, dict) and "kept_as" in record:
            records.append(record)
    return records


def last_salvage(path: Path) -> dict[str, Any] | None:
    """The latest salvage of the spool at ``path`` (what status shows), or None."""
    records = _report_lines(path)
    return records[-1] if records else None


def unfinished(path: Path) -> list[Path]:
    """The damaged copies beside ``path`` whose rows are not all known to be copied: a
    salvage that a dead daemon left part-way (or before it could say it was done)."""
    finished, saved = set(), {}
    for record in _report_lines(path):
        name = Path(record["kept_as"]).name
        saved[name] = record.get("saved", 0)
        if record.get("state") in FINISHED_STATES:
            finished.add(name)
        else:
            finished.discard(name)
    prefix = f"{path.name}.damaged-"
    return sorted((p for p in path.parent.glob(prefix + "*")
                   if p.name.endswith("Z") and p.name not in finished), key=_aside_order)


def _aside_order(aside: Path) -> tuple[str, int]:
    """Oldest first: by time, then by the number a second copy in the same second got."""
    stamp = aside.name.rsplit(".damaged-", 1)[1].rstrip("Z")
    when, _, n = stamp.partition(".")
    return when, int(n) if n.isdigit() else 1


class Salvage:
    """One damaged copy being saved: ``start`` (puts the file aside) or ``resume`` (a
    copy left part-way), then ``rescan`` every daemon turn until it says finished."""

    def __init__(self, path: Path, keep_free: int = 0) -> None:
        """``keep_free``: the spool's reserve, which the copy leaves whole, as producers
        do: it is the shipper's, whose claims and acks need room to free any (a copy
        that took part of it wedged a full disk: no claim could be written)."""
        self.path = path
        self.keep_free = keep_free
        self.aside: Path | None = None
        self.saved = 0
        self.unreadable = 0
        self.started = 0.0
        self.needs_room = False  # the copy stopped on a full disk; tried again later
        self._after = {table: 0 for table in COPIED}
        self._chunk = BATCH
        self._rescans: list[float] = []
        self._room_at = 0.0
        self._damaged: sqlite3.Connection | None = None
        self._marks_carried = False

    def start(self) -> None:
        """Put the damaged file aside, let a fresh spool take its place, save the rows."""
        self.started = time.time()
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(self.started))
        self.aside = self.path.with_name(f"{self.path.name}.damaged-{stamp}Z")
        for n in range(2, 1000):  # a second salvage within the second must not overwrite
            if not os.path.lexists(self.aside):
                break
            self.aside = self.path.with_name(f"{self.path.name}.damaged-{stamp}.{n}Z")
        with sqlite_conn.opening(self.path, exclusive=True):
            for suffix in ("", "-wal", "-shm"):
                try:
                    os.rename(f"{self.path}{suffix}", f"{self.aside}{suffix}")
                except FileNotFoundError:
                    pass
        sqlite_conn.retire(self.path)  # this process's handles follow to the fresh file
        self._begin()
        log.error("spool %s was damaged: kept aside as %s; %d events saved into a fresh "
                  "spool, %d could not be read%s", self.path, self.aside.name, self.saved,
                  self.unreadable, "; more once the disk has room" if self.needs_room else "")

    def resume(self, aside: Path) -> None:
        """Finish the copy of ``aside`` that a daemon before this one began."""
        self.aside = aside
        previous = [r for r in _report_lines(self.path) if Path(r["kept_as"]).name == aside.name]
        self.started = previous[-1].get("at", time.time()) if previous else time.time()
        self.saved = previous[-1].get("saved", 0) if previous else 0
        before = self.saved
        self._after = self._progress()
        self._begin()
        log.warning("spool %s: the salvage of %s resumed; %d more events saved", self.path,
                    aside.name, self.saved - before)

    def rescan(self) -> bool:
        """Copy what is left, or what producers wrote to the damaged file since; True
        once finished (the copy whole and the rescans over)."""
        now = time.monotonic()
        if self.needs_room and now >= self._room_at:
            self._copy_and_report()
        elif self._rescans and now >= self._rescans[0]:
            self._rescans.pop(0)
            self._copy_and_report()
        if self._rescans or self.needs_room:
            return False
        self._report("done")
        if self._damaged is not None:
            self._damaged.close()
            self._damaged = None
        return True

    def remove_for_room(self) -> None:
        """The salvage is finished and the filesystem is short of room: the damaged
        copy goes (every row of it that could be read is in the fresh spool)."""
        for suffix in ("", "-wal", "-shm"):
            try:
                os.unlink(f"{self.aside}{suffix}")
            except FileNotFoundError:
                pass
        log.error("spool %s: the damaged copy %s removed to give its room to the spool "
                  "(its %d readable events were all saved)", self.path, self.aside.name,
                  self.saved)
        self._report("removed")

    def _begin(self) -> None:
        try:
            self._damaged = sqlite3.connect(self.aside, isolation_level=None,
                                            check_same_thread=False)
            try:  # its WAL into the file and cut back: room for the copy on a full disk
                self._damaged.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            except sqlite3.DatabaseError as exc:
                log.debug("checkpoint of %s: %s", self.aside.name, exc)
        except sqlite3.Error as exc:
            log.error("spool %s: cannot read the damaged copy %s: %s", self.path,
                      self.aside, exc)
        self._rescans = [time.monotonic() + s for s in RESCAN_AFTER_S]
        self._copy_and_report()

    def _copy_and_report(self) -> None:
        before = self.saved
        self._copy()
        if self.saved > before or not self.needs_room:
            self._report("copying")

    def _copy(self) -> None:
        """Copy every readable row past the progress mark, chunk by chunk."""
        if self._damaged is None:
            return
        if not self._marks_carried:
            self._carry_marks()
        self.needs_room = False
        unreadable = 0
        for table in COPIED:
            rows = ReadableRows(self._damaged, table, COPIED[table][0], self._after[table])
            chunk: list[tuple] = []
            try:
                for row in rows:
                    chunk.append(row)
                    if len(chunk) >= BATCH:
                        self._store(table, chunk)
                        chunk = []
                self._store(table, chunk)
            except _NoRoom:
                self.needs_room = True
                self._room_at = time.monotonic() + ROOM_RETRY_S
                return  # the rest waits for room; nothing past the mark is lost
            unreadable += rows.unreadable
        self.unreadable = max(self.unreadable, unreadable)

    def _store(self, table: str, rows: list[tuple]) -> None:
        """Commit ``rows`` in chunks as large as the disk allows, each with its mark."""
        while rows:
            chunk = self._fitting(rows[:self._chunk])
            try:
                self._commit(table, chunk)
            except SpoolError as exc:
                if not is_disk_full(exc):
                    raise
                if self._chunk == 1:
                    raise _NoRoom from None
                self._chunk = max(1, len(chunk) // 2)
                continue
            rows = rows[len(chunk):]

    def _fitting(self, rows: list[tuple]) -> list[tuple]:
        """As many of ``rows`` as the filesystem takes above the reserve (twice their
        size, the WAL then the database, and a commit's own pages). While the fresh
        spool has rows to ship, the reserve is theirs, whole; once it has none, nothing
        more will free room, so a few rows may go into half of it (their claim needs
        little)."""
        try:
            floor = self.keep_free if self._fresh_has_rows() else self.keep_free // 2
            room = free_bytes(self.path.parent) - floor - COMMIT_OVERHEAD
        except OSError:
            return rows
        for n, row in enumerate(rows):
            room -= 2 * (ROW_OVERHEAD + sum(len(v) for v in row if isinstance(v, str)))
            if room < 0:
                if n == 0:
                    raise _NoRoom
                return rows[:n]
        return rows

    @contextmanager
    def _fresh(self) -> Iterator[sqlite3.Connection]:
        """This process's connection to the fresh spool, held for the block."""
        shared = sqlite_conn.join(self.path, "normal")
        try:
            with shared.held():
                yield shared.conn
        finally:
            sqlite_conn.leave(shared)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction in the fresh spool; sqlite3 errors become SpoolError."""
        try:
            with self._fresh() as conn:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:  # SQLite rolls back by itself on a full disk
                        conn.execute("ROLLBACK")
                    raise
        except sqlite3.Error as exc:
            raise sqlite_conn.spool_error(self.path, "salvage failed", exc) from exc

    def _fresh_has_rows(self) -> bool:
        try:
            with self._fresh() as conn:
                return conn.execute("SELECT 1 FROM events LIMIT 1").fetchone() is not None
        except sqlite3.Error:
            return True

    def _commit(self, table: str, rows: list[tuple]) -> None:
        with self._transaction() as conn:
            # Read again inside the transaction: whoever else copied this file (a daemon
            # before us) is never copied over.
            mark = conn.execute("SELECT after FROM salvage_progress WHERE kept_as = ? AND "
                                "tbl = ?", (self.aside.name, table)).fetchone()
            after = max(rows[-1][0], mark[0] if mark else 0)
            fresh = [row for row in rows if mark is None or row[0] > mark[0]]
            conn.executemany(COPIED[table][1], [row[1:] for row in fresh])
            conn.execute("INSERT OR REPLACE INTO salvage_progress VALUES (?, ?, ?)",
                         (self.aside.name, table, after))
        self._after[table] = after
        if table == "events":
            self.saved += len(fresh)

    def _carry_marks(self) -> None:
        """A damaged spool that was itself a salvage's fresh spool holds that salvage's
        marks: they come along (with its rows), so that the older damaged copy, resumed,
        is not copied again from its start."""
        try:
            marks = self._damaged.execute(
                "SELECT kept_as, tbl, after FROM salvage_progress").fetchall()
        except sqlite3.DatabaseError:
            marks = []  # none, or unreadable: then the older copy is copied again
        with self._transaction() as conn:
            for kept_as, table, after in marks:
                conn.execute("INSERT INTO salvage_progress VALUES (?, ?, ?) ON CONFLICT "
                             "DO UPDATE SET after = max(after, excluded.after)",
                             (kept_as, table, after))
        self._marks_carried = True

    def _progress(self) -> dict[str, int]:
        after = {table: 0 for table in COPIED}
        try:
            with self._fresh() as conn:
                for table, mark in conn.execute(
                        "SELECT tbl, after FROM salvage_progress WHERE kept_as = ?",
                        (self.aside.name,)):
                    after[table] = mark
        except sqlite3.OperationalError:
            pass  # no table: nothing was copied yet
        return after

    def _report(self, state: str) -> None:
        record = {"at": self.started, "kept_as": str(self.aside), "saved": self.saved,
                  "unreadable": self.unreadable, "state": state}
        try:
            append_to(report_path(self.path), json.dumps(record).encode() + b"\n")
        except OSError as exc:  # a full disk: "done" is written again by the next daemon
            log.error("spool %s: cannot record the salvage: %s", self.path, exc.strerror)


class _NoRoom(Exception):
    """Not even one row finds room in the fresh spool."""


class ReadableRows:
    """Every row of ``table`` past id ``after`` that can be read, in id order; then
    ``unreadable``: how many ids at most could not be read. Rows are read in runs;
    where a run breaks on a damaged page, ids are probed one by one until a readable
    row is found, and a run starts again from there (a range seek goes round the
    damaged page)."""

    def __init__(self, conn: sqlite3.Connection, table: str, columns: str,
                 after: int = 0) -> None:
        self.conn, self.table, self.after = conn, table, after
        self.select = f"SELECT id, {columns} FROM {table}"
        self.unreadable = 0

    def __iter__(self) -> Iterator[tuple]:
        top = _top_id(self.conn, self.table)
        after = self.after
        while True:
            try:
                rows = self.conn.execute(
                    f"{self.select} WHERE id > ? ORDER BY id LIMIT {BATCH}", (after,)
                ).fetchall()
            except sqlite3.DatabaseError:
                rows = None
            if rows:
                yield from rows
                after = rows[-1][0]
                continue
            if rows is not None:
                return  # the end
            row = self._probe(after, top if top is not None and top > after
                              else after + PROBE_SPAN)
            if row is None:
                return
            yield row
            after = row[0]

    def _probe(self, after: int, limit: int) -> tuple | None:
        for probe in range(after + 1, limit + 1):
            try:
                row = self.conn.execute(f"{self.select} WHERE id = ?", (probe,)).fetchone()
            except sqlite3.DatabaseError:
                self.unreadable += 1
                continue
            if row is not None:
                return row
        return None


def _top_id(conn: sqlite3.Connection, table: str) -> int | None:
    try:
        return conn.execute(f"SELECT max(id) FROM {table}").fetchone()[0] or 0
    except sqlite3.DatabaseError:
        return None
