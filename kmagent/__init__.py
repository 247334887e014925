"""kmagent: a durable log-and-ship agent for the Kissmetrics tracking API.

Apps call ``Client``/``KM``, which append to a local spool in microseconds and never
touch the network; ``kmagent run`` ships the spool. This module stays light: it imports
neither requests, watchdog nor click.
"""

from __future__ import annotations

import os
from typing import Any

from .client import KM, Client
from .errors import ConfigError, InvalidEvent, KmagentError, SpoolError, SpoolFull

__version__ = "0.2.0"

__all__ = ["Client", "KM", "KmagentError", "InvalidEvent", "SpoolError", "SpoolFull",
           "ConfigError", "status", "__version__"]


def status(config: str | os.PathLike | None = None, *,
           spool: str | os.PathLike | None = None) -> dict[str, Any]:
    """The figures of ``kmagent status --json``, computed in-process."""
    from .report import read_status
    return read_status(config, spool=spool).to_json()
