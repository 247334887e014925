"""What an event may hold (README, "What an event may hold"): every refusal, through the public Client.

Each refusal must raise ``kmagent.InvalidEvent`` (also a ``ValueError``) whose message
names the field, and must leave the spool exactly as it was: nothing appended, the
earlier accepted event still there, byte for byte.
"""

from __future__ import annotations

import enum
import logging
import math
import re
import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
from event_checks import (EARLIEST, T2010, assert_refused, baseline_client, last_query,
                          params, props_of)
from helpers import stored_rows as rows

import kmagent


@pytest.fixture
def client(spool_path):
    yield from baseline_client(spool_path)


# --- person, event name, identity -----------------------------------------------------

BAD_NAMES = [
    pytest.param("", id="empty"),
    pytest.param(42, id="int"),
    pytest.param(None, id="None"),
    pytest.param(b"bob", id="bytes"),
    pytest.param(["bob"], id="list"),
    pytest.param("x" * 256, id="256-chars"),
    pytest.param("bob\ud800", id="lone-surrogate"),
]


# A person or an identity may also be an int (an app's user.id), sent in decimal.
BAD_PERSONS = [p for p in BAD_NAMES if p.id != "int"] + [pytest.param(True, id="bool")]


@pytest.mark.parametrize("bad", BAD_PERSONS)
def test_person_is_refused_in_record_set_and_alias(client, spool_path, bad):
    assert_refused(spool_path, lambda: client.record(bad, "Signed Up"), r"\bperson\b")
    assert_refused(spool_path, lambda: client.set(bad, {"gender": "male"}), r"\bperson\b")
    assert_refused(spool_path, lambda: client.alias(bad, "bob@example.com"), r"\bperson\b")


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_event_name_is_refused(client, spool_path, bad):
    assert_refused(spool_path, lambda: client.record("bob", bad, {"a": 1}), r"\bevent\b")


@pytest.mark.parametrize("bad", BAD_PERSONS)
def test_alias_identity_is_refused(client, spool_path, bad):
    assert_refused(spool_path, lambda: client.alias("bob", bad), r"\bidentity\b")


def test_int_persons_and_identities_are_sent_in_decimal(client, spool_path):
    client.record(900021, "Signed Up")
    client.set(7, {"Plan": "Pro"})
    client.alias(900021, 12345678901234567890)
    kmagent.KM.identify(8)  # accepted, as in record()
    kmagent.KM.clear_identity()
    assert [params(q)[0] for _, q, _ in rows(spool_path)[-3:]] == [
        ("_p", "900021"), ("_p", "7"), ("_p", "900021")]
    assert params(rows(spool_path)[-1][1])[1] == ("_n", "12345678901234567890")


def test_decimal_and_uuid_values_are_sent_as_their_str(client, spool_path):
    order = uuid.UUID("12345678-1234-5678-1234-567812345678")
    client.record("bob", "Paid", {"Amount": Decimal("19.90"), "Order": order,
                                  "Big": Decimal("1E+30")})
    assert params(rows(spool_path)[-1][1])[-3:] == [
        ("Amount", "19.90"), ("Order", str(order)), ("Big", "1E+30")]


def test_names_of_255_characters_are_accepted(client, spool_path):
    name = "é" * 255  # characters, not bytes
    client.record(name, name, {name: name})
    client.alias(name, name)
    assert kmagent.status(spool=spool_path)["pending"] == 3
    (_, q_event, _), (path, q_alias, _) = rows(spool_path)[1:]
    got = params(q_event)
    assert got[0] == ("_p", name) and got[1] == ("_n", name) and got[-1] == (name, name)
    assert path == "a" and params(q_alias) == [("_p", name), ("_n", name)]


# --- property names -------------------------------------------------------------------

