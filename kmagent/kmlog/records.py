"""A km log's bytes → its records: request lines, and PHP serialize() entries that a
newline inside a value may spread over several lines (kissmetrics-php)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..events import Event
from . import phpserial
from .requests import BadRecord, from_php_requests, from_request_line

# How each kind of record begins; a file that begins otherwise is no km log.
_REQUEST_START = (b"/e?", b"/s?", b"/a?", b"http://", b"https://")
_PHP_START = re.compile(rb"a:\d")
# Where reading may start again after a PHP entry that does not parse: a newline that
# is followed by the beginning of a record (a newline inside a value rarely is)...
_RESYNC = re.compile(rb"\n(?=a:\d|/[esa]\?|https?://)")
# ...or, before it, an entry glued to a torn one (its writer was killed mid-write, and
# the next writer appended right after it), if it parses whole up to its newline.
_GLUED = re.compile(rb"a:\d+:\{")
# Between records, skipped: white space, and NULs, which a crash can leave where the
# last writes' blocks were never written (ext4's delayed allocation); a NUL is in no
# request line (the libraries escape it), so one also ends a line torn by the crash.
BLANK = b" \t\r\n\0"
_LINE_END = re.compile(rb"[\n\0]")
_NULS = re.compile(rb"\0+")


@dataclass
class Bad:
    raw: bytes  # the record as logged
    reason: str  # a key of requests.REASONS
    detail: str


def recognised(head: bytes) -> bool:
    """Whether a log that begins with ``head`` is in a format kmagent reads (an empty
    one is: nothing in it can be lost)."""
    head = head.lstrip(BLANK)
    return not head or head.startswith(_REQUEST_START) or bool(_PHP_START.match(head))


def parse(data: bytes, *, final: bool, now: float) -> tuple[list[Event], list[Bad], int]:
    """The events and the bad records in ``data``, and how many bytes they took: whole
    records only, unless ``final`` (no writer can add to it any more), when an
    unfinished last record is read too (a request line: as km_send reads it) or set
    aside (torn). A run of NULs is counted as a ``nul`` record (its length, not its
    bytes), never sent."""
    events: list[Event] = []
    bad: list[Bad] = []
    pos = 0
    size = len(data)
    while pos < size:
        if data[pos] == 0:
            end = _NULS.match(data, pos).end()
            bad.append(Bad(b"", "nul", f"{end - pos} NUL bytes, where a crash lost writes"))
            pos = end
            continue
        if data[pos] in BLANK:
            pos += 1
            continue
        if _PHP_START.match(data, pos):
            end = _php(data, pos, final, now, events, bad)
        else:
            found = _LINE_END.search(data, pos)
            if found is None and not final:
                break  # its writer may be finishing it
            # A newline is the line's; a NUL is the next run's, skipped above.
            end = size if found is None else found.end() - (data[found.start()] == 0)
            try:
                events.append(from_request_line(data[pos:end], now))
            except BadRecord as exc:
                bad.append(Bad(data[pos:end].rstrip(b"\r\n"), exc.reason, str(exc)))
        if end is None:
            break
        pos = end
    return events, bad, pos


def _php(data: bytes, pos: int, final: bool, now: float, events: list[Event],
         bad: list[Bad]) -> int | None:
    """Read the PHP entry at ``pos``; where the next record starts, or None to wait."""
    try:
        value, end = phpserial.loads_at(data, pos)
        if end < len(data) and data[end:end + 1] not in (b"\n", b"\r"):
            raise phpserial.Malformed(f"byte {end}: a newline expected after the entry")
        if end >= len(data) and not final:
            return None  # its newline is still to come
    except (phpserial.Incomplete, phpserial.Malformed) as exc:
        # Incomplete and final: torn (its string's declared length runs past the data).
        # Either way only the entry is set aside; reading goes on at the next record.
        if isinstance(exc, phpserial.Incomplete) and not final:
            return None  # its writer may be finishing it
        end = _resync(data, pos, final)
        if end is None:
            return None  # the next record, or the end of the file, will tell
        torn = isinstance(exc, phpserial.Incomplete)
        why = "a torn PHP entry" if torn else f"PHP entry: {exc}"
        bad.append(Bad(data[pos:end].rstrip(b"\r\n\0"), "unreadable", why))
        return end
    try:
        results = from_php_requests(value, now)
    except BadRecord as exc:
        results = [exc]
    for result in results:
        if isinstance(result, BadRecord):
            bad.append(Bad(data[pos:end], result.reason, str(result)))
        else:
            events.append(result)
    return end


def _resync(data: bytes, pos: int, final: bool) -> int | None:
    """Where the record after the unreadable PHP entry at ``pos`` begins: an entry glued
    to it, a newline-led record, or the end of the data; None to wait for more."""
    newline = _RESYNC.search(data, pos)
    limit = newline.end() if newline else len(data)
    for glued in _GLUED.finditer(data, pos + 1, limit):
        try:
            _, end = phpserial.loads_at(data, glued.start())
        except phpserial.Incomplete:
            if not final:
                return None  # it, or the entry at pos, may be finished yet
            continue
        except phpserial.Malformed:
            continue  # a part of the broken entry itself
        if data[end:end + 1] in (b"\n", b"\r") or (final and end == len(data)):
            return glued.start()
    if newline is None:
        return len(data) if final else None
    return newline.end()
