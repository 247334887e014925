"""`kmagent export`: pending events and dead letters as Kissmetrics newline-JSON import
lines, on both backends, through the real command."""

from __future__ import annotations

import json

import pytest
from helpers import run_kmagent

from kmagent import Client


@pytest.fixture(params=["sqlite", "jsonl"])
def backend(request) -> str:
    return request.param


def exported(config, *args: str) -> list[dict]:
    result = run_kmagent("export", *args, "--config", str(config))
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_pending_events_export_as_import_lines_and_stay_pending(host, write_config):
    config = write_config(host)
    client = Client(config=config)
    client.record("bob", "Signed Up", {"Plan": "Pro", "_source": "ad", "Paid": True},
                  timestamp=1700000000)
    client.set("bob", {"Age": 30}, timestamp=1700000001)
    client.alias("bob", "bob@example.com")
    client.close()
    lines = exported(config)
    assert lines[0] == {"_p": "bob", "_n": "Signed Up", "_t": 1700000000, "Plan": "Pro",
                        "_source": "ad", "Paid": "true"}
    assert lines[1] == {"_p": "bob", "_t": 1700000001, "Age": "30"}
    assert lines[2]["_p2"] == "bob@example.com" and lines[2]["_t"] > 1700000000
    assert len(exported(config)) == 3  # read only


def test_dead_letters_export_with_dead(host, write_config):
    host.answer_for = lambda target: 400 if "_p=poison" in target else None
    config = write_config(host)
    client = Client(config=config)
    for person in ("ann", "poison", "cat"):
        client.record(person, "Did", timestamp=1700000000)
    client.close()
    run_kmagent("flush", "--timeout", "20", "--config", str(config))
    assert exported(config) == []
    assert exported(config, "--dead") == [{"_p": "poison", "_n": "Did", "_t": 1700000000}]
    to_file = run_kmagent("export", "--dead", "-o", str(config.parent / "out.jsonl"),
                          "--config", str(config))
    assert "exported 1 dead letters" in to_file.stderr
    assert json.loads((config.parent / "out.jsonl").read_text())["_p"] == "poison"


def test_events_of_several_keys_are_exported_one_key_at_a_time(host, write_config):
    config = write_config(host)  # its api_key is the conftest's
    Client(config=config).record("ann", "Default Key", timestamp=1700000000)
    Client("project-b", config=config).record("bob", "Own Key", timestamp=1700000000)
    refused = run_kmagent("export", "--config", str(config))
    assert refused.returncode == 2 and "2 API keys" in refused.stderr
    assert "project-b" not in refused.stderr  # keys are never printed
    assert [line["_p"] for line in exported(config, "--key", "project-b")] == ["bob"]


@pytest.mark.parametrize("query, reason", [
    ("_p=bob&_n=Did&_t=1700000000&_d=1&_p2=ann", "'_p2'"),
    ("_p=bob&_n=Did&_t=1700000000&_d=1&Plan=a&Plan=b", "twice"),
    ("_p=bob&_n=Did&_t=1700000000&_d=1&City=caf%E9", "not UTF-8"),
])
def test_an_event_the_import_would_read_differently_is_left_out(query, reason):
    """Such requests reach the spool only from a km log imported byte for byte (record()
    refuses them); the import would alias bob and ann, keep one Plan, or mangle é."""
    from kmagent.export import Unexportable, import_line
    with pytest.raises(Unexportable, match=reason):
        import_line("e", query, 1700000000.0)
    assert json.loads(import_line("e", "_p=bob&_n=Did&_t=1700000000&_d=1&p2=x", 0)) == {
        "_p": "bob", "_n": "Did", "_t": 1700000000, "p2": "x"}
