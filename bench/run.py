"""`make bench`: every benchmark in one run, printed as it goes and written to
bench/RESULTS.md with the machine, the date and the commands.

    .venv/bin/python bench/run.py [--quick]    # --quick: skip idle.py and status.py
"""

from __future__ import annotations

import datetime
import sys
import time

import fsyncs
import idle
import outage
import producers
import resends
import shipping
import status
from common import BENCH, FIGURES, machine, table

SECTIONS = [
    ("Producer cost", "bench/producers.py", producers.run,
     "µs of wall time per event over all workers, median of 5 rounds; in brackets, the "
     "ratio to the bare baseline of the same durability (peers: to kmagent's SQLite "
     "normal). 8 threads share one client; 4 processes have one each."),
    ("fsync per event with durability = \"full\"", "bench/fsyncs.py", fsyncs.run,
     "Counted with strace -f -c: the difference between 250 and 50 events, over 200."),
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


def headline() -> str:
    """Every target of the speed work, with what this run measured."""
    f = FIGURES.get
    nan = float("nan")

    def ratio(a: str, b: str) -> float:
        return f(a, nan) / f(b, nan)

    rows = [
        ("record(), SQLite normal, 1 thread ÷ bare sqlite3 INSERT", "≤ 1.3×",
         ratio("sqlite", "bare_sqlite"), lambda v: v <= 1.3, "{:.2f}×"),
        ("record(), SQLite normal ÷ Segment track() enqueue, 1 thread", "≤ 1×",
         ratio("sqlite", "segment"), lambda v: v <= 1.0, "{:.2f}×"),
        ("record(), jsonl normal, 1 thread ÷ bare os.write", "≤ 3×",
         ratio("jsonl", "bare_write"), lambda v: v <= 3.0, "{:.2f}×"),
        ("record(), SQLite, durability=full: fsync calls per event (strace)", "≤ 1",
         f("fsyncs_sqlite", nan), lambda v: v <= 1.0, "{:.2f}"),
        ("record(), jsonl, durability=full: fsync calls per event (strace)", "≤ 1",
         f("fsyncs_jsonl", nan), lambda v: v <= 1.0, "{:.2f}"),
        ("record(), SQLite full: 8 threads ÷ 1 thread, µs per event (group commit)", "< 1×",
         ratio("sqlite_full_8_threads", "sqlite_full"), lambda v: v < 1.0, "{:.2f}×"),
        ("shipping, 20 ms, concurrency 16 ÷ bare http.client, 16 threads", "≥ 0.8×",
         ratio("ship_20ms_16", "ship_20ms_16_bare"), lambda v: v >= 0.8, "{:.2f}×"),
        ("shipping, 0 ms, concurrency 16 ÷ bare http.client, 16 threads", "≥ 0.5×",
         ratio("ship_0ms_16", "ship_0ms_16_bare"), lambda v: v >= 0.5, "{:.2f}×"),
        ("shipping, 0 ms, default (adaptive) ÷ bare http.client, 64 threads", "≥ 0.3×",
         ratio("ship_0ms_auto", "ship_0ms_auto_bare"), lambda v: v >= 0.3, "{:.2f}×"),
        ("shipping, 20 ms, concurrency 32 ÷ bare http.client, 32 threads", "≥ 0.85×",
         ratio("ship_20ms_32", "ship_20ms_32_bare"), lambda v: v >= 0.85, "{:.2f}×"),
        ("shipping, 20 ms, default (adaptive) ÷ bare http.client, 64 threads", "≥ 0.85×",
         ratio("ship_20ms_auto", "ship_20ms_auto_bare"), lambda v: v >= 0.85, "{:.2f}×"),
        ("shipping, 0 ms, concurrency 16 ÷ ordinary `requests.Session` threads", "≥ 1.2×",
         ratio("ship_0ms_16", "ship_0ms_16_session"), lambda v: v >= 1.2, "{:.2f}×"),
        ("shipping, 20 ms, default (adaptive) ÷ sequential loop", "≥ 20×",
         ratio("ship_20ms_auto", "ship_20ms_sequential"), lambda v: v >= 20, "{:.1f}×"),
        ("produce-to-arrival p50, daemon idle", "≤ 20 ms", f("latency_p50_ms", nan),
         lambda v: v <= 20, "{:.1f} ms"),
        ("daemon CPU, 60 s idle", "≤ 0.2 %", f("idle_cpu_percent", nan),
         lambda v: v <= 0.2, "{:.3f} %"),
        ("daemon peak RSS draining 1,000,000 (first → last tenth)", "≤ 60 MB, flat",
         f("drain_rss_peak_mb", nan), lambda v: v <= 60 and
         f("drain_rss_last_mb", nan) <= 1.2 * f("drain_rss_first_mb", nan),
         "{:.1f} MB" + f" ({f('drain_rss_first_mb', nan):.1f} → {f('drain_rss_last_mb', nan):.1f})"),
        ("kmagent.status() at 1,000,000 pending, SQLite", "≤ 100 ms",
         f("status_sqlite_ms", nan), lambda v: v <= 100, "{:.1f} ms"),
    ]
    lines = []
    for name, target, value, met, style in rows:
        if value != value:  # NaN: that section did not run
            continue
        lines.append((name, target, style.format(value), "met" if met(value) else "**not met**"))
    return table(("target", "goal", "this run", ""), lines)


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
    summary = headline()
    print(f"\n## Headline\n\n{summary}")
    parts.insert(1, "## Headline\n\nThe targets, and what this run measured (details below).\n\n"
                 + summary)
    (BENCH / "RESULTS.md").write_text("\n\n".join(parts) + "\n")
    print(f"\nwritten: {BENCH / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
