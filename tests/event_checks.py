"""What the event tests share: a Client on a spool holding one accepted event, and the
check that a refusal names its field and leaves the spool as it was."""

from __future__ import annotations

import re
from urllib.parse import parse_qsl

import pytest
from helpers import stored_rows as rows

import kmagent

T2010 = 1262304000  # 2010-01-01T00:00:00Z
EARLIEST = 1230768000  # 2009-01-01T00:00:00Z


def params(query: str) -> list[tuple[str, str]]:
    return parse_qsl(query, keep_blank_values=True, strict_parsing=True, errors="strict")


def props_of(query: str) -> list[tuple[str, str]]:
    """The properties of a stored query (everything after the reserved parameters)."""
    return [(k, v) for k, v in params(query) if k not in ("_p", "_n", "_t", "_d")]


def baseline_client(spool_path):
    """A Client on a real spool that already holds one accepted event (a fixture's
    body: ``yield from baseline_client(spool_path)``)."""
    km = kmagent.Client(spool=spool_path)
    km.record("baseline@example.com", "Baseline", {"n": 1}, timestamp=T2010)
    before = rows(spool_path)
    assert before == [("e", "_p=baseline%40example.com&_n=Baseline&_t=1262304000&_d=1&n=1",
                       None)]
    yield km
    km.close()


def assert_refused(spool_path, call, field: str) -> kmagent.InvalidEvent:
    """``call()`` raises InvalidEvent naming ``field`` (a regex) and spools nothing."""
    before = rows(spool_path)
    with pytest.raises(kmagent.InvalidEvent) as info:
        call()
    exc = info.value
    assert isinstance(exc, ValueError)
    assert isinstance(exc, kmagent.KmagentError)
    assert re.search(field, str(exc)), f"message {str(exc)!r} does not name {field!r}"
    assert kmagent.status(spool=spool_path)["pending"] == len(before)
    assert rows(spool_path) == before  # the earlier accepted event is untouched
    return exc


def last_query(spool_path) -> tuple[str, str]:
    path, query, _ = rows(spool_path)[-1]
    return path, query
