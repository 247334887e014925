"""Spool backends behind one contract (``Spool``); ``open_spool`` picks one."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from .base import Claimed, Spool

if TYPE_CHECKING:
    from ..config import Config

__all__ = ["Claimed", "Spool", "open_spool", "open_configured"]


def open_spool(path: str | os.PathLike, *, backend: str = "sqlite",
               durability: str = "normal") -> Spool:
    """Open (creating if missing) the spool at ``path``."""
    if backend == "sqlite":
        from .sqlite import SqliteSpool
        return SqliteSpool(Path(path), durability=durability)
    raise ValueError(f"unknown spool backend {backend!r}")


def open_configured(config: "Config", path: str | os.PathLike | None = None) -> Spool:
    """The spool the configuration names (or ``path`` instead of its ``[spool] path``)."""
    return open_spool(config.spool_path if path is None else path,
                      backend=config.spool_backend, durability=config.durability)
