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
# is followed by the beginning of a record (a newline inside a value rarely is).
_RESYNC = re.compile(rb"\n(?=a:\d|/[esa]\?|https?://)")


@dataclass
class Bad:
    raw: bytes  # the record as logged
    reason: str  # a key of requests.REASONS
    detail: str


def recognised(head: bytes) -> bool:
    """Whether a log that begins with ``head`` is in a format kmagent reads (an empty
    one is: nothing in it can be lost)."""
    head = head.lstrip()
    return not head or head.startswith(_REQUEST_START) or bool(_PHP_START.match(head))


def parse(data: bytes, *, final: bool, now: float) -> tuple[list[Event], list[Bad], int]:
    """The events and the bad records in ``data``, and how many bytes they took: whole
    records only, unless ``final`` (no writer can add to it any more), when an
    unfinished last record is read too (a request line: as km_send reads it) or set
    aside (torn)."""
    events: list[Event] = []
    bad: list[Bad] = []
    pos = 0
    size = len(data)
    while pos < size:
        if data[pos] in b" \t\r\n":
            pos += 1
            continue
        if _PHP_START.match(data, pos):
            end = _php(data, pos, final, now, events, bad)
        else:
            newline = data.find(b"\n", pos)
            if newline < 0 and not final:
                break  # its writer may be finishing it
            end = size if newline < 0 else newline + 1
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
    except phpserial.Incomplete:
        if not final:
            return None
        bad.append(Bad(data[pos:].rstrip(b"\r\n"), "unreadable", "a torn PHP entry"))
        return len(data)
    except phpserial.Malformed as exc:
        resync = _RESYNC.search(data, pos)
        if resync is None and not final:
            return None  # the next record, or the end of the file, will tell
        end = len(data) if resync is None else resync.end()
        bad.append(Bad(data[pos:end].rstrip(b"\r\n"), "unreadable", f"PHP entry: {exc}"))
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
