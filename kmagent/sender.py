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

import email.utils
import http.client
import ipaddress
import logging
import os
import random
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import certifi
import requests
import urllib3
from requests.adapters import HTTPAdapter
from requests.structures import CaseInsensitiveDict
from urllib3.util import Timeout
from requests.utils import get_environ_proxies, select_proxy

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
# What a request on a connection the host already closed fails with, before any answer
# (urllib3 wraps it in a ProtocolError, requests that in a ConnectionError).
STALE_CONNECTION = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError,
                    ConnectionAbortedError)
# What a request can fail with: requests' errors from adapter.send, urllib3's (and the
# socket's) from reading the streamed body, which requests does not wrap.
FAILURES = (requests.RequestException, urllib3.exceptions.HTTPError, OSError, ValueError)


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


def resolve_proxy(endpoint: str, proxy: str | None = None) -> str | None:
    """The proxy for ``endpoint``, resolved once as requests would per request: ``proxy``
    (``[ship] proxy``) for an https endpoint; otherwise the environment's (HTTPS_PROXY,
    HTTP_PROXY, ALL_PROXY, lower case too) unless NO_PROXY bypasses the endpoint."""
    target = urlsplit(endpoint)
    if proxy:
        return proxy if target.scheme == "https" else None
    if target.scheme == "http" and _loopback(target.hostname or ""):
        # http is for loopback only (kmagent testhost, a local relay), which a proxy
        # set for other programs could not reach.
        return None
    found = select_proxy(endpoint, get_environ_proxies(endpoint))
    if found and "://" not in found:
        found = "http://" + found  # as requests reads a proxy given without a scheme
    return found or None


def _loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_ca_bundle(ca_file: str | os.PathLike | None = None) -> str:
    """What TLS is verified against: ``ca_file``, else REQUESTS_CA_BUNDLE or
    CURL_CA_BUNDLE (as requests users expect), else certifi's bundle. Never nothing."""
    if ca_file:
        return str(ca_file)
    return (os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
            or certifi.where())


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it wraps: requests wraps urllib3's errors (in args, or a
    MaxRetryError's ``reason``), urllib3 the socket's or http.client's."""
    chain, todo = [], [exc]
    while todo and len(chain) < 8:
        current = todo.pop(0)
        if current in chain:
            continue
        chain.append(current)
        todo += [arg for arg in current.args if isinstance(arg, BaseException)]
        for inner in (getattr(current, "reason", None), current.__cause__):
            if isinstance(inner, BaseException):
                todo.append(inner)
    return chain


def _describe(exc: BaseException) -> str:
    """``ConnectionError: <what urllib3 said>``, without requests' "Max retries
    exceeded" wrapper (nothing is retried)."""
    inner = exc.args[0] if exc.args and isinstance(exc.args[0], BaseException) else exc
    if isinstance(inner, urllib3.exceptions.MaxRetryError) and inner.reason is not None:
        inner = inner.reason
    return f"{type(exc).__name__}: {inner}"


def _timed_out(exc: BaseException) -> bool:
    return isinstance(exc, (requests.Timeout, urllib3.exceptions.ReadTimeoutError,
                            TimeoutError))


class Transport(HTTPAdapter):
    """requests' HTTPAdapter for one origin, without the per-request work that only a
    Session's many hosts need: the connection pool is looked up once (not for every
    request, by a normalized pool key), the request line's target is known without
    parsing the URL again when no proxy is in the way, and the answer is read for
    its status, reason and headers only (no cookie jar, no guessed encoding). Each
    cut is measured in bench/shipping.py; everything else is requests' own."""

    def __init__(self, origin: str) -> None:
        # max_retries=0: requests' default, Retry(0, read=False); nothing is retried
        # by urllib3 (a read timeout sent again could count an event twice).
        super().__init__(pool_connections=1, pool_maxsize=1)
        self.origin = origin  # scheme://host[:port], what every request's URL starts with
        self._pool = None

    def get_connection_with_tls_context(self, request, verify, proxies=None, cert=None):
        pool = self._pool
        if pool is None or pool.pool is None:  # first use, or closed (``close()``)
            pool = self._pool = super().get_connection_with_tls_context(
                request, verify, proxies=proxies, cert=cert)
        return pool

    def request_url(self, request, proxies):
        if proxies or not request.url.startswith(self.origin):
            return super().request_url(request, proxies)  # requests decides, parsing
        return request.url[len(self.origin):] or "/"

    def build_response(self, req, resp):
        response = requests.Response()
        response.status_code = resp.status
        response.reason = resp.reason
        response.headers = resp.headers  # urllib3's: case-insensitive, as requests' is
        response.raw = resp
        response.url = req.url
        response.request = req
        response.connection = self
        return response

    def close(self) -> None:
        self._pool = None
        super().close()


