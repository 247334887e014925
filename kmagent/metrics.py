"""The daemon's running figures, published for ``kmagent status`` in another process.

The shipper counts; ``RunFigures`` turns the counts into the status fields and writes
them, at most once a second, to a small JSON file beside the spool (replaced by
rename, so a reader never sees half of it). Totals carry over from the previous run.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import deque
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

from .spool.files import write_atomically

if TYPE_CHECKING:  # status reads figures without importing the shipping side
    from .shipper import Shipper

PUBLISH_EVERY_S = 1.0
RATE_WINDOW_S = 60.0


@dataclass
class Published:
    """What a running daemon publishes beside the spool; ``reloads`` (finished this
    run, refused or not) and ``reload_error`` (the last one's refusal, or None) are
    what ``kmagent reload`` waits on."""

    pid: int | None = None  # None: nothing published (or readable)
    in_flight: int = 0
    concurrency: int | None = None
    delivered_total: int = 0  # the totals carry over from run to run
    retried_total: int = 0
    dead_total: int = 0
    last_success_at: float | None = None
    last_error_at: float | None = None
    last_error: str | None = None
    rate_1m: float = 0.0
    reloads: int = 0
    reload_error: str | None = None

    @classmethod
    def read(cls, path: Path) -> "Published":
        """The figures at ``path``; empty ones if there are none or they are unreadable
        (they are a courtesy, and an older kmagent's may lack some names)."""
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return cls()
        if not isinstance(data, dict):
            return cls()
        return cls(**{f.name: data[f.name] for f in fields(cls)
                      if f.name in data and _fits(f.type, data[f.name])})


def _fits(kind: object, value: object) -> bool:
    """Whether ``value`` is of the field type ``kind`` ("int", "float | None"...):
    anything else (a string, infinity, a list) is read as the default."""
    if value is None:
        return "None" in str(kind)
    if isinstance(value, bool):
        return False
    if str(kind).startswith("int"):
        return isinstance(value, int)
    if str(kind).startswith("float"):
        return isinstance(value, (int, float)) and math.isfinite(value)
    return isinstance(value, str)


class RunFigures:
    """Turns the shipper's counts into ``Published`` figures and publishes them."""

    def __init__(self, path: Path, shipper: "Shipper") -> None:
        self.path = path
        self.shipper = shipper
        previous = Published.read(path)
        self._base = Published(delivered_total=previous.delivered_total,
                               retried_total=previous.retried_total,
                               dead_total=previous.dead_total)
        self._samples: deque[tuple[float, int]] = deque()
        self._published = 0.0
        self.reloads = 0
        self.reload_error: str | None = None

    def reloaded(self, error: str | None) -> None:
        """A reload finished: applied (``error`` None) or refused. Published at once."""
        self.reloads += 1
        self.reload_error = error
        self.publish(force=True)

    def current(self, now: float | None = None) -> Published:
        now = time.time() if now is None else now
        shipper, base = self.shipper, self._base
        delivered = base.delivered_total + shipper.delivered_total
        self._samples.append((now, delivered))
        while len(self._samples) > 2 and self._samples[1][0] <= now - RATE_WINDOW_S:
            self._samples.popleft()
        first_at, first = self._samples[0]
        span = max(now - first_at, 1.0)
        return Published(
            pid=os.getpid(), in_flight=shipper.in_flight, concurrency=shipper.concurrency,
            delivered_total=delivered,
            retried_total=base.retried_total + shipper.retried_total,
            dead_total=base.dead_total + shipper.dead_total,
            last_success_at=shipper.last_success_at, last_error_at=shipper.last_error_at,
            last_error=shipper.last_error, rate_1m=(delivered - first) / span,
            reloads=self.reloads, reload_error=self.reload_error)

    def publish(self, force: bool = False) -> None:
        now = time.time()
        if not force and now - self._published < PUBLISH_EVERY_S:
            return
        self._published = now
        try:
            # The spool's mode, whatever the umask; no fsync: a crash loses only figures.
            write_atomically(self.path, json.dumps(asdict(self.current(now))).encode(),
                             sync=False)
        except OSError:
            pass  # figures are a courtesy: a full disk must not stop shipping
