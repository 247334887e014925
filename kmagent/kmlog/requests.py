"""A logged request → the Event kmagent sends: the same parameters, byte for byte, as
the library that logged it would have sent, plus ``_d=1`` beside its ``_t``.

Two formats are logged (PROTOCOL.md, "Kissmetrics' own logs"):

- a request line (km, kmts, km.php): ``/e?_n=…&_p=…&_k=…&_t=…``, percent-encoded; its
  parameters are kept as written (only ``_k`` is taken out, to travel as the event's
  key), so bytes that are not UTF-8 (``caf%E9``) are sent as the library sent them;
- a PHP ``serialize()`` array (kissmetrics-php's Delayed transport): one or more
  ``[path, {name: value}]`` requests, which its Sockets transport sends through PHP's
  ``http_build_query``: true/false as 1/0, null left out, arrays as ``name[key]``,
  floats as PHP prints them with 14 digits.

Set aside, never sent, is only what Kissmetrics itself cannot take (README, "What is
set aside"): each BadRecord carries one of REASONS.
"""

from __future__ import annotations

import math
from typing import Any
from urllib.parse import quote_from_bytes, unquote_to_bytes

from ..events import (ALIAS, EARLIEST_TIME, EVENT, LATEST_TIME, MAX_NAME_CHARS,
                      MAX_REQUEST_LINE, MAX_VALUE_BYTES, SET, Event, ASSUMED_KEY_CHARS)
from ..protocol import request_line_length

# Why a logged request is set aside; the README explains each.
REASONS = {
    "unreadable": "not a request the libraries log (garbled, torn or another format)",
    "person": "no person (_p), or an empty one",
    "event": "an event (/e) without a name, or an alias (/a) without a second identity",
    "time": "_t is not Unix seconds between 2009 and 2106 (milliseconds, or too old)",
    "name": "a person, event or property name over 255 characters",
    "size": "a value over 8,192 bytes, or a request line over 8,190 bytes",
    "empty": "a set (/s) of no properties",
    "nul": "a run of NUL bytes between records (a crash lost the writes there)",
}

PATHS = {b"/e": EVENT, b"/s": SET, b"/a": ALIAS}
# Every byte but RFC 3986's unreserved ones is escaped in what we send; a raw byte a
# log holds unescaped (a space, non-ASCII text) is escaped to the same byte.
_SAFE = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~%=&+"


