"""Prometheus metrics (opt-in): ``[metrics] listen`` serves them on a loopback
``host:port``; ``[metrics] textfile`` writes them for node_exporter's textfile
collector. Uses prometheus-client, the maintained reference implementation.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from prometheus_client import CollectorRegistry, start_http_server, write_to_textfile
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger("kmagent.metrics")

TEXTFILE_EVERY_S = 15.0


class _Collector:
    """Reads the daemon's figures at scrape time."""

    def __init__(self, figures: Callable[[], dict[str, Any]]) -> None:
        self._figures = figures

    def collect(self) -> Iterable[Any]:
        f = self._figures()
        for name, key, help_text in (
                ("kmagent_events_delivered", "delivered_total", "Events the host accepted (2xx)."),
                ("kmagent_events_retried", "retried_total", "Failed attempts that will be retried."),
                ("kmagent_events_dead", "dead_total", "Events moved to dead letters."),
                ("kmagent_events_dropped", "dropped_total", "Events dropped at max_bytes (when_full = drop).")):
            yield CounterMetricFamily(name, help_text, value=f.get(key) or 0)
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
            yield GaugeMetricFamily(name, help_text, value=f.get(key) or 0)


class Exporter:
    """Serves and/or writes the metrics; ``tick()`` from the daemon's loop."""

    def __init__(self, listen: str | None, textfile: Path | None,
                 figures: Callable[[], dict[str, Any]]) -> None:
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
                write_to_textfile(os.fspath(self.textfile), self.registry)
            except OSError as exc:
                log.warning("cannot write metrics to %s: %s", self.textfile, exc)
