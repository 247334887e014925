"""Wake-ups for the shipper: inotify (through watchdog) when the spool changes.

Events are only wake-ups, never a source of truth: inotify drops events silently when
its queue overflows, so the daemon also rescans on a timer (``RESCAN_INTERVAL_S``).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

log = logging.getLogger("kmagent.watch")

RESCAN_INTERVAL_S = 1.0


class _StoppingRace(logging.Filter):
    """watchdog logs an ERROR when an inotify event is read just as its thread stops
    (a race inside watchdog; harmless: the watcher is stopping). Only that line is kept
    out of the daemon's log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "called when the thread is inactive" not in record.getMessage()


logging.getLogger("watchdog.observers.inotify").addFilter(_StoppingRace())


class _WakeOnChange(FileSystemEventHandler):
    def __init__(self, prefix: str, wake: threading.Event) -> None:
        self._prefix = prefix
        self._wake = wake

    def on_any_event(self, event: FileSystemEvent) -> None:
        if Path(str(event.src_path)).name.startswith(self._prefix):
            self._wake.set()


class SpoolWatcher:
    """Sets ``wake`` whenever a file named ``prefix...`` in ``directory`` changes
    (SQLite's writes go to ``spool.db-wal``; jsonl's to ``events.jsonl``)."""

    def __init__(self, directory: Path, prefix: str, wake: threading.Event) -> None:
        self._observer = Observer()
        self._observer.daemon = True
        self._observer.schedule(_WakeOnChange(prefix, wake), str(directory), recursive=False)

    def start(self) -> None:
        try:
            self._observer.start()
        except OSError as exc:  # e.g. inotify watch limit reached: rescans still work
            log.warning("cannot watch the spool (%s); relying on %.0f s rescans",
                        exc, RESCAN_INTERVAL_S)

    def stop(self) -> None:
        if self._observer.is_alive():
            self._observer.stop()
            self._observer.join(timeout=2)
