"""The daemon at rest and under a backlog: produce-to-arrival latency while it idles
(p50, p99), its CPU over 60 s of idling, and its RSS while it drains a 1,000,000-event
backlog (sampled every second: it must stay flat). `kmagent run` is a real process;
the host is bench/loophost.py in another.

    .venv/bin/python bench/idle.py [--drain-all]
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import kmagent
from common import FIGURES, loop_host, percentile, table
from status import fill_sqlite

LATENCY_EVENTS = 200
LATENCY_GAP_S = 0.05  # the daemon goes back to idle between two events
IDLE_S = 60
BACKLOG = 1_000_000
DRAIN_SAMPLE_S = 60  # how long RSS is sampled unless --drain-all
TICKS = os.sysconf("SC_CLK_TCK")


def start_daemon(tmp: Path, url: str, spool: Path) -> tuple[subprocess.Popen, Path]:
    config = tmp / f"{spool.name}.toml"
    config.write_text(f'api_key = "bench"\nendpoint = "{url}"\n'
                      f'[spool]\npath = "{spool}"\n[log]\nlevel = "warning"\n')
    config.chmod(0o600)
    daemon = subprocess.Popen([sys.executable, "-m", "kmagent", "run", "--config", str(config)])
    return daemon, config


def stop(daemon: subprocess.Popen) -> None:
    daemon.send_signal(signal.SIGTERM)
    daemon.wait(timeout=60)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime, all threads


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def arrivals(log: Path) -> dict[str, float]:
    """person -> arrival time, from the host's log."""
    seen = {}
    for line in log.read_text().splitlines():
        at, target = line.split(" ", 1)
        person = target.split("_p=", 1)[1].split("&", 1)[0]
        seen.setdefault(person, float(at))
    return seen


def wait_for(predicate, timeout: float) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise TimeoutError
        time.sleep(0.05)


def at_rest(tmp: Path) -> list[tuple[str, str]]:
    log = tmp / "arrivals.log"
    log.touch()
    spool = tmp / "idle.db"
    with loop_host(log=log) as url:
        daemon, config = start_daemon(tmp, url, spool)
        try:
            client = kmagent.Client(config=config)
            client.record("warmup", "Started")
            wait_for(lambda: "warmup" in arrivals(log), 30)
            produced = {}
            for n in range(LATENCY_EVENTS):
                produced[f"lat{n}"] = time.time()
                client.record(f"lat{n}", "Latency")
                time.sleep(LATENCY_GAP_S)
            wait_for(lambda: len(arrivals(log)) > LATENCY_EVENTS, 30)
            seen = arrivals(log)
            latencies = [(seen[p] - t) * 1000 for p, t in produced.items()]
            time.sleep(2)
            cpu_before, start = cpu_seconds(daemon.pid), time.monotonic()
            time.sleep(IDLE_S)
            cpu = (cpu_seconds(daemon.pid) - cpu_before) / (time.monotonic() - start) * 100
            idle_rss = rss_mb(daemon.pid)
        finally:
            stop(daemon)
    FIGURES.update(latency_p50_ms=percentile(latencies, 0.5), idle_cpu_percent=cpu,
                   idle_rss_mb=idle_rss)
    return [("produce-to-arrival latency, daemon idle: p50",
             f"{percentile(latencies, 0.5):.1f} ms"),
            ("produce-to-arrival latency, daemon idle: p99",
             f"{percentile(latencies, 0.99):.1f} ms"),
            (f"daemon CPU over {IDLE_S} s idle", f"{cpu:.3f} %"),
            ("daemon RSS, idle", f"{idle_rss:.1f} MB")]


def draining(tmp: Path, drain_all: bool) -> list[tuple[str, str]]:
    spool = tmp / "backlog.db"
    fill_sqlite(spool, BACKLOG)
    with loop_host() as url:
        daemon, config = start_daemon(tmp, url, spool)
        samples, start = [], time.monotonic()
        try:
            while True:
                time.sleep(1)
                samples.append(rss_mb(daemon.pid))
                elapsed = time.monotonic() - start
                if not drain_all and elapsed >= DRAIN_SAMPLE_S:
                    break
                if drain_all and len(samples) % 10 == 0 and kmagent.status(config)["pending"] == 0:
                    break
            pending = kmagent.status(config)["pending"]
        finally:
            stop(daemon)
    delivered = BACKLOG - pending
    tenth = max(1, len(samples) // 10)
    FIGURES.update(drain_rss_first_mb=sorted(samples[:tenth])[tenth // 2],
                   drain_rss_last_mb=sorted(samples[-tenth:])[tenth // 2],
                   drain_rss_peak_mb=max(samples), drained=delivered)
    return [(f"RSS draining {BACKLOG:,} (every 1 s for {elapsed:.0f} s, {delivered:,} delivered, "
             f"{delivered / elapsed:,.0f}/s): first 10 % of samples, median", 
             f"{sorted(samples[:tenth])[tenth // 2]:.1f} MB"),
            ("… last 10 % of samples, median", f"{sorted(samples[-tenth:])[tenth // 2]:.1f} MB"),
            ("… peak", f"{max(samples):.1f} MB")]


def run(drain_all: bool = False) -> str:
    with tempfile.TemporaryDirectory() as tmpdir:
        rows = at_rest(Path(tmpdir)) + draining(Path(tmpdir), drain_all)
    return table(("daemon (SQLite spool, default settings)", "measured"), rows)


if __name__ == "__main__":
    print(run("--drain-all" in sys.argv))
