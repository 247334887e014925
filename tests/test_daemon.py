"""``kmagent run`` and ``kmagent flush`` as real processes against a real loopback host:
live delivery, SIGTERM, SIGKILL mid-drain, concurrent producers, flush beside a daemon."""

from __future__ import annotations

import collections
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from kmagent import Client
from kmagent.protocol import request_target

# figures(config) is what `kmagent status --json` prints, read in this process: the
# command itself is tested in test_cli.py, here it only reads the spool's figures.
from helpers import (API_KEY, figures, record_many, run_kmagent, start_daemon,
                     start_kmagent, stop, stored_rows, wait_for)


pytestmark = pytest.mark.backends()  # each test taking ``backend``: on each

FAST_RETRY = "[ship]\nmax_backoff = 1\nconcurrency = 4\n"


def expected_targets(spool_path) -> list[str]:
    """The request target of every pending event, as the host must receive it."""
    return [request_target(path, query, key or API_KEY)
            for path, query, key in stored_rows(spool_path)]


def test_run_delivers_events_recorded_while_it_idles_within_milliseconds(
        host, write_config, spool_path):
    config = write_config(host)
    Client(config=config).close()
    daemon = start_daemon(config)
    try:
        client = Client(config=config)
        for n in range(5):
            time.sleep(0.3)  # idle between events, at varying points of the 1 s rescan
            started = time.time()
            client.record("bob@example.com", f"Viewed Page {n}")
            request = wait_for(lambda: [r for r in host.delivered()
                                        if f"Page%20{n}&" in r.target], timeout=10)[0]
            # Woken by inotify, not by the rescan: five events all landing within
            # 0.25 s of a 1 s rescan tick by luck has a chance of about 1 in 3,000.
            assert request.at - started < 0.25, f"event {n}: {request.at - started:.3f} s"
        assert host.delivered()[0].target.startswith(
            f"/e?_k={API_KEY}&_p=bob%40example.com&_n=Viewed%20Page%200&_t=")
    finally:
        assert stop(daemon) == 0


def test_sigterm_exits_zero_and_loses_nothing_in_flight(host, write_config, spool_path):
    host.delay = 0.5  # requests are in flight when the signal comes
    config = write_config(host, extra="[ship]\nconcurrency = 4\n")
    record_many(config, 40)
    expected = expected_targets(spool_path)
    daemon = start_daemon(config)
    wait_for(lambda: figures(config)["in_flight"] > 0)
    assert figures(config)["concurrency"] == 4  # a number in the configuration fixes it
    started = time.monotonic()
    assert stop(daemon) == 0
    assert time.monotonic() - started < 10  # finished its in-flight work, then left
    in_flight_at_signal = len(host.received)
    assert in_flight_at_signal > 0 and all(r.status == 200 for r in host.received)
    host.delay = 0
    assert run_kmagent("flush", "--timeout", "30", "--config", str(config)).returncode == 0
    delivered = collections.Counter(r.target for r in host.delivered())
    assert set(delivered) == set(expected)
    # What was in flight at the signal was finished and acknowledged before the exit:
    # nothing is sent twice (a daemon that dropped its work on SIGTERM would resend it).
    assert max(delivered.values()) == 1


def test_sigterm_does_not_wait_for_a_hung_host_past_the_deadline(
        host, write_config, spool_path):
    host.delay = 30  # far longer than the shutdown deadline
    config = write_config(host, extra="[ship]\nconcurrency = 2\nread_timeout = 60\n"
                                      "shutdown_timeout = 2\n")
    record_many(config, 4)
    daemon = start_daemon(config)
    wait_for(lambda: host.started > 0)
    started = time.monotonic()
    assert stop(daemon, timeout=30) == 0
    assert time.monotonic() - started < 12  # the 2 s deadline, not the 30 s request
    assert figures(config)["pending"] == 4  # given back, to be sent again identically


def test_sigkill_mid_drain_loses_nothing_and_resends_only_in_flight(
        host, write_config, spool_path):
    host.delay = 0.01  # at most 8 / 0.01 s = 800 deliveries a second, however fast
    config = write_config(host, extra="[ship]\nconcurrency = 8\n")
    # Killed twice once 100 more were delivered: its whole claim window (16) is in
    # flight by then, and with the host's pace capping how far past 100 it gets before
    # the kill lands, well over 300 of the 600 are still to go after both kills.
    record_many(config, 600)
    expected = expected_targets(spool_path)
    for _ in range(2):  # kill it twice mid-drain
        daemon = start_daemon(config)
        before = len(host.delivered())
        wait_for(lambda: len(host.delivered()) >= before + 100, timeout=60)
        stop(daemon, signal.SIGKILL)
    assert figures(config)["pending"] > 0
    daemon = start_daemon(config)
    try:
        wait_for(lambda: figures(config)["pending"] == 0, timeout=60)
    finally:
        assert stop(daemon) == 0
    delivered = [r.target for r in host.delivered()]
    assert set(delivered) == set(expected)  # nothing lost, nothing foreign
    resent = sum(n - 1 for n in collections.Counter(delivered).values())
    # A resend is the same bytes (counted above by target) and only what was in flight:
    # at most the claim window (2 × concurrency) per kill.
    assert resent <= 2 * 2 * 8


