"""Prometheus metrics (opt-in): ``[metrics] listen`` serves them on a loopback
``host:port``; ``[metrics] textfile`` writes them for node_exporter's textfile
collector. Uses prometheus-client, the maintained reference implementation.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .spool.files import write_atomically

if TYPE_CHECKING:
    from .report import Status

log = logging.getLogger("kmagent.metrics")

TEXTFILE_EVERY_S = 15.0
# node_exporter (another user) reads the textfile, and metrics hold no secrets: unlike
# the spool's own files (0660), world-readable whatever the daemon's umask (UMask=0007).
TEXTFILE_MODE = 0o644


class _Collector:
    """Reads the daemon's figures at scrape time."""

    def __init__(self, figures: Callable[[], "Status"]) -> None:
        self._figures = figures

    def collect(self) -> Iterable[Any]:
        f = self._figures()
        for name, key, help_text in (
                ("kmagent_events_delivered", "delivered_total", "Events the host accepted (2xx)."),
                ("kmagent_events_retried", "retried_total", "Failed attempts that will be retried."),
                ("kmagent_events_dead", "dead_total", "Events moved to dead letters."),
                ("kmagent_events_dropped", "dropped_total", "Events dropped at max_bytes (when_full = drop).")):
            yield CounterMetricFamily(name, help_text, value=getattr(f, key) or 0)
        for name, key, help_text in (
                ("kmagent_events_pending", "pending", "Events not yet delivered nor dead."),
                ("kmagent_events_in_flight", "in_flight", "Requests being sent."),
                ("kmagent_concurrency", "concurrency", "Requests allowed at once now."),
                ("kmagent_dead_letters", "dead", "Dead letters in the spool."),
                ("kmagent_oldest_pending_age_seconds", "oldest_pending_age_s",
                 "Age of the oldest pending event."),
                ("kmagent_delivery_rate", "rate_1m", "Events delivered per second, last minute."),
                ("kmagent_last_success_timestamp_seconds", "last_success_at",
                 "When an event was last delivered."),
                ("kmagent_last_error_timestamp_seconds", "last_error_at",
                 "When an attempt last failed.")):
            yield GaugeMetricFamily(name, help_text, value=getattr(f, key) or 0)


class Exporter:
    """Serves and/or writes the metrics; ``tick()`` from the daemon's loop."""

    def __init__(self, listen: str | None, textfile: Path | None,
                 figures: Callable[[], "Status"]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_Collector(figures))
        self.textfile = textfile
        self._written = 0.0
        if listen:
            host, _, port = listen.rpartition(":")
            start_http_server(int(port), addr=host.strip("[]"), registry=self.registry)
            log.info("metrics on http://%s/metrics", listen)

    def tick(self, force: bool = False) -> None:
        if self.textfile is None:
            return
        now = time.monotonic()
        if force or now - self._written >= TEXTFILE_EVERY_S:
            self._written = now
            try:
                # Temp file (``.prom.tmp``, which the textfile collector skips), written
                # whole or not at all, then renamed: a scrape never reads half of it.
                write_atomically(self.textfile, generate_latest(self.registry),
                                 mode=TEXTFILE_MODE)
            except OSError as exc:
                log.warning("cannot write metrics to %s: %s", self.textfile, exc)
