"""The newline-JSON spool's line format (version 1): Event ⇄ one JSON object.

As close to Kissmetrics' own newline-JSON import format as it can be: ``_p`` the
person, ``_n`` the event name (events), ``_p2`` the second identity (aliases), ``_t``
the event's Unix time; every other key is a property, in the order given. The agent
adds the least it needs: ``_c`` (when the line was written, Unix seconds, a float),
``_k`` (the API key, only when the producer gave one) and ``_v`` (the format version).

``_o`` (origin) is written by the shipper alone, on the copy it makes when it moves a
line that keeps failing to the end of the spool: ``[file sequence number, byte offset]``
of the line as first written, kept as it is when a copy is moved again. It tells that
the copy was pending before any mark taken after the original (``kmagent flush``
counts it as such), and finds a copy again after a crash in the middle of a move. It is
added at the end of the object and is no part of the event: the copy's request is the
original's, byte for byte.

``_q`` holds a request imported from a km log (kmlog/requests.py): its query exactly
as that library would have sent it, ``_k`` left out; the line's ``_p``, ``_n``/``_p2``
and ``_t`` then only name it for people (read as UTF-8), and it has no properties of
its own.

Keys beginning with ``_`` belong to the format. A property whose name begins with ``_``
is written with one more ``_`` in front (``_plan`` → ``__plan``) and read back without
it, so no property can be mistaken for a field. Any writer may append such lines (one
``write()`` per line under an exclusive ``flock`` of ``events.jsonl``); lines without
``_v`` are read as version 1 and lines without ``_c`` as written at ``_t``.
"""

from __future__ import annotations

import json
import math
from json.encoder import encode_basestring
from typing import Any

from ...errors import InvalidEvent
from ...memo import Memo
from ...events import (ALIAS, EVENT, SET, Event, check_name, make_alias, make_event,
                      make_set)

FORMAT_VERSION = 1
FIELDS = frozenset({"_p", "_n", "_p2", "_t", "_c", "_k", "_v", "_d", "_o", "_q"})
# How an ``_o`` field begins in a line. Found in a line, it may still be inside a
# property's name (``"x\"_o":``), so a line that has it is parsed to be sure; a line
# without it has no origin, and need not be parsed to know.
ORIGIN_KEY = b'"_o":'

class BadLine(ValueError):
    """A line that is not a valid event; the reason says why."""


def to_line(event: Event, created: float) -> bytes:
    """The line for ``event`` (UTF-8, ending in a newline)."""
    # Built as text rather than through a dict and json's encoder: the values are
    # already validated plain str/int/float/bool, and this runs on every record().
    text = '{"_p":' + _string(event.person)
    if event.kind == EVENT:
        text += ',"_n":' + _string(event.name)
    elif event.kind == ALIAS:
        text += ',"_p2":' + _string(event.name)
    text += ',"_t":' + str(int(created) if event.time is None else event.time)
    if event.query is not None:
        text += ',"_q":' + _string(event.query)
    for name, value in event.props:
        text += "," + _keys[name] + ":" + (
            _string(value) if type(value) is str else _JSON_SCALARS[type(value)](value))
    text += ',"_c":' + float.__repr__(created)
    if event.api_key is not None:
        text += ',"_k":' + _string(event.api_key)
    return (text + _TAIL).encode("utf-8")


_string = encode_basestring  # a JSON string, non-ASCII kept as it is (valid UTF-8)
_TAIL = f',"_v":{FORMAT_VERSION}}}\n'
_JSON_SCALARS = {bool: lambda v: "true" if v else "false", int: int.__repr__,
                 float: float.__repr__}
# Property name -> its JSON key (a leading "_" doubled: see ORIGIN_KEY); names repeat.
_keys: Memo[str] = Memo(lambda name: _string("_" + name if name[0] == "_" else name))


