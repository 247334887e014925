"""``kmagent export``: events in the spool as lines of Kissmetrics' newline-JSON import
format, for bulk backfills: one JSON object a line with ``_p`` and ``_t``, ``_n`` for an
event, ``_p2`` for an alias, every other key a property (values as they would be sent).

An exported line must read in the import exactly as the tracking API read the request
(PROTOCOL.md, "The import format"). An event that cannot be written so is left out and
counted, never written changed: a property named ``_p2`` (the import would alias two
people; record() refuses the name, but a km log imported byte for byte may hold it), a
property given twice (JSON keeps one), a value that is not UTF-8 (JSON has no bytes).
"""

from __future__ import annotations

import collections
import json
from dataclasses import dataclass, field
from urllib.parse import parse_qsl

from .errors import InvalidEvent
from .events import ALIAS, EVENT, IMPORT_RESERVED_NAMES
from .protocol import split_query
from .spool import Spool


class Unexportable(ValueError):
    """The import would read this event differently; the message says why."""


@dataclass
class Export:
    lines: list[str] = field(default_factory=list)
    left_out: collections.Counter = field(default_factory=collections.Counter)  # by reason


def import_line(path: str, query: str, created: float) -> str:
    """One stored request as an import line. An alias carries no time of its own: it is
    given the time it was recorded (the import format requires ``_t``)."""
    try:
        names = [name for name, _ in parse_qsl(query, keep_blank_values=True, errors="strict")]
    except UnicodeDecodeError:
        raise Unexportable("a value that is not UTF-8 (the import's JSON holds text only)") from None
    if len(set(names)) != len(names):
        raise Unexportable("a parameter given twice (the import keeps one)")
    reserved = IMPORT_RESERVED_NAMES.intersection(names)
    if reserved:
        raise Unexportable(f"a property named {min(reserved)!r} (the import reads it as "
                           "an alias)")
    fields, properties = split_query(query)
    line: dict[str, object] = {"_p": fields["_p"]}
    if path == EVENT:
        line["_n"] = fields["_n"]
    elif path == ALIAS:
        line["_p2"] = fields["_n"]
    line["_t"] = int(fields["_t"]) if "_t" in fields else int(created)
    line.update(properties)
    return json.dumps(line, ensure_ascii=False, separators=(",", ":"))


def export_lines(spool: Spool, *, dead: bool = False, key: str | None = None,
                 configured_key: str | None = None) -> Export:
    """Import lines for every pending event (or every dead letter), oldest first, and
    the count of those left out, by reason.

    An import is for one Kissmetrics product, that is one API key: events recorded with
    a key of their own are told apart from those sent with ``configured_key``. With
    events of several keys, ``key`` must choose one (InvalidEvent says so otherwise)."""
    requests = [(path, query, api_key or configured_key, created)
                for path, query, api_key, created in spool.requests(dead=dead)]
    keys = {api_key for _, _, api_key, _ in requests}
    if key is None and len(keys) > 1:
        raise InvalidEvent("--key", f"these events belong to {len(keys)} API keys (one "
                                    "Kissmetrics product each): export one key at a time")
    result = Export()
    for path, query, api_key, created in requests:
        if key is not None and api_key != key:
            continue
        try:
            result.lines.append(import_line(path, query, created))
        except Unexportable as exc:
            result.left_out[str(exc)] += 1
    return result
