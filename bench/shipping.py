"""Shipping: delivered events/s to a loopback host with 0, 20 and 100 ms of added
latency. kmagent (`flush` of a SQLite spool) beside a bare hand-written client of the
same concurrency (threads, each with one keep-alive http.client connection), a
sequential loop (one connection, one request at a time, as km_send sends its log), a
client of the same concurrency written with requests the ordinary way (one
``requests.Session`` per thread, ``session.get`` per event) and the bound, concurrency ÷
latency. CPU seconds per 1,000 delivered events (this process: the host runs in its own)
for kmagent, bare http.client and the Session client. kmagent runs with a fixed concurrency (16, 32) and
with its default, adaptive from 16 up to 64 (beside 64 bare threads). Medians of
rounds; the host runs in its own process.

    .venv/bin/python bench/shipping.py
"""

from __future__ import annotations

import http.client
import itertools
import statistics
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

from common import FIGURES, loop_host, median_of, table

# CPU seconds per 1,000 delivered events of each client's last round, by client name.
CPU: dict[str, list[float]] = {}


def cpu_per_1000(name: str, cpu_start: float, n: int) -> None:
    CPU.setdefault(name, []).append((time.process_time() - cpu_start) * 1000 / n)

ROUNDS = 3
CONCURRENCY = (16, 32, None)  # None: kmagent's default, adaptive from 16 up to 64
AUTO_CEILING = 64
DELAYS = (0.0, 0.02, 0.1)
TARGET = "/e?_k=bench&_p=person{n}&_n=Shipped&_t=1795875344&_d=1"


def events_for(delay: float, concurrency: int) -> int:
    """Enough for ~2 s at the bound (at least 2,000 with no added latency)."""
    return 3000 if delay == 0 else max(200, int(2 * concurrency / delay))


def kmagent_rate(url: str, n: int, concurrency: int | None) -> float:
    """``concurrency`` fixed, or None: the default (adaptive, starting at 16)."""
    from kmagent.client import Client
    from kmagent.config import Config
    from kmagent.flush import flush
    with tempfile.TemporaryDirectory() as tmp:
        spool = Path(tmp) / "spool.db"
        client = Client(spool=spool)
        for i in range(n):
            client.record(f"person{i}", "Shipped")
        client.close()
        fixed = {"concurrency": concurrency, "adapt_concurrency": False} if concurrency else {}
        config = Config(api_key="bench", endpoint=url, spool_path=spool, **fixed)
        cpu, start = time.process_time(), time.perf_counter()
        result = flush(config, timeout=30)
        elapsed = time.perf_counter() - start
        cpu_per_1000("kmagent", cpu, n)
    assert result.remaining == 0, result
    return n / elapsed


def bare_rate(url: str, n: int, concurrency: int) -> float:
    """``concurrency`` threads, each with its own keep-alive connection, sharing the work."""
    address = urlsplit(url)
    numbers = itertools.count()  # next() on a count is atomic under the GIL

    def worker() -> None:
        conn = http.client.HTTPConnection(address.hostname, address.port, timeout=10)
        while (i := next(numbers)) < n:
            conn.request("GET", TARGET.format(n=i))
            response = conn.getresponse()
            response.read()
            assert response.status == 200
        conn.close()

    return run_threads(worker, n, concurrency, "bare")


def session_rate(url: str, n: int, concurrency: int) -> float:
    """The same with requests as its users write it: a Session per thread (keep-alive),
    ``session.get`` per event, the body read."""
    import requests
    numbers = itertools.count()

    def worker() -> None:
        with requests.Session() as session:
            while (i := next(numbers)) < n:
                response = session.get(url + TARGET.format(n=i), timeout=10)
                response.content
                assert response.status_code == 200

    return run_threads(worker, n, concurrency, "session")


def run_threads(worker, n: int, concurrency: int, name: str) -> float:
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    cpu, start = time.process_time(), time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    rate = n / (time.perf_counter() - start)
    if concurrency > 1:
        cpu_per_1000(name, cpu, n)
    return rate


def cpu_median(name: str) -> float:
    """The median over the rounds just run (then forgotten)."""
    return statistics.median(CPU.pop(name))


def run() -> str:
    rows = []
    for delay in DELAYS:
        with loop_host(delay) as url:
            n_seq = 2000 if delay == 0 else max(50, int(2 / delay))
            sequential = median_of(bare_rate, url, n_seq, 1, rounds=ROUNDS)
            for concurrency in CONCURRENCY:
                threads = concurrency or AUTO_CEILING  # the bare client at the ceiling
                n = events_for(delay, threads)
                bare = median_of(bare_rate, url, n, threads, rounds=ROUNDS)
                session = median_of(session_rate, url, n, threads, rounds=ROUNDS)
                ours = median_of(kmagent_rate, url, n, concurrency, rounds=ROUNDS)
                cpu = {name: cpu_median(name) for name in ("kmagent", "bare", "session")}
                bound = f"{threads / delay:,.0f}" if delay else "–"
                label = concurrency or f"auto (16 → ≤ {AUTO_CEILING}; others: {AUTO_CEILING})"
                name = f"ship_{delay * 1000:.0f}ms_{concurrency or 'auto'}"
                FIGURES[name], FIGURES[name + "_bare"] = ours, bare
                FIGURES[name + "_session"] = session
                FIGURES[name + "_cpu_per_1000"] = cpu["kmagent"]
                FIGURES[f"ship_{delay * 1000:.0f}ms_sequential"] = sequential
                rows.append((f"{delay * 1000:.0f} ms", label, f"{ours:,.0f}",
                             f"{bare:,.0f}", f"{session:,.0f}", f"{sequential:,.0f}", bound,
                             f"{ours / bare:.2f}", f"{ours / session:.2f}",
                             f"{ours / sequential:.1f}",
                             f"{cpu['kmagent']:.2f} / {cpu['bare']:.2f} / {cpu['session']:.2f}"))
    return table(("host latency", "concurrency", "kmagent events/s", "bare http.client threads",
                  "requests.Session threads", "sequential loop", "bound", "kmagent ÷ bare",
                  "kmagent ÷ Session", "kmagent ÷ sequential",
                  "CPU s per 1,000 events: kmagent / bare / Session"), rows)


if __name__ == "__main__":
    print(run())
