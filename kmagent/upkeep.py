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
from .spool.space import Ballast, ballast_for, free_bytes, keep_free_bytes

log = logging.getLogger("kmagent.daemon")

MAINTAIN_EVERY_S = 30.0
MAINTAIN_WHEN_LOW_S = 1.0  # near the reserve: give room back sooner
SALVAGE_ROOM_EVERY_S = 0.2  # a salvage waiting for room: delivered rows' room back
BALLAST_EVERY_S = 5.0  # how often a missing ballast is tried again


def salvage(path: Path, keep_free: int, aside: Path | None = None):
    """Salvage the damaged SQLite spool at ``path``, or resume the salvage of its damaged
    copy ``aside`` (see spool/salvage.py); ``keep_free``: the spool's reserve."""
    from .spool.salvage import Salvage
    job = Salvage(path, keep_free)
    if aside is None:
        job.start()
    else:
        job.resume(aside)
    return job


def open_for_shipping(config: Config, attempts: int = 3):
    """The configured spool, salvaged first if SQLite finds it damaged; and the
    salvages begun here, whose rescans Upkeep finishes."""
    jobs = []
    for attempt in range(attempts):
        try:
            return open_configured(config), jobs
        except SpoolDamaged as exc:
            if attempt == attempts - 1:
                raise
            path = Path(exc.path)
            jobs.append(salvage(path, keep_free_bytes(config.keep_free, path.parent)))
        except SpoolError:
            # A disk filled while no daemon ran (a reboot, a restart): SQLite cannot even
            # make its -wal and -shm, and systemd would restart a daemon that exits 74
            # for ever. The ballast the last daemon left is the room to open in.
            if attempt == attempts - 1 or not _give_up_ballast_to_open(config):
                raise
    raise AssertionError("unreachable")


def room_is_short(config: Config) -> bool:
    """Whether the configured spool's filesystem has less free than its reserve."""
    directory = Path(config.spool_path).parent if config.spool_backend == "sqlite" \
        else Path(config.spool_path)
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    try:
        return free_bytes(directory) < keep_free_bytes(config.keep_free, directory)
    except OSError:
        return False


def _give_up_ballast_to_open(config: Config) -> bool:
    """Release the configured spool's ballast if its filesystem is out of room; True if
    that gave room back."""
    ballast = ballast_for(Path(config.spool_path), config.spool_backend)
    try:
        if free_bytes(ballast.parent) >= keep_free_bytes(config.keep_free, ballast.parent):
            return False  # there is room: the open failed for another reason
    except OSError:
        return False
    return Ballast(ballast, 0).release()


class Upkeep:
    """Housekeeping for one spool; ``tick`` every loop turn, ``failed`` on a SpoolError."""

    def __init__(self, spool: Spool, salvaging=(), *, keep_ballast: bool = True) -> None:
        """``salvaging``: the salvages under way; ``keep_ballast``: allocate the ballast
        (the daemon); a flush only gives up the daemon's when it must."""
        self.spool = spool
        self.ballast = Ballast(spool.ballast_path, spool.keep_free)
        self.salvaging = list(salvaging)
        self.keep_ballast = keep_ballast
        self._maintained = self._ballast_at = time.monotonic()
        if keep_ballast:
            self.ballast.take(spool.keep_free)

    def resume_salvages(self) -> None:
        """Take on the salvages a daemon before this one left part-way. Called holding
        the shipper lock: one copier at a time."""
        from .spool.salvage import unfinished
        from .spool.sqlite import SqliteSpool
        if not isinstance(self.spool, SqliteSpool):
            return
        begun = {job.aside for job in self.salvaging}
        # Newest first: a damaged copy that was a salvage's fresh spool brings that
        # salvage's marks, which the older copy's resume then reads.
        for aside in reversed(unfinished(self.spool.path)):
            if aside not in begun:
                try:
                    self.salvaging.append(salvage(self.spool.path, self.spool.keep_free, aside))
                except SpoolError as exc:
                    log.error("cannot resume the salvage of %s: %s", aside.name, exc)

    def tick(self) -> None:
        now = time.monotonic()
        self._salvage()
        self.spool.rotate()
        low = self.spool.space_low()
        if now - self._maintained >= (MAINTAIN_WHEN_LOW_S if low else MAINTAIN_EVERY_S):
            self._maintained = now
            self.spool.maintain()
        if self.keep_ballast and now - self._ballast_at >= BALLAST_EVERY_S \
                and not any(job.needs_room for job in self.salvaging):
            self._ballast_at = now
            self.ballast.take(self.spool.keep_free)

    def wait_at_most(self) -> float | None:
        """How long the loop may sleep before ``tick`` has work (None: no limit)."""
        if any(job.needs_room for job in self.salvaging):
            return SALVAGE_ROOM_EVERY_S  # copy on as soon as delivered rows free room
        return None

    def failed(self, exc: SpoolError) -> bool:
        """Mend what ``exc`` says, if it can be mended here; True if worth trying again
        at once."""
        if isinstance(exc, SpoolDamaged):
            self._salvage()  # a damaged fresh spool: finish the old first
            try:
                self.salvaging.append(salvage(Path(exc.path), self.spool.keep_free))
            except SpoolError as again:  # e.g. the open-lock held: the next turn retries
                log.error("salvage postponed: %s", again)
                return False
            return True
        if self.spool.out_of_room(exc):
            return self._make_room()
        return False

    def _salvage(self) -> None:
        """Carry the salvages on; a copy stopped by a full disk gets the ballast's room,
        and a finished one gives up its damaged copy if the spool needs the room."""
        for job in list(self.salvaging):
            if job.rescan():
                self.salvaging.remove(job)
                if self.spool.space_low():
                    job.remove_for_room()
            elif job.needs_room:
                # Room for the copy comes from delivered rows: give theirs back sooner
                # than the once a second of a low disk.
                self.ballast.release()
                self._ballast_at = time.monotonic()
                if self._ballast_at - self._maintained >= SALVAGE_ROOM_EVERY_S:
                    self._maintained = self._ballast_at
                    try:
                        self.spool.maintain()
                    except SpoolError as exc:
                        log.debug("maintenance for the salvage: %s", exc)

    def _make_room(self) -> bool:
        released = self.ballast.release()
        self._ballast_at = time.monotonic()  # not taken back at once
        try:
            self.spool.maintain()
        except SpoolError as again:
            log.debug("maintenance on a full disk: %s", again)
        return released
