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

import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

from .errors import InvalidEvent, SpoolError
from .events import Event, make_alias, make_event, make_set
from .spool import Spool
from .spool.base import append_to, flocked, write_atomically

log = logging.getLogger("kmagent.kmlog")

QUERY_LOG = re.compile(r"^kissmetrics(_.+)?_query\.log$")
SENDING_LOG = re.compile(r"^\d+kissmetrics(_.+)?_sending\.log$")
HEAD_BYTES = 256  # how much of a file's beginning identifies it
CHUNK_BYTES = 4 * 1024 * 1024  # read, stored and recorded at a time
STATE_NAME, BAD_NAME = "km-log.json", "km-log-bad.jsonl"


@dataclass
class ImportResult:
    imported: int = 0  # events put into the spool
    malformed: int = 0  # lines set aside
    files: list[str] = field(default_factory=list)  # files that held something new
    errors: list[str] = field(default_factory=list)  # files or directories not readable
    more: bool = False  # stopped at the budget: more is waiting
    bad_path: Path | None = None  # where malformed lines went


class BadLine(ValueError):
    pass


def parse_line(line: str, now: float) -> Event:
    """One logged request as an Event: its ``_k``, person, name, properties and ``_t``
    kept; ``_d`` is implied (every event kmagent sends carries its time and ``_d=1``)."""
    try:
        return _parse_line(line, now)
    except BadLine:
        raise
    except Exception as exc:  # whatever a garbled line makes the parsers raise
        raise BadLine(f"unreadable: {type(exc).__name__}: {exc}") from None


def _parse_line(line: str, now: float) -> Event:
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
    """Imports km log directories into ``spool``; keeps its state beside the spool.

    Files are read in chunks that end at a line's end; after each chunk its events are
    in the spool (synced) and the offset is recorded, so a crash costs at most one
    chunk stored again, and a huge file never sits in memory at once.
    """

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        base = spool.path if spool.path.is_dir() else spool.path.parent
        prefix = "" if spool.path.is_dir() else spool.path.name + "."
        self.state_path = base / (prefix + STATE_NAME)
        self.bad_path = base / (prefix + BAD_NAME)

    def import_dirs(self, directories: list[Path], *, budget: int | None = None,
                    wait: bool = True) -> ImportResult:
        """Import every log in ``directories``; with ``budget``, stop after reading
        about that many bytes (the rest waits for the next call). If another import is
        running, wait for it, or with ``wait=False`` return at once, having done nothing."""
        result = ImportResult(bad_path=self.bad_path)
        # One importer at a time (the daemon and `kmagent import`): the state is read
        # and written whole, and a file one has deleted must not be read by the other.
        lock_path = self.state_path.with_name(self.state_path.name + ".lock")
        try:
            lock = flocked(lock_path, create=True, wait=wait)
        except BlockingIOError:
            return result  # another import is running, and we were not to wait
        except OSError as exc:
            raise SpoolError(f"cannot lock {lock_path}: {exc.strerror or exc}") from None
        try:
            state = self._load()
            left = [budget]
            for directory in directories:
                try:
                    files = log_files(Path(directory).resolve())
                except OSError as exc:
                    result.errors.append(f"{directory}: {exc.strerror or exc}")
                    continue
                for path in files:
                    try:
                        self._import_file(path, state, result, left)
                    except FileNotFoundError:
                        continue  # deleted or renamed by its writer or km_send meanwhile
                    except IsADirectoryError:
                        result.errors.append(f"{path}: a directory, not a log")
                    except OSError as exc:
                        result.errors.append(f"{path}: {exc.strerror or exc}")
                    if result.more:
                        return result
        finally:
            os.close(lock)  # releases the flock
        return result

    def _import_file(self, path: Path, state: dict, result: ImportResult,
                     left: list[int | None]) -> None:
        fd = flocked(path)
        try:
            st = os.fstat(fd)
            if st.st_nlink == 0 or os.stat(path).st_ino != st.st_ino:
                return  # deleted or replaced while we waited for the lock
            self._import_held(path, fd, st, state, result, left)
        finally:
            os.close(fd)  # releases the flock

    def _import_held(self, path: Path, fd: int, st: os.stat_result, state: dict,
                     result: ImportResult, left: list[int | None]) -> None:
        offset = self._resume_at(fd, st, path, state)
        while offset < st.st_size:
            if left[0] is not None and left[0] <= 0:
                result.more = True
                return  # the rest next time: the offset is recorded
            data = os.pread(fd, min(CHUNK_BYTES, st.st_size - offset), offset)
            if not data:
                # Cut short under us (a copytruncate ignores the flock): read it
                # afresh next time, from its start.
                state.pop(str(path), None)
                self._save(state)
                return
            end = data.rfind(b"\n") + 1
            if end and offset + len(data) < st.st_size:
                data = data[:end]  # whole lines only, unless this is the file's end
            events, bad = self._parse(data)
            self.spool.append_many(events)  # synced before the offset moves
            self._set_aside(path, bad)
            offset += len(data)
            if left[0] is not None:
                left[0] -= len(data)
            state[str(path)] = {"inode": st.st_ino, "offset": offset, "head": _head(fd, offset)}
            self._save(state)
            result.imported += len(events)
            result.malformed += len(bad)
            if str(path) not in result.files:
                result.files.append(str(path))
        if SENDING_LOG.match(path.name):
            path.unlink(missing_ok=True)
            state.pop(str(path), None)
        elif st.st_size:
            os.ftruncate(fd, 0)  # the writers append from the new end: 0
            os.fsync(fd)
            state[str(path)] = {"inode": st.st_ino, "offset": 0, "head": ""}
        else:
            return
        self._save(state)

    @staticmethod
    def _resume_at(fd: int, st: os.stat_result, path: Path, state: dict) -> int:
        """Where the unread part begins: 0 unless this is the very file read before
        (under this name, or another: km_send renames the query log it sends), still
        starting with the same bytes and not shorter than what was read."""
        remembered = state.get(str(path)) or next(
            (entry for entry in state.values() if entry["inode"] == st.st_ino), None)
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

    def _set_aside(self, path: Path, bad: list[tuple[str, str]]) -> None:
        if not bad:
            return
        try:
            append_to(self.bad_path, b"".join(
                (json.dumps({"file": str(path), "line": line, "reason": reason},
                            ensure_ascii=False) + "\n").encode() for line, reason in bad),
                sync=True)
        except OSError as exc:  # the spool's side, not the log's: stop the import
            raise SpoolError(f"cannot set malformed lines aside in {self.bad_path}: "
                             f"{exc.strerror or exc}") from None

    def _load(self) -> dict:
        try:
            state = json.loads(self.state_path.read_text())
            if isinstance(state, dict) and all(
                    isinstance(v, dict) and {"inode", "offset", "head"} <= set(v)
                    for v in state.values()):
                return state
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            pass
        log.warning("%s is unreadable; starting over (lines may be imported twice)",
                    self.state_path)
        return {}

    def _save(self, state: dict) -> None:
        try:
            write_atomically(self.state_path, json.dumps(state, sort_keys=True).encode())
        except OSError as exc:  # the spool's side, not the log's: stop the import
            raise SpoolError(f"cannot record import progress in {self.state_path}: "
                             f"{exc.strerror or exc}") from None


