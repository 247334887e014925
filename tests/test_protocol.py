"""The wire format (PROTOCOL.md, "The wire format" and "Requests"):
``kmagent.protocol.encode``, ``request_target`` and ``request_line_length``, byte for
byte; property tests that whatever ``Client.record`` accepts is stored as exactly what
was given, and that an event is refused exactly when its request line is too long."""

from __future__ import annotations

import math
import sqlite3
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import parse_qsl, quote, urlsplit

import pytest
import hypothesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kmagent
from kmagent.events import Event, make_alias, make_event, make_set
from kmagent.protocol import encode, quote_param, request_line_length, request_target

T = 1262304000  # the spec examples' _t


def decode(query: str) -> list[tuple[str, str]]:
    return parse_qsl(query, keep_blank_values=True, strict_parsing=True, errors="strict")


def spec_params(url: str) -> list[tuple[str, str]]:
    return sorted(decode(urlsplit(url).query))


# --- the spec's examples --------------------------------------------------------------

def test_spec_example_event_exact_bytes():
    event = make_event("bob", "Signed Up", {"gender": "male"}, now=T)
    path, query = encode(event)
    assert (path, query) == ("e", "_p=bob&_n=Signed%20Up&_t=1262304000&_d=1&gender=male")
    target = request_target(path, query, "KEY")
    assert target == "/e?_k=KEY&_p=bob&_n=Signed%20Up&_t=1262304000&_d=1&gender=male"
    # the same parameters as the spec's own URL (which spells the space as '+')
    spec = "https://trk.kissmetrics.io/e?_k=KEY&_p=bob&_n=Signed+Up&gender=male&_t=1262304000&_d=1"
    assert sorted(decode(urlsplit(target).query)) == spec_params(spec)


def test_spec_example_set_exact_bytes():
    path, query = encode(make_set("bob", {"gender": "male"}, now=T))
    assert (path, query) == ("s", "_p=bob&_t=1262304000&_d=1&gender=male")
    target = request_target(path, query, "KEY")
    assert target == "/s?_k=KEY&_p=bob&_t=1262304000&_d=1&gender=male"
    spec = "https://trk.kissmetrics.io/s?_k=KEY&_p=bob&gender=male&_t=1262304000&_d=1"
    assert sorted(decode(urlsplit(target).query)) == spec_params(spec)


def test_spec_example_alias_exact_bytes_without_t_or_d():
    path, query = encode(make_alias("User 12345", "bob@bob.com"))
    assert (path, query) == ("a", "_p=User%2012345&_n=bob%40bob.com")
    target = request_target(path, query, "KEY")
    assert target == "/a?_k=KEY&_p=User%2012345&_n=bob%40bob.com"
    assert "_t=" not in target and "_d=" not in target
    spec = "https://trk.kissmetrics.io/a?_k=KEY&_p=User+12345&_n=bob%40bob.com"
    assert sorted(decode(urlsplit(target).query)) == spec_params(spec)


# --- order, key -----------------------------------------------------------------------

def test_parameter_order_is_k_p_n_t_d_then_props_in_given_order():
    props = {"zeta": 1, "alpha": 2, "Mid": 3, "_t": T + 7, "beta": 4, "_d": 1}
    path, query = encode(make_event("bob", "Did", props, api_key="secret", now=0))
    assert query == f"_p=bob&_n=Did&_t={T + 7}&_d=1&zeta=1&alpha=2&Mid=3&beta=4"
    target = request_target(path, query, "k e/y&")
    assert target == f"/e?_k=k%20e%2Fy%26&_p=bob&_n=Did&_t={T + 7}&_d=1&zeta=1&alpha=2&Mid=3&beta=4"
    assert [k for k, _ in decode(urlsplit(target).query)] == [
        "_k", "_p", "_n", "_t", "_d", "zeta", "alpha", "Mid", "beta"]


def test_set_order_has_no_n():
    _, query = encode(make_set("bob", {"b": 1, "a": 2}, now=T))
    assert [k for k, _ in decode(query)] == ["_p", "_t", "_d", "b", "a"]


def test_the_key_is_never_part_of_the_stored_query():
    _, query = encode(make_event("bob", "Did", {"x": 1}, api_key="secret-key", now=T))
    assert "_k" not in query and "secret" not in query