@pytest.mark.parametrize("bad", [
    pytest.param("", id="empty"),
    pytest.param(7, id="int"),
    pytest.param(None, id="None"),
    pytest.param(b"plan", id="bytes"),
    pytest.param(("a",), id="tuple"),
    pytest.param("p" * 256, id="256-chars"),
    pytest.param("plan\udfff", id="lone-surrogate"),
])
def test_bad_property_names_are_refused(client, spool_path, bad):
    assert_refused(spool_path, lambda: client.record("bob", "Signed Up", {bad: "x"}),
                   r"property name")
    assert_refused(spool_path, lambda: client.set("bob", {"ok": 1, bad: "x"}),
                   r"property name")


@pytest.mark.parametrize("reserved", ["_k", "_p", "_n"])
def test_reserved_property_names_are_refused(client, spool_path, reserved):
    assert_refused(spool_path, lambda: client.record("bob", "Signed Up", {reserved: "evil"}),
                   re.escape(reserved))
    assert_refused(spool_path, lambda: client.set("bob", {"ok": 1, reserved: "evil"}),
                   re.escape(reserved))
    # even a None value under a reserved name is a mistake, not a property to drop
    # (the check happens before None values are left out)
    assert_refused(spool_path, lambda: client.record("bob", "Signed Up", {reserved: None}),
                   re.escape(reserved))


def test_property_name_of_255_characters_is_accepted(client, spool_path):
    client.record("bob", "Signed Up", {"p" * 255: 1})
    assert props_of(last_query(spool_path)[1]) == [("p" * 255, "1")]


# --- property values ------------------------------------------------------------------

class Opaque:
    def __str__(self) -> str:
        return "opaque"


@pytest.mark.parametrize("bad", [
    pytest.param({"a": 1}, id="dict"),
    pytest.param([1, 2], id="list"),
    pytest.param((1, 2), id="tuple"),
    pytest.param({1, 2}, id="set"),
    pytest.param(b"bytes", id="bytes"),
    pytest.param(bytearray(b"x"), id="bytearray"),
    pytest.param(Opaque(), id="object"),
    pytest.param(Decimal("NaN"), id="Decimal-NaN"),
    pytest.param(Decimal("Infinity"), id="Decimal-inf"),
    pytest.param(1 + 2j, id="complex"),
    pytest.param(datetime(2020, 1, 1, tzinfo=timezone.utc), id="datetime"),
    pytest.param(math.nan, id="nan"),
    pytest.param(math.inf, id="inf"),
    pytest.param(-math.inf, id="-inf"),
    pytest.param("abc\ud800", id="lone-surrogate"),
    pytest.param("\udc80", id="lone-low-surrogate"),
])
def test_bad_property_values_are_refused(client, spool_path, bad):
    name = "Plan_" + uuid.uuid4().hex[:6]
    assert_refused(spool_path, lambda: client.record("bob", "Signed Up", {"ok": 1, name: bad}),
                   re.escape(name))
    assert_refused(spool_path, lambda: client.set("bob", {name: bad}), re.escape(name))


@pytest.mark.parametrize("too_long", [
    pytest.param("a" * 8193, id="ascii-8193"),
    pytest.param("é" * 4096 + "a", id="2-byte-8193"),
    pytest.param("€" * 2731, id="3-byte-8193"),
    pytest.param("😀" * 2048 + "a", id="4-byte-8193"),
    pytest.param("é" * 4097, id="2-byte-4097-chars"),
])
def test_string_values_over_8192_utf8_bytes_are_refused(client, spool_path, too_long):
    assert len(too_long.encode("utf-8")) > 8192
    assert_refused(spool_path, lambda: client.record("bob", "Wrote", {"body": too_long}),
                   r"\bbody\b")


@pytest.mark.parametrize("exact", [
    pytest.param("a" * 8192, id="ascii"),
    pytest.param("é" * 4096, id="2-byte"),
    pytest.param("€" * 2730 + "ab", id="3-byte"),
    pytest.param("😀" * 2048, id="4-byte"),
])
def test_string_values_of_exactly_8192_utf8_bytes_meet_the_value_rule_not_the_line(
        client, spool_path, exact):
    # The value rule lets 8,192 bytes through; no request line can carry them (8,190
    # bytes at most, and non-ASCII is 3 characters a byte on the wire).
    assert len(exact.encode("utf-8")) == 8192
    exc = assert_refused(spool_path, lambda: client.record("bob", "Wrote", {"body": exact}),
                         r"^request line: ")
    assert "body" not in str(exc)


