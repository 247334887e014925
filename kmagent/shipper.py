"""Claim → send concurrently → acknowledge only what got a 2xx.

The shipper keeps up to ``window`` events in flight: worker threads send them (each
first passing the agent-wide Gate) and report back through a queue; the owning thread,
the only one that touches the spool, settles each outcome:

| outcome | what the spool is told |
|---|---|
| 2xx | ack: delivered, forget it |
| transient (connection error, timeout, 408, 429, 5xx) | retry after a capped, jittered backoff (at least the host's Retry-After); dead letter once older than ``max_age`` |
| permanent (3xx, other 4xx) | dead letter, with status and reason |
| not started (shutdown) | release |

Whatever is claimed and not settled stays in the spool, so a crash costs at most a
resend of the in-flight window, byte for byte the same requests.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from typing import Any, Callable, TypeVar

from .adaptive import AdaptiveLimit
from .gate import Gate
from .sender import DELIVERED, PERMANENT, Outcome, Sender, backoff_delay
from .errors import SpoolError
from .spool import Claimed, Retry
from .spool.session import ShippingSession

log = logging.getLogger("kmagent.shipper")

# Claim a little ahead of the workers so none idles waiting for the next claim; this is
# also the bound on what a SIGKILL can make us send twice.
WINDOW_PER_WORKER = 2
# Refused events whose dead letters wait for room: beyond this many, nothing more is
# claimed (a disk that stays full must not bring the whole spool into memory).
DEAD_WAITING_MAX = 1024
T = TypeVar("T")


class BatchLimit:
    """How many events one spool write (a claim, or the record of what finished) may
    cover. None, no limit, until a write fails on a full disk: a claim or an ack of a
    wide window can need more room (SQLite's WAL) than the reserve holds, so that it
    would fail for good. Then each failure halves it, down to one event, and each
    write that succeeds at the limit doubles it back."""

    UNLIMITED_FROM = 4096  # above any window (max_concurrency is at most 1,024)

    def __init__(self) -> None:
        self.limit: int | None = None

    def cap(self, count: int) -> int:
        return count if self.limit is None else min(count, self.limit)

    def shrink(self, tried: int) -> int:
        self.limit = max(1, tried // 2)
        return self.limit

    def succeeded(self, count: int) -> None:
        if self.limit is not None and count >= self.limit:
            self.limit *= 2
            if self.limit >= self.UNLIMITED_FROM:
                self.limit = None


class Shipper:
    """Moves events from a spool to the tracking host; drive it with ``step``."""

    def __init__(self, session: ShippingSession, sender: Sender, *,
                 concurrency: int | AdaptiveLimit, max_backoff: float,
                 max_age: float = 0.0, wake: threading.Event | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        """``concurrency``: a number of requests at once, kept; or an AdaptiveLimit,
        which moves it between 1 and its maximum (adaptive.py)."""
        self.session = session  # claims, acks...: only while this process ships the spool
        self.spool = session.spool  # what anyone may ask it (out_of_room, stats)
        self.sender = sender
        self.max_backoff = max_backoff
        self.max_age = max_age
        self.clock = clock
        if isinstance(concurrency, AdaptiveLimit):
            self.gate = Gate(concurrency.limit, max_backoff, adaptive=concurrency)
        else:
            self.gate = Gate(concurrency, max_backoff)
        # Set by workers when a request finishes (and by the daemon's watcher and signals).
        self.wake = wake or threading.Event()
        self._in_flight: dict[Any, Claimed] = {}
        self._todo: queue.SimpleQueue[Claimed | None] = queue.SimpleQueue()
        self._done: deque[tuple[Claimed, Outcome | None]] = deque()
        # Refused events whose dead letter found no room on the spool's disk: still
        # claimed in the spool (a crash gives them back), out of the window, written
        # once acks have freed room. (item, status, reason)
        self._dead_waiting: list[tuple[Claimed, int | None, str]] = []
        self._dead_written: set[Any] = set()  # this batch's, if it is recorded again
        self._workers: list[threading.Thread] = []
        self._add_workers()
        # Apart: dead letters (an INSERT and a DELETE each) failing on a full disk must
        # not hold claims down to one event at a time.
        self.claim_limit = BatchLimit()
        self.record_limit = BatchLimit()
        self.delivered_total = 0
        self.retried_total = 0
        self.dead_total = 0
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.last_success_at: float | None = None
        # Without a key of its own, the agent can send only events that carry one.
        self._with_key_only = sender.api_key is None

    def carry_on_from(self, previous: "Shipper") -> None:
        """Take over from a shipper this one replaces (a reload): its counts, and any
        wait the host asked for (Retry-After, an outage hold), which outlives a reload."""
        for name in ("delivered_total", "retried_total", "dead_total", "last_error",
                     "last_error_at", "last_success_at"):
            setattr(self, name, getattr(previous, name))
        self.gate.hold_until = previous.gate.hold_until

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def concurrency(self) -> int:
        """Requests that may run at once now (it moves when adaptive)."""
        return self.gate.allowed

    @property
    def window(self) -> int:
        """How many events may be claimed at once: a little ahead of the workers."""
        return self.gate.allowed * WINDOW_PER_WORKER

    def _add_workers(self) -> None:
        """As many workers as requests may run at once (an adaptive limit grows)."""
        # Daemon threads, not an executor: a request hung past the shutdown deadline
        # must not keep the process alive (its event is back in the spool by then).
        while len(self._workers) < self.gate.allowed:
            worker = threading.Thread(target=self._work, daemon=True,
                                      name=f"kmagent-send-{len(self._workers)}")
            worker.start()
            self._workers.append(worker)

    def step(self) -> int:
        """Settle finished requests, then claim and start more; returns deliveries."""
        delivered = self.settle()
        self.fill()
        return delivered

    def idle_until(self) -> float | None:
        """When a claimable event next becomes due, if the window has room for it."""
        if len(self._in_flight) >= self.window:
            return None  # a finishing request will wake us
        return self.session.next_due(with_key_only=self._with_key_only)

    def fill(self) -> int:
        """Claim ready events up to the window and hand them to the workers."""
        self._add_workers()
        room = self.window - len(self._in_flight) - max(
            0, len(self._dead_waiting) - DEAD_WAITING_MAX)
        if room <= 0:
            return 0
        items, _ = self._shrinking(self.claim_limit, room, lambda n: self.session.claim(
            n, now=self.clock(), with_key_only=self._with_key_only))
        for item in items:
            self._in_flight[item.id] = item
            self._todo.put(item)
        return len(items)

    def _shrinking(self, limit: BatchLimit, count: int,
                   write: Callable[[int], T]) -> tuple[T, int]:
        """``write(n)`` for up to ``count`` events, as many as ``limit`` allows; on a
        full disk again with half as many, down to one. Returns its result and n."""
        n = limit.cap(count)
        while True:
            try:
                result = write(n)
            except SpoolError as exc:
                if n == 1 or not self.spool.out_of_room(exc):
                    raise
                n = limit.shrink(n)
                continue
            limit.succeeded(n)
            return result, n

    def _work(self) -> None:
        while (item := self._todo.get()) is not None:
            ticket = self.gate.enter()
            if ticket is None:  # shutting down: not started, give it back
                outcome = None
            else:
                started = time.monotonic()
                try:
                    outcome = self.sender.send(item)
                except Exception as exc:
                    # A bug (or an event no request can be built from) must neither lose
                    # the event nor retry it forever: it goes to the dead letters.
                    log.exception("sending event %s failed unexpectedly", item.id)
                    outcome = Outcome(PERMANENT, None, f"could not be sent: {type(exc).__name__}",
                                      sent=False)
                self.gate.leave(ticket, outcome, time.monotonic() - started)
            self._done.append((item, outcome))
            self.wake.set()

    def settle(self) -> int:
        """Record what finished in the spool. Returns deliveries. If the spool cannot
        be written (disk full...), nothing is lost: the outcomes wait for the next try."""
        finished = []
        while self._done:
            finished.append(self._done.popleft())
        delivered = 0
        while finished:
            try:
                count, written = self._shrinking(
                    self.record_limit, len(finished), lambda n: self._record(finished[:n]))
            except BaseException:
                self._done.extendleft(reversed(finished))
                raise
            delivered += count
            for item, _ in finished[:written]:
                self._in_flight.pop(item.id, None)
                self._dead_written.discard(item.id)
            finished = finished[written:]
        if self._dead_waiting:
            waiting, self._dead_waiting = self._dead_waiting, []
            try:
                self._write_dead(waiting, self.clock(), again=True)
            except BaseException:  # written again is a no-op: the lease is gone
                self._dead_waiting = waiting + self._dead_waiting
                raise
            self._dead_written.difference_update(item.id for item, _, _ in waiting)
        if self.gate.recovered.is_set():
            self.gate.recovered.clear()
            woken = self.session.expedite()  # the outage is over: drain at full speed
            log.info("the tracking host answers again; %d waiting events due now", woken)
        return delivered

    def _record(self, finished: list[tuple[Claimed, Outcome | None]]) -> int:
        now = self.clock()
        delivered, released, retries, dead = [], [], [], []
        for item, outcome in finished:
            if item.id not in self._in_flight:
                continue  # given back at shutdown while it was being sent
            if outcome is None:
                released.append(item.id)
            elif outcome.kind == DELIVERED:
                delivered.append(item.id)
            elif outcome.kind == PERMANENT:
                dead.append((item, outcome.status, outcome.error or "refused"))
            elif self.max_age and now - item.created > self.max_age:
                dead.append((item, outcome.status,
                             f"expired after {now - item.created:.0f} s (max_age "
                             f"{self.max_age:g} s); last error: {outcome.error}"))
            else:
                delay = max(backoff_delay(item.attempts, self.max_backoff),
                            outcome.retry_after or 0.0)
                retries.append(Retry(item.id, now + delay, outcome.error))
        self.session.ack(delivered)
        self.session.release(released)
        self.session.retry(retries)
        self._write_dead(dead, now)
        # Logged once written: a spool error above means this batch is recorded again.
        for event_id, due, error in retries:
            self.last_error = error
            log.debug("event %s not delivered (%s); retry in %.1f s", event_id, error, due - now)
        if retries:  # one line per batch, not per event: an outage must not flood the log
            log.warning("%d events not delivered (last: %s); retrying with backoff",
                        len(retries), self.last_error)
        if delivered:
            self.last_success_at = now
        if retries or dead:
            self.last_error_at = now
        self.delivered_total += len(delivered)
        self.retried_total += len(retries)
        return len(delivered)

    def _write_dead(self, dead: list[tuple[Claimed, int | None, str]], now: float, *,
                    again: bool = False) -> None:
        """Dead-letter ``dead`` in order. On a disk too full for one (SQLite: a new
        page), it and the rest wait (``_dead_waiting``) instead of holding back the
        acks behind them, which are what frees room. ``again``: those that waited."""
        for n, (item, status, reason) in enumerate(dead):
            if item.id in self._dead_written:
                continue  # written when this batch was first recorded, and counted
            try:
                self.session.dead_letter([item.id], status=status, reason=reason, now=now)
            except SpoolError as exc:
                if not self.spool.out_of_room(exc):
                    raise
                if not again:
                    log.warning("the spool's disk is full: %d dead letters wait for room "
                                "(%d in all)", len(dead) - n,
                                len(self._dead_waiting) + len(dead) - n)
                self._dead_waiting.extend(dead[n:])
                return
            self._dead_written.add(item.id)
            self.last_error = reason
            self.dead_total += 1
            log.error("event %s dead-lettered: %s", item.id, reason)

    def shutdown(self, timeout: float) -> None:
        """Stop: give back what has not started, wait up to ``timeout`` for the rest,
        settle it, and give anything still unsettled back to the spool."""
        self.gate.close()  # workers waiting at the gate hand their events back
        not_started = []
        while True:
            try:
                item = self._todo.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                not_started.append(item.id)
                self._in_flight.pop(item.id, None)
        self.session.release(not_started)
        deadline = time.monotonic() + timeout
        while self._in_flight and time.monotonic() < deadline:
            self.wake.wait(min(0.1, max(0.0, deadline - time.monotonic())))
            self.wake.clear()
            self.settle()
        self.settle()
        # Dead letters still without room: given back, to be sent (and refused) again.
        self.session.release([item.id for item, _, _ in self._dead_waiting])
        self._dead_waiting.clear()
        # Still running past the deadline: release; a resend is byte-identical.
        self.session.release(list(self._in_flight))
        self._in_flight.clear()
        for _ in self._workers:
            self._todo.put(None)  # idle workers exit; busy ones die with the process
