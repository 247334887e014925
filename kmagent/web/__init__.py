"""An identity per web request: WSGI and ASGI middleware for ``KM``.

Web servers reuse threads, so a person set with ``KM.identify`` in one request would
still be current in the next request that thread serves. These middlewares give every
request a scope of its own (client.RequestScope): it starts with no person, or with the
``identify`` hook's answer, and whatever the request does to it (``KM.identify``)
ends with the request, also when the app raises, and, for a streamed response, only
once the body is closed (each chunk is produced inside the scope).

Framework helpers build on these: kmagent.web.django, kmagent.web.flask,
kmagent.web.celery (a scope per task). Nothing here imports a framework.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ..client import RequestScope
from ..errors import InvalidEvent

log = logging.getLogger("kmagent.web")

__all__ = ["ASGIMiddleware", "RequestScope", "WSGIMiddleware", "scope_for"]


def scope_for(identify: Callable[[Any], Any] | None, source: Any) -> RequestScope:
    """A fresh scope with ``identify(source)``'s person. A hook that fails or names no
    valid person costs the request its person (logged), never the request itself."""
    if identify is None:
        return RequestScope()
    try:
        person = identify(source)
    except Exception:
        log.exception("the identify hook failed; this request has no current person")
        return RequestScope()
    try:
        return RequestScope(person)
    except InvalidEvent as exc:
        log.warning("the identify hook's answer is not a person (%s); this request has "
                    "no current person", exc)
        return RequestScope()


class WSGIMiddleware:
    """``app`` with a current person per request (PEP 3333)."""

    def __init__(self, app: Callable, identify: Callable[[dict], Any] | None = None) -> None:
        self.app = app
        self.identify = identify

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        scope = scope_for(self.identify, environ)
        with scope.holding():
            body = self.app(environ, start_response)
        file_wrapper = environ.get("wsgi.file_wrapper")
        if isinstance(file_wrapper, type) and isinstance(body, file_wrapper):
            return body  # a file sent as it is (sendfile): no app code runs in it
        return ScopedBody(body, scope)


class ScopedBody:
    """A response body whose every chunk, and whose close(), runs in its request's
    scope: a generator that records while it streams records for that request."""

    def __init__(self, body: Iterable[bytes], scope: RequestScope) -> None:
        self._body = body
        self._iterator: Iterator[bytes] | None = None
        self._scope = scope

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        with self._scope.holding():
            if self._iterator is None:
                self._iterator = iter(self._body)
            return next(self._iterator)

    def close(self) -> None:
        close = getattr(self._body, "close", None)
        if close is not None:
            with self._scope.holding():
                close()


class ASGIMiddleware:
    """``app`` with a current person per HTTP request or websocket (ASGI 3). The
    request's tasks and thread-pool calls (a sync endpoint) share its scope."""

    def __init__(self, app: Callable, identify: Callable[[dict], Any] | None = None) -> None:
        self.app = app
        self.identify = identify

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope.get("type") not in ("http", "websocket"):
            await self.app(scope, receive, send)  # lifespan: no request, no person
            return
        with scope_for(self.identify, scope).holding():
            await self.app(scope, receive, send)
