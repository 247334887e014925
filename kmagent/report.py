"""The figures behind ``kmagent status`` and ``kmagent.status()``."""

from __future__ import annotations

import os
import time
from typing import Any

from .config import load_config
from .lock import ShipperLock
from .spool import open_configured


def read_status(config: str | os.PathLike | None = None, *,
                spool: str | os.PathLike | None = None) -> dict[str, Any]:
    """``pending``, ``in_flight``, ``dead``, ``oldest_pending_age_s``, ``daemon_pid``,
    ``spool`` (its path); cheap at any backlog."""
    with open_configured(load_config(config), spool) as store:
        figures = store.stats(time.time())
        figures["daemon_pid"] = ShipperLock(store.lock_path).holder()
        if figures["daemon_pid"] is None:
            figures["in_flight"] = 0  # claims die with their shipper
        figures["spool"] = str(store.path)
    return figures
