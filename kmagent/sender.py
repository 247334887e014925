"""Sending one stored event: a keep-alive connection pool, timeouts, no redirects,
and the classification of what came back. Also the backoff a failure earns.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import requests
from requests.adapters import HTTPAdapter

from . import __version__
from .protocol import quote_param, request_target
from .spool import Claimed

log = logging.getLogger("kmagent.sender")

USER_AGENT = f"kmagent/{__version__}"
BACKOFF_BASE_S = 1.0


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one request came to. ``error`` never contains the API key."""

    delivered: bool
    status: int | None = None
    error: str | None = None


def backoff_delay(attempts: int, cap: float, rng: random.Random = random._inst) -> float:
    """Capped exponential backoff with full jitter (uniform in [0, min(cap, base·2ⁿ⁻¹)])."""
    ceiling = min(cap, BACKOFF_BASE_S * 2 ** min(max(attempts - 1, 0), 30))
    return rng.uniform(0, ceiling)


def redact(text: str, secrets: tuple[str, ...]) -> str:
    """Hide API keys (raw and percent-encoded) in text bound for logs or errors."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***").replace(quote_param(secret), "***")
    return text


class Sender:
    """GETs stored events from the tracking host over a pool of keep-alive connections."""

    def __init__(self, endpoint: str, *, concurrency: int, connect_timeout: float,
                 read_timeout: float, proxy: str | None = None, ca_file: str | None = None,
                 api_key: str | None = None) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.api_key = api_key
        self._timeout = (connect_timeout, read_timeout)
        session = requests.Session()
        # The environment (proxies, netrc, CA bundle) was read once into the Config;
        # looking it up again on every request costs a third of the time (DESIGN.md).
        session.trust_env = False
        session.verify = str(ca_file) if ca_file else True  # TLS is always verified
        session.proxies = {"https": proxy} if proxy else {}
        session.headers = {"User-Agent": USER_AGENT, "Accept": "*/*",
                           "Accept-Encoding": "identity"}
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=concurrency, max_retries=0)
        session.mount("https://", adapter)
        session.mount("http://", adapter)
        self._session = session

    def send(self, item: Claimed) -> Outcome:
        """Send one event once. 2xx is delivered; anything else is not."""
        key = item.api_key or self.api_key
        if key is None:
            return Outcome(False, None, "no API key: set api_key or api_key_file")
        url = self.endpoint + request_target(item.path, item.query, key)
        try:
            response = self._session.get(url, timeout=self._timeout, allow_redirects=False)
        except requests.RequestException as exc:
            return Outcome(False, None, redact(f"{type(exc).__name__}: {exc}", (key,)))
        if 200 <= response.status_code < 300:
            return Outcome(True, response.status_code)
        return Outcome(False, response.status_code, f"HTTP {response.status_code}")

    def close(self) -> None:
        self._session.close()
