"""The figures behind ``kmagent status`` and ``kmagent.status()``."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from .config import Config, load_config
from .errors import SpoolDamaged
from .lock import ShipperLock
from .metrics import read_figures
from .spool import open_configured
from .spool.salvage import last_salvage


def read_status(config: str | os.PathLike | Config | None = None, *,
                spool: str | os.PathLike | None = None) -> dict[str, Any]:
    """Every field of ``kmagent status --json`` (see the README); cheap at any backlog.
    A spool that does not exist yet is reported empty, not created."""
    cfg = config if isinstance(config, Config) else load_config(config)
    location = Path(spool if spool is not None else cfg.spool_path)
    figures: dict[str, Any] = {
        "pending": 0, "in_flight": 0, "concurrency": None, "dead": 0,
        "oldest_pending_age_s": None,
        "dropped_total": 0, "delivered_total": 0, "retried_total": 0,
        "last_success_at": None, "last_error_at": None, "last_error": None,
        "rate_1m": 0.0, "daemon_pid": None, "spool": str(location), "exists": False,
        "salvaged": last_salvage(location)}
    if not location.exists():
        return figures
    try:
        return _read_spool(cfg, spool, figures)
    except SpoolDamaged as exc:
        # The daemon salvages it (or will, when it starts): say so, don't fail.
        figures.update(exists=True, damaged=str(exc))
        return figures


def _read_spool(cfg: Config, spool: str | os.PathLike | None,
                figures: dict[str, Any]) -> dict[str, Any]:
    with open_configured(cfg, spool) as store:
        figures.update(store.stats(time.time()))
        figures["dropped_total"] = store.dropped_total()
        figures["daemon_pid"] = ShipperLock(store.lock_path).holder()
        published = read_figures(store.figures_path)
        for name in ("delivered_total", "retried_total", "last_success_at",
                     "last_error_at", "last_error"):
            figures[name] = published.get(name, figures[name])
        running = figures["daemon_pid"] is not None and published.get("pid") == figures["daemon_pid"]
        # The rate and what is in flight belong to the running shipper; claims die with it.
        figures["rate_1m"] = published.get("rate_1m", 0.0) if running else 0.0
        if figures["daemon_pid"] is None:
            figures["in_flight"] = 0
        elif running:
            figures["in_flight"] = published.get("in_flight", figures["in_flight"])
            figures["concurrency"] = published.get("concurrency")
        figures["spool"] = str(store.path)
        figures["exists"] = True
    return figures
