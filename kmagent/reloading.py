"""``kmagent reload``: ask the running daemon to read its configuration again, and
wait for its answer.

A bare ``kill -HUP`` returns before the daemon has done anything, and says nothing
when it refuses the new configuration (it keeps the running one); it also needs
procps, which minimal images lack. Here the daemon's figures (metrics.RunFigures)
carry how many reloads it has finished and what the last refusal said: the command
sends SIGHUP, waits until that count moves, and reports the outcome, so that
``systemctl reload`` fails when the configuration is refused.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from .config import Config
from .errors import KmagentError
from .lock import ShipperLock
from .metrics import Published
from .spool import open_configured

POLL_S = 0.1


class ReloadFailed(KmagentError):
    """No daemon to reload, or it did not answer in time."""


@dataclass(frozen=True)
class ReloadResult:
    pid: int
    error: str | None  # None: applied; else why the daemon refused it


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's: it exists
    return True


def _reloads(figures_path: Path, pid: int) -> tuple[bool, int, str | None]:
    """Whether ``pid`` has published figures, its reload count and last refusal."""
    figures = Published.read(figures_path)
    if figures.pid != pid:
        return False, 0, None
    return True, int(figures.reloads or 0), figures.reload_error


def reload(config: Config, pid: int | None = None) -> ReloadResult:
    """Reload the daemon shipping ``config``'s spool (``pid``, or the lock's holder),
    waiting as long as a reload may take: in-flight requests finish first."""
    with open_configured(config) as spool:
        figures_path = spool.figures_path
        holder = ShipperLock(spool.lock_path).holder()
    if pid is None:
        if holder is None:
            raise ReloadFailed(f"no daemon ships {config.spool_path}")
        pid = holder
    return reload_daemon(figures_path, pid, timeout=config.shutdown_timeout + 30)


def reload_daemon(figures_path: Path, pid: int, *, timeout: float) -> ReloadResult:
    """SIGHUP to ``pid``, the daemon shipping the spool whose figures are at
    ``figures_path``, then wait up to ``timeout`` seconds for it to finish the reload."""
    deadline = time.monotonic() + timeout
    # A SIGHUP before the daemon has set its handlers would end it: wait until it
    # ships (it publishes figures from its loop).
    while not (state := _reloads(figures_path, pid))[0]:
        if not _running(pid):
            raise ReloadFailed(f"pid {pid} is not running")
        if time.monotonic() >= deadline:
            raise ReloadFailed(f"pid {pid} is not shipping {figures_path.parent} "
                               "(no figures from it yet)")
        time.sleep(POLL_S)
    before = state[1]
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        raise ReloadFailed(f"pid {pid} is not running") from None
    except PermissionError:
        raise ReloadFailed(f"not allowed to signal pid {pid} (run as its user, or root)") from None
    while True:
        published, count, error = _reloads(figures_path, pid)
        if published and count > before:
            return ReloadResult(pid, error)
        if not _running(pid):
            raise ReloadFailed(f"pid {pid} exited during the reload")
        if time.monotonic() >= deadline:
            raise ReloadFailed(f"pid {pid} did not finish the reload within {timeout:g} s")
        time.sleep(POLL_S)
