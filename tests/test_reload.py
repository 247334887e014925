"""A reload whose old shipper cannot give its claims back (a disk too full for the
write) must not leave those events claimed, and so unsent, until the next start."""

from __future__ import annotations

import contextlib
import threading
import time

import pytest

from helpers import figures, record_many, wait_for
from kmagent.config import load_config
from kmagent.daemon import Daemon
from kmagent.errors import SpoolError
from kmagent.spool.session import ShippingSession

pytestmark = pytest.mark.backends()


def twelve_in_flight(host, write_config, extra: str = ""):
    """A configuration with 12 events recorded, sent slowly enough (1 s each, 4 at
    once) that a reload finds requests in flight past its 0.2 s shutdown timeout."""
    path = write_config(host, extra="[ship]\nconcurrency = 4\nshutdown_timeout = 0.2\n"
                                    + extra)
    record_many(path, 12)
    host.delay = 1.0
    return path


@contextlib.contextmanager
def reloadable_daemon(path, **options):
    """``kmagent run``'s Daemon on a thread of this process (so that the test can
    break its spool calls), reloading from ``path``; stopped and joined at the end."""
    daemon = Daemon(load_config(path), reload=lambda: load_config(path), **options)
    runner = threading.Thread(target=daemon.run, daemon=True)
    runner.start()
    try:
        yield daemon
    finally:
        daemon.stop()
        runner.join(30)
    assert not runner.is_alive()


def test_claims_a_reload_could_not_give_back_are_sent_without_a_restart(
        host, write_config, monkeypatch):
    path = twelve_in_flight(host, write_config, "max_backoff = 1\n")
    real_release = ShippingSession.release
    refused = []

    def release_once_refused(session, ids):
        ids = list(ids)
        if ids and not refused:
            refused.append(ids)
            raise SpoolError("spool: release failed: database or disk is full")
        real_release(session, ids)
    monkeypatch.setattr(ShippingSession, "release", release_once_refused)
    with reloadable_daemon(path) as daemon:
        wait_for(lambda: host.started >= 4)
        daemon.reload()
        wait_for(lambda: refused)
        host.delay = 0.0
        wait_for(lambda: figures(path)["pending"] == 0, timeout=30)
    delivered = {dict(r.params)["n"] for r in host.delivered()}
    assert delivered == {str(n) for n in range(12)}


class Pings:
    """A Notifier that counts the loop's watchdog pings."""

    enabled = False
    watchdog_interval = 0.2

    def __init__(self) -> None:
        self.at: list[float] = []

    def notify(self, *fields: str) -> None:
        if "WATCHDOG=1" in fields:
            self.at.append(time.monotonic())

    def close(self) -> None:
        pass


def test_a_reload_on_a_spool_that_stays_unwritable_keeps_the_loop_turning(
        host, write_config, monkeypatch):
    """Claims given back later, through the loop's own error path: meanwhile it still
    pings systemd's watchdog (which would kill a daemon silent for WatchdogSec)."""
    path = twelve_in_flight(host, write_config)
    broken_until = [float("inf")]
    real_release, real_recover = ShippingSession.release, ShippingSession.recover

    def release(session, ids):
        ids = list(ids)
        if ids and time.monotonic() < broken_until[0]:
            raise SpoolError("spool: release failed: disk I/O error")
        real_release(session, ids)

    def recover(session):
        if time.monotonic() < broken_until[0]:
            raise SpoolError("spool: recover failed: disk I/O error")
        return real_recover(session)

    notifier = Pings()
    with reloadable_daemon(path, notifier=notifier) as daemon:
        wait_for(lambda: host.started >= 4)
        monkeypatch.setattr(ShippingSession, "release", release)
        monkeypatch.setattr(ShippingSession, "recover", recover)
        started = time.monotonic()
        broken_until[0] = started + 4.0  # unwritable for 4 s
        daemon.reload()
        time.sleep(4.0)
        assert len([t for t in notifier.at if t > started]) >= 2  # stalled: none
        host.delay = 0.0
        wait_for(lambda: figures(path)["pending"] == 0, timeout=30)
