"""``[km_log] dirs``: the daemon imports what the apps log, as they log it."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from ..spool import Spool
from .importer import CHUNK_BYTES, KmLogImporter

log = logging.getLogger("kmagent.kmlog")


class KmLogFollower:
    """Imports at most every ``FOLLOW_EVERY_S`` (the loop turns on every finished
    request) and a chunk at a time (the loop must keep shipping and pinging systemd's
    watchdog); takes each query log over every ``TAKE_OVER_EVERY_S``, so that what was
    read is deleted without a rename for every few lines. Never raises: a log it
    cannot read, or a full spool, is said once and shipping goes on."""

    FOLLOW_EVERY_S = 0.25
    TAKE_OVER_EVERY_S = 5.0

    def __init__(self, spool: Spool) -> None:
        self._importer = KmLogImporter(spool, take_over_every=self.TAKE_OVER_EVERY_S)
        self._last = -self.FOLLOW_EVERY_S
        self._said: set[str] = set()  # problems already logged, until they clear

    def follow(self, directories: tuple[Path, ...]) -> bool:
        """Import what is new; True if more is waiting (call again soon)."""
        if not directories or time.monotonic() - self._last < self.FOLLOW_EVERY_S:
            return False
        self._last = time.monotonic()
        try:
            result = self._importer.import_dirs(list(directories), budget=CHUNK_BYTES,
                                                wait=False)  # `kmagent import` is at it
        except Exception as exc:  # e.g. the spool is full: the shipper must go on
            self._say(f"cannot import km logs: {exc}")
            return False
        problems = set(result.errors)
        for problem in problems - self._said:
            log.error("cannot import km logs: %s", problem)
        self._said = problems
        if result.imported:
            log.info("imported %d events from km logs", result.imported)
        for reason, count in sorted(result.set_aside.items()):
            log.warning("%d km log records set aside in %s: %s", count, result.bad_path,
                        reason)
        return result.more

    def _say(self, problem: str) -> None:
        if problem not in self._said:
            log.error("%s", problem)
            self._said = {problem}
