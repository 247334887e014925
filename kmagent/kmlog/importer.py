"""Import the logs of Kissmetrics' own libraries (km, kmts, km.php, kissmetrics-php)
into the spool, losing no line whatever the writer, and storing none twice.

Per directory, each pass: the query logs are read where they lie (whole records only:
a writer may be finishing the last), and taken over now and then (takeover.py: renamed,
then read to the end and deleted once settled); km_send's orphaned sending logs are
read and deleted the same way. A file is read in chunks; after each, its events are in
the spool (synced) and how far it was read is recorded beside the spool with its inode
and a hash of its first bytes, keyed by the file's identity (device and inode), not
its name: renaming a file (a takeover, km_send) changes nothing of what is known of it,
so a crash costs at most that chunk stored again (the same requests, the same ``_t`` and
``_d=1``: Kissmetrics counts them once) and a file replaced under the same name is
never skipped into. A query log whose format is not one kmagent reads, or that is a
symbolic link, is left untouched and named.
"""

from __future__ import annotations

import collections
import errno
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SpoolError
from ..spool import Spool
from ..spool.files import append_to, flocked, write_atomically
from . import records, takeover

log = logging.getLogger("kmagent.kmlog")

HEAD_BYTES = 256  # how much of a file's beginning identifies it
CHUNK_BYTES = 4 * 1024 * 1024  # read, stored and recorded at a time
BAD_LINE_BYTES = 4096  # of a set-aside record, kept in full up to this
STATE_NAME, BAD_NAME = "km-log.json", "km-log-bad.jsonl"


@dataclass
class ImportResult:
    imported: int = 0  # events put into the spool
    set_aside: collections.Counter = field(default_factory=collections.Counter)  # by reason
    files: list[str] = field(default_factory=list)  # files that held something new
    errors: list[str] = field(default_factory=list)  # files or directories not read
    waiting: list[str] = field(default_factory=list)  # taken over, still being written
    more: bool = False  # stopped at the budget: more is waiting
    bad_path: Path | None = None  # where set-aside records went

    @property
    def malformed(self) -> int:
        return sum(self.set_aside.values())


