"""A strict reader of PHP's ``serialize()`` format, for kissmetrics-php's Delayed log.

Only what ``serialize()`` writes for arrays of scalars: ``N;``, ``b:0;``, ``i:-7;``,
``d:0.1;``, ``s:3:"abc";`` (the length in bytes: a string may hold newlines or bytes
that are not UTF-8) and ``a:2:{key;value;...}`` (int or string keys, order kept).
Objects, references and anything else are refused: a Delayed log holds none. No
well-kept Python parser exists (phpserialize's last release is from 2012), and one
this small is easy to check against the format.
"""

from __future__ import annotations

import re
from typing import Any

MAX_DEPTH = 32  # a request's parameters nest an array or two, never more

_INT = re.compile(rb"-?\d+")
_FLOAT = re.compile(rb"-?(?:\d+(?:\.\d+)?(?:E[+-]?\d+)?|INF)|NAN", re.IGNORECASE)


class Incomplete(ValueError):
    """The data ends inside the value: more may still be appended."""


class Malformed(ValueError):
    """Not a value ``serialize()`` writes; the message says where and why."""


def loads_at(data: bytes, pos: int = 0) -> tuple[Any, int]:
    """The value that starts at ``data[pos]``, and where it ends. None, bool, int,
    float, bytes, or a dict (keys int or bytes, in order)."""
    return _value(data, pos, 0)


def _expect(data: bytes, pos: int, token: bytes) -> int:
    end = pos + len(token)
    if data[pos:end] != token:
        if len(data) < end and token.startswith(data[pos:]):
            raise Incomplete(pos)
        raise Malformed(f"byte {pos}: {token.decode()!r} expected")
    return end


def _number(data: bytes, pos: int, pattern: re.Pattern) -> tuple[bytes, int]:
    match = pattern.match(data, pos)
    end = match.end() if match else pos
    if end >= len(data):
        raise Incomplete(pos)  # the number, or its ";", may be still to come
    if not match:
        raise Malformed(f"byte {pos}: a number expected")
    return match.group(), end


def _value(data: bytes, pos: int, depth: int) -> tuple[Any, int]:
    if pos + 2 > len(data):
        raise Incomplete(pos)
    kind = data[pos:pos + 2]
    if kind == b"N;":
        return None, pos + 2
    if kind == b"b:":
        flag = data[pos + 2:pos + 3]
        if not flag:
            raise Incomplete(pos)
        if flag not in (b"0", b"1"):
            raise Malformed(f"byte {pos + 2}: a boolean is 0 or 1")
        return flag == b"1", _expect(data, pos + 3, b";")
    if kind == b"i:":
        text, end = _number(data, pos + 2, _INT)
        return int(text), _expect(data, end, b";")
    if kind == b"d:":
        text, end = _number(data, pos + 2, _FLOAT)
        return float(text), _expect(data, end, b";")
    if kind == b"s:":
        text, end = _number(data, pos + 2, _INT)
        size = int(text)
        start = _expect(data, end, b':"')
        if size < 0:
            raise Malformed(f"byte {pos + 2}: a negative length")
        if start + size + 2 > len(data):
            raise Incomplete(pos)
        return data[start:start + size], _expect(data, start + size, b'";')
    if kind == b"a:":
        if depth >= MAX_DEPTH:
            raise Malformed(f"byte {pos}: nested deeper than {MAX_DEPTH}")
        text, end = _number(data, pos + 2, _INT)
        pos = _expect(data, end, b":{")
        items: dict[Any, Any] = {}
        for _ in range(int(text)):
            key, pos = _value(data, pos, depth + 1)
            if type(key) not in (int, bytes):
                raise Malformed(f"byte {pos}: an array key is an int or a string")
            items[key], pos = _value(data, pos, depth + 1)
        return items, _expect(data, pos, b"}")
    raise Malformed(f"byte {pos}: {kind!r} is no value serialize() writes for a request")
