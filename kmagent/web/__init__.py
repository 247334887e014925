"""An identity per web request: WSGI and ASGI middleware for ``KM``.

Web servers reuse threads, so a person set with ``KM.identify`` in one request would
still be current in the next request that thread serves. These middlewares run every
request as a client.Request of its own: it starts with no person, or with the
``identify`` hook's answer (inside another middleware's request, a hook that names no
one keeps that request's person), and whatever the request makes current ends with
it, also when the app raises, and, for a streamed response, only once the body is
closed: each chunk is produced inside the request, with what the last one left.

Framework helpers build on these: kmagent.web.django, kmagent.web.flask,
kmagent.web.celery (a scope per task). Nothing here imports a framework.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ..identity import Current, Request, current, current_request
from ..errors import InvalidEvent
from ..events import check_person

log = logging.getLogger("kmagent.web")

__all__ = ["ASGIMiddleware", "Request", "WSGIMiddleware", "request_for"]


def outer() -> Current:
    """Inside another middleware's request, what is current there: its person holds
    unless this one's hook names someone."""
    return current() if current_request() is not None else None


def request_for(identify: Callable[[Any], Any] | None, source: Any) -> Request:
    """A request whose person is ``identify(source)``'s answer; with no answer, no
    one, or inside an outer request, that request's current person. A hook that fails
    or names no valid person costs the request its person (logged), never the request."""
    if identify is None:
        return Request(outer())
    try:
        person = identify(source)
    except Exception:
        log.exception("the identify hook failed; this request has no current person")
        return Request(outer())
    if person is None:
        return Request(outer())
    try:
        return Request(check_person("person", person))
    except InvalidEvent as exc:
        log.warning("the identify hook's answer is not a person (%s); this request has "
                    "no current person", exc)
        return Request(outer())


class WSGIMiddleware:
    """``app`` with a current person per request (PEP 3333)."""

    def __init__(self, app: Callable, identify: Callable[[dict], Any] | None = None) -> None:
        self.app = app
        self.identify = identify

    def request(self, environ: dict) -> Request:
        """The Request this ``environ`` runs as (a framework helper may refine it)."""
        return request_for(self.identify, environ)

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        request = self.request(environ)
        with request.entered():
            body = self.app(environ, start_response)
        file_wrapper = environ.get("wsgi.file_wrapper")
        if isinstance(file_wrapper, type) and isinstance(body, file_wrapper):
            return body  # a file sent as it is (sendfile): no app code runs in it
        return RequestBody(body, request)


class RequestBody:
    """A response body whose every chunk, and whose close(), runs inside its request:
    a generator that records while it streams records for that request."""

    def __init__(self, body: Iterable[bytes], request: Request) -> None:
        self._body = body
        self._iterator: Iterator[bytes] | None = None
        self._request = request

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        with self._request.entered():
            if self._iterator is None:
                self._iterator = iter(self._body)
            return next(self._iterator)

    def close(self) -> None:
        close = getattr(self._body, "close", None)
        if close is not None:
            with self._request.entered():
                close()


class ASGIMiddleware:
    """``app`` with a current person per HTTP request or websocket (ASGI 3). The
    request's tasks and thread-pool calls (a sync endpoint) start with its person;
    what one of them identifies is its own, as everywhere with KM."""

    def __init__(self, app: Callable, identify: Callable[[dict], Any] | None = None) -> None:
        self.app = app
        self.identify = identify

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope.get("type") not in ("http", "websocket"):
            await self.app(scope, receive, send)  # lifespan: no request, no person
            return
        with request_for(self.identify, scope).entered():
            await self.app(scope, receive, send)