def test_encoding_is_deterministic():
    event = make_event("bob", "Signed Up", {"Amount": 99.95, "x": "a b&c"}, now=T)
    assert encode(event) == encode(event) == encode(
        make_event("bob", "Signed Up", {"Amount": 99.95, "x": "a b&c"}, now=T))


# --- values ---------------------------------------------------------------------------

def test_space_is_percent_20_never_plus():
    _, query = encode(make_event("Bob Smith", "Signed Up", {"Plan Name": "Pro Plan"}, now=T))
    assert query == "_p=Bob%20Smith&_n=Signed%20Up&_t=1262304000&_d=1&Plan%20Name=Pro%20Plan"
    assert "+" not in query


def test_booleans_are_true_and_false():
    _, query = encode(make_event("bob", "Did", {"a": True, "b": False}, now=T))
    assert query.endswith("&a=true&b=false")


@pytest.mark.parametrize("value, text", [
    (0, "0"), (42, "42"), (-7, "-7"), (10 ** 20, "100000000000000000000"),
    (-(2 ** 63), "-9223372036854775808"),
])
def test_ints_are_decimal(value, text):
    _, query = encode(make_event("bob", "Did", {"n": value}, now=T))
    assert query.endswith(f"&n={text}")
    assert decode(query)[-1] == ("n", text)


@pytest.mark.parametrize("value, text", [
    (99.95, "99.95"), (0.1, "0.1"), (2.0, "2.0"), (-1.5, "-1.5"), (1 / 3, "0.3333333333333333"),
    (1e20, "1e+20"), (1e16, "1e+16"), (1.5e300, "1.5e+300"), (1e-07, "1e-07"),
    (-2.5e-10, "-2.5e-10"), (5e-324, "5e-324"), (-0.0, "-0.0"),
    (1.7976931348623157e308, "1.7976931348623157e+308"),
])
def test_floats_are_their_repr_and_decode_exactly(value, text):
    assert repr(value) == text
    _, query = encode(make_event("bob", "Paid", {"Amount": value}, now=T))
    assert decode(query)[-1] == ("Amount", text)  # '+' must not turn into a space
    assert float(decode(query)[-1][1]) == value
    assert "+" not in query and " " not in query


def test_the_seed_amount_exact_bytes():
    _, query = encode(make_event("bob@example.com", "Signed Up",
                                 {"Plan": "Pro", "Amount": 99.95}, now=T))
    assert query == "_p=bob%40example.com&_n=Signed%20Up&_t=1262304000&_d=1&Plan=Pro&Amount=99.95"


ODD = ["a&b", "a=b", "a+b", "100%", "%20", "%zz", "#frag", "a/b", "what?", "😀",
       "line\nbreak", "tab\tx", "cr\r\n", "semi;colon", "quote\"'", "<>", "back\\slash",
       "nul\x00", "ümlaut", "日本語", "  two  spaces  ", "~-._", "=&=&"]


@pytest.mark.parametrize("odd", ODD)
def test_odd_characters_round_trip_in_every_position(odd):
    event = make_event("p" + odd, "e" + odd, {"k" + odd: "v" + odd, "plain": odd}, now=T)
    _, query = encode(event)
    assert decode(query) == [("_p", "p" + odd), ("_n", "e" + odd), ("_t", str(T)),
                             ("_d", "1"), ("k" + odd, "v" + odd), ("plain", odd)]
    # structure is intact: exactly one '&' between parameters and one '=' in each
    parts = query.split("&")
    assert len(parts) == 6 and all(part.count("=") == 1 for part in parts)
    # nothing outside RFC 3986 unreserved characters and percent escapes
    for ch in query:
        assert ch.isascii() and (ch.isalnum() or ch in "-._~%&="), repr(ch)
    _, alias = encode(make_alias("p" + odd, "i" + odd))
    assert decode(alias) == [("_p", "p" + odd), ("_n", "i" + odd)]


def test_non_ascii_is_utf8_percent_encoded():
    _, query = encode(make_event("José", "Café ☕", {"ñ": "😀"}, now=T))
    assert query == ("_p=Jos%C3%A9&_n=Caf%C3%A9%20%E2%98%95&_t=1262304000&_d=1"
                     "&%C3%B1=%F0%9F%98%80")


