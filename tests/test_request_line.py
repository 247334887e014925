"""The whole request line: at most 8,190 bytes (Apache's LimitRequestLine), counted as
the wire carries it, for every kind of text and key, on both backends (README, "What an
event may hold")."""

from __future__ import annotations

from urllib.parse import quote

import pytest
from event_checks import T2010, assert_refused, baseline_client
from helpers import stored_rows as rows

import kmagent
from kmagent.config import Config


@pytest.fixture
def client(spool_path):
    yield from baseline_client(spool_path)


LIMIT = 8190  # Apache's LimitRequestLine
AGENT_KEY_CHARS = 40  # counted for an event without a key of its own
KEYS = [
    pytest.param(None, id="agent-key"),
    pytest.param("app-key", id="own-key"),
    pytest.param("clé/ключ 2", id="own-non-ascii-key"),
]
# Text of characters 1, 3 (%20), 6 and 12 characters long on the wire.
UNITS = {"ascii": "a", "escaped-ascii": " ", "2-byte": "é", "4-byte": "😀"}
TEXTS = list(UNITS)


def quoted(text: str) -> str:
    """Percent-encoded as the wire format says (PROTOCOL.md): UTF-8, every byte but
    RFC 3986's unreserved ones as %XX."""
    return quote(text, safe="")


def request_line(path: str, params: list[tuple[str, str]], key: str | None) -> str:
    """The request line for these parameters, built here from the wire format's rules
    (not by kmagent); no key: 40 characters, as many as a Kissmetrics key has."""
    key_text = "k" * AGENT_KEY_CHARS if key is None else quoted(key)
    query = "&".join(f"{quoted(name)}={quoted(value)}" for name, value in params)
    return f"GET /{path}?_k={key_text}&{query} HTTP/1.1"


