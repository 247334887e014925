"""No request line over 8,190 bytes (Apache's LimitRequestLine) is sent: the stand-in
host refuses one as Apache does, the sender does not send one, and the shipper dead
letters an event that would need one instead of retrying it."""

from __future__ import annotations

import http.client
import time
from urllib.parse import quote

from helpers import sender_for, shipping_session

from kmagent.events import Event, make_event
from kmagent.protocol import encode
from kmagent.sender import PERMANENT
from kmagent.shipper import Shipper
from kmagent.spool import Claimed, open_spool


def claimed(size: int, key: str, own_key: str | None = None, prefix: str = "") -> Claimed:
    """A stored event whose request line, sent with ``key`` (to an endpoint with the
    path ``prefix``), is ``size`` bytes."""
    query = "_p=bob&_n=Big&_t=1700000000&_d=1&pad="
    frame = len(f"GET {prefix}/e?_k={quote(key, safe='')}&{query} HTTP/1.1")
    return Claimed(7, "e", query + "a" * (size - frame), own_key, 0.0, 1)


def request_line(target: str) -> int:
    return len(f"GET {target} HTTP/1.1".encode())


def test_the_stand_in_host_answers_a_request_line_over_8190_bytes_with_414(host):
    port = int(host.url.rsplit(":", 1)[1])
    for size, status in [(8190, 200), (8191, 414), (12000, 414)]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        target = "/e?_k=k&pad="
        target += "a" * (size - request_line(target))
        conn.request("GET", target)
        answer = conn.getresponse()
        assert answer.status == status
        if status == 414:
            assert answer.getheader("Connection") == "close"
        conn.close()
    assert [(request_line(r.target), r.status) for r in host.received] == [
        (8190, 200), (8191, 414), (12000, 414)]


def test_the_stand_in_host_keeps_a_request_line_over_64_kib_as_refused(host):
    # ~98 KB, as four 8 KiB values of non-ASCII text make: http.server's own limit.
    conn = http.client.HTTPConnection("127.0.0.1", int(host.url.rsplit(":", 1)[1]), timeout=5)
    try:
        conn.request("GET", "/e?_k=k&pad=" + "%C3%A9" * 16384)
        assert conn.getresponse().status == 414
    except OSError:
        pass  # or the host hangs up while the rest is still being written
    finally:
        conn.close()
    wait_until = time.monotonic() + 5
    while not host.received and time.monotonic() < wait_until:
        time.sleep(0.01)
    assert [r.status for r in host.received] == [414]


def test_a_request_line_of_8190_bytes_is_sent_and_of_8191_is_not(host):
    sender = sender_for(host.url)
    try:
        assert sender.send(claimed(8190, "secret-key")).delivered
        outcome = sender.send(claimed(8191, "secret-key"))
    finally:
        sender.close()
    assert (outcome.kind, outcome.status) == (PERMANENT, None)  # dead letter, no retry
    assert "8,191 bytes" in outcome.error and "at most 8,190" in outcome.error
    assert "the agent's API key" in outcome.error and "secret-key" not in outcome.error
    assert [(request_line(r.target), r.status) for r in host.received] == [(8190, 200)]


def test_an_event_recorded_within_the_limit_is_not_sent_with_a_longer_configured_key(host):
    """record() counts 40 characters for the agent's key; a longer one is caught here."""
    frame = request_line(f"/e?_k={'k' * 40}&_p=bob&_n=Big&_t=1700000000&_d=1&pad=")
    event = make_event("bob", "Big", {"pad": "a" * (8190 - frame)}, now=1700000000)
    item = Claimed(3, *encode(event), None, 0.0, 1)  # as record() stored it
    assert sender_for(host.url, api_key="f" * 40).send(item).delivered
    outcome = sender_for(host.url, api_key="f" * 41).send(item)
    assert outcome.kind == PERMANENT and "8,191 bytes" in outcome.error
    assert [request_line(r.target) for r in host.received] == [8190]


def test_an_oversized_stored_event_with_its_own_key_is_not_sent(host):
    outcome = sender_for(host.url).send(claimed(98376, "own-key", own_key="own-key"))
    assert outcome.kind == PERMANENT and "98,376 bytes with its own API key" in outcome.error
    assert host.received == []


def test_the_endpoint_path_counts_in_the_request_line(host):
    sender = sender_for(host.url + "/km")
    assert sender.send(claimed(8190, "secret-key", prefix="/km")).delivered
    outcome = sender.send(claimed(8190, "secret-key"))  # 8,193 bytes with "/km"
    assert outcome.kind == PERMANENT and "8,193 bytes" in outcome.error
    assert [request_line(r.target) for r in host.received] == [8190]
    sender.close()


def test_the_shipper_dead_letters_an_oversized_stored_event_instead_of_retrying(
        host, tmp_path):
    spool = open_spool(tmp_path / "spool.db")
    # Stored as it was before record() refused such events: built without make_event.
    spool.append(Event("e", "bob", "Big", 1700000000, (("pad", "é" * 4096),) * 4))
    spool.append(make_event("bob", "Small", {"n": 1}, now=1700000000))
    shipper = Shipper(shipping_session(spool), sender_for(host.url), concurrency=1,
                      max_backoff=1)
    try:
        deadline = time.monotonic() + 10
        while shipper.delivered_total + shipper.dead_total < 2 and time.monotonic() < deadline:
            shipper.step()
            shipper.wake.wait(0.05)
            shipper.wake.clear()
        assert (shipper.delivered_total, shipper.dead_total, shipper.retried_total) == (1, 1, 0)
        [letter] = spool.dead_letters()
        assert letter["event"] == "Big" and letter["status"] is None
        size = request_line("/e?_k=secret-key&_p=bob&_n=Big&_t=1700000000&_d=1"
                            + ("&pad=" + "%C3%A9" * 4096) * 4)
        assert f"{size:,} bytes" in letter["reason"] and "8,190" in letter["reason"]
        assert [dict(r.params)["_n"] for r in host.received] == ["Small"]
        assert spool.stats(time.time())["pending"] == 0
    finally:
        shipper.shutdown(5)
        shipper.sender.close()
        spool.close()
