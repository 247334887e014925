"""Producer cost: what recording one event costs the app, µs of wall time per event, in
1 thread, 8 threads (one client shared) and 4 processes (a client each), kmagent beside
bare baselines and its peers, all in one run. Medians of rounds; ratios against the
baseline of the same durability measured in the same run.

Peers run in bench/.venv-peers (made by `make bench`): Segment's track() into its
in-memory queue (consumer paused, so the message stays queued), persist-queue's
SQLiteAckQueue.put, and py-KISSmetrics' Client.record sending to a loopback host.

    .venv/bin/python bench/producers.py
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import BENCH, FIGURES, loop_host, table
from workload import SHAPES, micros_per_event

ROUNDS = 5
EVENTS = 10000  # per round, split between the workers; a tenth of it for fsync'd rows
PEERS_PYTHON = BENCH / ".venv-peers" / "bin" / "python"
QUERY = "_p=bob%40example.com&_n=Signed%20Up&_t=1795875344&_d=1&Plan=Pro&Amount={n}"


def kmagent_client(path: Path, backend: str, durability: str):
    def setup():
        from kmagent.client import Client
        from kmagent.config import Config
        return Client(config=Config(spool_backend=backend, spool_path=path, durability=durability))
    return setup, lambda client: lambda n: client.record("bob@example.com", "Signed Up",
                                                         {"Plan": "Pro", "Amount": n})


class _Clients:
    """Several Clients of one spool in one process (they share its one connection)."""

    def __init__(self, path: Path, backend: str, durability: str, count: int) -> None:
        from kmagent.client import Client
        from kmagent.config import Config
        config = Config(spool_backend=backend, spool_path=path, durability=durability)
        self.clients = [Client(config=config) for _ in range(count)]

    def close(self) -> None:
        for client in self.clients:
            client.close()


def kmagent_clients(path: Path, backend: str, durability: str, count: int = 4):
    """Each worker records through the process's ``count`` Clients in turn."""
    def per_worker(shared: _Clients):
        clients = shared.clients

        def record(n: int) -> None:
            clients[n % count].record("bob@example.com", "Signed Up",
                                      {"Plan": "Pro", "Amount": n})
        return record
    return lambda: _Clients(path, backend, durability, count), per_worker


def bare_sqlite(path: Path, synchronous: str):
    """A plain WAL table, one connection per thread, one autocommitted INSERT per event."""
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, path, query, created)")
    conn.close()

    def per_worker(_: Any):
        conn = sqlite3.connect(path, isolation_level=None, timeout=30, check_same_thread=False)
        conn.execute(f"PRAGMA synchronous={synchronous}")
        insert = "INSERT INTO t (path, query, created) VALUES ('e', ?, ?)"
        return lambda n: conn.execute(insert, (QUERY.format(n=n), time.time()))
    return lambda: None, per_worker


class _Appender:
    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def close(self) -> None:
        os.close(self.fd)


def bare_write(path: Path, sync: bool):
    """A JSON line per event, one os.write on a shared O_APPEND descriptor (+ fdatasync)."""
    def per_worker(appender: _Appender):
        fd = appender.fd

        def write(n: int) -> None:
            os.write(fd, json.dumps({"_p": "bob@example.com", "_n": "Signed Up",
                                     "_t": 1795875344, "Plan": "Pro", "Amount": n}).encode()
                     + b"\n")
            if sync:
                os.fdatasync(fd)
        return write
    return lambda: _Appender(path), per_worker


