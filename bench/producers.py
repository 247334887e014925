"""What recording one event costs the app, kmagent beside its peers, in one run:
medians of several rounds, ratios against a bare sqlite3 INSERT measured in the same run.
Peers run in bench/.venv-peers (made by `make bench`), the stand-in host in its own
process on 127.0.0.1.

    .venv/bin/python bench/producers.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import core  # the kmagent and bare measurements

ROUNDS, EVENTS = 5, 2000
PEERS_PYTHON = Path(__file__).resolve().parent / ".venv-peers" / "bin" / "python"


def peers(host_url: str) -> dict[str, float]:
    if not PEERS_PYTHON.exists():
        print("(no bench/.venv-peers: run `make bench` for the peers)", file=sys.stderr)
        return {}
    result = subprocess.run([str(PEERS_PYTHON), str(Path(__file__).with_name("peers_producer.py")),
                             str(ROUNDS), str(EVENTS), host_url],
                            capture_output=True, text=True, timeout=600)
    if result.returncode:
        print(result.stderr[-2000:], file=sys.stderr)
        return {}
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    with core.standin_host() as url, tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        rows = [
            ("bare sqlite3 INSERT, WAL, NORMAL (baseline)",
             core.median_of(core.bare_insert, tmp / "bare.db", "NORMAL", EVENTS)),
            ("kmagent Client.record, SQLite normal",
             core.median_of(core.client_record, tmp / "km.db", "normal", EVENTS)),
            ("bare os.write of a JSON line",
             core.median_of(core.bare_write, tmp / "bare.jsonl", False, EVENTS)),
            ("kmagent Client.record, jsonl normal",
             core.median_of(core.client_record, tmp / "km.d", "normal", EVENTS, "jsonl")),
        ]
        names = {"segment_track_enqueue": "Segment track() into its in-memory queue",
                 "persist_queue_put": "persist-queue SQLiteAckQueue.put",
                 "py_kissmetrics_record": "py-KISSmetrics Client.record (sends; loopback host)"}
        for key, value in peers(url).items():
            rows.append((names[key], value))
    baseline = rows[0][1]
    print(f"producer cost, 1 thread, {EVENTS} events x {ROUNDS} rounds, medians\n")
    print("| producer | µs/event | × bare sqlite3 |")
    print("|---|---:|---:|")
    for name, micros in rows:
        print(f"| {name} | {micros:.1f} | {micros / baseline:.2f} |")


if __name__ == "__main__":
    main()