def text_of(size: int, kind: str) -> str:
    """A text whose percent-encoding is exactly ``size`` characters."""
    unit = UNITS[kind]
    width = len(quoted(unit))
    return unit * (size // width) + "a" * (size % width)


def stored_line(spool_path, key: str | None) -> str:
    path, query, stored_key = rows(spool_path)[-1]
    assert stored_key == key
    key_text = "k" * AGENT_KEY_CHARS if key is None else quoted(key)
    return f"GET /{path}?_k={key_text}&{query} HTTP/1.1"


@pytest.fixture(params=["sqlite", "jsonl"])
def each_backend(request, tmp_path) -> tuple[str, object]:
    """(backend, spool path) of a spool of each backend."""
    return request.param, tmp_path / ("spool.db" if request.param == "sqlite" else "spool.d")


@pytest.fixture
def keyed(request, each_backend):
    """(Client, key) for the key ``request.param`` (None: the agent's), on a real spool
    of each backend that already holds one accepted event."""
    backend, path = each_backend
    km = kmagent.Client(request.param, config=Config(spool_backend=backend, spool_path=path))
    km.record("baseline@example.com", "Baseline", {"n": 1}, timestamp=T2010)
    yield km, request.param
    km.close()


def record_call(km, body):
    return lambda: km.record("bob", "Wrote", {"body": body}, timestamp=T2010)


def record_params(body):
    return [("_p", "bob"), ("_n", "Wrote"), ("_t", str(T2010)), ("_d", "1"), ("body", body)]


def set_call(km, body):
    return lambda: km.set("bob", {"body": body}, timestamp=T2010)


def set_params(body):
    return [("_p", "bob"), ("_t", str(T2010)), ("_d", "1"), ("body", body)]


@pytest.mark.parametrize("keyed", KEYS, indirect=True)
@pytest.mark.parametrize("kind", TEXTS)
@pytest.mark.parametrize("path, call, params", [
    pytest.param("e", record_call, record_params, id="record"),
    pytest.param("s", set_call, set_params, id="set"),
])
def test_a_request_line_of_8190_bytes_is_accepted_and_of_8191_refused(
        keyed, each_backend, kind, path, call, params):
    km, key = keyed
    _, spool_path = each_backend
    frame = len(request_line(path, params(""), key))
    fits = text_of(LIMIT - frame, kind)
    assert len(request_line(path, params(fits), key).encode()) == LIMIT
    call(km, fits)()
    assert stored_line(spool_path, key) == request_line(path, params(fits), key)

    over = text_of(LIMIT + 1 - frame, kind)
    assert len(request_line(path, params(over), key).encode()) == LIMIT + 1
    exc = assert_refused(spool_path, call(km, over), r"^request line: ")
    assert exc.field == "request line"
    assert "8,191 bytes" in exc.rule and "at most 8,190" in exc.rule
    assert ("40-character API key" in exc.rule) == (key is None)


def test_an_alias_of_8190_bytes_is_accepted_and_of_8191_refused(spool_path):
    # Only an alias with its own long key can be too long: three texts of at most 255
    # characters, mostly 4-byte ones (12 characters each on the wire).
    key, person = "🔑" * 255, "😀" * 255
    km = kmagent.Client(key, spool=spool_path)
    frame = len(request_line("a", [("_p", person), ("_n", "")], key))
    fits = text_of(LIMIT - frame, "4-byte")
    km.alias(person, fits)
    assert stored_line(spool_path, key) == request_line("a", [("_p", person), ("_n", fits)],
                                                        key)
    exc = assert_refused(spool_path, lambda: km.alias(person, fits + "a"), r"^request line: ")
    assert "8,191 bytes" in exc.rule and "at most 8,190" in exc.rule
    km.close()


@pytest.mark.parametrize("key", [None, "🔑" * 255])
@pytest.mark.parametrize("call", ["record", "record-short-name", "set", "alias"])
def test_the_person_event_name_identity_and_key_count_in_the_request_line(
        spool_path, key, call):
    person, body = "😀" * 255, {"body": "😀" * 200}  # 3,060 and 2,405 characters
    km = kmagent.Client(key, spool=spool_path)
    params, make = {
        "record": ([("_p", person), ("_n", person), ("_t", str(T2010)), ("_d", "1"),
                    *body.items()],
                   lambda: km.record(person, person, body, timestamp=T2010)),
        "record-short-name": ([("_p", person), ("_n", "Wrote"), ("_t", str(T2010)),
                               ("_d", "1"), *body.items()],
                              lambda: km.record(person, "Wrote", body, timestamp=T2010)),
        "set": ([("_p", person), ("_t", str(T2010)), ("_d", "1"), *body.items()],
                lambda: km.set(person, body, timestamp=T2010)),
        "alias": ([("_p", person), ("_n", person)], lambda: km.alias(person, person)),
    }[call]
    size = len(request_line(call[0], params, key))
    try:
        if size <= LIMIT:  # a set or an alias without a long key of its own
            make()
            assert len(stored_line(spool_path, key).encode()) == size
        else:
            exc = assert_refused(spool_path, make, r"^request line: ")
            assert f"{size:,} bytes" in exc.rule
    finally:
        km.close()


def spread(room: int, kind: str) -> dict[str, str]:
    """Properties of at most 400 characters each (the everyday size) whose ``&name=value``
    parts are exactly ``room`` characters on the wire."""
    budget = 400 * len(quoted(UNITS[kind]))
    count = -(-room // (5 + budget))
    sizes = [budget] * (count - 1) + [room - (count - 1) * (5 + budget) - 5]
    if sizes[-1] < 0:
        sizes[0] += sizes[-1]
        sizes[-1] = 0
    return {f"p{n:02d}": text_of(size, kind) for n, size in enumerate(sizes)}


@pytest.mark.parametrize("kind", TEXTS)
def test_many_everyday_values_count_as_encoded(client, spool_path, kind):
    params = [("_p", "bob"), ("_n", "Wrote"), ("_t", str(T2010)), ("_d", "1")]
    room = LIMIT - len(request_line("e", params, None))
    fits = spread(room, kind)
    assert len(request_line("e", [*params, *fits.items()], None)) == LIMIT
    client.record("bob", "Wrote", fits, timestamp=T2010)
    assert len(stored_line(spool_path, None)) == LIMIT
    over = spread(room + 1, kind)
    exc = assert_refused(spool_path, lambda: client.record("bob", "Wrote", over,
                                                           timestamp=T2010), r"^request line: ")
    assert "8,191 bytes" in exc.rule


@pytest.mark.parametrize("numbers", [
    pytest.param({"a": 10 ** 3999, "b": -10 ** 3999, "c": 10 ** 200}, id="4000-digit-ints"),
    pytest.param({f"n{n}": 10 ** 18 + n for n in range(400)}, id="19-digit-ints"),
    pytest.param({f"f{n}": 1.7976931348623157e308 for n in range(320)}, id="floats"),
])
def test_numbers_count_as_printed(client, spool_path, numbers):
    size = len(request_line("e", [("_p", "bob"), ("_n", "Counted"), ("_t", str(T2010)),
                                  ("_d", "1"), *((k, repr(v)) for k, v in numbers.items())],
                            None))
    assert size > LIMIT
    exc = assert_refused(spool_path, lambda: client.record("bob", "Counted", numbers,
                                                           timestamp=T2010), r"^request line: ")
    assert f"{size:,} bytes" in exc.rule


def test_the_ampersand_and_equals_sign_of_each_property_count(client, spool_path):
    # 320 names of two 4-byte characters with empty values: 26 characters each.
    names = [chr(0x1F600 + n // 20) + chr(0x1F600 + n % 20) for n in range(320)]
    props = dict.fromkeys(names, "")
    size = len(request_line("e", [("_p", "bob"), ("_n", "Wrote"), ("_t", str(T2010)),
                                  ("_d", "1"), *props.items()], None))
    assert size > LIMIT
    exc = assert_refused(spool_path, lambda: client.record("bob", "Wrote", props,
                                                           timestamp=T2010), r"^request line: ")
    assert f"{size:,} bytes" in exc.rule


def test_the_longest_alias_without_a_key_of_its_own_is_accepted(client, spool_path):
    longest = "😀" * 255
    client.alias(longest, longest)
    assert len(stored_line(spool_path, None)) == 6187  # well within 8,190
    assert kmagent.status(spool=spool_path)["pending"] == 2


@pytest.mark.parametrize("keyed", [None], indirect=True)
def test_four_8_kib_values_are_refused_naming_the_size_and_the_limit(keyed, each_backend):
    km, _ = keyed
    _, spool_path = each_backend
    props = {f"v{n}": "é" * 4096 for n in range(4)}  # each 8,192 UTF-8 bytes: allowed
    size = len(request_line("e", [("_p", "bob"), ("_n", "Wrote"), ("_t", str(T2010)),
                                  ("_d", "1"), *props.items()], None))
    assert size > 98_000
    exc = assert_refused(spool_path, lambda: km.record("bob", "Wrote", props, timestamp=T2010),
                         r"^request line: ")
    assert str(exc) == (f"request line: {size:,} bytes with a 40-character API key; at most "
                        "8,190 (Apache's LimitRequestLine), as hosts refuse longer ones: "
                        "shorten the properties")