# --- hypothesis: the encoder round-trips any text -------------------------------------

TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)))


@settings(max_examples=200, deadline=None)
@given(person=TEXT, name=TEXT, t=st.integers(min_value=1230768000, max_value=2 ** 32 - 1),
       props=st.lists(st.tuples(TEXT, TEXT), max_size=6))
def test_any_text_round_trips_through_encode(person, name, t, props):
    path, query = encode(Event("e", person, name, t, tuple(props)))
    assert path == "e"
    assert decode(query) == [("_p", person), ("_n", name), ("_t", str(t)), ("_d", "1"),
                             *props]
    assert "+" not in query and " " not in query
    path, query = encode(Event("a", person, name, None))
    assert path == "a" and decode(query) == [("_p", person), ("_n", name)]


@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.one_of(st.booleans(), st.integers(),
                                 st.floats(allow_nan=False, allow_infinity=False)),
                       min_size=1, max_size=6))
def test_any_number_round_trips_through_encode(values):
    props = tuple((f"p{i}", v) for i, v in enumerate(values))
    _, query = encode(Event("s", "bob", None, T, props))
    expected = [("true" if v else "false") if isinstance(v, bool) else repr(v) for v in values]
    assert [v for _, v in decode(query)[3:]] == expected


# --- hypothesis: Client.record stores exactly what it accepts --------------------------

def _utf8_ok(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _name_ok(name) -> bool:
    return isinstance(name, str) and 1 <= len(name) <= 255 and _utf8_ok(name)


def _as_person(person):
    """A person as sent: an int (not a bool) in decimal."""
    return str(person) if type(person) is int else person


def spec_line(path: str, params: list[tuple[str, str]], key: str | None) -> bytes:
    """The request line, from the wire format's rules (UTF-8, every byte but RFC 3986's
    unreserved ones as %XX), not from kmagent.protocol; no key: 40 characters, as a
    Kissmetrics key has (the length record() counts for the agent's own key)."""
    key_text = "k" * 40 if key is None else quote(key, safe="")
    query = "&".join(f"{quote(name, safe='')}={quote(value, safe='')}" for name, value in params)
    return f"GET /{path}?_k={key_text}&{query} HTTP/1.1".encode()


def expected_properties(props) -> list[tuple[str, str]] | None:
    """The oracle: the decoded properties, or None when the event must be refused."""
    if props is None:
        return []
    if not isinstance(props, Mapping):
        return None
    out = []
    for name, value in props.items():
        if not _name_ok(name) or name in ("_k", "_p", "_n", "_p2"):
            return None
        if value is None:
            continue
        if type(value) is bool:
            out.append((name, "true" if value else "false"))
        elif type(value) is int:
            out.append((name, str(value)))
        elif type(value) is float:
            if not math.isfinite(value):
                return None
            out.append((name, repr(value)))
        elif type(value) is str:
            if not _utf8_ok(value) or len(value.encode("utf-8")) > 8192:
                return None
            out.append((name, value))
        else:
            return None
    return out


SURROGATE = st.builds(lambda a, s, b: a + s + b, st.text(max_size=3),
                      st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF),
                      st.text(max_size=3))
def mostly(valid, invalid, odds: int):
    """``valid`` ``odds`` times out of ``odds + 1`` (one_of would pick evenly)."""
    return st.integers(0, odds).flatmap(lambda i: invalid if i == 0 else valid)


VALID_NAME = st.one_of(st.text(min_size=1, max_size=20), st.text(min_size=250, max_size=255))
INVALID_NAME = st.one_of(
    st.just(""), st.text(min_size=256, max_size=260), SURROGATE,
    st.integers(), st.none(), st.binary(max_size=4), st.booleans(),
)
# Mostly valid, so that most examples reach the spool; about one in four is invalid.
NAMES = mostly(VALID_NAME, INVALID_NAME, 4)
VALID_KEY = st.text(min_size=1, max_size=12).filter(lambda k: k not in ("_t", "_d"))
KEYS = mostly(
    st.one_of(VALID_KEY, st.sampled_from(["k" * 255, "Plan", "with space", "_x"])),
    st.one_of(st.sampled_from(["", "_k", "_p", "_n", "k" * 256]),
              SURROGATE, st.integers(), st.binary(max_size=3), st.none()),
    12)
