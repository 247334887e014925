"""Chaos: producers in several processes and threads (one SIGKILLed mid-stream), a
daemon SIGKILLed again and again, and a host that fails and resets a share of requests.
Every event whose record() returned must arrive, and every resend must be the same bytes.
"""

from __future__ import annotations

import collections
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from helpers import figures, run_kmagent, start_kmagent, wait_for

from kmagent import Client


pytestmark = pytest.mark.backends()  # each test taking ``backend``: on each

PRODUCER = textwrap.dedent("""
    import sys, threading, time
    from kmagent import Client
    client = Client(config=sys.argv[1])
    name, per_thread = sys.argv[2], int(sys.argv[3])
    printing = threading.Lock()
    def produce(t):
        for n in range(per_thread):
            event = f"{name}-{t}-{n}"
            client.record("chaos", event, {"n": n, "pad": "x" * (n % 300)})
            with printing:
                print(event, flush=True)  # record() returned: this one must arrive
            # Keep producing while the daemon is killed and restarted: a few hundred
            # events a thread, spread over seconds (a sleep costs no CPU).
            time.sleep(0.01)
    threads = [threading.Thread(target=produce, args=(t,)) for t in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
""")


def test_nothing_acknowledged_is_lost_and_resends_are_identical(host, write_config, spool_path):
    host.delay, host.fail_rate, host.reset_rate = 0.002, 0.1, 0.1
    config = write_config(host, extra="[ship]\nconcurrency = 8\nmax_backoff = 1\n")
    with open(config, "a") as fh:
        fh.write("rotate_bytes = 16384\n")  # jsonl: rotations happen during the run
    Client(config=config).close()

    acknowledged: list[str] = []
    producers = []
    for p in range(3):
        proc = subprocess.Popen([sys.executable, "-c", PRODUCER, str(config), f"p{p}", "350"],
                                stdout=subprocess.PIPE, text=True)
        reader = threading.Thread(target=lambda s=proc.stdout: acknowledged.extend(s), daemon=True)
        reader.start()
        producers.append((proc, reader))

    def producer_kill() -> None:
        wait_for(lambda: sum(1 for a in acknowledged if a.startswith("p0-")) > 100)
        producers[0][0].kill()  # mid-stream, possibly mid-write

    killer = threading.Thread(target=producer_kill, daemon=True)
    killer.start()
    for _ in range(5):  # the daemon dies again and again, each time mid-shipping
        requests_before = len(host.received)
        daemon = start_kmagent("run", "--config", str(config))
        # A loaded machine can take longer than any fixed sleep to start the daemon:
        # kill it only once it has sent something, so every death is mid-stream.
        wait_for(lambda: len(host.received) > requests_before, timeout=60)
        time.sleep(0.3)
        daemon.send_signal(signal.SIGKILL)
        daemon.communicate()
    killer.join(30)
    for proc, reader in producers:
        proc.wait(60)
        reader.join(10)
    assert [proc.returncode for proc, _ in producers[1:]] == [0, 0]
    assert host.delivered(), "the killed daemons should have shipped some events"

    flush = run_kmagent("flush", "--timeout", "30", "--config", str(config), timeout=120)
    assert flush.returncode == 0, flush.stderr
    assert figures(config)["pending"] == 0  # what `status --json` says, read in-process

    attempts = collections.defaultdict(set)  # event -> every distinct request target
    for request in host.received:
        attempts[dict(request.params)["_n"]].add(request.target)
    delivered = {dict(r.params)["_n"] for r in host.delivered()}
    wanted = {line.strip() for line in acknowledged}
    assert len(wanted) > 1000 and wanted <= delivered  # nothing acknowledged was lost
    assert all(len(targets) == 1 for targets in attempts.values())  # resends identical
    assert any(r.status == 0 for r in host.received) and any(
        r.status == 503 for r in host.received)  # the faults really happened
