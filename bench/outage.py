"""An 8 s outage at concurrency 16: requests the host sees during it and how long the
backlog takes to drain after it, with the agent-wide gate and without it (every worker
retrying on its own). Also the quiet time after a 429 with Retry-After: 2.

    .venv/bin/python bench/outage.py
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from pathlib import Path

import kmagent.gate
from common import table
from kmagent import Client
from kmagent.config import Config
from kmagent.daemon import Daemon
from kmagent.flush import flush
from kmagent.testhost import StandInHost

EVENTS = 600
OUTAGE_S = 8


def outage_run(tmp: Path, gate: bool) -> tuple[int, float]:
    kmagent.gate.OUTAGE_AFTER = 5 if gate else 10**9
    spool = tmp / f"outage-{gate}.db"
    client = Client(spool=spool)
    for n in range(EVENTS):
        client.record(f"p{n}", "Outage")
    client.close()
    with StandInHost() as host:
        config = Config(api_key="bench", endpoint=host.url, spool_path=spool,
                        concurrency=16, adapt_concurrency=False, max_backoff=4)
        daemon = Daemon(config)
        host.outage(OUTAGE_S)
        started = time.time()
        runner = threading.Thread(target=daemon.run, daemon=True)
        runner.start()
        while len(host.delivered()) < EVENTS and time.time() - started < 120:
            time.sleep(0.05)
        daemon.stop()
        runner.join(30)
        during = sum(1 for r in host.received if r.at < started + OUTAGE_S)
        drained = max(r.at for r in host.delivered()) - (started + OUTAGE_S)
    return during, drained


def retry_after_gap(tmp: Path) -> float:
    spool = tmp / "429.db"
    client = Client(spool=spool)
    for n in range(50):
        client.record(f"p{n}", "Limited")
    client.close()
    with StandInHost() as host:
        first = []
        host.answer_for = lambda target: 429 if not first and not first.append(1) else None
        host.retry_after = "2"
        flush(Config(api_key="bench", endpoint=host.url, spool_path=spool, concurrency=4,
                     adapt_concurrency=False))
        [refusal] = [r for r in host.received if r.status == 429]
        later = sorted(r.at - refusal.at for r in host.received if r.at > refusal.at + 0.2)
    return later[0]


def run() -> str:
    logging.disable(logging.CRITICAL)  # the figures, not the agent's log
    rows = []
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        for gate in (True, False):
            during, drained = outage_run(tmp, gate)
            label = "kmagent (gate: probe one at a time)" if gate else "every worker on its own"
            rows.append((label, during, f"{drained:.1f}"))
        gap = retry_after_gap(tmp)
    logging.disable(logging.NOTSET)
    return (f"{EVENTS} events pending, concurrency 16, max_backoff 4 s, host down for the "
            f"first {OUTAGE_S} s\n\n"
            + table(("agent", "requests during the outage", "drained after it (s)"), rows)
            + f"\n\n429 with Retry-After: 2 → the next new request {gap:.2f} s later")


if __name__ == "__main__":
    print(run())
