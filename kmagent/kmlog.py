"""Import the cron logs of Kissmetrics' own libraries (Ruby km/kmts, PHP) into the spool.

Their writers append one request per line (``/e?…``, ``/s?…``, ``/a?…``, URL-escaped,
``_k`` included) to ``<dir>/kissmetrics_<env>_query.log`` (older: ``kissmetrics_query.log``)
under an exclusive ``flock``. Their ``km_send`` renames that file to
``<timestamp>kissmetrics_<env>_sending.log`` and sends it line by line; if it dies
mid-file, the renamed file is never looked at again. Both kinds are imported here.

One file at a time, under the writers' own ``flock`` (so an append during the import
waits, then lands in the emptied file): read what is new, store the events in the spool
(synced), remember how far the file was read, then empty a query log or delete a
sending log. What was read is remembered beside the spool with the file's inode and its
first bytes, so a crash anywhere in between never spools a line twice: a file that was
emptied, or replaced, no longer starts with the bytes remembered.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator
from urllib.parse import parse_qsl, urlsplit

from .errors import InvalidEvent
from .events import Event, make_alias, make_event, make_set
from .spool import Spool
from .spool.base import append_to, write_atomically

log = logging.getLogger("kmagent.kmlog")

QUERY_LOG = re.compile(r"^kissmetrics(_.+)?_query\.log$")
SENDING_LOG = re.compile(r"^\d+kissmetrics(_.+)?_sending\.log$")
HEAD_BYTES = 256  # how much of a file's beginning identifies it
STATE_NAME, BAD_NAME = "km-log.json", "km-log-bad.jsonl"


@dataclass
class ImportResult:
    imported: int = 0  # events put into the spool
    malformed: int = 0  # lines set aside
    files: list[str] = field(default_factory=list)  # files that held something new
    bad_path: Path | None = None  # where malformed lines went


class BadLine(ValueError):
    pass


def parse_line(line: str, now: float) -> Event:
    """One logged request as an Event: its ``_k``, person, name, properties and ``_t``
    kept; ``_d`` is implied (every event kmagent sends carries its time and ``_d=1``)."""
    text = line.strip()
    if text.startswith(("http://", "https://")):
        parts = urlsplit(text)
        text = parts.path + ("?" + parts.query if parts.query else "")
    path, sep, query = text.partition("?")
    if path not in ("/e", "/s", "/a") or not sep:
        raise BadLine("not a logged request (/e?, /s? or /a?)")
    try:
        params = dict(parse_qsl(query, keep_blank_values=True, errors="strict"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadLine(f"cannot decode the query: {exc}") from None
    api_key = params.pop("_k", None) or None
    person = params.pop("_p", None)
    name = params.pop("_n", None)
    try:
        if path == "/a":
            return make_alias(person, name, api_key=api_key)
        # Logged when it happened: the logged _t is the event's time. Without one (no
        # writer we know omits it) the event is dated now, as km_send's would have been.
        if path == "/e":
            return make_event(person, name, params, api_key=api_key, now=now)
        return make_set(person, params, api_key=api_key, now=now)
    except InvalidEvent as exc:
        raise BadLine(str(exc)) from None


def log_files(directory: Path) -> list[Path]:
    """Orphaned sending logs first (they are older), then query logs."""
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    sending = [directory / n for n in names if SENDING_LOG.match(n)]
    query = [directory / n for n in names if QUERY_LOG.match(n)]
    return sending + query


class KmLogImporter:
    """Imports km log directories into ``spool``; keeps its state beside the spool."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        base = spool.path if spool.path.is_dir() else spool.path.parent
        prefix = "" if spool.path.is_dir() else spool.path.name + "."
        self.state_path = base / (prefix + STATE_NAME)
        self.bad_path = base / (prefix + BAD_NAME)

    def import_dirs(self, directories: list[Path]) -> ImportResult:
        result = ImportResult(bad_path=self.bad_path)
        for directory in directories:
            for path in log_files(Path(directory).resolve()):
                try:
                    self._import_file(path, result)
                except FileNotFoundError:
                    continue  # deleted or renamed by its writer or km_send meanwhile
        return result

    def _import_file(self, path: Path, result: ImportResult) -> None:
        sending = bool(SENDING_LOG.match(path.name))
        with _locked(path) as fd:
            st = os.fstat(fd)
            state = self._load()
            start = self._resume_at(fd, st, state.get(str(path)))
            if st.st_size <= start:
                if sending:
                    self._finish_sending(path, state)
                return
            data = os.pread(fd, st.st_size - start, start)
            events, bad = self._parse(data)
            self.spool.append_many(events)  # synced before the file is touched
            if bad:
                append_to(self.bad_path, b"".join(
                    (json.dumps({"file": str(path), "line": line, "reason": reason},
                                ensure_ascii=False) + "\n").encode() for line, reason in bad),
                    sync=True)
            state[str(path)] = {"inode": st.st_ino, "offset": st.st_size,
                                "head": _head(fd, st.st_size)}
            self._save(state)
            if sending:
                self._finish_sending(path, state)
            else:
                os.ftruncate(fd, 0)  # the writers append from the new end: 0
                os.fsync(fd)
                state[str(path)] = {"inode": st.st_ino, "offset": 0, "head": ""}
                self._save(state)
        result.imported += len(events)
        result.malformed += len(bad)
        result.files.append(str(path))

    @staticmethod
    def _resume_at(fd: int, st: os.stat_result, remembered: dict | None) -> int:
        """Where the unread part begins: 0 unless this is the very file read before,
        still starting with the same bytes and not shorter than what was read."""
        if not remembered or remembered["inode"] != st.st_ino:
            return 0
        offset = remembered["offset"]
        if st.st_size < offset or _head(fd, offset) != remembered["head"]:
            return 0
        return offset

    @staticmethod
    def _parse(data: bytes) -> tuple[list[Event], list[tuple[str, str]]]:
        events, bad = [], []
        now = time.time()
        for raw in data.split(b"\n"):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                bad.append((raw.decode("utf-8", "replace"), "not UTF-8"))
                continue
            try:
                events.append(parse_line(line, now))
            except BadLine as exc:
                bad.append((line, str(exc)))
        return events, bad

    def _finish_sending(self, path: Path, state: dict) -> None:
        path.unlink(missing_ok=True)
        state.pop(str(path), None)
        self._save(state)

    def _load(self) -> dict:
        try:
            return json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return {}
        except ValueError:
            log.warning("%s is unreadable; starting over (lines may be imported twice)",
                        self.state_path)
            return {}

    def _save(self, state: dict) -> None:
        write_atomically(self.state_path, json.dumps(state, sort_keys=True).encode())