def test_values_over_512_characters_are_accepted_but_logged_once_per_name(
        client, spool_path, caplog):
    caplog.set_level(logging.DEBUG, logger="kmagent")
    first, second = "Bio_" + uuid.uuid4().hex, "Note_" + uuid.uuid4().hex

    def warnings_about(name: str) -> list[logging.LogRecord]:
        return [r for r in caplog.records
                if r.name.startswith("kmagent") and r.levelno >= logging.WARNING
                and name in r.getMessage()]

    client.record("bob", "Wrote", {first: "x" * 512})  # at the documented limit: silent
    assert warnings_about(first) == []
    client.record("bob", "Wrote", {first: "x" * 513})
    assert len(warnings_about(first)) == 1
    client.record("bob", "Wrote", {first: "y" * 600})
    client.set("bob", {first: "z" * 1000})
    assert len(warnings_about(first)) == 1  # once per name
    client.record("bob", "Wrote", {second: "x" * 513})
    assert len(warnings_about(second)) == 1  # another name is logged on its own
    assert len(warnings_about(first)) == 1
    assert kmagent.status(spool=spool_path)["pending"] == 1 + 5
    assert props_of(rows(spool_path)[2][1]) == [(first, "x" * 513)]


def test_none_values_are_left_out(client, spool_path):
    client.record("bob", "Signed Up", {"a": None, "Plan": "Pro", "b": None, "n": 0})
    assert props_of(last_query(spool_path)[1]) == [("Plan", "Pro"), ("n", "0")]
    client.set("bob", {"gender": "male", "age": None})
    path, query = last_query(spool_path)
    assert path == "s" and props_of(query) == [("gender", "male")]
    assert "age" not in query and "None" not in query
    client.record("bob", "Only Nones", {"a": None})  # an event needs no property
    assert props_of(last_query(spool_path)[1]) == []


@pytest.mark.parametrize("bad", [
    pytest.param([("Plan", "Pro")], id="list-of-pairs"),
    pytest.param("Plan=Pro", id="str"),
    pytest.param(42, id="int"),
    pytest.param({("Plan", "Pro")}, id="set"),
])
def test_props_must_be_a_mapping(client, spool_path, bad):
    assert_refused(spool_path, lambda: client.record("bob", "Signed Up", bad), r"\bprops\b")
    assert_refused(spool_path, lambda: client.set("bob", bad), r"\bprops\b")


@pytest.mark.parametrize("empty", [
    pytest.param({}, id="no-property"),
    pytest.param({"gender": None}, id="only-None"),
    pytest.param({"a": None, "b": None, "_t": None, "_d": None}, id="only-Nones-and-time"),
    pytest.param({"_t": T2010, "_d": 1}, id="only-time"),
])
def test_a_set_needs_at_least_one_property(client, spool_path, empty):
    assert_refused(spool_path, lambda: client.set("bob", empty), r"\bprops\b")
    assert_refused(spool_path, lambda: client.record("bob", empty), r"\bprops\b")


def test_props_may_be_any_mapping(client, spool_path):
    from types import MappingProxyType
    client.record("bob", "Signed Up", MappingProxyType({"Plan": "Pro"}))
    assert props_of(last_query(spool_path)[1]) == [("Plan", "Pro")]


# --- time -----------------------------------------------------------------------------

def test_naive_datetime_is_refused_as_timestamp_and_as_t(client, spool_path):
    naive = datetime(2020, 1, 1, 12, 0, 0)
    assert_refused(spool_path, lambda: client.record("bob", "Signed Up", timestamp=naive),
                   r"\btimestamp\b")
    assert_refused(spool_path, lambda: client.set("bob", {"a": 1}, timestamp=naive),
                   r"\btimestamp\b")
    assert_refused(spool_path, lambda: client.record("bob", "Signed Up", {"_t": naive}),
                   r"\b_t\b")


