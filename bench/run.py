"""`make bench`: every benchmark in one run, printed as it goes and written to
bench/RESULTS.md with the machine, the date and the commands.

    .venv/bin/python bench/run.py [--quick]    # --quick: skip idle.py and status.py
"""

from __future__ import annotations

import datetime
import sys
import time
from pathlib import Path

import idle
import outage
import producers
import resends
import shipping
import status
from common import BENCH, machine

SECTIONS = [
    ("Producer cost", "bench/producers.py", producers.run,
     "µs of wall time per event over all workers, median of 5 rounds; in brackets, the "
     "ratio to the bare baseline of the same durability (peers: to kmagent's SQLite "
     "normal). 8 threads share one client; 4 processes have one each."),
    ("Shipping", "bench/shipping.py", shipping.run,
     "Delivered events/s to bench/loophost.py (asyncio, its own process) with added "
     "latency; median of 3 rounds. kmagent is `flush` of a SQLite spool."),
    ("The daemon at rest and draining", "bench/idle.py", lambda: idle.run(drain_all=True),
     "A real `kmagent run` process on SQLite with the default concurrency."),
    ("`status` at a million pending", "bench/status.py", status.run,
     "Median of 7."),
    ("What a SIGKILL costs", "bench/resends.py", resends.run, ""),
    ("An outage", "bench/outage.py", outage.run, ""),
]
QUICK_SKIP = {"bench/idle.py", "bench/status.py"}


def main() -> None:
    quick = "--quick" in sys.argv
    started = datetime.datetime.now(datetime.timezone.utc)
    parts = [f"# kmagent benchmarks\n\nWritten by `make bench` (`bench/run.py`) on "
             f"{started:%Y-%m-%d %H:%M} UTC.\n\nMachine: {machine()}.\n\nEvery figure "
             "beside another was measured in the same run: the machine is shared and noisy, "
             "so compare ratios, not absolute times across runs."]
    for title, command, run, about in SECTIONS:
        if quick and command in QUICK_SKIP:
            continue
        start = time.monotonic()
        print(f"\n## {title} (`{command}`)\n", flush=True)
        body = run()
        print(body, flush=True)
        parts.append(f"## {title}\n\nCommand: `.venv/bin/python {command}` "
                     f"({time.monotonic() - start:.0f} s). {about}\n\n{body}")
    (BENCH / "RESULTS.md").write_text("\n\n".join(parts) + "\n")
    print(f"\nwritten: {BENCH / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
