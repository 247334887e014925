"""The fault policy: classification, the agent-wide gate (Retry-After, outages), dead
letters, max_age, bounded disk, a full or read-only disk, shutdown, and secrets."""

from __future__ import annotations

import email.utils
import json
import os
import signal
import sqlite3
import time

import pytest
from helpers import (API_KEY, figures, fill, run_in_process, run_kmagent, start_daemon,
                     stop, wait_for)

import kmagent
from kmagent import Client
from kmagent.gate import OUTAGE_AFTER, Gate
from kmagent.sender import (DELIVERED, PERMANENT, TRANSIENT, Outcome, classify,
                            parse_retry_after)


pytestmark = pytest.mark.backends()  # each test taking ``backend``: on each

FAST = "[ship]\nmax_backoff = 1\nconcurrency = 4\n"


# --- classification ----------------------------------------------------------------

@pytest.mark.parametrize("code, kind", [
    (200, DELIVERED), (204, DELIVERED), (408, TRANSIENT), (429, TRANSIENT),
    (500, TRANSIENT), (503, TRANSIENT), (599, TRANSIENT), (301, PERMANENT),
    (302, PERMANENT), (400, PERMANENT), (403, PERMANENT), (404, PERMANENT)])
def test_outcomes_are_classified(code, kind):
    assert classify(code) == kind


def test_retry_after_is_seconds_or_an_http_date_capped_at_an_hour():
    now = 1_800_000_000.0
    assert parse_retry_after("2", now) == 2
    assert parse_retry_after(email.utils.formatdate(now + 30, usegmt=True), now) == 30
    assert parse_retry_after("999999", now) == 3600
    assert parse_retry_after(email.utils.formatdate(now - 30, usegmt=True), now) == 0
    assert parse_retry_after("soon", now) is None and parse_retry_after(None) is None


# --- the gate, on a fake clock -------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def fail(retry_after=None) -> Outcome:
    return Outcome(TRANSIENT, 503, "HTTP 503", retry_after)


