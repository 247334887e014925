"""What keeps a spool shippable while the daemon runs: housekeeping, the ballast that
gives it room on a full disk, and the salvage of a damaged SQLite file.

The daemon hands every SpoolError to ``Upkeep.failed``: on a full disk it gives up the
ballast and frees what delivered events held (a checkpoint, a vacuum), on a damaged
file it salvages; either way the next turn goes on at once. Nothing here stops the
daemon: what it cannot mend now it tries again on a later turn.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from .config import Config
from .errors import SpoolDamaged, SpoolError
from .spool import Spool, open_configured
from .spool.space import Ballast, is_disk_full

log = logging.getLogger("kmagent.daemon")

MAINTAIN_EVERY_S = 30.0
MAINTAIN_WHEN_LOW_S = 1.0  # near the reserve: give room back sooner
BALLAST_EVERY_S = 5.0  # how often a missing ballast is tried again


def salvage(path: Path):
    """Salvage the damaged SQLite spool at ``path`` (see spool/salvage.py)."""
    from .spool.salvage import Salvage
    from .spool.sqlite import SCHEMA
    job = Salvage(path, SCHEMA)
    job.start()
    return job


def open_for_shipping(config: Config, attempts: int = 3):
    """The configured spool, salvaged first if SQLite finds it damaged; and the salvage
    under way (None if none), whose rescans Upkeep finishes."""
    job = None
    for attempt in range(attempts):
        try:
            return open_configured(config), job
        except SpoolDamaged as exc:
            if attempt == attempts - 1:
                raise
            job = salvage(Path(exc.path))
    raise AssertionError("unreachable")


class Upkeep:
    """Housekeeping for one spool; ``tick`` every loop turn, ``failed`` on a SpoolError."""

    def __init__(self, spool: Spool, salvaging=None, *, keep_ballast: bool = True) -> None:
        """``keep_ballast``: allocate the ballast (the daemon); a flush only gives up
        the daemon's when it must."""
        self.spool = spool
        self.ballast = Ballast(spool.ballast_path, spool.keep_free)
        self.salvaging = salvaging
        self.keep_ballast = keep_ballast
        self._maintained = self._ballast_at = time.monotonic()
        if keep_ballast:
            self.ballast.take(spool.keep_free)

    def tick(self) -> None:
        now = time.monotonic()
        if self.salvaging is not None and self.salvaging.rescan():
            self.salvaging = None
        low = self.spool.space_low()
        if now - self._maintained >= (MAINTAIN_WHEN_LOW_S if low else MAINTAIN_EVERY_S):
            self._maintained = now
            self.spool.maintain()
        if self.keep_ballast and now - self._ballast_at >= BALLAST_EVERY_S:
            self._ballast_at = now
            self.ballast.take(self.spool.keep_free)

    def failed(self, exc: SpoolError) -> bool:
        """Mend what ``exc`` says, if it can be mended here; True if worth trying again
        at once."""
        if isinstance(exc, SpoolDamaged):
            if self.salvaging is not None:
                self.salvaging.rescan()  # a damaged fresh spool: finish the old first
            self.salvaging = salvage(Path(exc.path))
            return True
        if is_disk_full(exc):
            released = self.ballast.release()
            self._ballast_at = time.monotonic()  # not taken back at once
            try:
                self.spool.maintain()
            except SpoolError as again:
                log.debug("maintenance on a full disk: %s", again)
            return released
        return False
