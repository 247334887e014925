"""Adaptive request concurrency: the controller on its own, then a real shipper against
a real loopback host with latency (it grows) and one that pushes back (it shrinks)."""

from __future__ import annotations

import pytest
from helpers import shipping_session, wait_for

from kmagent.adaptive import AdaptiveLimit
from kmagent.client import Client
from kmagent.config import load_config
from kmagent.shipping import make_shipper
from kmagent.spool import open_spool
from kmagent.testhost import StandInHost


def period(limit: AdaptiveLimit, rtt: float | None = 0.02, *, pushed_back: bool = False,
           busy: bool = True) -> int:
    """One round trip's worth of answers; returns the limit after it."""
    for _ in range(limit.limit):
        limit.observe(rtt, pushed_back=pushed_back,
                      in_flight=limit.limit if busy else 1)
    return limit.limit


def test_doubles_per_round_trip_until_the_first_back_off_then_adds_one():
    limit = AdaptiveLimit(4, 100)
    assert [period(limit) for _ in range(3)] == [8, 16, 32]
    assert period(limit, pushed_back=True) == 28
    assert [period(limit) for _ in range(3)] == [29, 30, 31]
    assert [period(AdaptiveLimit(40, 64)) for _ in range(1)] == [64]  # never past the ceiling


def test_does_not_grow_when_fewer_requests_are_waiting_than_allowed():
    limit = AdaptiveLimit(4, 10)
    assert [period(limit, busy=False) for _ in range(3)] == [4, 4, 4]


def test_backs_off_when_the_host_pushes_back_but_never_below_one():
    limit = AdaptiveLimit(20, 64)
    assert period(limit, pushed_back=True) == 18
    for _ in range(40):
        period(limit, pushed_back=True)
    assert limit.limit == 1


def test_backs_off_when_the_round_trip_rises():
    limit = AdaptiveLimit(10, 64)
    limit.slow_start = False
    for _ in range(5):
        period(limit, rtt=0.020)
    grown = limit.limit
    assert period(limit, rtt=0.080) == int(grown * 0.9)  # requests queue: fewer at once


def test_a_slowly_drifting_round_trip_is_not_mistaken_for_queueing():
    limit = AdaptiveLimit(4, 64)
    limit.slow_start = False
    for n in range(20):
        period(limit, rtt=0.020 + n * 0.0005)
    assert limit.limit == 24


def test_configuration_auto_by_default_fixed_when_a_number_is_given(tmp_path):
    def load(text: str):
        path = tmp_path / "c.toml"
        path.write_text(text)
        return load_config(path)
    def concurrency(config):
        return config.concurrency, config.adapt_concurrency, config.max_concurrency
    assert concurrency(load("")) == (16, True, 64)
    assert concurrency(load('[ship]\nconcurrency = "auto"\nmax_concurrency = 8\n')) == (
        8, True, 8)
    fixed = load("[ship]\nconcurrency = 4\n")
    assert concurrency(fixed)[:2] == (4, False)
    assert concurrency(load("[ship]\nconcurrency = 4\nmax_concurrency = 200\n")) == (
        4, True, 200)


@pytest.mark.parametrize("text, words", [
    ('[ship]\nconcurrency = "many"\n', ["concurrency", "auto"]),
    ("[ship]\nconcurrency = 32\nmax_concurrency = 8\n", ["concurrency", "max_concurrency"]),
    ("[ship]\nmax_concurrency = 0\n", ["max_concurrency", "1"]),
])
def test_bad_concurrency_settings_are_refused_with_the_rule(tmp_path, text, words):
    from kmagent.errors import ConfigError
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as refused:
        load_config(path)
    assert all(word in str(refused.value) for word in words)


def drain(tmp_path, host: StandInHost, events: int, extra: str = ""):
    config_path = tmp_path / "c.toml"
    config_path.write_text(f'api_key = "k"\nendpoint = "{host.url}"\n{extra}'
                           f'[spool]\npath = "{tmp_path / "s.db"}"\n')
    config = load_config(config_path)
    client = Client(config=config)
    for n in range(events):
        client.record(f"p{n}", "Adapted")
    client.close()
    spool = open_spool(tmp_path / "s.db")
    shipper = make_shipper(config, shipping_session(spool))
    try:
        def drained() -> bool:
            shipper.step()
            return spool.stats(0)["pending"] == 0 and not shipper.in_flight
        wait_for(drained, timeout=60, interval=0.005)
        return shipper
    finally:
        shipper.shutdown(5)
        spool.close()


def test_a_shipper_facing_a_slow_host_opens_more_requests_at_once(tmp_path):
    with StandInHost(delay=0.02) as host:
        shipper = drain(tmp_path, host, 1500)
    assert shipper.concurrency > 16  # it started at 16 and the round trip held
    assert len(shipper._workers) >= shipper.concurrency


def test_a_shipper_facing_pushback_opens_fewer(tmp_path):
    # Every fourth request fails: not an outage (never 5 in a row), but pushback.
    with StandInHost(delay=0.005, fail_rate=0.25, seed=7) as host:
        shipper = drain(tmp_path, host, 400, extra="[ship]\nmax_backoff = 1\n")
    assert shipper.concurrency < 16


@pytest.mark.parametrize("outcome, pushed", [
    (dict(kind="transient", status=429), True),
    (dict(kind="transient", status=503), True),
    (dict(kind="transient", status=500, retry_after=2.0), True),
    (dict(kind="transient", error="TimeoutError: timed out", timed_out=True), True),
    (dict(kind="transient", status=500), False),  # a flaky backend, not load
    (dict(kind="transient", error="ConnectionResetError: reset"), False),
    (dict(kind="delivered", status=200), False),
])
def test_only_signs_of_load_count_as_pushback(outcome, pushed):
    from kmagent.gate import pushed_back
    from kmagent.sender import Outcome
    assert pushed_back(Outcome(**outcome)) is pushed
