"""Django: ``kmagent.web.django.KmagentMiddleware``, after Django's
AuthenticationMiddleware in ``MIDDLEWARE``.

Each request's current person is its signed-in user (``request.user``, by the
attribute ``KMAGENT["IDENTIFY_BY"]``, ``"pk"`` unless set), looked up when an event is
recorded: a user who logs in or out during the request is recorded as such from then
on (in an async request the user is looked up once, before the view). An anonymous
request has no person unless the app calls ``KM.identify``. Streamed
responses record for their request while they stream. Sync and async (ASGI) requests.

Settings, all optional (the configuration file is used without them)::

    KMAGENT = {"API_KEY": "...", "CONFIG": "/etc/kmagent/config.toml",
               "SPOOL": "/var/lib/kmagent/spool.db", "IDENTIFY_BY": "pk"}
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from ..client import KM, RequestScope

SETTINGS = ("API_KEY", "CONFIG", "SPOOL", "IDENTIFY_BY")


def _settings() -> dict[str, Any]:
    from django.conf import settings
    from django.core.exceptions import ImproperlyConfigured
    chosen = getattr(settings, "KMAGENT", {})
    if not isinstance(chosen, dict):
        raise ImproperlyConfigured("KMAGENT: must be a dict")
    unknown = sorted(set(chosen) - set(SETTINGS))
    if unknown:
        raise ImproperlyConfigured(f"KMAGENT: unknown key {unknown[0]!r}; known: "
                                   + ", ".join(SETTINGS))
    return chosen


class KmagentMiddleware:
    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable) -> None:
        self.get_response = get_response
        chosen = _settings()
        self.identify_by = chosen.get("IDENTIFY_BY", "pk")
        if not isinstance(self.identify_by, str) or not self.identify_by:
            from django.core.exceptions import ImproperlyConfigured
            raise ImproperlyConfigured("KMAGENT['IDENTIFY_BY']: must be an attribute name")
        if any(chosen.get(name) is not None for name in ("API_KEY", "CONFIG", "SPOOL")):
            KM.init(chosen.get("API_KEY"), config=chosen.get("CONFIG"),
                    spool=chosen.get("SPOOL"))
        self._async = inspect.iscoroutinefunction(get_response)
        if self._async:
            from asgiref.sync import markcoroutinefunction
            markcoroutinefunction(self)

    def _scope(self, request: Any) -> RequestScope:
        def signed_in() -> Any:
            user = getattr(request, "user", None)
            if user is None or not getattr(user, "is_authenticated", False):
                return None
            return getattr(user, self.identify_by)
        return RequestScope(resolve=signed_in)

    def __call__(self, request: Any) -> Any:
        if self._async:
            return self.__acall__(request)
        scope = self._scope(request)
        with scope.holding():
            response = self.get_response(request)
        return _streamed_in(scope, response)

    async def __acall__(self, request: Any) -> Any:
        if hasattr(request, "auser"):
            # Events are recorded by sync calls, which may not query the database from
            # an event loop: the user is found now, as Django's own alogin() leaves it.
            request.user = await request.auser()
        scope = self._scope(request)
        with scope.holding():
            response = await self.get_response(request)
        return _streamed_in(scope, response)


def _streamed_in(scope: RequestScope, response: Any) -> Any:
    """A streamed response's chunks produced inside its request's scope."""
    if getattr(response, "streaming", False):
        content = response.streaming_content
        if getattr(response, "is_async", False):
            response.streaming_content = _async_chunks(scope, content)
        else:
            response.streaming_content = _chunks(scope, content)
    return response


def _chunks(scope: RequestScope, content: Iterator[bytes]) -> Iterator[bytes]:
    iterator = iter(content)
    while True:
        with scope.holding():
            try:
                chunk = next(iterator)
            except StopIteration:
                return
        yield chunk


async def _async_chunks(scope: RequestScope, content: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    iterator = aiter(content)
    while True:
        with scope.holding():
            try:
                chunk = await anext(iterator)
            except StopAsyncIteration:
                return
        yield chunk
