"""The Event record, and the rules an event must meet before it may enter the spool.

Kissmetrics answers 200 even to malformed requests (PROTOCOL.md, "The answer
tells nothing"), so a bad event can never be detected after it is sent: everything the
tracking host would silently mangle or drop is refused here, at the caller, with an
``InvalidEvent`` naming the field and the rule.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal
from typing import Any, NamedTuple, Union
from uuid import UUID

from .errors import InvalidEvent
from .memo import Memo

Value = Union[str, int, float, bool]

# Kissmetrics "API Specifications": identities and names are at most 255 characters.
MAX_NAME_CHARS = 255
# Older docs allow 8 KB "in theory"; the current ones document 512 characters.
MAX_VALUE_BYTES = 8192
DOCUMENTED_VALUE_CHARS = 512
# Kissmetrics holds no data before 2009 ("Technical Notes").
EARLIEST_TIME = 1230768000  # 2009-01-01T00:00:00Z
# Python refuses to print ints over 4,300 digits; no analytics value is that long.
MAX_INT_DIGITS = 4000
_MAX_INT_BITS = int(MAX_INT_DIGITS * 3.3219)  # log2(10): a cheap bound on the digits
_SMALL_INT = 2**63  # ints below this need no digit check
# Past 2106 a "timestamp" is almost surely milliseconds; refuse rather than mis-date.
LATEST_TIME = 2**32 - 1
# The whole request line an event makes (``GET``, the target with ``_k``, ``HTTP/1.1``),
# in bytes: Apache's LimitRequestLine (nginx's default buffers are 8 KiB). Hosts refuse
# a longer one, or drop it unanswered, so it would be retried forever.
MAX_REQUEST_LINE = 8190
# An event without a key of its own is sent with the agent's, which the producer may not
# know: it is counted as long as a Kissmetrics API key (40 hex characters). A longer
# configured key is caught when sending (sender.py): the event is dead-lettered.
ASSUMED_KEY_CHARS = 40
# Parameters the agent owns; a property may never override them.
RESERVED_NAMES = frozenset({"_k", "_p", "_n"})
# Kissmetrics' newline-JSON import (``kmagent export``) reads ``_p2`` as an alias's
# second identity: a property of that name would alias two people there (PROTOCOL.md).
IMPORT_RESERVED_NAMES = frozenset({"_p2"})
# Parameters accepted as properties but meaning "the event's time" (as in Kissmetrics'
# own examples: PROTOCOL.md).
TIME_NAMES = frozenset({"_t", "_d"})

EVENT, SET, ALIAS = "e", "s", "a"

log = logging.getLogger("kmagent")
_long_value_names: set[str] = set()


class Event(NamedTuple):
    """One call to record/set/alias, immutable: it is sent exactly as built (a named
    tuple rather than a frozen dataclass: built on every record(), 3x cheaper).

    ``kind`` is the request path (``e``, ``s`` or ``a``); ``name`` is the event name for
    ``e`` and the second identity for ``a``; ``time`` is ``_t`` (None only for aliases).
    ``query`` is set only for a request imported from a km log (kmlog/requests.py): its
    parameters exactly as that library would have sent them, percent-encoded, ``_k``
    left out; it is sent as it stands, and ``props`` is empty.
    """

    kind: str
    person: str
    name: str | None
    time: int | None
    props: tuple[tuple[str, Value], ...] = ()
    api_key: str | None = None
    query: str | None = None


def check_name(field: str, value: Any) -> str:
    """A person, event name, identity or property name: non-empty str, ≤255 chars."""
    # The common case first, in one test: ASCII text is valid UTF-8 as it stands.
    if type(value) is str and 0 < len(value) <= MAX_NAME_CHARS and value.isascii():
        return value
    if not isinstance(value, str):
        raise InvalidEvent(field, f"must be a str, not {type(value).__name__}")
    if not value:
        raise InvalidEvent(field, "must not be empty")
    if len(value) > MAX_NAME_CHARS:
        raise InvalidEvent(field, f"at most {MAX_NAME_CHARS} characters (got {len(value)})")
    _check_utf8(field, value)
    return value


def check_person(field: str, value: Any) -> str:
    """A person or identity: a name (check_name), or an int, sent in decimal (an app's
    ``user.id``, as Kissmetrics' own libraries sent it)."""
    if type(value) is str:
        return check_name(field, value)  # the common case: no more than check_name
    if isinstance(value, int) and not isinstance(value, bool):
        return check_name(field, str(int.__int__(value)))
    if isinstance(value, str):
        return check_name(field, str.__str__(value))
    raise InvalidEvent(field, f"must be a str or an int, not {type(value).__name__}")


def _check_utf8(field: str, value: str) -> int:
    try:
        return len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidEvent(field, "must be encodable as UTF-8 (no lone surrogates)") from None


def check_value(name: str, value: Any) -> Value:
    """A property value: str (≤8,192 UTF-8 bytes), int, finite float or bool; a Decimal
    or a UUID is sent as its ``str()``."""
    kind = type(value)
    # The common cases first: short ASCII text, and numbers of everyday size.
    if kind is str:
        if len(value) <= DOCUMENTED_VALUE_CHARS and value.isascii():
            return value
    elif kind is int:
        if -_SMALL_INT < value < _SMALL_INT:
            return value
    field = f"property {name!r}"
    if kind is str:
        size = _check_utf8(field, value)
        if size > MAX_VALUE_BYTES:
            raise InvalidEvent(field, f"at most {MAX_VALUE_BYTES} UTF-8 bytes (got {size})")
        if len(value) > DOCUMENTED_VALUE_CHARS and name not in _long_value_names:
            _long_value_names.add(name)
            log.warning(
                "property %r: value of %d characters; Kissmetrics documents %d "
                "(accepted; logged once per name)", name, len(value), DOCUMENTED_VALUE_CHARS)
        return value
    if kind is bool:
        return value
    if kind is int:
        if value.bit_length() > _MAX_INT_BITS:
            raise InvalidEvent(field, f"integers are limited to {MAX_INT_DIGITS} digits")
        return value
    if kind is float:
        if not math.isfinite(value):
            raise InvalidEvent(field, "must be a finite number (not NaN or infinity)")
        return value
    # Subclasses (StrEnum, IntEnum...) are sent as their plain value.
    if isinstance(value, str):
        return check_value(name, str.__str__(value))
    if isinstance(value, int):
        return check_value(name, int.__int__(value))
    if isinstance(value, float):
        return check_value(name, float.__float__(value))
    if isinstance(value, Decimal):  # as text: a float would round it
        if not value.is_finite():
            raise InvalidEvent(field, "must be a finite number (not NaN or infinity)")
        return check_value(name, str(value))
    if isinstance(value, UUID):
        return str(value)
    raise InvalidEvent(
        field, f"must be str, int, float or bool, not {kind.__name__} "
        "(Kissmetrics has no structured values)")


def unix_seconds(field: str, value: Any) -> int:
    """A time given as Unix seconds (int, float, digit string) or an aware datetime."""
    if isinstance(value, datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise InvalidEvent(field, "naive datetime: give a timezone-aware datetime")
        seconds = int(value.timestamp())
    elif isinstance(value, bool):
        raise InvalidEvent(field, "must be Unix seconds or an aware datetime, not bool")
    elif isinstance(value, int):
        seconds = int.__int__(value)  # a subclass's own __str__ must not reach the wire
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidEvent(field, "must be a finite number")
        seconds = int(value)
    elif isinstance(value, str) and value.isascii() and value.isdigit():
        seconds = int(value)
    else:
        raise InvalidEvent(
            field, f"must be Unix seconds or an aware datetime, not {type(value).__name__}")
    if seconds < EARLIEST_TIME:
        raise InvalidEvent(field, f"{seconds} is before 2009-01-01 (Kissmetrics keeps no earlier data)")
    if seconds > LATEST_TIME:
        raise InvalidEvent(field, f"{seconds} is after 2106: give Unix seconds, not milliseconds")
    return seconds


def _check_d(value: Any) -> None:
    if value is True or (type(value) is int and value == 1) or value == "1":
        return
    raise InvalidEvent("_d", "only 1 is accepted: kmagent always sends the event's own time")


# The request line is measured from a bound on each text's percent-encoded length: 3
# characters per ASCII character, 12 per other (4 UTF-8 bytes, each as %XX). Almost
# every event is far below the limit by this bound; one that is not is encoded and
# measured exactly (_check_request_line), so the bound costs only a few additions.
_QUOTED_PER_CHAR = 12
# A non-str value as sent: at most 26 characters (a float's repr, its "+" as %2B),
# except an int of 2**63 or more (counted as printed; any digit needs no escape).
_QUOTED_SCALAR = 26
# What the bound leaves for the texts: the limit less what every request line has,
# "GET /e?_k=&_p=&_n=&_t=&_d=1 HTTP/1.1", _t's 10 digits (times end in 2106) and a key
# of ASSUMED_KEY_CHARS (an event's own key is counted on top of that).
_ROOM = MAX_REQUEST_LINE - len("GET /e?_k=&_p=&_n=&_t=&_d=1 HTTP/1.1") - 10 - ASSUMED_KEY_CHARS


def _quoted_bound(text: str) -> int:
    return (3 if text.isascii() else _QUOTED_PER_CHAR) * len(text)


def _quoted_value_bound(value: Value) -> int:
    """At least the length of a checked value as encoded (protocol.format_value)."""
    if type(value) is str:
        return _quoted_bound(value)
    if type(value) is int and not -_SMALL_INT < value < _SMALL_INT:
        return len(repr(value))
    return _QUOTED_SCALAR


# Property names already found valid and neither reserved nor a time, with the bound
# on their encoded length (+2 for "&" and "="): an app uses the same few names over and
# over, so each is checked once (bounded, for apps that do not).
_plain_names: Memo[int] = Memo()


def _check_property_name(name: Any) -> int:
    check_name("property name", name)
    if name in RESERVED_NAMES:
        raise InvalidEvent(f"property {name!r}", "reserved: _k, _p and _n are set by kmagent")
    if name in IMPORT_RESERVED_NAMES:
        raise InvalidEvent(f"property {name!r}", "reserved: Kissmetrics' newline-JSON "
                           "import reads it as an alias's second identity")
    size = 2 + _quoted_bound(name)
    if name not in TIME_NAMES:
        _plain_names.remember(name, size)
    return size


def _properties(props: Any, timestamp: Any,
                now: float) -> tuple[tuple[tuple[str, Value], ...], int, int]:
    """Validate props; split out ``_t``/``_d``; return (properties, frozen time, a bound
    on the properties' encoded length, ``&name=value`` each)."""
    if props is None:
        props = {}
    elif type(props) is not dict and not isinstance(props, Mapping):
        raise InvalidEvent("props", f"must be a mapping, not {type(props).__name__}")
    pairs = []
    time_prop = None
    size = 0
    for name, value in props.items():
        name_size = _plain_names.get(name)
        if name_size is None:
            name_size = _check_property_name(name)
        if value is None:
            continue  # Kissmetrics has no null: leave the property out
        if name in TIME_NAMES:
            if name == "_t":
                time_prop = unix_seconds("_t", value)
            else:
                _check_d(value)
            continue
        # check_value's own fast path, inline (it runs for nearly every value), where
        # the bound on the encoded value is one multiplication.
        kind = type(value)
        if kind is str and len(value) <= DOCUMENTED_VALUE_CHARS and value.isascii():
            size += name_size + 3 * len(value)
        elif kind is int and -_SMALL_INT < value < _SMALL_INT:
            size += name_size + _QUOTED_SCALAR
        else:
            value = check_value(name, value)
            size += name_size + _quoted_value_bound(value)
        pairs.append((name, value))
    if timestamp is not None:
        if time_prop is not None:
            raise InvalidEvent("timestamp", "given twice (as timestamp= and as _t): give it once")
        time_prop = unix_seconds("timestamp", timestamp)
    return tuple(pairs), int(now) if time_prop is None else time_prop, size


def _check_request_line(event: Event) -> Event:
    """``event``, if its request line (the key counted as events.py says) is at most
    MAX_REQUEST_LINE bytes; InvalidEvent, naming the size and the limit, if not."""
    from .protocol import encode, quote_param, request_line_length  # it imports this module
    key = event.api_key
    size = request_line_length(*encode(event), ASSUMED_KEY_CHARS if key is None
                               else len(quote_param(key)))
    if size > MAX_REQUEST_LINE:
        with_key = (f"with a {ASSUMED_KEY_CHARS}-character API key" if key is None
                    else "with its API key")
        raise InvalidEvent("request line", f"{size:,} bytes {with_key}; at most "
                           f"{MAX_REQUEST_LINE:,} (Apache's LimitRequestLine), as hosts "
                           "refuse longer ones: shorten the properties")
    return event


def make_event(person: Any, name: Any, props: Any = None, *, timestamp: Any = None,
               api_key: str | None = None, now: float) -> Event:
    """An ``e`` request: ``person`` did ``name``; time frozen at ``now`` unless given."""
    # str first, as before ints were allowed: this runs on every record()
    person = (check_name("person", person) if type(person) is str
              else check_person("person", person))
    check_name("event", name)
    pairs, t, size = _properties(props, timestamp, now)
    event = Event(EVENT, person, name, t, pairs, api_key)
    # The request line: a bound first (cheap), measured exactly only if it is too long.
    if size + _QUOTED_PER_CHAR * (len(person) + len(name) + (
            0 if api_key is None else len(api_key))) > _ROOM or not 0 <= t <= LATEST_TIME:
        _check_request_line(event)
    return event


def make_set(person: Any, props: Any, *, timestamp: Any = None,
             api_key: str | None = None, now: float) -> Event:
    """An ``s`` request: properties of ``person``; at least one is required."""
    # str first, as before ints were allowed: this runs on every record()
    person = (check_name("person", person) if type(person) is str
              else check_person("person", person))
    pairs, t, size = _properties(props, timestamp, now)
    if not pairs:
        raise InvalidEvent("props", "a set needs at least one property (None values are left out)")
    event = Event(SET, person, None, t, pairs, api_key)
    if size + _QUOTED_PER_CHAR * (len(person) + (
            0 if api_key is None else len(api_key))) > _ROOM or not 0 <= t <= LATEST_TIME:
        _check_request_line(event)
    return event


def make_alias(person: Any, identity: Any, *, api_key: str | None = None) -> Event:
    """An ``a`` request: ``person`` and ``identity`` are the same person."""
    person = check_person("person", person)
    identity = check_person("identity", identity)
    event = Event(ALIAS, person, identity, None, (), api_key)
    if _QUOTED_PER_CHAR * (len(person) + len(identity) + (
            0 if api_key is None else len(api_key))) > _ROOM:
        _check_request_line(event)
    return event
