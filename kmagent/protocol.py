"""Event → request: the Kissmetrics wire format, as a pure function.

``GET /e|/s|/a?`` with parameters in a fixed order: ``_k``, ``_p``, ``_n`` (events and
aliases), ``_t``, ``_d=1`` (events and sets), then the properties in the order given.
UTF-8, percent-encoded, space as ``%20``. The query (without ``_k``) is computed once,
when the event is produced, and stored: every resend is the same bytes, which is what
lets Kissmetrics drop it as a duplicate (PROTOCOL.md, "Duplicates"). The whole
request line, ``request_line_length``, is at most ``events.MAX_REQUEST_LINE`` bytes:
make_event/make_set/make_alias refuse longer events, and the sender never sends one.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, quote

from .events import ALIAS, Event, Value
from .memo import Memo


_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# For ASCII text, str.translate does in C what quote() does byte by byte in Python. Every
# ASCII code is in the table (unreserved ones map to themselves): a code missing from it
# would cost translate() a raised and caught LookupError.
_ASCII_ESCAPES = {byte: chr(byte) if byte in _UNRESERVED else f"%{byte:02X}"
                  for byte in range(128)}


def quote_param(text: str) -> str:
    """Percent-encode everything but RFC 3986 unreserved characters (space → %20)."""
    if text.isascii():
        return text.translate(_ASCII_ESCAPES)
    return quote(text, safe="")


# Event and property names repeat: their encodings are kept, not computed per event.
_quoted_names: Memo[str] = Memo(quote_param)


def format_value(value: Value) -> str:
    """true/false for booleans, decimal ints, floats as Python's shortest round-trip repr."""
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return quote_param(value)
    if isinstance(value, float):
        return quote_param(repr(value))  # shortest round-trip form; "1e+20" needs %2B
    return repr(value)


def encode(event: Event) -> tuple[str, str]:
    """The request path (``e``/``s``/``a``) and its query string, ``_k`` left out."""
    if event.query is not None:
        return event.kind, event.query  # imported from a km log, as its library sent it
    query = "_p=" + quote_param(event.person)
    if event.kind == ALIAS:
        return event.kind, query + "&_n=" + quote_param(event.name)
    if event.name is not None:
        query += "&_n=" + _quoted_names[event.name]
    query += f"&_t={event.time}&_d=1"
    for name, value in event.props:
        query += "&" + _quoted_names[name] + "=" + (
            quote_param(value) if type(value) is str else format_value(value))
    return event.kind, query


def request_target(path: str, query: str, api_key: str) -> str:
    """The request target for one stored event, with the key that will send it first."""
    return f"/{path}?_k={quote_param(api_key)}&{query}"


# "GET " + request_target(...) + " HTTP/1.1", less the path, the key and the query.
_REQUEST_LINE_FRAME = len("GET /?_k=& HTTP/1.1")


def request_line_length(path: str, query: str, key_length: int) -> int:
    """The exact bytes of the request line ``GET <target> HTTP/1.1`` (CRLF not counted,
    as in Apache's LimitRequestLine) for a stored event sent with a key that is
    ``key_length`` characters once percent-encoded (``len(quote_param(key))``; a
    Kissmetrics key, 40 hex characters, is unchanged by it)."""
    if path.isascii() and query.isascii():  # always, for what encode() makes
        return _REQUEST_LINE_FRAME + len(path) + key_length + len(query)
    return _REQUEST_LINE_FRAME + key_length + len((path + query).encode("utf-8", "surrogatepass"))


def split_query(query: str, errors: str = "replace") -> tuple[dict[str, str], dict[str, str]]:
    """A stored query read back: its ``_p``/``_n``/``_t`` fields, and its properties
    (everything else but ``_d``), in the order sent. ``errors`` is how bytes that are not
    UTF-8 are decoded (an imported km log may hold them)."""
    params = parse_qsl(query, keep_blank_values=True, errors=errors)
    fields = {name: value for name, value in params if name in ("_p", "_n", "_t")}
    properties = {name: value for name, value in params
                  if name not in ("_p", "_n", "_t", "_d")}
    return fields, properties


def describe(path: str, query: str) -> dict[str, Any]:
    """A stored request read back for people: ``path``, ``person``, ``event``
    (None for sets and aliases), ``identity`` (aliases), ``properties`` (as sent)."""
    fields, properties = split_query(query)
    view: dict[str, Any] = {"path": path, "person": fields.get("_p"),
                            "event": fields.get("_n") if path == "e" else None}
    if path == ALIAS:
        view["identity"] = fields.get("_n")
    view["properties"] = properties
    return view
