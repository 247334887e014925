"""``kmagent flush``: deliver what is pending now, then exit.

Never ships beside a running daemon: if another process holds the shipper lock, the
flush watches the spool until that process has delivered everything that was pending
when the flush started (and takes over if the holder dies). Gives up when nothing was
delivered for ``timeout`` seconds.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

from .config import Config, shipping_config
from .shipping import make_shipper
from .errors import SpoolDamaged, SpoolError
from .lock import ShipperLock
from .shipper import Shipper
from .spool import open_configured
from .upkeep import Upkeep

log = logging.getLogger("kmagent.flush")

POLL_S = 0.2  # how often progress is measured (a count over the flushed range)


@dataclass(frozen=True)
class FlushResult:
    total: int  # pending when the flush started
    remaining: int  # of those, still pending at the end
    dead: int  # dead letters in the spool at the end
    dead_new: int  # of the flushed events, how many went to dead letters
    waited_for: int | None  # pid of the daemon that did the shipping, if not us
    last_error: str | None
    no_key: bool  # what remains carries no API key and none is configured


def flush(config: Config, *, timeout: float | None = None,
          on_progress: Callable[[int, int], None] | None = None) -> FlushResult:
    """Deliver everything pending at the start; ``on_progress(done, total)``."""
    timeout = 2 * config.max_backoff if timeout is None else timeout
    config = shipping_config(config)
    spool = open_configured(config)
    lock = ShipperLock(spool.lock_path)
    shipper: Shipper | None = None
    upkeep: Upkeep | None = None
    waited_for = None
    try:
        dead_before = spool.stats(time.time())["dead"]
        mark = spool.mark()
        total = remaining = spool.pending_through(mark)
        last_progress = time.monotonic()
        no_key = False
        while remaining:
            if shipper is None:
                if lock.try_acquire():
                    session = spool.ship(lock)
                    session.recover()
                    session.expedite()
                    shipper = make_shipper(config, session)
                    upkeep = Upkeep(spool, keep_ballast=False)
                else:
                    waited_for = lock.holder() or waited_for
            if shipper is None:
                time.sleep(POLL_S)
            else:
                try:
                    _ship_for(shipper, POLL_S)
                    upkeep.tick()
                except SpoolDamaged as exc:
                    # The daemon salvages it: it rescans, for a minute, what apps still
                    # write to the damaged file, which a flush would leave behind.
                    raise SpoolDamaged(f"{exc}; start the daemon (kmagent run): it keeps "
                                       "the file aside and saves every readable event",
                                       exc.path) from exc
                except SpoolError as exc:
                    # A full disk, say: give up the daemon's ballast, free what was
                    # delivered, try again until the timeout (outcomes wait in memory).
                    if not upkeep.failed(exc):
                        log.error("%s; trying again", exc)
                        time.sleep(POLL_S)
                # Pending, yet nothing in flight and nothing we may claim, and no key of
                # our own: what is left carries no API key and none is configured.
                no_key = (config.api_key is None and not shipper.in_flight
                          and shipper.idle_until() is None)
            now_remaining = spool.pending_through(mark)
            if now_remaining < remaining:
                last_progress = time.monotonic()
                remaining = now_remaining
                if on_progress:
                    on_progress(total - remaining, total)
            elif no_key or time.monotonic() - last_progress >= timeout:
                break  # (checked after a pass, so that even --timeout 0 tries once)
        if shipper is not None:
            shipper.shutdown(config.shutdown_timeout)
            shipper.sender.close()
            remaining = spool.pending_through(mark)
        last_error = shipper.last_error if shipper else None
        dead = spool.stats(time.time())["dead"]
        return FlushResult(total, remaining, dead, max(0, dead - dead_before), waited_for,
                           last_error, no_key)
    finally:
        lock.release()
        spool.close()


def _ship_for(shipper: Shipper, seconds: float) -> None:
    """Drive the shipper for about ``seconds``, sleeping only until there is work."""
    end = time.monotonic() + seconds
    while True:
        shipper.step()
        left = end - time.monotonic()
        if left <= 0:
            return
        due = shipper.idle_until()
        if not shipper.in_flight and due is None:
            return
        wait = left if due is None else min(left, max(0.0, due - time.time()))
        shipper.wake.wait(wait)
        shipper.wake.clear()
