"""kmagent.compat.kissmetrics: py-KISSmetrics' names and signatures, spooling instead
of sending; the key given travels with each event to a real loopback host."""

from __future__ import annotations

import datetime
import decimal
import inspect
import uuid

import pytest
from helpers import run_kmagent, stored_rows

from kmagent import InvalidEvent
from kmagent.compat import kissmetrics
from kmagent.compat.kissmetrics import KM, Client, ClientCompat


def test_client_calls_spool_with_their_key_and_arrive_with_it(host, write_config, spool_path):
    config = write_config(host, api_key=None)  # no agent-wide key: the app's own travels
    km = Client("app-key", trk_host="trk.kissmetrics.io", trk_scheme="https", config=config)
    assert km.record("bob", "Signed Up", {"Plan": "Pro"}, timestamp=1700000000) is None
    km.record("bob", "Visited")
    km.set("bob", {"Age": 30})
    km.alias("bob", "bob@example.com")
    km.close()
    assert [(p, k) for p, _, k in stored_rows(spool_path)] == [
        ("e", "app-key"), ("e", "app-key"), ("s", "app-key"), ("a", "app-key")]
    assert host.received == []  # nothing is sent by the app

    assert run_kmagent("flush", "--timeout", "20", "--config", str(config)).returncode == 0
    sent = [dict(r.params) for r in host.delivered()]
    assert {s["_k"] for s in sent} == {"app-key"}
    first = next(s for s in sent if s.get("_n") == "Signed Up")
    assert (first["_t"], first["_d"], first["Plan"]) == ("1700000000", "1", "Pro")


def test_km_identifies_per_instance_and_reset_forgets(tmp_path, spool_path):
    km = KM("app-key", spool=spool_path)
    other = ClientCompat("app-key", host="trk.kissmetrics.io:443", spool=spool_path)
    with pytest.raises(InvalidEvent, match="identify"):
        km.record("Viewed")
    km.identify("ann")
    other.identify("bob")
    km.record("Viewed", {"Page": "/"})
    km.set({"Plan": "Pro"})
    other.record("Viewed")
    km.alias("ann", "ann@example.com")
    assert [q.split("&")[0] for _, q, _ in stored_rows(spool_path)] == [
        "_p=ann", "_p=ann", "_p=bob", "_p=ann"]
    km.reset()
    with pytest.raises(InvalidEvent):
        km.record("Viewed")


def test_the_checks_py_kissmetrics_made_are_still_made(spool_path):
    with pytest.raises(ValueError, match="trk_scheme"):
        Client("k", trk_scheme="ftp", spool=spool_path)
    with pytest.raises(ValueError, match="80 or 443"):
        ClientCompat("k", host="trk.kissmetrics.io:8080", spool=spool_path)


def test_bad_input_is_refused_at_the_call(spool_path):
    km = Client("k", spool=spool_path)
    with pytest.raises(InvalidEvent, match="path"):
        km.record("bob", "Did", path="x")
    with pytest.raises(InvalidEvent, match="_k"):
        km.record("bob", "Did", {"_k": "other"})  # py-KISSmetrics let this override the key
    with pytest.raises(InvalidEvent, match="structured"):
        km.record("bob", "Did", {"Tags": ["a", "b"]})  # it sent the list's repr
    assert stored_rows(spool_path) == []


def test_the_public_signatures_are_py_kissmetrics_ones():
    expected = {
        Client.__init__: ["self", "key", "trk_host", "trk_scheme"],
        Client.record: ["self", "person", "event", "properties", "timestamp", "path"],
        Client.set: ["self", "person", "properties", "timestamp", "path"],
        Client.alias: ["self", "person", "identity", "path"],
        ClientCompat.__init__: ["self", "key", "host", "http_timeout", "logging"],
        ClientCompat.record: ["self", "action", "props", "path", "resp"],
        ClientCompat.set: ["self", "data", "path", "resp"],
        ClientCompat.alias: ["self", "name", "alias_to", "path", "resp"],
        ClientCompat.identify: ["self", "identity"],
        ClientCompat.reset: ["self"],
    }
    for function, names in expected.items():
        positional = [p.name for p in inspect.signature(function).parameters.values()
                      if p.kind is p.POSITIONAL_OR_KEYWORD]
        assert positional == names, function
    assert (kissmetrics.RECORD_PATH, kissmetrics.SET_PATH, kissmetrics.ALIAS_PATH) == ("e", "s", "a")
    assert KM is ClientCompat