def measure(tmp: Path, name: str, factory, *args, full: bool = False) -> dict[str, float]:
    figures = {}
    for shape, kwargs in SHAPES.items():
        workers = kwargs.get("threads", 1) * kwargs.get("processes", 1)
        events = max(20, (EVENTS // 10 if full else EVENTS) // workers)
        path = tmp / f"{name}-{shape.replace(' ', '-')}"
        setup, per_worker = factory(path, *args)
        figures[shape] = micros_per_event(setup, per_worker, events=events, rounds=ROUNDS, **kwargs)
    return figures


def peers(host_url: str) -> dict[str, dict[str, float]]:
    if not PEERS_PYTHON.exists():
        print("(no bench/.venv-peers: `make bench` makes it)", file=sys.stderr)
        return {}
    result = subprocess.run([str(PEERS_PYTHON), str(BENCH / "peers_producer.py"),
                             str(ROUNDS), str(EVENTS), host_url],
                            capture_output=True, text=True, timeout=1200)
    if result.returncode:
        print(result.stderr[-2000:], file=sys.stderr)
        return {}
    return json.loads(result.stdout.strip().splitlines()[-1])


def run() -> str:
    with tempfile.TemporaryDirectory() as tmpdir, loop_host() as url:
        tmp = Path(tmpdir)
        groups = [  # (baseline row, kmagent row)
            (("bare sqlite3 INSERT, WAL, synchronous=NORMAL",
              measure(tmp, "bare-normal.db", bare_sqlite, "NORMAL")),
             ("kmagent record(), SQLite, durability=normal",
              measure(tmp, "km-normal.db", kmagent_client, "sqlite", "normal"))),
            (("bare sqlite3 INSERT, WAL, synchronous=NORMAL",
              measure(tmp, "bare-normal-2.db", bare_sqlite, "NORMAL")),
             ("kmagent record(), SQLite, normal, 4 Clients in one process",
              measure(tmp, "km-normal-4.db", kmagent_clients, "sqlite", "normal"))),
            (("bare os.write of a JSON line",
              measure(tmp, "bare-normal.jsonl", bare_write, False)),
             ("kmagent record(), jsonl, durability=normal",
              measure(tmp, "km-normal.d", kmagent_client, "jsonl", "normal"))),
            (("bare sqlite3 INSERT, WAL, synchronous=FULL",
              measure(tmp, "bare-full.db", bare_sqlite, "FULL", full=True)),
             ("kmagent record(), SQLite, durability=full",
              measure(tmp, "km-full.db", kmagent_client, "sqlite", "full", full=True))),
            (("bare os.write of a JSON line + fdatasync",
              measure(tmp, "bare-full.jsonl", bare_write, True, full=True)),
             ("kmagent record(), jsonl, durability=full",
              measure(tmp, "km-full.d", kmagent_client, "jsonl", "full", full=True))),
        ]
        others = peers(url)
    names = {"segment_track_enqueue": "Segment track() into its in-memory queue",
             "persist_queue_put": "persist-queue SQLiteAckQueue.put",
             "py_kissmetrics_record": "py-KISSmetrics Client.record (a request per call)"}

    def cell(value: float | None, base: float | None) -> str:
        if value is None:
            return "–"
        return f"{value:,.1f}" + (f" ({value / base:.2f}×)" if base else "")

    rows = []
    for (base_name, base), (ours_name, ours) in groups:
        rows.append([base_name] + [cell(base[s], None) for s in SHAPES])
        rows.append([ours_name] + [cell(ours[s], base[s]) for s in SHAPES])
    sqlite_normal = groups[0][1][1]
    keys = ("bare_sqlite", "bare_sqlite_again", "bare_write", "bare_sqlite_full",
            "bare_fdatasync")
    for key, (_, figures) in zip(keys, (group[0] for group in groups)):
        FIGURES[key] = figures["1 thread"]
    for key, (_, figures) in zip(("sqlite", "sqlite_4_clients", "jsonl", "sqlite_full",
                                  "jsonl_full"), (group[1] for group in groups)):
        FIGURES[key] = figures["1 thread"]
        FIGURES[key + "_8_threads"] = figures["8 threads"]
    FIGURES["segment"] = others.get("segment_track_enqueue", {}).get("1 thread", float("nan"))
    for key, figures in others.items():
        rows.append([names[key] + " (× kmagent SQLite normal)"]
                    + [cell(figures.get(s), sqlite_normal[s]) for s in SHAPES])
    return table(["producer: µs per event (× its bare baseline)", *SHAPES], rows)


if __name__ == "__main__":
    print(run())