@pytest.mark.parametrize("aware, expected", [
    (datetime(2020, 1, 1, tzinfo=timezone.utc), 1577836800),
    (datetime(2020, 1, 1, 2, 0, tzinfo=timezone(timedelta(hours=2))), 1577836800),
    (datetime(2019, 12, 31, 19, 0, tzinfo=timezone(timedelta(hours=-5))), 1577836800),
    (datetime(2020, 1, 1, 0, 0, 0, 999999, tzinfo=timezone.utc), 1577836800),
])
def test_aware_datetime_is_accepted_and_converted_to_unix_seconds(
        client, spool_path, aware, expected):
    client.record("bob", "Signed Up", timestamp=aware)
    assert last_query(spool_path) == ("e", f"_p=bob&_n=Signed%20Up&_t={expected}&_d=1")
    client.set("bob", {"a": 1}, timestamp=aware)
    assert last_query(spool_path) == ("s", f"_p=bob&_t={expected}&_d=1&a=1")
    client.record("bob", "Signed Up", {"_t": aware, "x": 1})
    assert last_query(spool_path) == ("e", f"_p=bob&_n=Signed%20Up&_t={expected}&_d=1&x=1")


def test_float_timestamps_are_truncated_to_whole_seconds(client, spool_path):
    client.record("bob", "Signed Up", timestamp=T2010 + 0.999)
    assert last_query(spool_path) == ("e", f"_p=bob&_n=Signed%20Up&_t={T2010}&_d=1")


@pytest.mark.parametrize("early", [
    pytest.param(EARLIEST - 1, id="2008-12-31T23:59:59"),
    pytest.param(0, id="epoch"),
    pytest.param(-1, id="negative"),
    pytest.param(1234567, id="1970"),
    pytest.param(float(EARLIEST - 1), id="float"),
    pytest.param(datetime(2008, 12, 31, 23, 59, 59, tzinfo=timezone.utc), id="datetime"),
])
def test_timestamps_before_2009_are_refused(client, spool_path, early):
    assert_refused(spool_path, lambda: client.record("bob", "Old", timestamp=early),
                   r"\btimestamp\b")
    assert_refused(spool_path, lambda: client.record("bob", "Old", {"_t": early}), r"\b_t\b")
    assert_refused(spool_path, lambda: client.set("bob", {"a": 1}, timestamp=early),
                   r"\btimestamp\b")


def test_the_first_second_of_2009_is_accepted(client, spool_path):
    client.record("bob", "New Year", timestamp=EARLIEST)
    assert last_query(spool_path) == ("e", f"_p=bob&_n=New%20Year&_t={EARLIEST}&_d=1")


@pytest.mark.parametrize("millis", [
    pytest.param(T2010 * 1000, id="int"),
    pytest.param(T2010 * 1000 + 0.5, id="float"),
    pytest.param(1_700_000_000_123, id="2023-ms"),
])
def test_millisecond_timestamps_are_refused(client, spool_path, millis):
    assert_refused(spool_path, lambda: client.record("bob", "Ms", timestamp=millis),
                   r"\btimestamp\b")
    assert_refused(spool_path, lambda: client.record("bob", "Ms", {"_t": millis}), r"\b_t\b")


@pytest.mark.parametrize("bad", [
    pytest.param(True, id="bool"),
    pytest.param("soon", id="str"),
    pytest.param(math.nan, id="nan"),
    pytest.param(math.inf, id="inf"),
    pytest.param([T2010], id="list"),
])
def test_timestamps_of_the_wrong_type_are_refused(client, spool_path, bad):
    assert_refused(spool_path, lambda: client.record("bob", "Odd", timestamp=bad),
                   r"\btimestamp\b")


