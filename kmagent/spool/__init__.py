"""Spool backends behind one contract (``Spool``); ``open_spool`` picks one."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .base import Spool
from .records import Claimed, Retry

if TYPE_CHECKING:
    from ..config import Config

__all__ = ["Claimed", "Retry", "Spool", "open_spool", "open_configured"]


BACKENDS = ("sqlite", "jsonl")
# jsonl seals its active file once this large, or this old ([spool] rotate_bytes,
# rotate_seconds). Here, not in jsonl/: the configuration reads them without loading it.
DEFAULT_ROTATE_BYTES = 16 * 1024 * 1024
DEFAULT_ROTATE_SECONDS = 3600.0


def open_spool(path: str | os.PathLike, *, backend: str = "sqlite",
               durability: str = "normal", **options: Any) -> Spool:
    """Open (creating if missing) the spool at ``path``: a file for SQLite, a directory
    for jsonl. ``options``: ``max_bytes``, ``when_full``, ``keep_free``; jsonl's ``rotate_bytes`` and
    ``rotate_seconds``."""
    if backend == "sqlite":
        from .sqlite import SqliteSpool
        return SqliteSpool(Path(path), durability=durability, **options)
    if backend == "jsonl":
        from .jsonl import JsonlSpool
        return JsonlSpool(Path(path), durability=durability, **options)
    raise ValueError(f"unknown spool backend {backend!r}")


def open_configured(config: "Config", path: str | os.PathLike | None = None) -> Spool:
    """The spool the configuration names, or the one at ``path`` (whose backend an
    existing directory or file decides: a directory is jsonl, a file SQLite)."""
    backend = config.spool_backend
    if path is None:
        path = config.spool_path
    elif Path(path).is_dir():
        backend = "jsonl"
    elif Path(path).is_file():
        backend = "sqlite"
    options: dict[str, Any] = {"max_bytes": config.max_bytes, "when_full": config.when_full,
                               "keep_free": config.keep_free}
    if backend == "jsonl":
        options.update(rotate_bytes=config.rotate_bytes, rotate_seconds=config.rotate_seconds)
    return open_spool(path, backend=backend, durability=config.durability, **options)
