"""The agent-wide admission gate: no request starts while the host asked us to wait
(Retry-After), and during an outage the agent probes with one request at a time
instead of every worker hammering the host.

    healthy ──(OUTAGE_AFTER transient failures in a row)──▶ outage: hold, then 1 probe
       ▲                                                     │ probe fails: hold longer
       └──── probe succeeds: limit doubles per success up to the concurrency ◀┘

Workers call ``enter()`` before a request and ``leave(outcome)`` after it. With an
AdaptiveLimit, healthy traffic is further held to the limit it finds (adaptive.py).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from typing import Callable

from .adaptive import AdaptiveLimit
from .sender import DELIVERED, TRANSIENT, Outcome, backoff_ceiling

log = logging.getLogger("kmagent.gate")

# Transient failures in a row, with no success between them, that mean "the host is
# down" rather than "this request was unlucky".
OUTAGE_AFTER = 5


def pushed_back(outcome: Outcome) -> bool:
    """The host said "too much" (429, 503, Retry-After) or did not answer in time. Other
    failures (a reset, a 500) say nothing about load: a steady trickle of them must not
    hold the adaptive limit down."""
    return outcome.kind == TRANSIENT and (
        outcome.status in (429, 503) or outcome.retry_after is not None or outcome.timed_out)


class Gate:
    """Decides when a worker may start a request; thread-safe."""

    def __init__(self, concurrency: int, max_backoff: float,
                 clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None,
                 adaptive: AdaptiveLimit | None = None) -> None:
        self.adaptive = adaptive
        self.concurrency = adaptive.maximum if adaptive else concurrency  # the ceiling
        self.max_backoff = max_backoff
        self.clock = clock
        self.rng = rng or random.Random()
        self._cond = threading.Condition()
        self.limit = concurrency  # requests allowed at once (1 while probing)
        self.active = 0
        self.hold_until = 0.0  # no request starts before (clock time)
        self.failures_in_row = 0
        self.outage_level = 0  # 0: healthy
        self._generation = 0  # bumped when an outage starts or deepens
        self._closed = False
        self.recovered = threading.Event()  # set when an outage ends

    @property
    def in_outage(self) -> bool:
        return self.outage_level > 0

    @property
    def allowed(self) -> int:
        """Requests that may run at once now."""
        if self.adaptive is None:
            return self.limit
        return min(self.limit, self.adaptive.limit)

    def enter(self) -> int | None:
        """Wait until a request may start; returns a ticket, or None once closed."""
        with self._cond:
            while not self._closed:
                wait = self.hold_until - self.clock()
                if wait <= 0 and self.active < self.allowed:
                    self.active += 1
                    return self._generation
                self._cond.wait(None if wait <= 0 else wait)
            return None

    def leave(self, ticket: int, outcome: Outcome, rtt: float | None = None) -> None:
        """Account for a finished request started with ``ticket``, ``rtt`` s long."""
        with self._cond:
            if not outcome.sent:  # refused before any request: it says nothing of the host
                self.active -= 1
                self._cond.notify_all()
                return
            if self.adaptive is not None and not self.outage_level:
                # (During an outage the probes say nothing about how many at once.)
                self.adaptive.observe(rtt, pushed_back=pushed_back(outcome),
                                      in_flight=self.active)
            self.active -= 1
            now = self.clock()
            if outcome.retry_after is not None:
                # Agent-wide: once the host says "wait", nothing new starts before then.
                self.hold_until = max(self.hold_until, now + outcome.retry_after)
            if outcome.kind != TRANSIENT:
                # Any answer but a transient failure means the host is up.
                self.failures_in_row = 0
                if outcome.kind == DELIVERED and self.limit < self.concurrency:
                    self.limit = min(self.concurrency, self.limit * 2)  # ramp up
                if self.outage_level:
                    self.outage_level = 0
                    self.recovered.set()
                    log.warning("the tracking host answers again: ramping back up")
            else:
                self.failures_in_row += 1
                if (not self.outage_level and self.failures_in_row >= OUTAGE_AFTER) or (
                        self.outage_level and ticket == self._generation):
                    # The host looks down (or the probe failed): hold, then one probe.
                    self.outage_level += 1
                    self._generation += 1
                    self.limit = 1
                    ceiling = backoff_ceiling(self.outage_level, self.max_backoff)
                    # "Equal jitter": at least half the ceiling, so probes really space out.
                    delay = ceiling / 2 + self.rng.uniform(0, ceiling / 2)
                    self.hold_until = max(self.hold_until, now + delay)
                    log.warning("the tracking host looks down (%d failures in a row, last: "
                                "%s): one probe in %.1f s", self.failures_in_row,
                                outcome.error, delay)
            self._cond.notify_all()

    def close(self) -> None:
        """Shutdown: every waiting and future ``enter`` returns None."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
