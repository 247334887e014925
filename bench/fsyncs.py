"""fsync calls per recorded event with ``durability = "full"``, counted by strace (the
target is at most one per event): kmagent beside a bare sqlite3 FULL insert and a bare
os.write + fdatasync. Each producer runs twice, with 50 and with 250 events; the
difference, over 200, is the per-event count, free of what opening a spool costs.

    .venv/bin/python bench/fsyncs.py        (needs strace; skipped without it)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import FIGURES, table

PRODUCERS = {
    "bare_sqlite": "bare sqlite3 INSERT, WAL, synchronous=FULL",
    "sqlite": "kmagent record(), SQLite, durability=full",
    "bare_write": "bare os.write of a JSON line + fdatasync",
    "jsonl": "kmagent record(), jsonl, durability=full",
}


def produce(kind: str, events: int, directory: Path) -> None:
    if kind == "bare_sqlite":
        conn = sqlite3.connect(directory / "bare.db", isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, path, query, created)")
        for n in range(events):
            conn.execute("INSERT INTO t (path, query, created) VALUES ('e', ?, ?)",
                         (f"_p=bob&_n=Did&n={n}", time.time()))
    elif kind == "bare_write":
        fd = os.open(directory / "bare.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        for n in range(events):
            os.write(fd, json.dumps({"_p": "bob", "_n": "Did", "n": n}).encode() + b"\n")
            os.fdatasync(fd)
    else:
        from kmagent.client import Client
        from kmagent.config import Config
        client = Client(config=Config(spool_backend=kind, durability="full",
                                      spool_path=directory / ("s.db" if kind == "sqlite" else "s.d")))
        for n in range(events):
            client.record("bob", "Did", {"n": n})


def syncs(strace: str, kind: str, events: int) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        summary = Path(tmp) / "strace.txt"
        subprocess.run([strace, "-f", "-c", "-e", "trace=fsync,fdatasync", "-o", str(summary),
                        sys.executable, __file__, "--produce", kind, str(events), tmp],
                       check=True, capture_output=True)
        counts = re.findall(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?f(?:data)?sync$",
                            summary.read_text(), re.M)
        return sum(int(c) for c in counts)


def run() -> str:
    strace = shutil.which("strace")
    if strace is None:
        return "(strace is not installed: fsync counts skipped)"
    rows = []
    for kind, name in PRODUCERS.items():
        per_event = (syncs(strace, kind, 250) - syncs(strace, kind, 50)) / 200
        FIGURES[f"fsyncs_{kind}"] = per_event
        rows.append((name, f"{per_event:.2f}"))
    return table(("producer, 1 thread", "fsync + fdatasync calls per event"), rows)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--produce"]:
        produce(sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]))
    else:
        print(run())
