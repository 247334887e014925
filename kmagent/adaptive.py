"""Adaptive request concurrency: find how many requests at once the host and the path
to it can take, instead of asking users to tune ``[ship] concurrency``.

Additive increase, multiplicative decrease on the round-trip time, after Vector's
adaptive request concurrency. Decisions are made once per "period", about one
round trip's worth of answers (as many as the current limit):

- the host pushed back (429, 503, a Retry-After, no answer in time: gate.pushed_back;
  other 5xx and resets say nothing of load): × 0.9;
- the period's mean round trip rose well above the running average: × 0.9
  (requests queue somewhere: more at once would only wait longer);
- otherwise, if every slot was busy at some point (more would have been used): + 1,
  or × 2 until the first back-off ("slow start", as TCP does: from 16, a host 100 ms
  away gets 64 at once in 0.2 s instead of 4.8 s).

Throughput is concurrency ÷ round trip, so while the round trip holds, one more request
at once is one more round trip's worth of events per second.
"""

from __future__ import annotations

import math

DECREASE = 0.9
RTT_RISE = 1.5  # a period this much slower than the average (plus RTT_SLACK_S) backs off
RTT_SLACK_S = 0.002  # loopback round trips jitter by a millisecond or two
EWMA_ALPHA = 0.2  # how fast the average round trip follows the periods'


class AdaptiveLimit:
    """The current limit on requests at once, between 1 and ``maximum``; not
    thread-safe (the Gate calls it under its lock)."""

    def __init__(self, initial: int, maximum: int) -> None:
        self.maximum = maximum
        self.limit = max(1, min(initial, maximum))
        self.average_rtt: float | None = None
        self._rtts: list[float] = []
        self._answers = 0
        self._saturated = False
        self._pushed_back = False
        self.slow_start = True  # doubling, until the first back-off

    def observe(self, rtt: float | None, *, pushed_back: bool, in_flight: int) -> None:
        """One request finished after ``rtt`` s; ``in_flight`` were running, it included."""
        if pushed_back:
            self._pushed_back = True
        elif rtt is not None:
            self._rtts.append(rtt)
        if in_flight >= self.limit:
            self._saturated = True
        self._answers += 1
        if self._answers >= self.limit:
            self._adjust()

    def _adjust(self) -> None:
        mean = sum(self._rtts) / len(self._rtts) if self._rtts else None
        if self._pushed_back or (
                mean is not None and self.average_rtt is not None
                and mean > self.average_rtt * RTT_RISE + RTT_SLACK_S):
            self.limit = max(1, math.floor(self.limit * DECREASE))
            self.slow_start = False
        elif self._saturated:
            grown = self.limit * 2 if self.slow_start else self.limit + 1
            self.limit = min(self.maximum, grown)
        if mean is not None:
            self.average_rtt = mean if self.average_rtt is None else (
                self.average_rtt + EWMA_ALPHA * (mean - self.average_rtt))
        self._rtts.clear()
        self._answers = 0
        self._saturated = self._pushed_back = False
