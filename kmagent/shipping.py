"""The shipping side, assembled from a configuration: what `kmagent run`, `flush` and
`check` build their Sender and Shipper with (none of them imports another's module)."""

from __future__ import annotations

import threading

from .adaptive import AdaptiveLimit
from .config import Config
from .sender import Sender
from .shipper import Shipper
from .spool.session import ShippingSession


def make_sender(config: Config) -> Sender:
    """A Sender configured from ``config`` (completed by ``shipping_config``)."""
    return Sender(config.endpoint, connect_timeout=config.connect_timeout,
                  read_timeout=config.read_timeout,
                  proxy=config.proxy, ca_file=config.ca_file, api_key=config.api_key)


def make_shipper(config: Config, session: ShippingSession,
                 wake: threading.Event | None = None) -> Shipper:
    """A Shipper for the spool of ``session`` with a Sender configured from ``config``."""
    concurrency: int | AdaptiveLimit = config.concurrency
    if config.adapt_concurrency:
        concurrency = AdaptiveLimit(config.concurrency, config.max_concurrency)
    return Shipper(session, make_sender(config), concurrency=concurrency,
                   max_backoff=config.max_backoff, max_age=config.max_age, wake=wake)