VALID_VALUE = st.one_of(
    st.text(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),  # big ones are written with 'e+'
    st.booleans(),
    st.none(),
    st.sampled_from(["é" * 4096, "😀" * 2048]),  # exactly 8192 UTF-8 bytes
)
INVALID_VALUE = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf]),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
    st.binary(max_size=4),
    SURROGATE,
    st.sampled_from(["é" * 4096 + "x", "x" * 8193]),
)
# Mostly valid; about one value in ten is one that must be refused.
VALUES = mostly(VALID_VALUE, INVALID_VALUE, 9)
PROPS = mostly(
    st.one_of(st.none(), st.dictionaries(KEYS, VALUES, max_size=5)),
    st.one_of(st.lists(st.tuples(st.text(max_size=3), st.integers()), max_size=2),
              st.text(max_size=3), st.integers()),
    6)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(person=NAMES, event=NAMES, props=PROPS)
def test_client_record_refuses_or_stores_exactly_what_was_given(person, event, props):
    expected_props = expected_properties(props)
    sent_person = _as_person(person)
    valid = _name_ok(sent_person) and _name_ok(event) and expected_props is not None and len(
        spec_line("e", [("_p", sent_person), ("_n", event), ("_t", "1" * 10), ("_d", "1"),
                        *expected_props], None)) <= 8190
    hypothesis.event("valid" if valid else "invalid")
    with tempfile.TemporaryDirectory() as tmp:
        spool = Path(tmp) / "spool.db"
        client = kmagent.Client(spool=spool)
        try:
            before = int(time.time())
            try:
                client.record(person, event, props)
            except kmagent.InvalidEvent:
                refused = True
            else:
                refused = False
            after = int(time.time())
        finally:
            client.close()
        conn = sqlite3.connect(spool)
        try:
            stored = conn.execute("SELECT path, query FROM events").fetchall()
        finally:
            conn.close()
    if not valid:
        assert refused, f"accepted an invalid event: {stored}"
        assert stored == []
        return
    assert not refused, "refused a valid event"
    assert len(stored) == 1
    path, query = stored[0]
    assert path == "e"
    got = decode(query)
    assert got[:2] == [("_p", sent_person), ("_n", event)]
    assert got[2][0] == "_t" and before <= int(got[2][1]) <= after
    assert got[3] == ("_d", "1")
    assert got[4:] == expected_props


# --- the request line: at most 8,190 bytes --------------------------------------------

def sent_line(path: str, query: str, key: str) -> bytes:
    return f"GET {request_target(path, query, key)} HTTP/1.1".encode()


@pytest.mark.parametrize("event", [
    make_event("bob", "Signed Up", {"gender": "male"}, now=T),
    make_set("José", {"ñ": "😀", "n": 1e20}, now=T),
    make_alias("User 12345", "bob@bob.com"),
], ids=["event", "set", "alias"])
@pytest.mark.parametrize("key", ["KEY", "0123456789abcdef0123456789abcdef01234567",
                                 "k e/y&", "clé 🔑"])
def test_request_line_length_is_the_bytes_of_get_target_http_1_1(event, key):
    path, query = encode(event)
    assert request_line_length(path, query, len(quote_param(key))) == len(
        sent_line(path, query, key))


def test_request_line_length_of_the_spec_example_and_of_a_non_ascii_stored_query():
    line = b"GET /e?_k=KEY&_p=bob&_n=Signed%20Up&_t=1262304000&_d=1&gender=male HTTP/1.1"
    assert request_line_length("e", "_p=bob&_n=Signed%20Up&_t=1262304000&_d=1&gender=male",
                               3) == len(line) == 75
    # encode() never makes one; a query that is not ASCII counts its UTF-8 bytes.
    assert request_line_length("e", "_p=José", 3) == len(b"GET /e?_k=KEY&_p=Jos\xc3\xa9 HTTP/1.1")