@pytest.mark.parametrize("bad_d", [0, 2, -1, "yes", "0", 1.5, "true"])
def test_d_other_than_1_is_refused(client, spool_path, bad_d):
    assert_refused(spool_path, lambda: client.record("bob", "Signed Up", {"_d": bad_d}),
                   r"\b_d\b")
    assert_refused(spool_path,
                   lambda: client.record("bob", "Signed Up", {"_t": T2010, "_d": bad_d}),
                   r"\b_d\b")


def test_d_of_1_is_accepted_and_not_a_property(client, spool_path):
    client.record("bob", "Signed Up", {"_d": 1, "Plan": "Pro"}, timestamp=T2010)
    assert last_query(spool_path) == ("e", f"_p=bob&_n=Signed%20Up&_t={T2010}&_d=1&Plan=Pro")


def test_t_given_in_props_and_as_timestamp_is_refused(client, spool_path):
    assert_refused(
        spool_path,
        lambda: client.record("bob", "Signed Up", {"_t": T2010}, timestamp=T2010),
        r"\b_t\b|\btimestamp\b")
    assert_refused(
        spool_path,
        lambda: client.record("bob", "Signed Up", {"_t": T2010, "_d": 1}, timestamp=T2010 + 5),
        r"\b_t\b|\btimestamp\b")
    assert_refused(
        spool_path, lambda: client.set("bob", {"_t": T2010, "a": 1}, timestamp=T2010),
        r"\b_t\b|\btimestamp\b")


# --- subclasses of the plain types are sent as their plain value -----------------------

class Tier(enum.IntEnum):
    GOLD = 3


class Plan(enum.StrEnum):
    PRO = "Pro Plan"


class Price(float):
    def __repr__(self) -> str:
        return "Price!"

    __str__ = __repr__


class Count(int):
    def __repr__(self) -> str:
        return "Count!"

    __str__ = __repr__


class Label(str):
    def __str__(self) -> str:
        return "Label!"

    __repr__ = __str__


def test_subclasses_of_plain_types_are_accepted_as_plain_values(client, spool_path):
    client.record("bob", "Upgraded", {"tier": Tier.GOLD, "plan": Plan.PRO,
                                      "price": Price(9.5), "seats": Count(12),
                                      "label": Label("hello world"), "flag": True})
    path, query = last_query(spool_path)
    assert path == "e"
    assert re.fullmatch(r"_p=bob&_n=Upgraded&_t=\d{10}&_d=1&tier=3&plan=Pro%20Plan"
                        r"&price=9\.5&seats=12&label=hello%20world&flag=true", query), query
    assert props_of(query) == [("tier", "3"), ("plan", "Pro Plan"), ("price", "9.5"),
                               ("seats", "12"), ("label", "hello world"), ("flag", "true")]


def test_subclass_values_still_obey_the_limits(client, spool_path):
    class Huge(str):
        pass
    assert_refused(spool_path,
                   lambda: client.record("bob", "Wrote", {"body": Huge("a" * 8193)}),
                   r"\bbody\b")
    assert_refused(spool_path,
                   lambda: client.record("bob", "Paid", {"amount": Price(math.nan)}),
                   r"\bamount\b")


def test_str_enum_is_accepted_as_person_and_event_name(client, spool_path):
    # A StrEnum is a str: accepted as a person/event name, sent as its value.
    client.record(Plan.PRO, Plan.PRO)
    assert last_query(spool_path)[1].startswith("_p=Pro%20Plan&_n=Pro%20Plan&_t=")


# --- numbers --------------------------------------------------------------------------

def test_huge_int_is_stored_in_decimal_or_refused_as_invalid_event(client, spool_path):
    """A value the encoder cannot render must be an InvalidEvent, never a raw error."""
    huge = 10 ** 5000
    try:
        client.record("bob", "Counted", {"big": huge})
    except kmagent.InvalidEvent as exc:
        assert "big" in str(exc)
        assert kmagent.status(spool=spool_path)["pending"] == 1
    else:
        assert props_of(last_query(spool_path)[1]) == [("big", "1" + "0" * 5000)]