def _head(fd: int, size: int) -> str:
    return hashlib.sha256(os.pread(fd, min(size, HEAD_BYTES), 0)).hexdigest()


class KmLogFollower:
    """``[km_log] dirs`` for the daemon: import what the apps logged, at most every
    ``FOLLOW_EVERY_S`` (the loop turns on every finished request) and a chunk at a
    time (the loop must keep shipping and pinging systemd's watchdog). Never raises:
    a log it cannot read, or a full spool, is said once and shipping goes on."""

    FOLLOW_EVERY_S = 0.25

    def __init__(self, spool: Spool) -> None:
        self._importer = KmLogImporter(spool)
        self._last = -self.FOLLOW_EVERY_S
        self._said: set[str] = set()  # problems already logged, until they clear

    def follow(self, directories: tuple[Path, ...]) -> bool:
        """Import what is new; True if more is waiting (call again soon)."""
        if not directories or time.monotonic() - self._last < self.FOLLOW_EVERY_S:
            return False
        self._last = time.monotonic()
        try:
            result = self._importer.import_dirs(list(directories), budget=CHUNK_BYTES,
                                                wait=False)  # `kmagent import` is at it
        except Exception as exc:  # e.g. the spool is full: the shipper must go on
            self._say(f"cannot import km logs: {exc}")
            return False
        problems = set(result.errors)
        for problem in problems - self._said:
            log.error("cannot import km logs: %s", problem)
        self._said = problems
        if result.imported:
            log.info("imported %d events from km logs", result.imported)
        if result.malformed:
            log.warning("%d malformed lines in km logs set aside in %s",
                        result.malformed, result.bad_path)
        return result.more

    def _say(self, problem: str) -> None:
        if problem not in self._said:
            log.error("%s", problem)
            self._said = {problem}
