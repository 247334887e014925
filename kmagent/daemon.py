"""``kmagent run``: the long-running shipper and its lifecycle.

Startup order (each step relies on the one before):
1. open the spool (creating it if missing);
2. take the shipper lock, waiting if a flush holds it;
3. recover what a dead shipper left in flight;
4. arm the watcher, then ship: wake on inotify, on finished requests, on the next
   backoff expiry, and at least every RESCAN_INTERVAL_S.
Signal handlers only set flags (and wake the loop); the loop does the work.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Callable

from .config import Config, shipping_config
from .errors import SpoolError
from .lock import ShipperLock
from .sender import Sender
from .shipper import Shipper
from .spool import Spool, open_configured
from .watch import RESCAN_INTERVAL_S, SpoolWatcher

log = logging.getLogger("kmagent.daemon")

LOCK_POLL_S = 0.5
SPOOL_RETRY_S = (0.5, 5.0)  # first and longest pause after the spool failed us
MAINTAIN_EVERY_S = 30.0


def make_shipper(config: Config, spool: Spool, wake: threading.Event | None = None) -> Shipper:
    """A Shipper for ``spool`` with a Sender configured from ``config``."""
    sender = Sender(config.endpoint, concurrency=config.concurrency,
                    connect_timeout=config.connect_timeout, read_timeout=config.read_timeout,
                    proxy=config.proxy, ca_file=config.ca_file, api_key=config.api_key)
    return Shipper(spool, sender, concurrency=config.concurrency,
                   max_backoff=config.max_backoff, max_age=config.max_age, wake=wake)


def acquire(lock: ShipperLock, stop: threading.Event, what: str) -> bool:
    """Take the shipper lock, waiting (and saying for whom) while another process holds it."""
    announced = None
    while not lock.try_acquire():
        holder = lock.holder()
        if holder != announced:
            log.info("%s: spool is being shipped by pid %s; waiting for it", what, holder)
            announced = holder
        if stop.wait(LOCK_POLL_S):
            return False
    return True


class Daemon:
    """The ``kmagent run`` loop; ``stop()`` may be called from any thread or a signal."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._signals = 0

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def _on_signal(self, signum: int, frame: object) -> None:
        self._signals += 1
        if self._signals > 1:
            # A second signal means "now": everything unacknowledged is still in the
            # spool and will be sent again, byte-identical, on the next start.
            os._exit(0)
        # Not self.stop() here: the handler runs on the main thread, which may be inside
        # the very Event it would set (holding its lock): set it from another thread.
        threading.Thread(target=self.stop, name="kmagent-stop", daemon=True).start()

    def install_signal_handlers(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)

    def run(self, on_ready: Callable[[], None] | None = None) -> int:
        config = self.config = shipping_config(self.config)
        spool = open_configured(config)
        lock = ShipperLock(spool.lock_path)
        try:
            if not acquire(lock, self._stop, "run"):
                return 0
            recovered = spool.recover()
            if recovered:
                log.info("recovered %d events a previous shipper had in flight", recovered)
            shipper = make_shipper(config, spool, self._wake)
            watcher = SpoolWatcher(*spool.watch_target, self._wake)
            watcher.start()
            log.info("shipping %s to %s (concurrency %d)", spool.path, config.endpoint,
                     config.concurrency)
            if config.api_key is None:
                log.warning("no api_key configured: events recorded without a key of their "
                            "own wait in the spool until api_key or api_key_file is set")
            if on_ready:
                on_ready()
            try:
                self._loop(shipper)
            finally:
                watcher.stop()
                shipper.shutdown(config.shutdown_timeout)
                shipper.sender.close()
                log.info("stopped; %d delivered this run", shipper.delivered_total)
            return 0
        finally:
            lock.release()
            spool.close()

    def _loop(self, shipper: Shipper) -> None:
        pause = SPOOL_RETRY_S[0]
        maintained = time.monotonic()
        while not self._stop.is_set():
            try:
                shipper.step()
                if time.monotonic() - maintained >= MAINTAIN_EVERY_S:
                    shipper.spool.maintain()
                    maintained = time.monotonic()
                timeout = RESCAN_INTERVAL_S
                due = shipper.idle_until()
                if due is not None:
                    timeout = min(timeout, max(0.0, due - time.time()))
                pause = SPOOL_RETRY_S[0]
            except SpoolError as exc:
                # Disk full, read-only... Keep running: nothing is lost (outcomes wait in
                # memory, events in the spool), and shipping resumes when it can write.
                log.error("%s; trying again in %.1f s", exc, pause)
                self._stop.wait(pause)  # finished requests must not cut the pause short
                timeout, pause = 0.0, min(pause * 2, SPOOL_RETRY_S[1])
            self._wake.wait(timeout)
            self._wake.clear()
