"""Requests a web app under test is sent, and what each must record: logged in,
anonymous, identified by the hook, streamed, raising, one after another on the same
server thread. ``expected`` is the person its event carries, None for none at all."""

from __future__ import annotations

import http.client
from dataclasses import dataclass
from urllib.parse import parse_qs

from helpers import stored_rows


@dataclass(frozen=True)
class Step:
    path: str
    headers: dict
    event: str | None  # what it records, None: nothing
    person: str | None = None
    status: int = 200


def scenario(rounds: int = 3) -> list[tuple[str, Step]]:
    """(request id, step) for ``rounds`` rounds of every kind of request."""
    steps = [
        Step("/login", {"X-Login": "alice"}, "Logged In", "alice"),
        Step("/view", {}, None),
        Step("/view", {"X-User": "bob"}, "Viewed Page", "bob"),
        Step("/stream", {"X-User": "carol"}, "Streamed", "carol"),
        Step("/stream", {}, None),
        Step("/boom", {"X-Login": "mallory"}, None, status=500),
        Step("/view", {}, None),
        Step("/login", {"X-Login": "dave", "X-User": "erin"}, "Logged In", "dave"),
        Step("/view", {"X-User": "erin"}, "Viewed Page", "erin"),
        Step("/view", {}, None),
    ]
    return [(f"r{n}-{i}", step) for n in range(rounds) for i, step in enumerate(steps)]


def send_all(port: int, steps: list[tuple[str, Step]]) -> None:
    """Each request on a fresh connection, one after another, bodies read whole."""
    for request_id, step in steps:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", step.path, headers={**step.headers, "X-Req": request_id})
        try:
            response = conn.getresponse()
        except http.client.RemoteDisconnected:
            # uWSGI answers an app that raised by closing the connection
            assert step.status == 500, (request_id, step)
            conn.close()
            continue
        body = response.read()
        conn.close()
        assert response.status == step.status, (request_id, step, response.status, body)


def recorded(spool_path) -> dict[str, list[tuple[str, str]]]:
    """Request id -> [(event name, person)] of what the spool holds."""
    found: dict[str, list[tuple[str, str]]] = {}
    for _, query, _ in stored_rows(spool_path):
        params = {k: v[0] for k, v in parse_qs(query).items()}
        found.setdefault(params.get("req", "?"), []).append((params["_n"], params["_p"]))
    return found


def check(spool_path, steps: list[tuple[str, Step]]) -> None:
    found = recorded(spool_path)
    for request_id, step in steps:
        want = [(step.event, step.person)] if step.event else []
        assert found.pop(request_id, []) == want, (request_id, step)
    assert not found, f"events of no request in the scenario: {found}"
