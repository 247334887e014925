"""The ``kmagent`` command, run as a real subprocess against real spool files and the
real stand-in tracking host on 127.0.0.1."""

from __future__ import annotations

import json
import re
import time

import pytest

import kmagent
from helpers import (API_KEY, figures, record_many, run_in_process, run_kmagent,
                     start_daemon, stop)

PERSON = "bob@example.com"
P = "bob%40example.com"  # PERSON as it travels


def status_json(config) -> dict:
    result = run_kmagent("status", "--json", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    figures = json.loads(result.stdout)  # stdout carries only the JSON
    assert isinstance(figures, dict)
    return figures


def ok(*args: str) -> None:
    """``kmagent ARGS`` as a real process: exits 0, says nothing on stdout."""
    check_ok(run_kmagent(*args))


def ok_here(*args: str) -> None:
    """The same command run in this process (click's CliRunner): for the records that
    set a test up, where what is tested is what the command appends, not that it is in
    the spool once its process has exited (test_record_set_and_alias_append runs them
    as real processes and reads them back from another)."""
    check_ok(run_in_process(*args))


def check_ok(result) -> None:
    assert result.returncode == 0, result.stderr
    assert result.stdout == "", f"stdout must carry only the command's output: {result.stdout!r}"
    assert "Traceback" not in result.stderr


def targets_with_time(received, before: float, after: float) -> list[str]:
    """Request targets with a ``_t`` frozen between ``before`` and ``after`` replaced by
    ``NOW`` (any other ``_t`` is kept as is)."""
    def replace(match: re.Match) -> str:
        t = int(match.group(1))
        return "_t=NOW" if int(before) <= t <= int(after) + 1 else match.group(0)
    return sorted(re.sub(r"_t=(\d+)", replace, r.target) for r in received)


# --- version and help --------------------------------------------------------------------

def test_version():
    result = run_kmagent("--version")
    assert result.returncode == 0
    assert kmagent.__version__ in result.stdout
    assert "kmagent" in result.stdout


@pytest.mark.parametrize("command", ["record", "set", "alias", "status", "flush", "run",
                                     "testhost"])
def test_help_of_every_command_has_an_example(command):
    result = run_in_process(command, "--help")
    assert result.returncode == 0, result.stderr
    assert "Example" in result.stdout


def test_top_level_help_lists_the_commands():
    result = run_in_process("--help")
    assert result.returncode == 0
    for command in ("record", "set", "alias", "status", "flush", "run"):
        assert command in result.stdout


# --- appending ---------------------------------------------------------------------------

def test_status_json_of_an_empty_spool(write_config):
    figures = status_json(write_config())
    assert {"pending", "dead", "oldest_pending_age_s", "in_flight", "daemon_pid"} <= set(figures)
    assert figures["pending"] == 0
    assert figures["dead"] == 0
    assert figures["in_flight"] == 0
    assert figures["oldest_pending_age_s"] is None
    assert figures["daemon_pid"] is None


def test_record_set_and_alias_append(write_config, spool_path):
    config = str(write_config())
    ok("record", PERSON, "Signed Up", "Plan=Pro", "--config", config)
    ok("set", PERSON, "gender=male", "--config", config)
    ok("alias", PERSON, "User 12345", "--config", config)
    assert spool_path.exists()
    figures = status_json(config)
    assert figures["pending"] == 3
    assert figures["dead"] == 0
    assert figures["in_flight"] == 0
    assert figures["daemon_pid"] is None
    assert isinstance(figures["oldest_pending_age_s"], float)
    assert 0 <= figures["oldest_pending_age_s"] < 60


INVALID = [
    # (arguments, a word of the message naming the culprit)
    (["record", PERSON, ""], ["event"]),
    (["record", PERSON, "Signed Up", "NoEqualsSign"], ["NoEqualsSign"]),
    (["record", PERSON, "Signed Up", "=value"], ["=value", "property", "name"]),
    (["set", PERSON], ["propert", "NAME=VALUE"]),
    (["record", "x" * 256, "Signed Up"], ["person"]),
    (["alias", PERSON, ""], ["identity"]),
]


@pytest.mark.parametrize("args, names", INVALID, ids=["empty-event", "no-equals",
                                                      "empty-name", "set-no-props",
                                                      "person-256", "empty-identity"])
def test_invalid_input_exits_2_naming_the_field(write_config, args, names):
    config = write_config()
    result = run_in_process(*args, "--config", str(config))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines, "no message"
    message = lines[-1]  # the one line saying what is wrong
    assert any(name.lower() in message.lower() for name in names), result.stderr
    assert figures(config)["pending"] == 0  # nothing appended


def test_config_option_before_and_after_the_command_name(write_config, spool_path, tmp_path):
    config = str(write_config())
    ok_here("--config", config, "record", PERSON, "Before")
    ok_here("record", PERSON, "After", "--config", config)
    ok_here("-c", config, "set", PERSON, "a=1")
    assert status_json(config)["pending"] == 3
    result = run_kmagent("--config", config, "status", "--json")
    assert result.returncode == 0
    assert json.loads(result.stdout)["pending"] == 3
    # Nothing went to the default spool under $XDG_STATE_HOME.
    assert not (tmp_path / "state" / "kmagent" / "spool.db").exists()


def test_command_line_config_wins_over_kmagent_config(write_config, tmp_path, monkeypatch):
    bad = tmp_path / "bad.toml"
    bad.write_text("bogus = 1\n")
    monkeypatch.setenv("KMAGENT_CONFIG", str(bad))
    config = str(write_config())
    ok_here("record", PERSON, "Signed Up", "--config", config)
    assert status_json(config)["pending"] == 1


# --- configuration errors: 78, one line, no traceback ---------------------------------------

COMMANDS = {
    "record": ["record", PERSON, "Signed Up", "Plan=Pro"],
    "set": ["set", PERSON, "gender=male"],
    "alias": ["alias", PERSON, "User 12345"],
    "status": ["status", "--json"],
    "flush": ["flush", "--timeout", "1"],
    "run": ["run"],
}


@pytest.mark.parametrize("how", ["unknown-key", "missing-file", "env-bad-file"])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_configuration_error_exits_78_for_every_command(command, how, write_config, tmp_path,
                                                        monkeypatch):
    args = list(COMMANDS[command])
    if how == "unknown-key":
        path = write_config(extra="[ship]\nconcurrenzy = 4")
        args += ["--config", str(path)]
    elif how == "missing-file":
        path = tmp_path / "no-such-config.toml"
        args = ["--config", str(path), *args]
    else:
        path = tmp_path / "env.toml"
        path.write_text('endpoint = "http://example.com"\n')
        monkeypatch.setenv("KMAGENT_CONFIG", str(path))
    result = run_in_process(*args)
    assert result.returncode == 78, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    assert str(path) in result.stderr
    if how == "unknown-key":
        assert "concurrenzy" in result.stderr
    if how == "env-bad-file":
        assert "endpoint" in result.stderr


def test_invalid_toml_exits_78(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text("[ship\n")
    result = run_in_process("status", "--config", str(path))
    assert result.returncode == 78
    assert "Traceback" not in result.stderr
    assert str(path) in result.stderr


# --- status ------------------------------------------------------------------------------

def test_status_human_output_mentions_pending_and_dead(write_config):
    config = str(write_config())
    ok_here("record", PERSON, "Signed Up", "--config", config)
    ok_here("record", PERSON, "Signed Up", "--config", config)
    result = run_kmagent("status", "--config", config)
    assert result.returncode == 0, result.stderr
    assert re.search(r"pending\D*2\b", result.stdout, re.I), result.stdout
    assert re.search(r"dead\D*0\b", result.stdout, re.I), result.stdout


# --- flush -------------------------------------------------------------------------------

def test_flush_with_nothing_pending_exits_0(write_config, host):
    result = run_kmagent("flush", "--config", str(write_config(host)))
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert host.received == []


def test_flush_delivers_in_the_documented_wire_format(write_config, host):
    config = str(write_config(host))
    before = time.time()
    ok_here("record", PERSON, "Viewed Homepage", "--config", config)
    ok_here("record", PERSON, "Signed Up", "Plan Name=Pro Plus", "city=Zürich", "q=a&b=c",
            "--config", config)
    ok_here("set", PERSON, "gender=male", "Plan Name=Pro", "--config", config)
    ok_here("alias", PERSON, "User 12345", "--config", config)
    after = time.time()
    result = run_kmagent("flush", "--config", config, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert targets_with_time(host.received, before, after) == sorted([
        f"/e?_k={API_KEY}&_p={P}&_n=Viewed%20Homepage&_t=NOW&_d=1",
        f"/e?_k={API_KEY}&_p={P}&_n=Signed%20Up&_t=NOW&_d=1"
        "&Plan%20Name=Pro%20Plus&city=Z%C3%BCrich&q=a%26b%3Dc",
        f"/s?_k={API_KEY}&_p={P}&_t=NOW&_d=1&gender=male&Plan%20Name=Pro",
        f"/a?_k={API_KEY}&_p={P}&_n=User%2012345",
    ])
    left = figures(config)
    assert left["pending"] == 0
    assert left["dead"] == 0


def test_flush_against_a_failing_host_exits_1_and_keeps_the_events(write_config, host):
    host.status = 503
    config = str(write_config(host))
    for n in range(3):
        ok_here("record", PERSON, f"Event {n}", "--config", config)
    started = time.monotonic()
    result = run_kmagent("flush", "--timeout", "2", "--config", config, timeout=30)
    elapsed = time.monotonic() - started
    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert elapsed < 15, f"flush --timeout 2 took {elapsed:.1f} s"
    assert host.received, "the flush never tried the host"
    summary = [line for line in result.stderr.splitlines()
               if re.search(r"\b3\b.*\b(pending|remain)", line, re.I)]
    assert summary, f"how many remain is not said: {result.stderr!r}"
    assert any("503" in line for line in summary), \
        f"the last error is not in the summary: {summary!r}"
    left = figures(config)
    assert left["pending"] == 3
    assert left["dead"] == 0


def test_flush_without_any_api_key_exits_1_quickly(write_config, host):
    config = str(write_config(host, api_key=None))
    ok_here("record", PERSON, "Signed Up", "--config", config)
    started = time.monotonic()
    result = run_kmagent("flush", "--config", config, timeout=30)
    elapsed = time.monotonic() - started
    assert result.returncode == 1, result.stderr
    assert elapsed < 10, f"flush took {elapsed:.1f} s"
    assert "api_key" in result.stderr
    assert "Traceback" not in result.stderr
    assert host.received == []
    assert figures(config)["pending"] == 1


def test_an_event_keeps_the_key_of_its_client(write_config, host, spool_path):
    config = str(write_config(host))  # configured key: test-key
    before = time.time()
    client = kmagent.Client("client-key", spool=spool_path)
    client.record(PERSON, "From Client")
    client.close()
    ok_here("record", PERSON, "From CLI", "--config", config)
    after = time.time()
    result = run_kmagent("flush", "--config", config, timeout=30)
    assert result.returncode == 0, result.stderr
    assert targets_with_time(host.received, before, after) == sorted([
        f"/e?_k=client-key&_p={P}&_n=From%20Client&_t=NOW&_d=1",
        f"/e?_k={API_KEY}&_p={P}&_n=From%20CLI&_t=NOW&_d=1",
    ])


def test_the_seeds_example_sequence(write_config, host):
    config = str(write_config(host))
    before = time.time()
    ok_here("record", PERSON, "Viewed Homepage", "--config", config)
    ok_here("record", PERSON, "Signed Up", "Plan=Pro", "Amount=99.95", "--config", config)
    ok_here("record", PERSON, "Signed Up", "_d=1", "_t=1234567890", "--config", config)
    ok_here("set", PERSON, "gender=male", "--config", config)
    after = time.time()
    result = run_kmagent("flush", "--config", config, timeout=30)
    assert result.returncode == 0, result.stderr
    assert targets_with_time(host.delivered(), before, after) == sorted([
        f"/e?_k={API_KEY}&_p={P}&_n=Viewed%20Homepage&_t=NOW&_d=1",
        f"/e?_k={API_KEY}&_p={P}&_n=Signed%20Up&_t=NOW&_d=1&Plan=Pro&Amount=99.95",
        f"/e?_k={API_KEY}&_p={P}&_n=Signed%20Up&_t=1234567890&_d=1",
        f"/s?_k={API_KEY}&_p={P}&_t=NOW&_d=1&gender=male",
    ])
    assert len(host.received) == 4  # each sent once


def failing_until(enough: int | None):
    """An ``answer_for``: 503 for the event named "Failing" (until ``enough`` others
    were answered, if given), the usual answer for the others."""
    others = [0]

    def answer(target: str) -> int | None:
        if "_n=Failing" in target:
            return 503 if enough is None or others[0] < enough else None
        others[0] += 1
        return None
    return answer


@pytest.mark.parametrize("backend", ["sqlite", "jsonl"])
@pytest.mark.parametrize("beside", ["alone", "daemon"])
@pytest.mark.parametrize("failing", ["for good", "for a while"])
def test_flush_exits_0_only_when_nothing_it_was_to_flush_is_pending(
        write_config, host, backend, beside, failing):
    """One event keeps failing among many: the others go past it, and on jsonl it is
    moved out of their way (written again at the end of the spool, past the flush's
    mark). It is still one of the events the flush was to deliver: while it is pending,
    the flush cannot exit 0, whether it ships itself or watches the daemon do it."""
    # jsonl: 2,500 is enough to move the failing line (past half its 4,096 read-ahead).
    count = 2500 if backend == "jsonl" else 400
    host.answer_for = failing_until(None if failing == "for good" else count * 3 // 5)
    if beside == "daemon":
        host.delay = 0.005  # the daemon still ships when the flush takes its mark
    config = write_config(host, extra="[ship]\nmax_backoff = 1\nconcurrency = 4\n")
    kmagent.Client(config=config).record("poison", "Failing")
    record_many(config, count)
    daemon = start_daemon(config) if beside == "daemon" else None
    try:
        result = run_kmagent("flush", "--timeout", "3", "--config", str(config), timeout=120)
        left = figures(config)["pending"]  # in-process: what `kmagent status` would say
    finally:
        if daemon is not None:
            assert stop(daemon) == 0, daemon.log
    assert "Traceback" not in result.stderr
    delivered = {dict(r.params)["_n"] for r in host.delivered()}
    assert {f"e {n}" for n in range(count)} <= delivered
    # Beside the daemon, the flush counts what was still pending when it started.
    total = count + 1 if beside == "alone" else r"\d+"
    if failing == "for good":
        assert result.returncode == 1, result.stderr
        assert re.search(rf"^1 of {total} events still pending: nothing was delivered "
                         r"for 3 s", result.stderr, re.M), result.stderr
        assert "Failing" not in delivered and left == 1
    else:
        assert result.returncode == 0, result.stderr
        assert re.search(rf"^flushed {total} events", result.stderr, re.M), result.stderr
        assert "Failing" in delivered and left == 0


@pytest.mark.parametrize("published", [
    "[1, 2]", "null", "garbage{", '{"pid": "x", "rate_1m": "fast", "last_success_at": "y", '
    '"reloads": [1], "delivered_total": 1e309, "last_error": 7, "in_flight": true}',
])
def test_figures_of_the_wrong_shape_read_as_none(write_config, published):
    """The daemon's figures file is a courtesy, and one from another version or a
    broken disk may hold anything: status, reload and a daemon's start read what is
    not of the right type as no figure at all, never as a traceback."""
    from kmagent.config import load_config
    from kmagent.metrics import Published, RunFigures
    from kmagent.spool import open_configured
    config = write_config()
    ok_here("record", "bob", "Signed Up", "--config", str(config))
    with open_configured(load_config(config)) as spool:
        path = spool.figures_path
    path.write_text(published)
    assert Published.read(path) == Published()
    assert RunFigures(path, shipper=None)._base == Published()  # a start carries zeros on
    for args in (["status"], ["status", "--json"]):
        result = run_in_process(*args, "--config", str(config))
        assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert figures(config)["delivered_total"] == 0 and figures(config)["pending"] == 1
