"""The spool watcher wakes the shipper for what producers write, and never for the
daemon's own files beside the spool (its figures, rewritten every second, used to wake
it every second)."""

from __future__ import annotations

import logging
import os
import threading
import time
from types import SimpleNamespace

import pytest

from kmagent.events import make_event
from kmagent.metrics import RunFigures
from kmagent.spool import open_spool
from kmagent.spool.files import write_atomically
from kmagent.spool.salvage import report_path
from kmagent.watch import SpoolWatcher

SETTLE_S = 0.5


def _event(n: int):
    return make_event(f"person{n}", "Did", {"n": n}, now=1_700_000_000 + n)


def _idle_shipper():
    return SimpleNamespace(delivered_total=0, retried_total=0, dead_total=0, in_flight=0,
                           concurrency=1, last_success_at=None, last_error_at=None,
                           last_error=None)


@pytest.fixture(params=["sqlite", "jsonl"])
def watched(request, tmp_path):
    path = tmp_path / "spool" / ("spool.db" if request.param == "sqlite" else "spool.jsonl.d")
    spool = open_spool(path, backend=request.param)
    spool.append(_event(0))  # the files exist, as under a running daemon
    wake = threading.Event()
    watcher = SpoolWatcher(*spool.watch_target, wake)
    watcher.start()
    time.sleep(SETTLE_S)  # nothing of the set-up above counts
    wake.clear()
    try:
        yield SimpleNamespace(spool=spool, wake=wake, backend=request.param)
    finally:
        watcher.stop()
        spool.close()


def test_the_daemons_own_files_do_not_wake_it(watched):
    spool = watched.spool
    figures = RunFigures(spool.figures_path, _idle_shipper())
    for _ in range(3):  # temp file, then rename over figures.json, as every second
        figures.publish(force=True)
    assert spool.figures_path.exists()
    spool.lock_path.touch()
    spool.ballast_path.write_bytes(b"\0" * 4096)
    if watched.backend == "sqlite":
        write_atomically(report_path(spool.path), b"{}\n")  # salvage.json (+ .tmp)
    else:
        checkpoint = spool.spool_dir / "checkpoint.json"  # written by the shipper
        if checkpoint.exists():
            write_atomically(checkpoint, checkpoint.read_bytes())
        write_atomically(spool.spool_dir / "dead.jsonl", b"")
    if watched.backend == "jsonl":
        with open(spool.spool_dir / "events.jsonl", "rb") as f:  # the shipper reading
            f.read()
    assert not watched.wake.wait(SETTLE_S * 2)


def test_an_append_wakes_it(watched):
    watched.spool.append(_event(1))
    assert watched.wake.wait(5)


def test_a_sealed_file_wakes_it(tmp_path):
    spool = open_spool(tmp_path / "d", backend="jsonl")
    spool.append(_event(0))
    wake = threading.Event()
    watcher = SpoolWatcher(*spool.watch_target, wake)
    watcher.start()
    try:
        time.sleep(SETTLE_S)
        wake.clear()
        os.replace(tmp_path / "d" / "events.jsonl", tmp_path / "d" / "events.0000000001.jsonl")
        assert wake.wait(5)
    finally:
        watcher.stop()
        spool.close()


def test_watchdogs_event_chatter_stays_out_of_a_debug_log():
    from kmagent import logs
    root = logging.getLogger()
    level, handlers = root.level, root.handlers[:]
    try:
        logs.setup("debug")  # [log] level = "debug"
        assert logging.getLogger("kmagent.watch").isEnabledFor(logging.DEBUG)
        inotify = logging.getLogger("watchdog.observers.inotify_buffer")
        assert not inotify.isEnabledFor(logging.DEBUG)  # "in-event ..." per inotify event
        assert inotify.isEnabledFor(logging.WARNING)
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
