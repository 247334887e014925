"""Sending one stored event: a keep-alive connection pool, timeouts, no redirects,
and the classification of what came back. Also the backoff a failure earns.

Classification (the real host answers 200 even to bad parameters, which is why bad
events are refused at record()): 2xx delivered; connection errors, timeouts, 408, 429
and 5xx transient (retry); 3xx (never followed: the key would travel elsewhere) and
every other 4xx permanent (dead letter). An event whose request line would be over
MAX_REQUEST_LINE bytes (the agent's key longer than the 40 characters record() counted,
an endpoint with a path, an event stored before the limit) is never sent, as hosts
refuse or drop such a request unanswered: it is permanent, not retried forever.
"""

from __future__ import annotations

import base64
import email.utils
import http.client
import logging
import random
import ssl
import threading
import time
from dataclasses import dataclass
from urllib.parse import SplitResult, unquote, urlsplit

import certifi

from . import __version__
from .logs import redact
from .events import MAX_REQUEST_LINE
from .protocol import quote_param, request_line_length, request_target
from .spool import Claimed

log = logging.getLogger("kmagent.sender")

USER_AGENT = f"kmagent/{__version__}"
BACKOFF_BASE_S = 1.0
MAX_RETRY_AFTER_S = 3600.0  # a host's Retry-After is honoured up to an hour
TRANSIENT_STATUSES = frozenset({408, 429})

