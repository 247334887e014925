"""The SQLite spool's tables, and the upgrade of a spool made by an older kmagent.

The format is the file's ``PRAGMA user_version``. A new file gets the whole schema;
a file of an older format is upgraded in place, one step at a time, each step and the
new version in the same transaction as the check of the old one (two processes that
open it at once: one upgrades, the other finds it done). Nothing is copied: a step
only adds what the format needs, so every event stays where it is.

Since format 2 the file also says which kmagent may still write to it: ``writable_by``
in table ``kmagent_format``, the oldest format whose code understands enough of this
one to append and ship safely. A kmagent that finds a newer format refuses it only if
it is older than that; so an additive step (a table, an index) can leave apps with
the previous kmagent recording. Format 1 code, made before the record existed, refuses
anything newer: apps on it must be upgraded with the daemon (README, "Upgrading").

sqlite-utils creates the tables (and, for ``kmagent dead list`` and the tests, reads
them); it is imported only here, when a file is created or upgraded, so a producer
that opens an existing spool never pays for the import. Partial indexes, which
sqlite-utils does not make, are plain SQL.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Callable

from ..errors import SpoolError

FORMAT_VERSION = 2
WRITABLE_BY = 2  # format 1 code cannot know that format 2 allows it (see above)

# Partial indexes: the claim walks past only what is leased or backed off.
INDEXES = (
    "CREATE INDEX events_backoff ON events(due) WHERE due > 0 AND lease IS NULL",
    "CREATE INDEX events_leased ON events(lease) WHERE lease IS NOT NULL",
    # Without a key of its own the agent claims only events that carry one; this keeps
    # that claim cheap however many keyless events wait (keyless rows never enter it).
    "CREATE INDEX events_keyed ON events(id) WHERE api_key IS NOT NULL AND lease IS NULL",
)


def _format_1(db) -> None:
    """Events waiting or in flight, and dead letters."""
    db["events"].create({"id": int, "path": str, "query": str, "api_key": str,
                         "created": float, "due": float, "attempts": int, "lease": int,
                         "last_error": str},
                        pk="id", not_null={"path", "query", "created", "due", "attempts"},
                        defaults={"attempts": 0})
    for statement in INDEXES:
        db.execute(statement)
    db["dead"].create({"id": int, "path": str, "query": str, "api_key": str,
                       "created": float, "attempts": int, "failed_at": float,
                       "status": int, "reason": str},
                      pk="id", not_null={"path", "query", "created", "attempts",
                                         "failed_at", "reason"})


def _format_2(db) -> None:
    """A salvage's progress marks (salvage.py), kept in the fresh spool with each chunk
    it copies; and which formats' code may write to the file."""
    db["salvage_progress"].create({"kept_as": str, "tbl": str, "after": int},
                                  pk=("kept_as", "tbl"), not_null={"kept_as", "tbl", "after"},
                                  if_not_exists=True)
    db["kmagent_format"].create({"writable_by": int}, not_null={"writable_by"})
    db["kmagent_format"].insert({"writable_by": WRITABLE_BY})


# STEPS[n] turns format n into n + 1 (STEPS[0] makes a new file format 1).
STEPS: tuple[Callable, ...] = (_format_1, _format_2)
assert len(STEPS) == FORMAT_VERSION


def writable(conn: sqlite3.Connection, path: Path, version: int) -> None:
    """Raise SpoolError unless this kmagent may use a spool of format ``version``."""
    if version <= FORMAT_VERSION:
        return
    try:
        row = conn.execute("SELECT max(writable_by) FROM kmagent_format").fetchone()
    except sqlite3.OperationalError:
        row = None
    if row is None or row[0] is None or row[0] > FORMAT_VERSION:
        raise SpoolError(f"spool {path}: format {version} is newer than this kmagent "
                         f"understands ({FORMAT_VERSION}); upgrade kmagent")


def install(conn: sqlite3.Connection, version: int) -> None:
    """Make a new file (``version`` 0) or upgrade an older one to FORMAT_VERSION."""
    import sqlite_utils  # here only: ~0.1 s to import, and only creation needs it
    if version == 0:
        # Both before the first table: auto_vacuum lets the file shrink as delivered
        # rows go (PRAGMA incremental_vacuum); WAL is persistent.
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("BEGIN IMMEDIATE")  # two processes at once: one does it
    try:
        found = conn.execute("PRAGMA user_version").fetchone()[0]
        db = sqlite_utils.Database(conn, execute_plugins=False)
        for step in STEPS[found:]:
            step(db)
        if found < FORMAT_VERSION:
            conn.execute(f"PRAGMA user_version = {FORMAT_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:  # SQLite rolls back by itself on a full disk
            conn.execute("ROLLBACK")
        raise
    # The new pages into the file and the WAL cut back: a spool's size (max_bytes)
    # counts its WAL, and a small max_bytes must not be taken by the schema's frames.
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