# Texts from characters of every width on the wire: 1 (unreserved), 3 (other ASCII),
# 6, 9 and 12 (2-, 3- and 4-byte UTF-8).
UNITS = ["a", "-", " ", "&", "é", "€", "😀"]
LINE_NAME = st.text(alphabet=st.sampled_from(UNITS), min_size=1, max_size=255)
LINE_VALUE = st.lists(st.tuples(st.sampled_from(UNITS), st.integers(1, 2500)), max_size=3).map(
    lambda runs: "".join(unit * count for unit, count in runs)).filter(
    lambda value: len(value.encode()) <= 8192)
LINE_PROPS = st.lists(st.tuples(LINE_NAME, LINE_VALUE), max_size=4, unique_by=lambda p: p[0])
LINE_KEY = st.one_of(st.none(), LINE_NAME)


def make(kind: str, person: str, name: str, props: dict, key: str | None) -> Event:
    if kind == "e":
        return make_event(person, name, props, api_key=key, now=T)
    if kind == "s":
        return make_set(person, props, api_key=key, now=T)
    return make_alias(person, name, api_key=key)


def params_of(kind: str, person: str, name: str, props: list) -> list[tuple[str, str]]:
    if kind == "a":
        return [("_p", person), ("_n", name)]
    return [("_p", person), *([("_n", name)] if kind == "e" else []), ("_t", str(T)),
            ("_d", "1"), *props]


def key_chars(key: str | None) -> int:
    return 40 if key is None else len(quote(key, safe=""))


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(["e", "s", "a"]), person=LINE_NAME, name=LINE_NAME,
       props=LINE_PROPS, key=LINE_KEY)
def test_an_event_is_refused_exactly_when_its_request_line_is_over_8190_bytes(
        kind, person, name, props, key):
    if kind == "s" and not props:
        props = [("p", "v")]
    size = len(spec_line(kind, params_of(kind, person, name, props), key))
    hypothesis.event("too long" if size > 8190 else "fits")
    try:
        event = make(kind, person, name, dict(props), key)
    except kmagent.InvalidEvent as exc:
        assert size > 8190, f"refused a request line of {size} bytes: {exc}"
        assert exc.field == "request line" and f"{size:,} bytes" in exc.rule
    else:
        assert size <= 8190, f"accepted a request line of {size} bytes"
        assert request_line_length(*encode(event), key_chars(key)) == size


@settings(max_examples=200, deadline=None)
@given(kind=st.sampled_from(["e", "s"]), person=LINE_NAME, name=LINE_NAME,
       props=LINE_PROPS, key=LINE_KEY, unit=st.sampled_from(UNITS))
def test_for_any_event_a_request_line_of_8190_bytes_is_accepted_and_8191_refused(
        kind, person, name, props, key, unit):
    frame = len(spec_line(kind, params_of(kind, person, name, [*props, ("fill", "")]), key))
    hypothesis.assume(frame <= 8190)
    room = 8190 - frame
    width = len(quote(unit, safe=""))
    fill = unit * (room // width) + "a" * (room % width)  # exactly ``room`` on the wire
    event = make(kind, person, name, {**dict(props), "fill": fill}, key)
    assert request_line_length(*encode(event), key_chars(key)) == 8190
    with pytest.raises(kmagent.InvalidEvent, match=r"^request line: 8,191 bytes .*8,190"):
        make(kind, person, name, {**dict(props), "fill": fill + "a"}, key)


def test_a_time_of_more_than_10_digits_is_measured_not_assumed():
    # The time comes from ``now`` when none is given; Unix seconds have 10 digits
    # until 2286, but a far-off ``now`` must be counted as it is. (4-byte characters:
    # the bound record() tries first is exact for them.)
    def line(t: int) -> int:
        return len(spec_line("e", [("_p", "😀"), ("_n", "😀"), ("_t", str(t)), ("_d", "1"),
                                   ("😀", "😀" * 600)], None))
    make_event("😀", "😀", {"😀": "😀" * 600}, now=T)
    assert line(T) < 8190 < line(10 ** 1000)
    with pytest.raises(kmagent.InvalidEvent, match=f"^request line: {line(10 ** 1000):,} bytes"):
        make_event("😀", "😀", {"😀": "😀" * 600}, now=10 ** 1000)