def from_line(line: bytes) -> tuple[Event, float]:
    """The Event a line holds and when it was written; BadLine if it holds none."""
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError) as exc:  # RecursionError: [[[[... nested deep
        raise BadLine(f"not JSON: {str(exc)[:200] or type(exc).__name__}") from None
    if not isinstance(obj, dict):
        raise BadLine("not a JSON object")
    version = obj.pop("_v", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise BadLine(f"format version {version!r}; this kmagent reads {FORMAT_VERSION}")
    props: dict[str, Any] = {}
    fields: dict[str, Any] = {}
    for key, value in obj.items():
        if key.startswith("__"):
            props[key[1:]] = value
        elif key.startswith("_"):
            if key not in FIELDS:
                raise BadLine(f"unknown field {key!r} (a property beginning with _ is "
                              "written with one more _)")
            fields[key] = value
        else:
            props[key] = value
    if "_o" in fields and _origin(fields["_o"]) is None:
        raise BadLine(f"_o: {fields['_o']!r} is not [file sequence number, byte offset]")
    try:
        return _event(fields, props), created_of(fields)
    except InvalidEvent as exc:
        raise BadLine(str(exc)) from None


def _origin(value: Any) -> tuple[int, int] | None:
    if isinstance(value, list) and len(value) == 2 and all(
            type(n) is int and n >= 0 for n in value):
        return value[0], value[1]
    return None


def origin_of(line: bytes) -> tuple[int, int] | None:
    """The ``_o`` of a line (a moved copy), or None: a line without it, or not valid."""
    if ORIGIN_KEY not in line:
        return None
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):
        return None
    return _origin(obj.get("_o")) if isinstance(obj, dict) else None


def with_origin(line: bytes, origin: tuple[int, int]) -> bytes:
    """The copy of a valid line that is moved: ``_o`` added at the end of the object (a
    line that has one already keeps it, and stays byte for byte the same)."""
    if origin_of(line) is not None:
        return line
    body = line.rstrip(b" \t\r\n")  # a valid event's object ends in "}"
    return body[:-1] + b',"_o":[%d,%d]}\n' % origin


def _event(fields: dict[str, Any], props: dict[str, Any]) -> Event:
    api_key = fields.get("_k")
    if api_key is not None:
        check_name("_k", api_key)  # as Client checks its api_key
    if "_d" in fields:
        props["_d"] = fields["_d"]  # validated as record() validates _d: only 1 is accepted
    if "_p2" in fields and "_n" in fields:
        raise BadLine("both _n and _p2: an event or an alias, not both")
    if "_q" in fields:
        return _imported(fields, props, api_key)
    if "_p2" in fields:
        return make_alias(fields.get("_p"), fields["_p2"], api_key=api_key)
    if "_t" not in fields:
        raise BadLine("_t: missing (events and sets carry their time)")
    if "_n" in fields:
        return make_event(fields.get("_p"), fields["_n"], props, timestamp=fields["_t"],
                          api_key=api_key, now=0)
    return make_set(fields.get("_p"), props, timestamp=fields["_t"], api_key=api_key, now=0)


def _imported(fields: dict[str, Any], props: dict[str, Any], api_key: str | None) -> Event:
    """A request imported from a km log: sent as its ``_q`` holds it."""
    query, person, stamp = fields["_q"], fields.get("_p"), fields.get("_t")
    if not (isinstance(query, str) and query.isascii() and query):
        raise BadLine("_q: not a percent-encoded query")
    if props or not isinstance(person, str) or type(stamp) is not int:
        raise BadLine("_q: an imported request has _p and _t, and no properties")
    kind = ALIAS if "_p2" in fields else EVENT if "_n" in fields else SET
    name = fields.get("_p2", fields.get("_n"))
    if name is not None and not isinstance(name, str):
        raise BadLine("_n/_p2: not a string")
    return Event(kind, person, name, stamp, (), api_key, query)


def created_of(fields: dict[str, Any]) -> float:
    """When a line was written: its ``_c``, else its ``_t``; 0 when neither is a time."""
    created = fields.get("_c", fields.get("_t"))
    if isinstance(created, bool) or not isinstance(created, (int, float)) \
            or not math.isfinite(created):
        return 0.0  # unknown: treated as very old
    return float(created)
