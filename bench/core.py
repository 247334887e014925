"""Core figures: producer cost (µs/event) beside a bare sqlite3 INSERT, and shipping
throughput (events/s) to a loopback stand-in host. Medians of several rounds, ratios
against a baseline measured in the same run (the machine is shared and noisy).

    .venv/bin/python bench/core.py
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import subprocess
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

ROUNDS = 5
EVENTS = 2000


def bare_insert(path: Path, synchronous: str, n: int) -> float:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, path, query, key, created, due)")
    start = time.perf_counter()
    for i in range(n):
        conn.execute("INSERT INTO t (path, query, key, created, due) VALUES (?, ?, ?, ?, ?)",
                     ("e", f"_p=bob&_n=Signed%20Up&_t=1700000000&_d=1&Plan=Pro&Amount={i}",
                      None, time.time(), time.time()))
    elapsed = time.perf_counter() - start
    conn.close()
    return elapsed / n * 1e6


def bare_write(path: Path, fsync: bool, n: int) -> float:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    start = time.perf_counter()
    for i in range(n):
        os.write(fd, json.dumps({"_p": "bob@example.com", "_n": "Signed Up",
                                 "_t": 1700000000, "Plan": "Pro", "Amount": i}).encode() + b"\n")
        if fsync:
            os.fdatasync(fd)
    elapsed = time.perf_counter() - start
    os.close(fd)
    return elapsed / n * 1e6


def client_record(path: Path, durability: str, n: int, backend: str = "sqlite") -> float:
    from kmagent.client import Client
    config = path.with_suffix(".toml")
    config.write_text(f'[spool]\nbackend = "{backend}"\npath = "{path}"\n'
                      f'durability = "{durability}"\n')
    client = Client(config=config)
    start = time.perf_counter()
    for i in range(n):
        client.record("bob@example.com", "Signed Up", {"Plan": "Pro", "Amount": i})
    elapsed = time.perf_counter() - start
    client.close()
    return elapsed / n * 1e6


@contextlib.contextmanager
def standin_host(delay: float = 0.0) -> Iterator[str]:
    """`kmagent testhost` in its own process (in this one, its threads would compete
    with the agent's for the GIL); yields its URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    host = subprocess.Popen([sys.executable, "-m", "kmagent", "testhost", "--port", str(port),
                             "--delay", str(delay)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        host.stderr.readline()  # "stand-in tracking host on ...": it listens
        yield f"http://127.0.0.1:{port}"
    finally:
        host.terminate()
        host.wait()


def shipping(tmp: Path, n: int, concurrency: int, delay: float) -> float:
    """Events/s for a flush of ``n`` events to a stand-in host in its own process."""
    from kmagent.client import Client
    from kmagent.config import Config
    from kmagent.flush import flush
    spool = tmp / f"ship-{time.monotonic_ns()}.db"
    client = Client(spool=spool)
    for i in range(n):
        client.record(f"p{i}", "Shipped")
    client.close()
    with standin_host(delay) as url:
        config = Config(api_key="bench", endpoint=url, spool_path=spool,
                        concurrency=concurrency)
        start = time.perf_counter()
        result = flush(config, timeout=30)
        elapsed = time.perf_counter() - start
    assert result.remaining == 0, result
    return n / elapsed


def median_of(fn, *args) -> float:
    return statistics.median(fn(*args) for _ in range(ROUNDS))


def main() -> None:
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        print(f"python {sys.version.split()[0]}, sqlite {sqlite3.sqlite_version}, "
              f"{EVENTS} events x {ROUNDS} rounds, medians\n")
        print("| producer, 1 thread | µs/event | × bare |")
        print("|---|---:|---:|")
        for sync, durability, n in (("NORMAL", "normal", EVENTS), ("FULL", "full", EVENTS // 10)):
            bare = median_of(bare_insert, tmp / f"bare-{sync}.db", sync, n)
            ours = median_of(client_record, tmp / f"km-{durability}.db", durability, n)
            print(f"| bare sqlite3 INSERT, WAL, {sync} | {bare:.1f} | 1.00 |")
            print(f"| Client.record, sqlite {durability} | {ours:.1f} | {ours / bare:.2f} |")
        for fsync, durability, n in ((False, "normal", EVENTS), (True, "full", EVENTS // 10)):
            bare = median_of(bare_write, tmp / f"bare-{durability}.jsonl", fsync, n)
            ours = median_of(client_record, tmp / f"km-{durability}.d", durability, n, "jsonl")
            label = "os.write of a JSON line" + (" + fdatasync" if fsync else "")
            print(f"| bare {label} | {bare:.1f} | 1.00 |")
            print(f"| Client.record, jsonl {durability} | {ours:.1f} | {ours / bare:.2f} |")
        print("\n| shipping to `kmagent testhost` (own process) | events/s | bound (conc ÷ latency) |")
        print("|---|---:|---:|")
        for delay in (0.0, 0.02):
            for concurrency in (1, 16):
                rate = statistics.median(shipping(tmp, 1000 if delay == 0 else 600,
                                                  concurrency, delay) for _ in range(3))
                bound = f"{concurrency / delay:,.0f}" if delay else "-"
                print(f"| concurrency {concurrency}, host latency {delay * 1000:.0f} ms | "
                      f"{rate:,.0f} | {bound} |")


if __name__ == "__main__":
    main()
