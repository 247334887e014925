"""Wake-ups for the shipper: inotify (through watchdog) when the spool changes.

Events are only wake-ups, never a source of truth: inotify drops events silently when
its queue overflows, so the daemon also rescans on a timer (``RESCAN_INTERVAL_S``).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Callable, Union

from watchdog.events import (EVENT_TYPE_ATTRIB, EVENT_TYPE_CLOSED_NO_WRITE, EVENT_TYPE_DELETED,
                             EVENT_TYPE_OPENED, FileSystemEvent, FileSystemEventHandler)
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

# watchdog logs every inotify event it reads at debug level (each figures rewrite, each
# write to the spool: dozens of lines a second with [log] level = "debug"), which says
# nothing about kmagent. Its warnings and errors still show; a level set on the
# "watchdog" logger before this module is imported (someone asking for them) is kept.
_watchdog_log = logging.getLogger("watchdog")
if _watchdog_log.level == logging.NOTSET:
    _watchdog_log.setLevel(logging.WARNING)

# Events that never mean new data: a reader opening or closing a file (the shipper
# itself reads events.jsonl and km logs), a chmod, a file removed (the shipper deletes
# what it has shipped).
_NOT_WRITES = frozenset({EVENT_TYPE_OPENED, EVENT_TYPE_CLOSED_NO_WRITE, EVENT_TYPE_ATTRIB,
                         EVENT_TYPE_DELETED})

Names = Union[str, Callable[[str], bool]]


def _matcher(names: Names) -> Callable[[str], bool]:
    if callable(names):
        return names
    return lambda name: name.startswith(names)


class _WakeOnChange(FileSystemEventHandler):
    def __init__(self, names: Names, wake: threading.Event) -> None:
        self._wanted = _matcher(names)
        self._wake = wake

    def wakes(self, event: FileSystemEvent) -> bool:
        if event.is_directory or event.event_type in _NOT_WRITES:
            return False
        paths = [event.src_path, getattr(event, "dest_path", "")]
        return any(path and self._wanted(os.path.basename(os.fsdecode(path)))
                   for path in paths)

    def on_any_event(self, event: FileSystemEvent) -> None:
        if self.wakes(event):
            self._wake.set()


class SpoolWatcher:
    """Sets ``wake`` whenever a file in ``directory`` that ``names`` wants is written,
    created or renamed (to or from). ``names``: a prefix of file names, or a function of
    a file name (``Spool.watch_target`` gives the names producers write: ``spool.db`` and
    its ``-wal``, ``events.jsonl`` and sealed files, and never the daemon's own files
    beside them: figures, lock, ballast, salvage state, temp files)."""

    def __init__(self, directory: Path, names: Names, wake: threading.Event) -> None:
        self._observer = Observer()
        self._observer.daemon = True
        self._observer.schedule(_WakeOnChange(names, wake), str(directory), recursive=False)

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
