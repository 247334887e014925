"""What a SIGKILL of the daemon costs in resends, per backend: a backlog is drained by
a daemon that is SIGKILLed every 0.7 s until it is empty; counts the events the
stand-in host received twice.

    .venv/bin/python bench/resends.py
"""

from __future__ import annotations

import collections
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import table
from kmagent import Client, status
from kmagent.testhost import StandInHost

EVENTS = 3000
CONCURRENCY = 8


def drain_with_kills(tmp: Path, backend: str) -> tuple[int, int, int]:
    spool = tmp / backend / ("spool.db" if backend == "sqlite" else "spool.d")
    with StandInHost(delay=0.005) as host:
        config = tmp / f"{backend}.toml"
        config.write_text(f'api_key = "bench"\nendpoint = "{host.url}"\n[spool]\n'
                          f'backend = "{backend}"\npath = "{spool}"\n'
                          f"[ship]\nconcurrency = {CONCURRENCY}\n")
        config.chmod(0o600)  # it holds the key
        client = Client(config=config)
        for n in range(EVENTS):
            client.record(f"p{n}", "Resent?")
        client.close()
        kills = 0
        while status(config)["pending"]:
            daemon = subprocess.Popen([sys.executable, "-m", "kmagent", "run", "--config",
                                       str(config)], stderr=subprocess.DEVNULL)
            time.sleep(0.7)
            daemon.send_signal(signal.SIGKILL)
            daemon.wait()
            kills += 1
        counts = collections.Counter(r.target for r in host.delivered())
    assert len(counts) == EVENTS
    return kills, sum(n - 1 for n in counts.values()), max(counts.values())


def run() -> str:
    rows = []
    with tempfile.TemporaryDirectory() as tmpdir:
        for backend in ("sqlite", "jsonl"):
            kills, resent, most = drain_with_kills(Path(tmpdir), backend)
            rows.append((backend, kills, resent, f"{resent / kills:.1f}", most))
    return (f"{EVENTS} events, concurrency {CONCURRENCY} (claim window {2 * CONCURRENCY}), "
            "host latency 5 ms, daemon SIGKILLed every 0.7 s\n\n"
            + table(("backend", "SIGKILLs", "events resent", "per SIGKILL",
                     "most sends of one event"), rows))


if __name__ == "__main__":
    print(run())