def test_what_py_kissmetrics_accepted_is_accepted(spool_path):
    km = Client("first-key", spool=spool_path)
    km.record("bob", "Did", [("Plan", "Pro")])  # it merged properties with dict.update
    km.key = "second-key"  # and read the key on every call
    km.set("bob", {"Age": 30})
    assert [(q.split("&")[-1], k) for _, q, k in stored_rows(spool_path)] == [
        ("Plan=Pro", "first-key"), ("Age=30", "second-key")]
    compat = KM("k", spool=spool_path)
    assert compat.log_file() == "/tmp/kissmetrics_error.log" and compat.now().tzinfo is None


def test_values_py_kissmetrics_sent_as_their_str_are_sent_so(spool_path):
    """py-KISSmetrics urlencoded every person, name and value: an int person
    (``KM.identify(user.id)``), Decimal, UUID, dates, bytes and int property names
    went out as their ``str()``; so they do here, parameter by parameter."""
    from urllib.parse import parse_qsl
    km = Client("k", spool=spool_path)
    when = datetime.datetime(2026, 12, 1, 9, 30, tzinfo=datetime.timezone.utc)
    km.record(900021, "Paid", {"Amount": decimal.Decimal("19.90"), "Order": uuid.UUID(int=7),
                               "Day": datetime.date(2026, 12, 1), "At": when,
                               "Note": "café".encode(), 7: "seven"}, timestamp=1700000000)
    compat = KM("k", spool=spool_path)
    compat.identify(42)
    compat.set({"Plan": b"Pro"})
    compat.alias(42, 43)
    queries = [dict(parse_qsl(q)) for _, q, _ in stored_rows(spool_path)]
    assert queries[0] == {"_p": "900021", "_n": "Paid", "_t": "1700000000", "_d": "1",
                          "Amount": "19.90", "Order": str(uuid.UUID(int=7)),
                          "Day": "2026-12-01", "At": "2026-12-01 09:30:00+00:00",
                          "Note": "café", "7": "seven"}
    assert (queries[1]["_p"], queries[1]["Plan"]) == ("42", "Pro")
    assert (queries[2]["_p"], queries[2]["_n"]) == ("42", "43")
    with pytest.raises(InvalidEvent, match="UTF-8"):
        km.set("bob", {"Raw": b"caf\xe9"})
    with pytest.raises(InvalidEvent, match="_p2"):
        km.set("bob", {"_p2": "ann"})  # Kissmetrics' import would alias bob and ann
    assert len(stored_rows(spool_path)) == 3


def test_the_request_line_limit_counts_the_key_given_and_a_key_changed_later(spool_path):
    km = Client("app-key", spool=spool_path)
    frame = len("GET /e?_k=app-key&_p=bob&_n=Big&_t=1700000000&_d=1&pad= HTTP/1.1")
    fits = {"pad": "a" * (8190 - frame)}
    km.record("bob", "Big", fits, timestamp=1700000000)
    with pytest.raises(InvalidEvent, match=r"^request line: 8,191 bytes with its API key; "
                                           r"at most 8,190 "):
        km.record("bob", "Big", {"pad": "a" * (8191 - frame)}, timestamp=1700000000)
    km.key = "app-key-2"  # two characters more
    with pytest.raises(InvalidEvent, match=r"^request line: 8,192 bytes"):
        km.record("bob", "Big", fits, timestamp=1700000000)
    compat = KM("app-key", spool=spool_path)
    compat.identify("bob")
    with pytest.raises(InvalidEvent, match=r"^request line: "):
        compat.set({"pad": "é" * 1400})  # 8,400 characters on the wire
    km.key = "🔑" * 255  # 3,060 characters on the wire: an alias can be too long too
    with pytest.raises(InvalidEvent, match=r"^request line: 9,207 bytes"):
        km.alias("😀" * 255, "😀" * 255)
    assert [(p, k) for p, _, k in stored_rows(spool_path)] == [("e", "app-key")]
    km.close()
    compat.client.close()
