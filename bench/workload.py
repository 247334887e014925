"""Run a producer in 1 thread, N threads or N processes and time it: µs of wall time per
event over all workers (stdlib only: the peers' virtualenv imports it too).

``setup()`` runs once per process and returns what the workers share (a client, a
queue); ``per_worker(shared)`` runs once per thread and returns ``call(n)``, the
function timed once per event.
"""

from __future__ import annotations

import multiprocessing
import statistics
import threading
import time
from typing import Any, Callable

# The ways a producer runs in the benchmarks (keyword arguments of micros_per_event).
SHAPES = {"1 thread": {"threads": 1}, "8 threads": {"threads": 8},
          "4 processes": {"processes": 4}}

Setup = Callable[[], Any]
PerWorker = Callable[[Any], Callable[[int], Any]]


def _threads(setup: Setup, per_worker: PerWorker, threads: int, events: int) -> tuple[float, float]:
    """(earliest start, latest end) of ``threads`` threads each making ``events`` calls."""
    shared = setup()
    calls = [per_worker(shared) for _ in range(threads)]
    barrier = threading.Barrier(threads)
    spans: list[tuple[float, float]] = []

    def work(call: Callable[[int], Any]) -> None:
        barrier.wait()
        start = time.perf_counter()
        for n in range(events):
            call(n)
        spans.append((start, time.perf_counter()))

    workers = [threading.Thread(target=work, args=(call,)) for call in calls]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    close = getattr(shared, "close", None)
    if callable(close):
        close()
    return min(s for s, _ in spans), max(e for _, e in spans)


def _process(setup, per_worker, threads, events, barrier, results) -> None:
    shared = setup()
    call = per_worker(shared)
    barrier.wait()
    start = time.perf_counter()  # CLOCK_MONOTONIC: comparable across processes
    for n in range(events):
        call(n)
    results.put((start, time.perf_counter()))
    close = getattr(shared, "close", None)
    if callable(close):
        close()


def micros_per_event(setup: Setup, per_worker: PerWorker, *, events: int, threads: int = 1,
                     processes: int = 0, rounds: int = 5) -> float:
    """Median over ``rounds`` of wall time ÷ all events, in µs."""
    results = []
    for _ in range(rounds):
        if processes:
            context = multiprocessing.get_context("fork")
            barrier, queue = context.Barrier(processes), context.Queue()
            children = [context.Process(target=_process, args=(setup, per_worker, 1, events,
                                                               barrier, queue))
                        for _ in range(processes)]
            for child in children:
                child.start()
            spans = [queue.get(timeout=600) for _ in children]
            for child in children:
                child.join()
            start, end = min(s for s, _ in spans), max(e for _, e in spans)
            total = events * processes
        else:
            start, end = _threads(setup, per_worker, threads, events)
            total = events * threads
        results.append((end - start) / total * 1e6)
    return statistics.median(results)