class Sender:
    """GETs stored events from the tracking host with requests' transport: each worker
    thread sends through its own ``HTTPAdapter`` (urllib3 pool of one keep-alive
    connection), with a ``PreparedRequest`` built directly (no Session: nothing of the
    environment is merged per request; bench/shipping.py).

    Resolved once, here: the proxy (``proxy``, for an https endpoint, or the
    environment's with NO_PROXY honoured; credentials in its URL go as
    Proxy-Authorization) and the CA bundle (``ca_file``, REQUESTS_CA_BUNDLE,
    CURL_CA_BUNDLE or certifi's). TLS is always verified; redirects are never followed.
    """

    def __init__(self, endpoint: str, *, connect_timeout: float,
                 read_timeout: float, proxy: str | None = None, ca_file: str | None = None,
                 api_key: str | None = None) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.api_key = api_key
        target = urlsplit(self.endpoint)
        self._prefix = target.path  # an endpoint may carry a path before /e
        self.proxy = resolve_proxy(self.endpoint, proxy)
        self._proxies = {target.scheme: self.proxy} if self.proxy else None
        tls = target.scheme == "https" or (self.proxy or "").startswith("https:")
        # Without TLS there is nothing to verify: True spares requests a stat() of the
        # bundle per request (it asks whether the path is a directory), ~7 % at 0 ms.
        self._verify = resolve_ca_bundle(ca_file) if tls else True
        self._origin = f"{target.scheme}://{target.netloc}"
        self._timeout = Timeout(connect=connect_timeout, read=read_timeout)  # built once
        self._headers = CaseInsensitiveDict(HEADERS)  # shared, never changed
        self._local = threading.local()
        self._adapters: set[HTTPAdapter] = set()
        self._adapters_lock = threading.Lock()

    def _adapter(self) -> HTTPAdapter:
        """This thread's adapter: one pool of one connection (no checkout contention)."""
        adapter = getattr(self._local, "adapter", None)
        if adapter is None:
            adapter = Transport(self._origin)
            self._local.adapter, self._local.warm = adapter, False
            with self._adapters_lock:
                self._adapters.add(adapter)
        return adapter

    def _get(self, path: str, key: str | None) -> tuple[int, str, str | None] | Outcome:
        """(status, reason, Retry-After) for ``GET path``, or the failure's Outcome."""
        adapter = self._adapter()
        request = requests.PreparedRequest()
        request.method, request.url, request.headers = "GET", self.endpoint + path, self._headers
        for attempt in (1, 2):
            warm = self._local.warm  # a connection kept alive after an earlier answer
            response = None
            try:
                response = adapter.send(request, stream=True, timeout=self._timeout,
                                        verify=self._verify, proxies=self._proxies)
                raw = response.raw
                # The connection goes back to the pool once the body is read (the host
                # sends a 43-byte GIF); anything past MAX_BODY is not read: it is closed.
                raw.read(MAX_BODY, decode_content=False)
                original = getattr(raw, "_original_response", None)
                self._local.warm = raw.closed and not getattr(original, "will_close", True)
                if not raw.closed:
                    response.close()
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("GET %s -> %s", path, response.status_code)
                return (response.status_code, response.reason,
                        response.headers.get("Retry-After"))
            except FAILURES as exc:
                self._local.warm = False
                if response is not None:
                    response.close()
                # A kept-alive connection the host closed while idle fails at once:
                # once more on a fresh one (a GET of the same bytes is safe to repeat).
                # Never after a timeout: the host may have counted it.
                if (warm and attempt == 1 and not _timed_out(exc)
                        and any(isinstance(e, STALE_CONNECTION) for e in _causes(exc))):
                    continue
                return Outcome(TRANSIENT, None, redact(_describe(exc), (key or "",)),
                               timed_out=_timed_out(exc))
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
        with self._adapters_lock:  # kept: a thread may send again, on a new connection
            adapters = list(self._adapters)
        for adapter in adapters:
            adapter.close()