DELIVERED, TRANSIENT, PERMANENT = "delivered", "transient", "permanent"
MAX_BODY = 64 * 1024
HEADERS = {"User-Agent": USER_AGENT, "Accept": "*/*", "Accept-Encoding": "identity"}
# What a request on a connection the host already closed fails with, before any answer.
STALE_CONNECTION = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError,
                    ConnectionAbortedError)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one request came to. ``error`` never contains the API key."""

    kind: str  # DELIVERED, TRANSIENT or PERMANENT
    status: int | None = None
    error: str | None = None
    retry_after: float | None = None  # seconds the host asked us to wait
    timed_out: bool = False  # no answer within the connect or read timeout
    sent: bool = True  # False: refused before any request (it says nothing of the host)

    @property
    def delivered(self) -> bool:
        return self.kind == DELIVERED


def classify(status: int) -> str:
    if 200 <= status < 300:
        return DELIVERED
    if status >= 500 or status in TRANSIENT_STATUSES:
        return TRANSIENT
    return PERMANENT


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as seconds from now (delta-seconds or an HTTP date), capped at an hour."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when is None or when.tzinfo is None:
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def backoff_ceiling(attempts: int, cap: float) -> float:
    """Capped exponential: min(cap, base·2ⁿ⁻¹) after the n-th failure."""
    return min(cap, BACKOFF_BASE_S * 2 ** min(max(attempts - 1, 0), 30))


def backoff_delay(attempts: int, cap: float, rng: random.Random = random._inst) -> float:
    """Capped exponential backoff with full jitter: uniform in [0, ceiling]."""
    return rng.uniform(0, backoff_ceiling(attempts, cap))


def _proxy_authorization(proxy: SplitResult | None) -> dict[str, str] | None:
    """Basic credentials for a proxy URL that carries ``user:password@``."""
    if proxy is None or proxy.username is None:
        return None
    secret = f"{unquote(proxy.username)}:{unquote(proxy.password or '')}"
    return {"Proxy-Authorization": "Basic " + base64.b64encode(secret.encode()).decode()}


class Sender:
    """GETs stored events from the tracking host, each worker thread on its own
    keep-alive connection.

    http.client directly: no pool to check out from, no per-request environment or
    proxy lookups (bench/shipping.py: urllib3's pool reached a third of what bare
    http.client threads did on loopback). TLS is always verified, against certifi's
    bundle (what requests would use) or ``ca_file``; ``proxy`` is an HTTPS proxy,
    reached with CONNECT, for an https endpoint.
    """

    def __init__(self, endpoint: str, *, connect_timeout: float,
                 read_timeout: float, proxy: str | None = None, ca_file: str | None = None,
                 api_key: str | None = None) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.api_key = api_key
        target = urlsplit(self.endpoint)
        self._https = target.scheme == "https"
        self._host = target.hostname or ""
        self._port = target.port or (443 if self._https else 80)
        self._prefix = target.path  # an endpoint may carry a path before /e
        self._context = ssl.create_default_context(
            cafile=str(ca_file) if ca_file else certifi.where()) if self._https else None
        self._proxy = urlsplit(proxy) if proxy and self._https else None
        self._proxy_headers = _proxy_authorization(self._proxy)
        self._connect_timeout, self._read_timeout = connect_timeout, read_timeout
        self._local = threading.local()
        self._open: set[http.client.HTTPConnection] = set()
        self._open_lock = threading.Lock()

    def _new_connection(self) -> http.client.HTTPConnection:
        if self._proxy is not None:
            conn = http.client.HTTPSConnection(
                self._proxy.hostname or "", self._proxy.port or 80,
                timeout=self._connect_timeout, context=self._context)
            conn.set_tunnel(self._host, self._port, headers=self._proxy_headers)
        elif self._https:
            conn = http.client.HTTPSConnection(self._host, self._port,
                                               timeout=self._connect_timeout,
                                               context=self._context)
        else:
            conn = http.client.HTTPConnection(self._host, self._port,
                                              timeout=self._connect_timeout)
        conn.connect()
        conn.sock.settimeout(self._read_timeout)  # connected: from now on, reads wait
        with self._open_lock:
            self._open.add(conn)
        return conn

    def _drop(self, conn: http.client.HTTPConnection) -> None:
        conn.close()
        self._local.conn = None
        with self._open_lock:
            self._open.discard(conn)

    def _get(self, path: str, key: str | None) -> tuple[int, str, str | None] | Outcome:
        """(status, reason, Retry-After) for ``GET path``, or the failure's Outcome."""
        for attempt in (1, 2):
            conn = getattr(self._local, "conn", None)
            reused = conn is not None
            try:
                if conn is None:
                    conn = self._local.conn = self._new_connection()
                conn.request("GET", self._prefix + path, headers=HEADERS)
                response = conn.getresponse()
                # The connection is reusable once the body is read; the host sends a
                # 43-byte GIF, so anything past MAX_BODY is not read: the connection goes.
                response.read(MAX_BODY)
                if response.will_close or not response.isclosed():
                    self._drop(conn)
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("GET %s -> %s", path, response.status)
                return (response.status, response.reason, response.getheader("Retry-After"))
            except (OSError, http.client.HTTPException, ValueError) as exc:
                if conn is not None:
                    self._drop(conn)
                # A kept-alive connection the host closed while idle fails at once:
                # once more on a fresh one (a GET of the same bytes is safe to repeat).
                if reused and attempt == 1 and isinstance(exc, STALE_CONNECTION):
                    continue
                return Outcome(TRANSIENT, None, redact(f"{type(exc).__name__}: {exc}", (key or "",)),
                               timed_out=isinstance(exc, TimeoutError))
        raise AssertionError("unreachable")

    def send(self, item: Claimed) -> Outcome:
        """Send one event once. 2xx is delivered; anything else is not."""
        key = item.api_key or self.api_key
        if key is None:
            return Outcome(TRANSIENT, None, "no API key: set api_key or api_key_file",
                           sent=False)
        size = len(self._prefix) + request_line_length(item.path, item.query,
                                                       len(quote_param(key)))
        if size > MAX_REQUEST_LINE:
            whose = "its own" if item.api_key else "the agent's"
            return Outcome(PERMANENT, None, f"not sent: its request line would be {size:,} "
                           f"bytes with {whose} API key; at most {MAX_REQUEST_LINE:,} "
                           "(Apache's LimitRequestLine), as hosts refuse longer ones",
                           sent=False)
        answer = self._get(request_target(item.path, item.query, key), key)
        if isinstance(answer, Outcome):
            return answer
        status, reason, retry_after = answer
        kind = classify(status)
        if kind == DELIVERED:
            return Outcome(kind, status)
        error = f"HTTP {status} {reason or ''}".strip()
        if 300 <= status < 400:
            error += " (redirects are never followed)"
        return Outcome(kind, status, redact(error, (key,)), parse_retry_after(retry_after))

    def probe(self) -> Outcome:
        """One harmless request (``GET /`` on the endpoint, no event, no key): can the
        host be reached, TLS and proxy included? Any HTTP answer counts as reachable."""
        answer = self._get("/", self.api_key)
        if isinstance(answer, Outcome):
            return answer
        return Outcome(DELIVERED, answer[0])

    def close(self) -> None:
        with self._open_lock:
            connections, self._open = self._open, set()
        for conn in connections:
            conn.close()
