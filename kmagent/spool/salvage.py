"""A damaged SQLite spool: kept aside, never deleted, and every readable row saved.

A spool file can be damaged by a bad disk or a lost lock (see sqlite_conn). Once SQLite
says so, the daemon renames the file (with its -wal and -shm, so that what was
committed stays readable) to ``<spool>.damaged-<UTC time>``, lets a fresh spool take
its place, and copies into it every row it can still read: a damaged page costs the
rows on it, not the spool. Producers that had the old file open notice that its name
now leads elsewhere (they look every half second, with the size check) and follow;
what they wrote into the old file meanwhile is picked up by rescans of it over the
next minute. ``<spool>.salvage.json`` keeps what each salvage saved, for ``status``.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import sqlite_conn
from .files import append_to

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
BATCH = 500
PROBE_SPAN = 10_000  # ids probed one by one past a damaged page when the top is unknown
RESCAN_AFTER_S = (1.0, 5.0, 20.0, 60.0)  # for rows written by producers not yet following


def report_path(path: Path) -> Path:
    return path.with_name(path.name + ".salvage.json")


def last_salvage(path: Path) -> dict[str, Any] | None:
    """The latest salvage of the spool at ``path`` (what status shows), or None."""
    try:
        lines = report_path(path).read_bytes().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return None


@dataclass
class Salvage:
    """One salvage: started by ``start``, finished by ``rescan`` calls over a minute."""

    path: Path
    schema: tuple[str, ...]
    aside: Path | None = None
    saved: int = 0
    unreadable: int = 0
    started: float = 0.0
    _seen: dict[str, set[int]] = field(default_factory=lambda: {t: set() for t in COPIED})
    _rescans: list[float] = field(default_factory=list)
    _damaged: sqlite3.Connection | None = None

    def start(self) -> None:
        """Put the damaged file aside, open a fresh spool in its place, save the rows."""
        self.started = time.time()
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self.started))
        self.aside = self.path.with_name(f"{self.path.name}.damaged-{stamp}")
        with sqlite_conn.opening(self.path, exclusive=True):
            for suffix in ("", "-wal", "-shm"):
                try:
                    os.rename(f"{self.path}{suffix}", f"{self.aside}{suffix}")
                except FileNotFoundError:
                    pass
        sqlite_conn.retire(self.path)  # this process's handles follow to the fresh file
        try:
            self._damaged = sqlite3.connect(self.aside, isolation_level=None,
                                            check_same_thread=False)
        except sqlite3.Error as exc:
            log.error("spool %s: cannot read the damaged copy %s: %s", self.path,
                      self.aside, exc)
        self._copy()
        self._rescans = [time.monotonic() + s for s in RESCAN_AFTER_S]
        log.error("spool %s was damaged: kept aside as %s; %d events saved into a fresh "
                  "spool, %d could not be read", self.path, self.aside.name, self.saved,
                  self.unreadable)
        self._report()

    def rescan(self) -> bool:
        """Copy what producers wrote to the damaged file since; True once finished."""
        if self._rescans and time.monotonic() >= self._rescans[0]:
            self._rescans.pop(0)
            before = self.saved
            self._copy()
            if self.saved > before:
                log.warning("spool %s: %d more events saved from %s", self.path,
                            self.saved - before, self.aside.name)
                self._report()
        if self._rescans:
            return False
        if self._damaged is not None:
            self._damaged.close()
            self._damaged = None
        return True

    def _copy(self) -> None:
        if self._damaged is None:
            return
        unreadable = 0
        for table, (columns, insert) in COPIED.items():
            rows, missed = readable_rows(self._damaged, table, columns, self._seen[table])
            unreadable += missed
            if rows:
                self._store(insert, rows)
                self._seen[table].update(row[0] for row in rows)
                if table == "events":
                    self.saved += len(rows)
        self.unreadable = max(self.unreadable, unreadable)

    def _store(self, insert: str, rows: list[tuple]) -> None:
        shared = sqlite_conn.join(self.path, "normal", self.schema)
        try:
            with shared.held():
                conn = shared.conn
                conn.execute("BEGIN IMMEDIATE")
                try:
                    conn.executemany(insert, [row[1:] for row in rows])
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
        except sqlite3.Error as exc:
            raise sqlite_conn.spool_error(self.path, "salvage failed", exc) from None
        finally:
            sqlite_conn.leave(shared)

    def _report(self) -> None:
        record = {"at": self.started, "kept_as": str(self.aside), "saved": self.saved,
                  "unreadable": self.unreadable}
        try:
            append_to(report_path(self.path), json.dumps(record).encode() + b"\n")
        except OSError as exc:
            log.error("spool %s: cannot record the salvage: %s", self.path, exc.strerror)


def readable_rows(conn: sqlite3.Connection, table: str, columns: str,
                  seen: set[int]) -> tuple[list[tuple], int]:
    """Every row of ``table`` that can be read, in id order, but those in ``seen``; and
    how many ids at most could not be read. Rows are read in runs; where a run breaks
    on a damaged page, ids are probed one by one until a readable row is found, and a
    run starts again from there (a range seek goes round the damaged page)."""
    found: list[tuple] = []
    unreadable, after = 0, 0
    top = _top_id(conn, table)
    select = f"SELECT id, {columns} FROM {table}"
    while True:
        read = 0
        try:
            for row in conn.execute(f"{select} WHERE id > ? ORDER BY id LIMIT {BATCH}",
                                    (after,)):
                read += 1
                after = row[0]
                if row[0] not in seen:
                    found.append(row)
            if read == 0:
                break
            continue
        except sqlite3.DatabaseError:
            pass
        limit = top if top is not None and top > after else after + PROBE_SPAN
        probe, resumed = after + 1, False
        while probe <= limit and not resumed:
            try:
                row = conn.execute(f"{select} WHERE id = ?", (probe,)).fetchone()
            except sqlite3.DatabaseError:
                unreadable += 1
                row = None
            probe += 1
            if row is not None:
                resumed, after = True, row[0]
                if row[0] not in seen:
                    found.append(row)
        if not resumed:
            break
    return found, unreadable


def _top_id(conn: sqlite3.Connection, table: str) -> int | None:
    try:
        return conn.execute(f"SELECT max(id) FROM {table}").fetchone()[0] or 0
    except sqlite3.DatabaseError:
        return None