PRODUCER = textwrap.dedent("""
    import sys
    from kmagent import Client
    client = Client(config=sys.argv[1])
    for n in range(int(sys.argv[3])):
        client.record("p" + sys.argv[2], "n" + str(n))
        print(n, flush=True)
""")


def test_concurrent_producer_processes_lose_nothing(host, write_config, spool_path):
    config = write_config(host)
    Client(config=config).close()
    daemon = start_daemon(config)  # shipping while they write
    try:
        producers = [subprocess.Popen([sys.executable, "-c", PRODUCER, str(config),
                                       str(p), "300"], stdout=subprocess.DEVNULL)
                     for p in range(4)]
        assert [p.wait(60) for p in producers] == [0, 0, 0, 0]
        wait_for(lambda: len(host.delivered()) >= 1200, timeout=60)
    finally:
        assert stop(daemon) == 0
    seen = collections.Counter((dict(r.params)["_p"], dict(r.params)["_n"])
                               for r in host.delivered())
    assert set(seen) == {(f"p{p}", f"n{n}") for p in range(4) for n in range(300)}
    assert max(seen.values()) == 1


def test_a_producer_killed_mid_stream_keeps_every_event_record_returned_for(
        write_config, spool_path):
    config = write_config()
    Client(config=config).close()
    producer = subprocess.Popen([sys.executable, "-c", PRODUCER, str(config), "0",
                                 "1000000"], stdout=subprocess.PIPE, text=True)
    acknowledged = []
    for line in producer.stdout:
        acknowledged.append(int(line))
        if len(acknowledged) == 2000:
            producer.kill()
            break
    producer.wait()
    acknowledged.extend(int(line) for line in producer.stdout.read().split())
    stored = {query.split("&")[1] for _, query, _ in stored_rows(spool_path)}
    assert {f"_n=n{n}" for n in acknowledged} <= stored


def test_flush_beside_a_running_daemon_never_sends_twice(host, write_config, spool_path):
    host.delay = 1.0  # slow until both flushes are surely up, on a loaded machine too
    config = write_config(host, extra="[ship]\nconcurrency = 4\n")
    # 100: at 4 a second until both flushes are up, most are still pending then.
    record_many(config, 100)
    daemon = start_daemon(config)
    try:
        flushes = [start_kmagent("flush", "--config", str(config)) for _ in range(2)]
        time.sleep(3)
        host.delay = 0.01
        for flush in flushes:
            out, err = flush.communicate(timeout=60)
            assert flush.returncode == 0, err
            assert f"delivered by pid {daemon.pid}" in err
    finally:
        assert stop(daemon) == 0
    delivered = collections.Counter(r.target for r in host.delivered())
    assert len(delivered) == 100 and max(delivered.values()) == 1


def test_run_waits_for_a_flush_that_holds_the_spool(host, write_config, spool_path):
    host.delay = 0.05  # the flush takes ~5 s: the daemon starts well before it ends
    config = write_config(host, extra="[ship]\nconcurrency = 2\n")
    record_many(config, 200)
    flush = start_kmagent("flush", "--config", str(config))
    wait_for(lambda: figures(config)["daemon_pid"] == flush.pid)
    daemon = start_kmagent("run", "--config", str(config))
    try:
        assert flush.wait(60) == 0
        Client(config=config).record("late", "After Flush")
        wait_for(lambda: any("After%20Flush" in r.target for r in host.delivered()))
    finally:
        assert stop(daemon) == 0
        flush.communicate()
    assert f"shipped by pid {flush.pid}; waiting for it" in daemon.log
    delivered = collections.Counter(r.target for r in host.delivered())
    assert len(delivered) == 201 and max(delivered.values()) == 1


def test_failed_requests_are_retried_with_the_same_bytes(host, write_config, spool_path):
    host.fail_first = 6
    config = write_config(host, extra=FAST_RETRY)
    record_many(config, 3)
    result = run_kmagent("flush", "--timeout", "15", "--config", str(config))
    assert result.returncode == 0, result.stderr
    failed = [r.target for r in host.received if r.status == 503]
    delivered = [r.target for r in host.delivered()]
    assert len(failed) == 6 and len(delivered) == 3
    assert set(failed) <= set(delivered)  # every retry repeated the exact request


def test_events_are_never_acknowledged_without_a_2xx(host, write_config, spool_path):
    host.status = 503
    config = write_config(host, extra=FAST_RETRY)
    record_many(config, 2)
    result = run_kmagent("flush", "--timeout", "2", "--config", str(config))
    assert result.returncode == 1
    assert "HTTP 503" in result.stderr
    left = figures(config)
    assert (left["pending"], left["dead"]) == (2, 0)


def test_a_redirect_is_never_followed_and_the_event_is_dead_lettered(
        host, write_config, spool_path):
    host.status = 302
    config = write_config(host, extra=FAST_RETRY)
    record_many(config, 2)
    result = run_kmagent("flush", "--timeout", "30", "--config", str(config))
    assert result.returncode == 0  # dead letters are reported, not a failure of flush
    assert "2 dead letters" in result.stderr
    left = figures(config)
    assert (left["pending"], left["dead"]) == (0, 2)
    assert len(host.received) == 2 and all(r.target.startswith("/e?") for r in host.received)
