"""The figures behind ``kmagent status`` and ``kmagent.status()``."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from .config import Config, load_config
from .lock import ShipperLock
from .spool import open_configured


def read_status(config: str | os.PathLike | Config | None = None, *,
                spool: str | os.PathLike | None = None) -> dict[str, Any]:
    """``pending``, ``in_flight``, ``dead``, ``oldest_pending_age_s``, ``daemon_pid``,
    ``spool`` (its path), and ``bad_lines`` for jsonl; cheap at any backlog. A spool
    that does not exist yet is reported empty, not created."""
    cfg = config if isinstance(config, Config) else load_config(config)
    location = Path(spool if spool is not None else cfg.spool_path)
    if not location.exists():
        return {"pending": 0, "in_flight": 0, "dead": 0, "oldest_pending_age_s": None,
                "dropped_total": 0, "daemon_pid": None, "spool": str(location),
                "exists": False}
    with open_configured(cfg, spool) as store:
        figures = store.stats(time.time())
        figures["dropped_total"] = store.dropped_total()
        figures["daemon_pid"] = ShipperLock(store.lock_path).holder()
        if figures["daemon_pid"] is None:
            figures["in_flight"] = 0  # claims die with their shipper
        figures["spool"] = str(store.path)
        figures["exists"] = True
    return figures