def _head(fd: int, size: int) -> str:
    return hashlib.sha256(os.pread(fd, min(size, HEAD_BYTES), 0)).hexdigest()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[int]:
    """The file, open and held under the exclusive flock its writers take."""
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)  # releases the flock


class KmLogFollower:
    """``[km_log] dirs`` for the daemon: import what the apps logged, at most every
    ``FOLLOW_EVERY_S`` (the loop turns on every finished request)."""

    FOLLOW_EVERY_S = 0.25

    def __init__(self, spool: Spool) -> None:
        self._importer = KmLogImporter(spool)
        self._last = -self.FOLLOW_EVERY_S
        self._failing: set[str] = set()

    def follow(self, directories: tuple[Path, ...]) -> None:
        if not directories or time.monotonic() - self._last < self.FOLLOW_EVERY_S:
            return
        self._last = time.monotonic()
        for directory in directories:
            try:
                result = self._importer.import_dirs([directory])
            except OSError as exc:  # e.g. permissions: say so once, keep shipping
                if str(directory) not in self._failing:
                    self._failing.add(str(directory))
                    log.error("cannot import km logs from %s: %s", directory,
                              exc.strerror or exc)
                continue
            self._failing.discard(str(directory))
            if result.imported:
                log.info("imported %d events from km logs in %s", result.imported, directory)
            if result.malformed:
                log.warning("%d malformed lines in km logs in %s set aside in %s",
                            result.malformed, directory, result.bad_path)