def test_retry_after_holds_every_new_request_agent_wide():
    import threading
    gate = Gate(4, 60)  # the real clock: enter() really has to wait
    ticket = gate.enter()
    gate.leave(ticket, Outcome(TRANSIENT, 429, "HTTP 429", retry_after=0.5))
    started = time.monotonic()
    entered = []
    workers = [threading.Thread(target=lambda: entered.append(
        (gate.enter(), time.monotonic() - started))) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(5)
    assert len(entered) == 3 and all(waited >= 0.45 for _, waited in entered)


def test_an_outage_is_probed_with_one_request_then_ramps_up():
    clock = Clock()
    gate = Gate(16, 60, clock=clock)
    tickets = [gate.enter() for _ in range(16)]
    for ticket in tickets[:OUTAGE_AFTER]:
        gate.leave(ticket, fail())
    assert gate.in_outage and gate.limit == 1 and gate.hold_until > clock.now
    first_hold = gate.hold_until - clock.now
    for ticket in tickets[OUTAGE_AFTER:]:  # started before the outage: no deeper
        gate.leave(ticket, fail())
    assert gate.outage_level == 1
    clock.now = gate.hold_until
    probe = gate.enter()
    gate.leave(probe, fail())  # the probe failed: hold longer
    assert gate.outage_level == 2 and gate.hold_until - clock.now >= first_hold / 2
    clock.now = gate.hold_until
    probe = gate.enter()
    gate.leave(probe, Outcome(DELIVERED, 200))
    assert not gate.in_outage and gate.recovered.is_set()
    limits = []
    for _ in range(4):
        gate.leave(gate.enter(), Outcome(DELIVERED, 200))
        limits.append(gate.limit)
    assert limits == [4, 8, 16, 16]


def test_a_permanent_refusal_means_the_host_is_up():
    gate = Gate(4, 60, clock=Clock())
    for _ in range(OUTAGE_AFTER - 1):
        gate.leave(gate.enter(), fail())
    gate.leave(gate.enter(), Outcome(PERMANENT, 400, "HTTP 400"))
    gate.leave(gate.enter(), fail())
    assert not gate.in_outage


def test_an_event_refused_before_any_request_says_nothing_of_the_host():
    """An oversized request line or a missing key never reaches the host: it must not
    end an outage hold, nor count as a failure of the host."""
    clock = Clock()
    gate = Gate(4, 60, clock=clock)
    for _ in range(OUTAGE_AFTER):
        gate.leave(gate.enter(), fail())
    assert gate.in_outage
    clock.now = gate.hold_until  # the probe's turn
    gate.leave(gate.enter(), Outcome(PERMANENT, None, "not sent: too long", sent=False))
    assert gate.in_outage and not gate.recovered.is_set()
    healthy = Gate(4, 60, clock=Clock())
    for _ in range(OUTAGE_AFTER):
        healthy.leave(healthy.enter(), Outcome(TRANSIENT, None, "no API key", sent=False))
    assert not healthy.in_outage and healthy.active == 0


# --- against a real daemon and host ----------------------------------------------------

def test_retry_after_stops_every_new_request_until_it_expires(host, write_config, spool_path):
    answered = []

    def first_is_429(target: str):
        answered.append(target)
        return 429 if len(answered) == 1 else None

    host.answer_for = first_is_429
    host.retry_after = "2"
    host.delay = 0.02  # the backlog takes seconds: without the hold, requests would go on
    config = write_config(host, extra="[ship]\nconcurrency = 4\n")
    client = Client(config=config)
    for n in range(200):  # a backlog: without the agent-wide hold, requests would go on
        client.record(f"p{n}", "Rate Limited")
    # The flush command's own code, in this process (a Python start spared).
    result = run_in_process("flush", "--timeout", "30", "--config", str(config))
    assert result.returncode == 0, result.stderr
    [refusal] = [r for r in host.received if r.status == 429]
    later = [r.at - refusal.at for r in host.received if r.at > refusal.at]
    # Requests already on their way may land just after the 429; nothing new starts
    # until the 2 s are over.
    assert not [gap for gap in later if 0.2 < gap < 1.95], later
    assert len(host.delivered()) == 200


def test_an_outage_costs_a_few_dozen_requests_and_the_backlog_drains_after(
        host, write_config, spool_path):
    config = write_config(host, extra="[ship]\nconcurrency = 16\nmax_backoff = 4\n")
    client = Client(config=config)
    for n in range(600):
        client.record(f"p{n}", "Outage")
    host.outage(8)
    started = time.time()
    daemon = start_daemon(config)
    try:
        wait_for(lambda: len(host.delivered()) >= 600, timeout=60)
    finally:
        assert stop(daemon) == 0
    during = [r for r in host.received if r.at < started + 8]
    after = [r.at for r in host.delivered()]
    assert len(during) <= 60, f"{len(during)} requests during the outage"
    drain = max(after) - (started + 8)
    assert drain < 8, f"took {drain:.1f} s to drain 600 events after the outage"
    print(f"\noutage: {len(during)} requests in 8 s; drained 600 events {drain:.1f} s after")


def test_refused_events_go_to_dead_letters_and_the_rest_flows(host, write_config, spool_path):
    host.answer_for = lambda target: 400 if "_p=poison" in target else None
    config = write_config(host, extra=FAST)
    client = Client(config=config)
    for n in range(10):
        client.record("poison" if n % 5 == 0 else f"p{n}", f"Event {n}", {"n": n})
    # The commands' own code, run in this process: each real process start costs ~0.4 s
    # of CPU, and what is checked is what the commands do and print. figures() is what
    # `status --json` prints, read in-process.
    result = run_in_process("flush", "--timeout", "30", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "2 of them refused for good" in result.stderr
    assert len(host.delivered()) == 8
    shown = figures(config)
    assert (shown["pending"], shown["dead"]) == (0, 2)

    listed = json.loads(run_in_process("dead", "list", "--json", "--config", str(config)).stdout)
    assert [(d["person"], d["event"], d["properties"], d["status"], d["path"]) for d in listed] \
        == [("poison", "Event 0", {"n": "0"}, 400, "e"), ("poison", "Event 5", {"n": "5"}, 400, "e")]
    assert all("400" in d["reason"] and d["failed_at"] > 0 for d in listed)
    plain = run_in_process("dead", "list", "--config", str(config)).stdout.splitlines()
    assert len(plain) == 2 and plain[0].startswith(listed[0]["id"] + "\t")

    retried = run_in_process("dead", "retry", listed[0]["id"], "--config", str(config))
    assert retried.returncode == 0
    shown = figures(config)
    assert (shown["pending"], shown["dead"]) == (1, 1)
    host.answer_for = None
    assert run_in_process("flush", "--timeout", "30", "--config", str(config)).returncode == 0
    assert any("Event%200" in r.target and r.status == 200 for r in host.received)

    unknown = run_in_process("dead", "purge", "no-such-id", "--config", str(config))
    assert unknown.returncode == 2 and "no-such-id" in unknown.stderr
    assert run_in_process("dead", "purge", "--all", "--config", str(config)).returncode == 0
    assert figures(config)["dead"] == 0


def test_an_event_past_max_age_is_dead_lettered_as_expired(host, write_config, spool_path):
    host.status = 503
    config = write_config(host, extra="[ship]\nmax_backoff = 1\nmax_age = 1\n")
    Client(config=config).record("bob", "Too Late")
    time.sleep(1.2)
    result = run_in_process("flush", "--timeout", "5", "--config", str(config))
    assert result.returncode == 0, result.stderr
    [letter] = json.loads(run_in_process("dead", "list", "--json", "--config",
                                         str(config)).stdout)
    assert "expired" in letter["reason"] and letter["status"] == 503


def test_max_bytes_error_raises_spool_full(write_config, spool_path):
    config = write_config(extra="")
    with open(config, "a") as fh:
        fh.write("max_bytes = 65536\n")
    client = Client(config=config)
    with pytest.raises(kmagent.SpoolFull):
        for n in range(100_000):
            client.record(f"p{n}", "Fill", {"pad": "x" * 500})
    stored = figures(config)["pending"]
    assert 0 < stored < 1000  # refused near the cap; what was accepted is kept


def test_max_bytes_drop_drops_and_counts(write_config, spool_path):
    config = write_config(extra="")
    with open(config, "a") as fh:
        fh.write('max_bytes = 65536\nwhen_full = "drop"\n')
    client = Client(config=config)
    for n in range(2000):
        client.record(f"p{n}", "Fill", {"pad": "x" * 500})
    shown = figures(config)
    assert shown["dropped_total"] > 0
    assert shown["pending"] + shown["dropped_total"] == 2000


def test_a_full_disk_refuses_quickly_and_the_daemon_resumes(
        host, write_config, spool_path, small_disk, backend, tmp_path):
    spool = small_disk / ("spool.db" if backend == "sqlite" else "spool.d")
    config = tmp_path / "small.toml"
    config.write_text(f'api_key = "{API_KEY}"\nendpoint = "{host.url}"\n[spool]\n'
                      f'backend = "{backend}"\npath = "{spool}"\n[ship]\nmax_backoff = 1\n')
    client = Client(config=config)
    for n in range(50):
        client.record(f"p{n}", "Before Full")
    host.status = 503  # nothing is delivered while the disk fills
    daemon = start_daemon(config)
    try:
        fill(small_disk)
        started = time.monotonic()
        # Refused at the reserve (SpoolFull) or by the full disk itself (SpoolError).
        with pytest.raises((kmagent.SpoolError, kmagent.SpoolFull)):
            for n in range(10_000):
                client.record(f"q{n}", "While Full", {"pad": "y" * 200})
        assert time.monotonic() - started < 5
        time.sleep(2)  # the daemon fails to write its bookkeeping, and carries on
        assert daemon.poll() is None
        os.unlink(small_disk / "filler")
        host.status = 200
        wait_for(lambda: figures(config)["pending"] == 0, timeout=30)
    except AssertionError:
        stop(daemon)
        raise AssertionError(daemon.log[-3000:])
    finally:
        code = stop(daemon)
        assert code == 0, daemon.log
    names = {dict(r.params)["_p"] for r in host.delivered()}
    assert {f"p{n}" for n in range(50)} <= names
    if backend == "sqlite":
        with sqlite3.connect(spool) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def start_hung_daemon(host, write_config, extra: str = ""):
    """A daemon with one request in flight to a host that takes 20 s to answer."""
    host.delay = 20
    config = write_config(host, extra="[ship]\nread_timeout = 60\n" + extra)
    Client(config=config).record("bob", "Hung")
    daemon = start_daemon(config)
    wait_for(lambda: host.started > 0)
    return daemon, config


def test_shutdown_timeout_bounds_a_sigterm(host, write_config, spool_path):
    daemon, config = start_hung_daemon(host, write_config, "shutdown_timeout = 1\n")
    started = time.monotonic()
    assert stop(daemon) == 0
    assert time.monotonic() - started < 5
    assert figures(config)["pending"] == 1


def test_a_second_sigterm_exits_at_once(host, write_config, spool_path):
    daemon, config = start_hung_daemon(host, write_config)
    daemon.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    started = time.monotonic()
    assert stop(daemon) == 0
    assert time.monotonic() - started < 3
    assert figures(config)["pending"] == 1  # nothing lost either way


def test_the_api_key_never_reaches_logs_errors_or_status(host, write_config, spool_path,
                                                         tmp_path):
    secret = "Sup3r-Secret-Key"
    host.status = 503
    config = write_config(host, extra=FAST, api_key=secret)
    Client(config=config).record("bob", "Secretive")
    Client("Own Key/With?Odd&Chars", config=config).record("bob", "Own Key")
    result = run_kmagent("flush", "--timeout", "2", "--log-level", "debug",
                         "--config", str(config))
    assert result.returncode == 1
    assert "GET /e?_k=***" in result.stderr  # urllib3's debug line, redacted
    shown = result.stderr + result.stdout + json.dumps(figures(config))
    for text in (secret, "Own Key/With?Odd&Chars", "Own%20Key%2FWith%3FOdd%26Chars"):
        assert text not in shown


def test_spool_files_are_not_world_readable(write_config, spool_path, backend):
    config = write_config()
    Client(config=config).record("bob", "Private")
    run_kmagent("status", "--config", str(config))
    files = [spool_path] if backend == "sqlite" else list(spool_path.iterdir())
    files += list(spool_path.parent.glob(spool_path.name + "*"))
    assert files
    for path in files:
        assert not os.stat(path).st_mode & 0o007, f"{path} is open to everyone"


def test_a_world_readable_config_holding_the_key_gets_a_warning(write_config, tmp_path):
    config = write_config()
    config.chmod(0o644)
    warned = run_kmagent("status", "--config", str(config))
    assert "api_key_file" in warned.stderr and "readable by every user" in warned.stderr
    config.chmod(0o600)
    assert "readable by every user" not in run_kmagent("status", "--config", str(config)).stderr
