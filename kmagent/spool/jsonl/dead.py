"""A jsonl spool's dead letters: ``dead.jsonl``, one JSON object per line (``id``,
``status``, ``reason``, ``failed_at`` and the event's original ``line``).

The shipper appends to it; ``kmagent dead`` commands read it and rewrite it whole
(retry, purge). Both hold ``dead.lock`` (an flock) while they do, so that a rewrite
never drops a letter appended meanwhile."""

from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from ...events import Event
from ..files import append_to, flocked, write_atomically
from ..records import unknown_ids
from .layout import DEAD, DEAD_LOCK, dump_line
from .line import from_line


class DeadLetters:
    """The dead-letter file of the spool in ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / DEAD
        self._lock_path = directory / DEAD_LOCK

    @contextmanager
    def _locked(self) -> Iterator[None]:
        fd = flocked(self._lock_path, create=True)
        try:
            yield
        finally:
            os.close(fd)

    def add(self, records: list[dict[str, Any]]) -> None:
        """Append ``records``, synced: their lines may be settled (and go) after."""
        with self._locked():
            append_to(self.path, b"".join(dump_line(r) for r in records), sync=True)

    def count(self) -> int:
        try:
            return self.path.read_bytes().count(b"\n")
        except FileNotFoundError:
            return 0

    def highest_file_number(self) -> int:
        """The highest file number a letter's id names (0 if none): a checkpoint rebuilt
        must not give a number again that a dead letter's id already uses."""
        try:
            return max((int(m) for m in re.findall(rb'"id":"(\d+):', self.path.read_bytes())),
                       default=0)
        except FileNotFoundError:
            return 0

    def read(self) -> list[dict[str, Any]]:
        """Every letter once, in the order the events were recorded."""
        try:
            text = self.path.read_bytes()
        except FileNotFoundError:
            return []
        records: dict[str, dict[str, Any]] = {}
        for line in text.split(b"\n"):
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a record torn by a full disk: its event was not settled
            # A crash between writing a dead letter and settling its line writes it
            # twice on the next run: one id, one letter.
            records.setdefault(record["id"], record)
        # In the order the events were recorded (the spool's), as on SQLite, not in the
        # order concurrent sends happened to fail.
        return sorted(records.values(), key=lambda r: tuple(map(int, r["id"].split(":"))))

    def take(self, ids: list[str] | None,
             requeue: Callable[[list[Event]], None] | None = None) -> int:
        """Remove the letters ``ids`` (None: all), handing their events to ``requeue``
        first if given; refuses ids it does not hold. How many it took."""
        with self._locked():
            records = self.read()
            unknown_ids(ids, (r["id"] for r in records))
            chosen = [r for r in records if ids is None or r["id"] in ids]
            if requeue is not None and chosen:
                requeue([event_of(r)[0] for r in chosen])
            write_atomically(self.path, b"".join(dump_line(r) for r in records
                                                  if r not in chosen))
        return len(chosen)


def event_of(record: dict[str, Any]) -> tuple[Event, float]:
    """The event a dead letter holds (its original line, as an object), and when that
    line was written."""
    return from_line(json.dumps(record["line"]).encode())
