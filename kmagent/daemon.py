"""``kmagent run``: the long-running shipper and its lifecycle.

Startup order (each step relies on the one before):
1. open the spool (creating it if missing);
2. take the shipper lock, waiting if a flush holds it;
3. recover what a dead shipper left in flight;
4. arm the watcher, tell systemd READY=1, then ship: wake on inotify, on finished
   requests, on the next backoff expiry, and at least every RESCAN_INTERVAL_S.
Signal handlers only set flags (and wake the loop); the loop does the work, and pings
systemd's watchdog only from the loop, so a stuck loop stops the pings.

SIGHUP reloads the configuration: the sending side (key, endpoint, ``[ship]``, log
level) is rebuilt with it; the spool keys take effect on restart. In-flight work is
finished or given back first, so nothing is lost.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any, Callable

from .config import Config, shipping_config
from .errors import KmagentError, SpoolError
from .kmlog import KmLogFollower
from .metrics import RunFigures
from .lock import ShipperLock
from .shipper import Shipper
from .shipping import make_shipper
from .spool import Spool
from .notify import Notifier
from .report import Status
from .upkeep import Upkeep, open_for_shipping, room_is_short
from .watch import RESCAN_INTERVAL_S, SpoolWatcher

log = logging.getLogger("kmagent.daemon")

LOCK_POLL_S = 0.5
SPOOL_RETRY_S = (0.5, 5.0)  # first and longest pause after the spool failed us
STATUS_EVERY_S = 5.0  # how often systemd's STATUS= line is refreshed


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

    def __init__(self, config: Config, *, reload: Callable[[], Config] | None = None,
                 notifier: Notifier | None = None) -> None:
        self.config = config
        self._reload_config = reload
        self.notifier = notifier or Notifier()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._reload = threading.Event()
        self._recover_owed = False  # a reload left claims it could not give back
        self._signals = 0

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def reload(self) -> None:
        self._reload.set()
        self._wake.set()

    def _on_hangup(self, signum: int, frame: object) -> None:
        threading.Thread(target=self.reload, name="kmagent-reload", daemon=True).start()

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
        signal.signal(signal.SIGHUP, self._on_hangup)

    def _open_when_room(self, config: Config):
        """The spool (open_for_shipping), waiting while the disk is too full to open it
        at all and no ballast is left to give up (a daemon's first start on a disk
        another program filled): exiting instead would make systemd restart it every
        RestartSec until its start limit fails the unit for good. None if stopped."""
        announced = False
        while True:
            try:
                return open_for_shipping(config)
            except SpoolError as exc:
                if not room_is_short(config):
                    raise
                if not announced:
                    log.error("%s; the disk holding it is full: waiting for room", exc)
                    self.notifier.notify("STATUS=waiting for room on the spool's disk")
                    announced = True
            if self._stop.wait(SPOOL_RETRY_S[1]):
                return None

    def run(self, on_ready: Callable[[], None] | None = None) -> int:
        config = self.config = shipping_config(self.config)
        opened = self._open_when_room(config)
        if opened is None:
            return 0
        spool, salvaging = opened
        lock = self._lock = ShipperLock(spool.lock_path)
        try:
            if not acquire(lock, self._stop, "run"):
                return 0
            session = spool.ship(lock)
            upkeep = self._upkeep = Upkeep(spool, salvaging)
            upkeep.resume_salvages()
            recovered = self._mended(upkeep, session.recover)
            if recovered:
                log.info("recovered %d events a previous shipper had in flight", recovered)
            shipper = make_shipper(config, session, self._wake)
            watchers = [SpoolWatcher(*spool.watch_target, self._wake)]
            # km/kmts/PHP cron log directories: their writes wake the loop too.
            watchers += [SpoolWatcher(d, "", self._wake) for d in config.km_log_dirs]
            for watcher in watchers:
                watcher.start()
            self._announce(config, spool)
            self.notifier.notify("READY=1", f"MAINPID={os.getpid()}")
            if on_ready:
                on_ready()
            figures = RunFigures(spool.figures_path, shipper)
            exporter = self._exporter(config, figures)
            try:
                self._loop(figures, exporter)
            finally:
                self.notifier.notify("STOPPING=1")
                for watcher in watchers:
                    watcher.stop()
                shipper = figures.shipper
                try:
                    shipper.shutdown(self.config.shutdown_timeout)
                except SpoolError as exc:
                    # What could not be given back is still leased in the spool and is
                    # recovered at the next start: nothing is lost; exit as asked.
                    log.error("%s while stopping; the next start recovers it", exc)
                shipper.sender.close()
                figures.publish(force=True)
                if exporter is not None:
                    exporter.tick(force=True)
                log.info("stopped; %d delivered this run", shipper.delivered_total)
            return 0
        finally:
            lock.release()
            spool.close()
            self.notifier.close()

    def _mended(self, upkeep: Upkeep, operation: Callable[[], Any]) -> Any:
        """``operation()``, tried again while upkeep can mend what stops it (a full
        disk, a damaged file) and a few times more after that."""
        pause = SPOOL_RETRY_S[0]
        while True:
            try:
                return operation()
            except SpoolError as exc:
                if self._stop.is_set():
                    raise
                if not upkeep.failed(exc):
                    log.error("%s; trying again in %.1f s", exc, pause)
                    self._stop.wait(pause)
                    pause = min(pause * 2, SPOOL_RETRY_S[1])

    @staticmethod
    def _announce(config: Config, spool: Spool) -> None:
        log.info("shipping %s to %s (concurrency %s)", spool.path, config.endpoint,
                 f"adaptive from {config.concurrency}, at most {config.max_concurrency}"
                 if config.adapt_concurrency else config.concurrency)
        if config.api_key is None:
            log.warning("no api_key configured: events recorded without a key of their "
                        "own wait in the spool until api_key or api_key_file is set")

    @staticmethod
    def _exporter(config: Config, figures: RunFigures):
        """Prometheus metrics, when [metrics] asks for them."""
        if not (config.metrics_listen or config.metrics_textfile):
            return None
        from .prometheus import Exporter
        spool = figures.shipper.spool
        listen = config.metrics_listen
        cached = Status(daemon_pid=os.getpid())
        read_at = -1e9

        def current() -> Status:
            nonlocal read_at
            # Spool figures at most every few seconds: a scrape must stay cheap.
            if time.monotonic() - read_at >= STATUS_EVERY_S:
                cached.count(spool)
                read_at = time.monotonic()
            cached.take(figures.current())
            return cached
        try:
            return Exporter(listen, config.metrics_textfile, current)
        except OSError as exc:  # e.g. the port is taken: shipping matters more than metrics
            log.error("cannot serve metrics on %s: %s; shipping without them", listen,
                      exc.strerror or exc)
            return None

    def _loop(self, figures: RunFigures, exporter=None) -> None:
        """Ship until stopped (a reload replaces ``figures.shipper``)."""
        shipper = figures.shipper
        spool = shipper.spool
        km_logs = KmLogFollower(spool)
        pause = SPOOL_RETRY_S[0]
        upkeep = self._upkeep
        pinged = status_at = time.monotonic()
        watchdog = self.notifier.watchdog_interval
        while not self._stop.is_set():
            try:
                if self._reload.is_set():
                    shipper = figures.shipper = self._reloaded(shipper, figures)
                if self._recover_owed:  # before the replacement claims anything
                    shipper.session.recover()
                    self._recover_owed = False
                more_logs = km_logs.follow(self.config.km_log_dirs)  # never raises
                shipper.step()
                upkeep.tick()
                self._lock.sign()  # deferred by a full disk at start
                timeout = KmLogFollower.FOLLOW_EVERY_S if more_logs else RESCAN_INTERVAL_S
                due = shipper.idle_until()
                if due is not None:
                    timeout = min(timeout, max(0.0, due - time.time()))
                timeout = min(timeout, upkeep.wait_at_most() or timeout)
                pause = SPOOL_RETRY_S[0]
            except SpoolError as exc:
                # Disk full, damaged, read-only... Keep running: nothing is lost (outcomes
                # wait in memory, events in the spool). What upkeep can mend (the
                # ballast given up, a salvage) is tried again at once; else after a
                # pause, and shipping resumes when it can write.
                if upkeep.failed(exc):
                    log.warning("%s; mended, going on", exc)
                    timeout = 0.0
                else:
                    log.error("%s; trying again in %.1f s", exc, pause)
                    self._stop.wait(pause)  # finished requests must not cut it short
                    timeout, pause = 0.0, min(pause * 2, SPOOL_RETRY_S[1])
            figures.publish()
            if exporter is not None:
                exporter.tick()
            now = time.monotonic()
            if watchdog is not None:
                if now - pinged >= watchdog:
                    self.notifier.notify("WATCHDOG=1")  # the loop made a full turn
                    pinged = now
                timeout = min(timeout, max(0.0, pinged + watchdog - now))
            if self.notifier.enabled and now - status_at >= STATUS_EVERY_S:
                self._report(shipper, figures)
                status_at = now
            self._wake.wait(timeout)
            self._wake.clear()

    def _report(self, shipper: Shipper, figures: RunFigures) -> None:
        try:
            pending = shipper.spool.stats(time.time())["pending"]
        except SpoolError:
            pending = "?"
        now = figures.current()
        self.notifier.notify(f"STATUS={pending} pending, {now.in_flight} in flight, "
                             f"{now.delivered_total} delivered, "
                             f"{now.rate_1m:.1f}/s over the last minute")

    def _reloaded(self, shipper: Shipper, figures: RunFigures) -> Shipper:
        """SIGHUP: finish or give back in-flight work, then ship with the new settings.
        The outcome goes into the figures, for ``kmagent reload``."""
        self._reload.clear()
        if self._reload_config is None:
            return shipper
        self.notifier.notify("RELOADING=1")
        try:
            fresh = shipping_config(self._reload_config())
        except KmagentError as exc:
            log.error("reload refused, keeping the running configuration: %s", exc)
            figures.reloaded(str(exc))
            self.notifier.notify("READY=1")
            return shipper
        for key in ("spool_backend", "spool_path", "durability", "rotate_bytes",
                    "rotate_seconds", "max_bytes", "when_full"):
            if getattr(fresh, key) != getattr(self.config, key):
                log.warning("reload: %s changed; it takes effect on restart", key)
        try:
            shipper.shutdown(self.config.shutdown_timeout)
        except SpoolError as exc:
            # What it could not give back stays claimed, and nothing else in this run
            # would give it back: recover, as a start does, before the next claims.
            # The loop does it first thing, through its error path (pauses, watchdog
            # pings, figures), so that a disk that stays full does not stall the loop.
            log.error("%s while reloading; its claims are given back first", exc)
            self._recover_owed = True
        shipper.sender.close()
        self.config = fresh
        replacement = make_shipper(fresh, shipper.session, self._wake)
        replacement.carry_on_from(shipper)
        figures.shipper = replacement
        figures.reloaded(None)
        log.info("configuration reloaded from %s", fresh.source)
        self.notifier.notify("READY=1")
        return replacement
