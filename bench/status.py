"""`status` at a large backlog: 1,000,000 pending events on each backend, timed
in-process (kmagent.status) and as a command, beside `kmagent --version`.

    .venv/bin/python bench/status.py [EVENTS]

Medians of 7.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import kmagent
from common import FIGURES, median_of, table
from kmagent.spool import open_spool

EVENTS = 1_000_000
QUERY = "_p=person{n}&_n=Signed%20Up&_t=1795875344&_d=1&Plan=Pro"


def fill_sqlite(path: Path, events: int = EVENTS) -> None:
    open_spool(path).close()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN")
    now = time.time()
    conn.executemany("INSERT INTO events (path, query, api_key, created, due) "
                     "VALUES ('e', ?, NULL, ?, 0)",
                     ((QUERY.format(n=n), now) for n in range(events)))
    conn.execute("COMMIT")
    conn.close()


def fill_jsonl(path: Path, events: int = EVENTS) -> None:
    open_spool(path, backend="jsonl").close()
    now = time.time()
    with open(path / "events.jsonl", "w") as fh:
        for n in range(events):
            fh.write(json.dumps({"_p": f"person{n}", "_n": "Signed Up", "_t": 1795875344,
                                 "Plan": "Pro", "_c": now, "_v": 1}) + "\n")


def elapsed_ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def median_ms(fn) -> float:
    return median_of(elapsed_ms, fn, rounds=7)


def run(events: int = EVENTS) -> str:
    command = [str(Path(sys.executable).parent / "kmagent")]
    rows = []
    with tempfile.TemporaryDirectory() as tmpdir:
        for backend, fill in (("sqlite", fill_sqlite), ("jsonl", fill_jsonl)):
            path = Path(tmpdir) / ("spool.db" if backend == "sqlite" else "spool.d")
            fill(path, events)
            assert kmagent.status(spool=path)["pending"] == events
            config = Path(tmpdir) / f"{backend}.toml"
            config.write_text(f'[spool]\nbackend = "{backend}"\npath = "{path}"\n')
            inproc = median_ms(lambda: kmagent.status(config))
            cmd = median_ms(lambda: subprocess.run(command + ["status", "--json", "--config",
                                                              str(config)], check=True,
                                                   capture_output=True))
            version = median_ms(lambda: subprocess.run(command + ["--version"], check=True,
                                                       capture_output=True))
            rows.append((backend, f"{events:,}", f"{inproc:.1f}", f"{cmd:.0f}", f"{version:.0f}"))
            FIGURES[f"status_{backend}_ms"] = inproc
    return table(("backend", "pending", "kmagent.status() ms", "`kmagent status --json` ms",
                  "`kmagent --version` ms"), rows)


if __name__ == "__main__":
    print(run(int(sys.argv[1]) if len(sys.argv) > 1 else EVENTS))
