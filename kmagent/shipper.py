"""Claim → send concurrently → acknowledge only what got a 2xx.

The shipper keeps up to ``window`` events in flight: worker threads send them and
report back through a queue; the owning thread (the only one that touches the spool)
acknowledges deliveries and schedules failures for a retry with backoff. Whatever is
claimed and not acknowledged stays in the spool, so a crash costs at most a resend of
the in-flight window, byte for byte the same requests.
"""

from __future__ import annotations

import logging
import threading
import time
import queue
from collections import deque
from typing import Any, Callable

from .sender import Outcome, Sender, backoff_delay
from .spool import Claimed, Spool

log = logging.getLogger("kmagent.shipper")

# Claim a little ahead of the workers so none idles waiting for the next claim; this is
# also the bound on what a SIGKILL can make us send twice.
WINDOW_PER_WORKER = 2


class Shipper:
    """Moves events from a spool to the tracking host; drive it with ``step``."""

    def __init__(self, spool: Spool, sender: Sender, *, concurrency: int, max_backoff: float,
                 wake: threading.Event | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.spool = spool
        self.sender = sender
        self.max_backoff = max_backoff
        self.window = concurrency * WINDOW_PER_WORKER
        self.clock = clock
        # Set by workers when a request finishes (and by the daemon's watcher and signals).
        self.wake = wake or threading.Event()
        self._in_flight: dict[Any, Claimed] = {}
        self._todo: queue.SimpleQueue[Claimed | None] = queue.SimpleQueue()
        self._done: deque[tuple[Claimed, Outcome]] = deque()
        # Daemon threads, not an executor: a request hung past the shutdown deadline
        # must not keep the process alive (its event is back in the spool by then).
        self._workers = [threading.Thread(target=self._work, name=f"kmagent-send-{n}",
                                          daemon=True) for n in range(concurrency)]
        for worker in self._workers:
            worker.start()
        self.delivered_total = 0
        self.retried_total = 0
        self.last_error: str | None = None
        # Without a key of its own, the agent can send only events that carry one.
        self._with_key_only = sender.api_key is None

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def step(self) -> int:
        """Settle finished requests, then claim and start more; returns deliveries."""
        delivered = self.settle()
        self.fill()
        return delivered

    def idle_until(self) -> float | None:
        """When a claimable event next becomes due, if the window has room for it."""
        if len(self._in_flight) >= self.window:
            return None  # a finishing request will wake us
        return self.spool.next_due(with_key_only=self._with_key_only)

    def fill(self) -> int:
        """Claim ready events up to the window and hand them to the workers."""
        room = self.window - len(self._in_flight)
        if room <= 0:
            return 0
        items = self.spool.claim(room, now=self.clock(), with_key_only=self._with_key_only)
        for item in items:
            self._in_flight[item.id] = item
            self._todo.put(item)
        return len(items)

    def _work(self) -> None:
        while (item := self._todo.get()) is not None:
            if item.id not in self._in_flight:
                continue  # released at shutdown before it started
            try:
                outcome = self.sender.send(item)
            except Exception as exc:  # a bug must not lose the claim: treat as a failure
                log.exception("sending event %s failed unexpectedly", item.id)
                outcome = Outcome(False, None, f"{type(exc).__name__}")
            self._done.append((item, outcome))
            self.wake.set()

    def settle(self) -> int:
        """Record what finished: ack deliveries, schedule retries. Returns deliveries."""
        finished = []
        while self._done:
            finished.append(self._done.popleft())
        if not finished:
            return 0
        delivered = [item.id for item, outcome in finished if outcome.delivered]
        self.spool.ack(delivered)
        now = self.clock()
        retries = []
        for item, outcome in finished:
            if self._in_flight.pop(item.id, None) is None:
                continue  # given back at shutdown while it was being sent
            if not outcome.delivered:
                # Everything not 2xx is retried for now; permanent refusals will go to
                # dead letters once the fault policy classifies them.
                delay = backoff_delay(item.attempts, self.max_backoff)
                retries.append((item.id, now + delay, outcome.error))
                self.last_error = outcome.error
                log.warning("event %s not delivered (%s); retry in %.1f s",
                            item.id, outcome.error, delay)
        self.spool.retry(retries)
        self.retried_total += len(retries)
        self.delivered_total += len(delivered)
        return len(delivered)

    def shutdown(self, timeout: float) -> None:
        """Stop: give back what has not started, wait up to ``timeout`` for the rest,
        settle it, and give anything still unsettled back to the spool."""
        not_started = []
        while True:
            try:
                item = self._todo.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                not_started.append(item.id)
                self._in_flight.pop(item.id, None)
        self.spool.release(not_started)
        deadline = time.monotonic() + timeout
        while self._in_flight and time.monotonic() < deadline:
            self.wake.wait(min(0.1, max(0.0, deadline - time.monotonic())))
            self.wake.clear()
            self.settle()
        self.settle()
        # Still running past the deadline: release; a resend is byte-identical.
        self.spool.release(list(self._in_flight))
        self._in_flight.clear()
        for _ in self._workers:
            self._todo.put(None)  # idle workers exit; busy ones die with the process