class KmLogImporter:
    """Imports km log directories into ``spool``; keeps its state beside the spool.
    ``take_over_every`` is how often a query log is renamed and finished (0: on
    every pass, as `kmagent import km-log` does)."""

    def __init__(self, spool: Spool, *, take_over_every: float = 0.0,
                 settle_s: float = takeover.SETTLE_S) -> None:
        self.spool = spool
        base = spool.path if spool.path.is_dir() else spool.path.parent
        prefix = "" if spool.path.is_dir() else spool.path.name + "."
        self.state_path = base / (prefix + STATE_NAME)
        self.bad_path = base / (prefix + BAD_NAME)
        self.take_over_every = take_over_every
        self.settle_s = settle_s
        self._taken_at: dict[str, float] = {}  # query log -> when last taken over
        self._taking_over = True

    def import_and_finish(self, directories: list[Path],
                          within: float = 30.0) -> ImportResult:
        """`kmagent import km-log`: import, take every query log over, and wait (up to
        ``within`` seconds) until what was taken over is settled, read and deleted."""
        result = self.import_dirs(directories)
        deadline = time.monotonic() + within
        while result.waiting and not result.errors and time.monotonic() < deadline:
            time.sleep(min(0.05, self.settle_s))
            step = self.import_dirs(directories, take_over=False)
            result.imported += step.imported
            result.set_aside.update(step.set_aside)
            result.files += [f for f in step.files if f not in result.files]
            result.errors, result.waiting = step.errors, step.waiting
        return result

    def import_dirs(self, directories: list[Path], *, budget: int | None = None,
                    wait: bool = True, take_over: bool = True) -> ImportResult:
        """Import what is in ``directories``; with ``budget``, stop after reading about
        that many bytes (the rest waits for the next call). If another import is
        running, wait for it, or with ``wait=False`` return at once, having done nothing.
        Without ``take_over``, query logs are read but none is taken over."""
        result = ImportResult(bad_path=self.bad_path)
        self._taking_over = take_over
        # One importer at a time (the daemon and `kmagent import`): the state is read
        # and written whole, and a file one has deleted must not be read by the other.
        lock_path = self.state_path.with_name(self.state_path.name + ".lock")
        try:
            lock = flocked(lock_path, create=True, wait=wait)
        except BlockingIOError:
            return result  # another import is running, and we were not to wait
        except OSError as exc:
            raise SpoolError(f"cannot lock {lock_path}: {exc.strerror or exc}") from exc
        try:
            state = self._load()
            left = [budget]
            for directory in directories:
                self._import_dir(Path(directory).resolve(), state, result, left)
                if result.more:
                    break
        finally:
            os.close(lock)  # releases the flock
        return result

    def _import_dir(self, directory: Path, state: dict, result: ImportResult,
                    left: list[int | None]) -> None:
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            return
        except OSError as exc:
            result.errors.append(f"{directory}: {exc.strerror or exc}")
            return
        for path in takeover.query_logs(directory, names):
            self._attempt(path, result, lambda p=path: self._query_log(p, state, result, left))
            if result.more:
                return
        names = os.listdir(directory)  # with what was just taken over
        for path in takeover.renamed_logs(directory, names):
            self._attempt(path, result, lambda p=path: self._renamed(p, state, result, left))
            if result.more:
                return
        self._forget_missing(directory, state)

    @staticmethod
    def _attempt(path: Path, result: ImportResult, step) -> None:
        try:
            step()
        except FileNotFoundError:
            pass  # renamed by its writer or deleted meanwhile: found again, or gone
        except IsADirectoryError:
            result.errors.append(f"{path}: a directory, not a log")
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                result.errors.append(f"{path}: {exc.strerror or exc}")
                return
            # Renaming a link would move the link, not the log: its target would never
            # be emptied, and the apps would log to a new plain file beside it.
            result.errors.append(f"{path}: a symbolic link; left as it is (name the "
                                 "directory its target is in, or make it a plain file)")

    def _query_log(self, path: Path, state: dict, result: ImportResult,
                   left: list[int | None]) -> None:
        """Read what is new in a query log, where it lies; take it over when due."""
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            st = os.fstat(fd)
            if not self._recognised(path, fd, result):
                return
            self._read(path, fd, st, state, result, left, final=False)
            if result.more or not st.st_size:
                return
            since = time.monotonic() - self._taken_at.get(str(path), -1e9)
            if self._taking_over and since >= self.take_over_every:
                takeover.take_over(path)  # what is known of it goes with its inode
                self._taken_at[str(path)] = time.monotonic()
        finally:
            os.close(fd)

    def _renamed(self, path: Path, state: dict, result: ImportResult,
                 left: list[int | None]) -> None:
        """A file taken over, or an orphaned sending log: read what is new; once it is
        settled, read the rest and delete it."""
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            st = os.fstat(fd)
            if not self._recognised(path, fd, result):
                return
            if not takeover.settled(fd, st, self.settle_s):
                # A sending log held open is a sender's at work (its cron job not yet
                # removed): reading it would send its lines a second time.
                if takeover.TAKEN_LOG.match(path.name) or not takeover.held_open(st):
                    self._read(path, fd, st, state, result, left, final=False)
                if not result.more:
                    result.waiting.append(str(path))
                return
            self._read(path, fd, st, state, result, left, final=True)
            if result.more:
                return
            os.unlink(path)
            late = os.fstat(fd)  # written between the last look and the delete?
            if late.st_size > st.st_size:
                self._read(path, fd, late, state, result, [None], final=True)
            state.pop(_identity(st), None)
            self._save(state)
        finally:
            os.close(fd)  # and with it the flock settled() took

    @staticmethod
    def _recognised(path: Path, fd: int, result: ImportResult) -> bool:
        # The format shows in its first record: past any NULs a crash left at the head
        # of a log just created (or blank space), however long the run.
        offset = 0
        while chunk := os.pread(fd, CHUNK_BYTES, offset):
            blank = len(chunk) - len(chunk.lstrip(records.BLANK))
            if blank < len(chunk):
                offset += blank
                break
            offset += len(chunk)
        if records.recognised(os.pread(fd, HEAD_BYTES, offset)):
            return True
        result.errors.append(f"{path}: not a log kmagent reads (requests logged by km, "
                             "kmts, km.php or kissmetrics-php); left as it is")
        return False

    def _read(self, path: Path, fd: int, st: os.stat_result, state: dict,
              result: ImportResult, left: list[int | None], *, final: bool) -> None:
        offset = self._resume_at(fd, st, state)
        while offset < st.st_size:
            if left[0] is not None and left[0] <= 0:
                result.more = True
                return  # the rest next time: the offset is recorded
            data = os.pread(fd, min(CHUNK_BYTES, st.st_size - offset), offset)
            if not data:
                return  # cut short under us (a copytruncate): _resume_at will see
            last = offset + len(data) >= st.st_size
            events, bad, used = records.parse(data, final=final and last, now=time.time())
            if not used:
                if not last:  # one record bigger than a chunk: read it whole
                    data = os.pread(fd, st.st_size - offset, offset)
                    events, bad, used = records.parse(data, final=final, now=time.time())
                if not used:
                    return  # an unfinished record: its writer may finish it
            self.spool.append_many(events)  # synced before the offset moves
            self._set_aside(path, bad, result)
            offset += used
            if left[0] is not None:
                left[0] -= used
            state[_identity(st)] = {"name": str(path), "dev": st.st_dev, "inode": st.st_ino,
                                    "offset": offset, "head": _head(fd, offset)}
            self._save(state)
            result.imported += len(events)
            if str(path) not in result.files:
                result.files.append(str(path))

    @staticmethod
    def _resume_at(fd: int, st: os.stat_result, state: dict) -> int:
        """Where the unread part begins: 0 unless this is the very file read before
        (the same device and inode, whatever its name now), still starting with the
        same bytes and not shorter than what was read (the inode was not reused)."""
        remembered = state.get(_identity(st))
        if not remembered:
            return 0
        offset = remembered["offset"]
        if st.st_size < offset or _head(fd, offset) != remembered["head"]:
            return 0
        return offset

    @staticmethod
    def _forget_missing(directory: Path, state: dict) -> None:
        """Drop what is remembered of files in ``directory`` that are gone (deleted
        by a crashed import after it had read them, or by an operator)."""
        try:
            names = os.listdir(directory)
        except OSError:
            return  # gone, or unreadable since the pass began: next time
        present = set()
        for path in takeover.query_logs(directory, names) + takeover.renamed_logs(
                directory, names):
            try:
                present.add(_identity(os.stat(path, follow_symlinks=False)))
            except FileNotFoundError:
                return  # renamed since the listing (km_send?): forget nothing this time
        for key in [k for k, entry in state.items()
                    if Path(entry["name"]).parent == directory and k not in present]:
            del state[key]

    def _set_aside(self, path: Path, bad: list[records.Bad], result: ImportResult) -> None:
        if not bad:
            return
        lines = []
        for record in bad:
            entry = {"file": str(path), "reason": record.reason, "detail": record.detail,
                     "line": record.raw[:BAD_LINE_BYTES].decode("utf-8", "backslashreplace")}
            if len(record.raw) > BAD_LINE_BYTES:
                entry["bytes"] = len(record.raw)  # kept: the start, and the length
            lines.append((json.dumps(entry, ensure_ascii=False) + "\n").encode())
            result.set_aside[record.reason] += 1
        try:
            append_to(self.bad_path, b"".join(lines), sync=True)
        except OSError as exc:  # the spool's side, not the log's: stop the import
            raise SpoolError(f"cannot set records aside in {self.bad_path}: "
                             f"{exc.strerror or exc}") from exc

    def _load(self) -> dict:
        try:
            state = json.loads(self.state_path.read_text())
            if isinstance(state, dict) and all(
                    isinstance(v, dict) and {"inode", "offset", "head"} <= set(v)
                    for v in state.values()):
                return _by_identity(state)
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
                             f"{exc.strerror or exc}") from exc


def _identity(st: os.stat_result) -> str:
    return f"{st.st_dev}:{st.st_ino}"


def _by_identity(state: dict) -> dict:
    """The state, each file keyed by its identity: one written by an earlier kmagent
    was keyed by name, with the inode only (the device is its directory's)."""
    keyed = {}
    for key, entry in state.items():
        if "dev" not in entry or "name" not in entry:
            try:
                entry = {**entry, "name": key, "dev": os.stat(Path(key).parent).st_dev}
            except OSError:
                continue  # its directory is gone: so is the file
        keyed[f"{entry['dev']}:{entry['inode']}"] = entry
    return keyed


def _head(fd: int, size: int) -> str:
    return hashlib.sha256(os.pread(fd, min(size, HEAD_BYTES), 0)).hexdigest()
