"""The figures behind ``kmagent status`` and ``kmagent.status()``."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .config import Config, load_config
from .errors import SpoolDamaged
from .lock import ShipperLock
from .metrics import Published
from .spool import Spool, open_configured
from .spool.salvage import last_salvage


@dataclass
class Status:
    """What ``kmagent status`` reports (the README lists the fields); ``to_json()`` is
    ``kmagent status --json`` and ``kmagent.status()``."""

    pending: int = 0
    in_flight: int = 0
    concurrency: int | None = None  # the running shipper's, now
    dead: int = 0
    oldest_pending_age_s: float | None = None
    dropped_total: int = 0
    delivered_total: int = 0
    retried_total: int = 0
    dead_total: int = 0  # dead letters made, ever (those purged too)
    last_success_at: float | None = None
    last_error_at: float | None = None
    last_error: str | None = None
    rate_1m: float = 0.0
    daemon_pid: int | None = None
    spool: str = ""
    exists: bool = False
    salvaged: dict[str, Any] | None = None  # the latest salvage of a damaged SQLite file
    # Only when they apply: left out of the JSON otherwise.
    bad_lines: int | None = None  # jsonl: lines no event could be read from
    checkpoint_rebuilt_at: float | None = None  # jsonl: when its checkpoint was rebuilt
    damaged: str | None = None  # SQLite says the file is damaged; the daemon salvages it

    def count(self, spool: Spool) -> None:
        """Take the spool's own figures: pending, in flight, dead, dropped..."""
        for name, value in spool.stats(time.time()).items():
            setattr(self, name, value)
        self.dropped_total = spool.dropped_total()

    def take(self, published: Published) -> None:
        """Fold in a daemon's published figures: its totals, and, if it is the one that
        holds the spool now (``daemon_pid``), its rate and what it has in flight."""
        for name in ("delivered_total", "retried_total", "dead_total", "last_success_at",
                     "last_error_at", "last_error"):
            setattr(self, name, getattr(published, name))
        running = self.daemon_pid is not None and published.pid == self.daemon_pid
        # The rate and what is in flight belong to the running shipper; claims die with it.
        self.rate_1m = published.rate_1m if running else 0.0
        if self.daemon_pid is None:
            self.in_flight = 0
        elif running:
            self.in_flight = published.in_flight
            self.concurrency = published.concurrency

    def to_json(self) -> dict[str, Any]:
        figures = asdict(self)
        if self.bad_lines is None:  # not a jsonl spool
            del figures["bad_lines"], figures["checkpoint_rebuilt_at"]
        if self.damaged is None:
            del figures["damaged"]
        return figures


def read_status(config: str | os.PathLike | Config | None = None, *,
                spool: str | os.PathLike | None = None) -> Status:
    """Every field of ``kmagent status`` (see the README); cheap at any backlog. A spool
    that does not exist yet is reported empty, not created."""
    cfg = config if isinstance(config, Config) else load_config(config)
    location = Path(spool if spool is not None else cfg.spool_path)
    status = Status(spool=str(location), salvaged=last_salvage(location))
    if not location.exists():
        return status
    try:
        _read_spool(cfg, spool, status)
    except SpoolDamaged as exc:
        # The daemon salvages it (or will, when it starts): say so, don't fail.
        status.exists, status.damaged = True, str(exc)
    return status


def _read_spool(cfg: Config, spool: str | os.PathLike | None, status: Status) -> None:
    with open_configured(cfg, spool) as store:
        status.count(store)
        status.daemon_pid = ShipperLock(store.lock_path).holder()
        status.take(Published.read(store.figures_path))
        status.spool = str(store.path)
        status.exists = True