class BadRecord(ValueError):
    """A logged request that is set aside: ``reason`` (a key of REASONS) and why."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


Param = tuple[str, bytes, bytes]  # as it will be sent (escaped), name and value decoded


def from_request_line(line: bytes, now: float) -> Event:
    """One km/kmts/km.php log line (``/e?…``, or a whole ``http://host/e?…`` URL)."""
    text = line.strip()
    if text.startswith((b"http://", b"https://")):
        slash = text.find(b"/", text.find(b"//") + 2)
        text = text[slash:] if slash > 0 else b""
    path, sep, query = text.partition(b"?")
    kind = PATHS.get(path)
    if kind is None or not sep:
        raise BadRecord("unreadable", "not a logged request (/e?, /s? or /a?)")
    params: list[Param] = []
    for item in query.split(b"&"):
        if not item:
            continue
        item = _escape_raw(item)
        name, _, value = item.partition(b"=")
        params.append((item.decode("ascii"), _unquote(name), _unquote(value)))
    return _event(kind, params, now)


def from_php_requests(value: Any, now: float) -> list[Event | BadRecord]:
    """The requests of one kissmetrics-php Delayed log entry, ``[[path, params], …]``,
    each an Event or the BadRecord that sets it aside (BadRecord raised if the entry is
    no list of requests at all)."""
    if not isinstance(value, dict) or not value:
        raise BadRecord("unreadable", "not a list of requests")
    results: list[Event | BadRecord] = []
    for request in value.values():
        if not (isinstance(request, dict) and set(request) == {0, 1}
                and isinstance(request[0], bytes) and isinstance(request[1], dict)):
            raise BadRecord("unreadable", "a request is [path, parameters]")
        kind = PATHS.get(b"/" + request[0])
        if kind is None:
            raise BadRecord("unreadable", f"path {request[0]!r} is not e, s or a")
        params: list[Param] = []
        _build_query(request[1], None, params)
        try:
            results.append(_event(kind, params, now))
        except BadRecord as exc:
            results.append(exc)
    return results


def _escape_raw(item: bytes) -> bytes:
    if all(b in _SAFE for b in item):
        return item
    return b"".join(bytes((b,)) if b in _SAFE else b"%%%02X" % b for b in item)


def _unquote(text: bytes) -> bytes:
    return unquote_to_bytes(text.replace(b"+", b" "))


def _build_query(data: dict, prefix: bytes | None, params: list[Param]) -> None:
    """PHP's http_build_query(data, '', '&'), as Sockets sends it (%20 for a space)."""
    for key, value in data.items():
        name = key if isinstance(key, bytes) else str(key).encode()
        if prefix is not None:
            name = prefix + b"[" + name + b"]"
        if value is None:
            continue  # http_build_query leaves nulls out
        if isinstance(value, dict):
            _build_query(value, name, params)
            continue
        if value is True or value is False:
            text = b"1" if value else b"0"
        elif isinstance(value, float):
            text = _php_float(value).encode()
        elif isinstance(value, int):
            text = str(value).encode()
        else:
            text = value
        escaped = quote_from_bytes(name, safe="") + "=" + quote_from_bytes(text, safe="")
        params.append((escaped, name, text))


def _php_float(value: float) -> str:
    """A float as PHP prints it at its default precision (14): 0.1, 1.0E+20, 1.0E-7."""
    if math.isnan(value):
        return "NAN"
    if math.isinf(value):
        return "INF" if value > 0 else "-INF"
    text = "%.14G" % value
    mantissa, e, exponent = text.partition("E")
    if not e:
        return text
    if "." not in mantissa:
        mantissa += ".0"
    return f"{mantissa}E{int(exponent):+d}"


def _chars(text: bytes) -> int:
    return len(text.decode("utf-8", "replace"))


def _text(text: bytes) -> str:
    return text.decode("utf-8", "replace")


def _event(kind: str, params: list[Param], now: float) -> Event:
    """Check what Kissmetrics cannot take; the Event that sends ``params`` as they are,
    ``_k`` taken out, ``_d=1`` right after ``_t`` (added, dated ``now``, if missing)."""
    fields: dict[bytes, bytes] = {}
    sent: list[str] = []
    properties = 0
    for escaped, name, value in params:
        if name in (b"_k", b"_p", b"_n", b"_t", b"_d"):
            if name not in fields:
                fields[name] = value
            if name in (b"_k", b"_d"):
                continue  # the key travels apart; _d=1 goes after _t
        else:
            properties += 1
            if not name or _chars(name) > MAX_NAME_CHARS:
                raise BadRecord("name", f"property name of {_chars(name)} characters")
            if len(value) > MAX_VALUE_BYTES:
                raise BadRecord("size", f"property {_text(name)[:40]!r}: {len(value):,} bytes")
        sent.append(escaped)
        if name == b"_t":
            sent.append("_d=1")
    person = fields.get(b"_p")
    if not person:
        raise BadRecord("person", "no _p")
    if _chars(person) > MAX_NAME_CHARS:
        raise BadRecord("name", f"person of {_chars(person)} characters")
    name = fields.get(b"_n")
    if kind != SET:
        if not name:
            raise BadRecord("event", "no _n")
        if _chars(name) > MAX_NAME_CHARS:
            raise BadRecord("name", f"{'event' if kind == EVENT else 'identity'} "
                                    f"of {_chars(name)} characters")
    elif not properties:
        raise BadRecord("empty", "a set of no properties")
    if b"_t" in fields:
        stamp = fields[b"_t"]
        if not (stamp.isdigit() and EARLIEST_TIME <= int(stamp) <= LATEST_TIME):
            raise BadRecord("time", f"_t={_text(stamp)[:20]}")
        time = int(stamp)
    else:
        time = int(now)  # logged without one: dated when imported, and frozen
        sent += [f"_t={time}", "_d=1"]
    key = _text(fields[b"_k"]) if fields.get(b"_k") else None
    query = "&".join(sent)
    size = request_line_length(kind, query, ASSUMED_KEY_CHARS if key is None else
                               len(quote_from_bytes(fields[b"_k"], safe="")))
    if size > MAX_REQUEST_LINE:
        raise BadRecord("size", f"request line of {size:,} bytes")
    return Event(kind, _text(person), None if name is None else _text(name), time, (),
                 key, query)
