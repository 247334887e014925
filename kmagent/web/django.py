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
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from ..client import KM
from ..identity import LookedUp, Request
from . import RequestBody, outer

log = logging.getLogger("kmagent.web")

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

    def _request(self, request: Any) -> Request:
        def signed_in() -> Any:
            user = getattr(request, "user", None)
            if user is None or not getattr(user, "is_authenticated", False):
                return None
            return getattr(user, self.identify_by)
        # Inside an outer middleware's request, its person holds for anonymous visitors.
        return Request(LookedUp(signed_in, outer()))

    def __call__(self, request: Any) -> Any:
        if self._async:
            return self.__acall__(request)
        if type(request).__name__ == "ASGIRequest":
            # Sync middleware under ASGI (a sync-only one follows): an async view would
            # record from an event loop, where request.user may not query the database.
            # Here, in Django's worker thread, it may: the user is found now.
            try:
                getattr(request.user, "is_authenticated", None)
            except Exception:
                log.exception("the signed-in user could not be found; this request has "
                              "no current person")
        carried = self._request(request)
        with carried.entered():
            response = self.get_response(request)
        return _streamed_in(carried, response)

    async def __acall__(self, request: Any) -> Any:
        if hasattr(request, "auser"):
            # Events are recorded by sync calls, which may not query the database from
            # an event loop: the user is found now, as Django's own alogin() leaves it.
            try:
                request.user = await request.auser()
            except Exception:  # the session store is down: the view decides, not us
                log.exception("the signed-in user could not be found; this request has "
                              "no current person")
        carried = self._request(request)
        with carried.entered():
            response = await self.get_response(request)
        return _streamed_in(carried, response)


def _streamed_in(carried: Request, response: Any) -> Any:
    """A streamed response's chunks, and its close() (the view's generator's finally,
    when the client goes away), run inside its request. A file (FileResponse) is left
    as it is: no app code runs in it, and the server may sendfile() it."""
    if not getattr(response, "streaming", False) or getattr(response, "file_to_stream",
                                                             None) is not None:
        return response
    content = response.streaming_content
    # The view's own iterator: Django wraps it (map() or an async generator) without
    # closing it, and a client that goes away leaves it suspended, to be finalized
    # whenever, outside the request. The response's close() closes it inside.
    original = getattr(response, "_iterator", None)
    is_async = getattr(response, "is_async", False)
    if is_async:
        response.streaming_content = _async_chunks(carried, content)
    else:
        response.streaming_content = RequestBody(content, carried)  # as WSGI bodies
    close = response.close

    def closed_inside() -> None:
        with carried.entered():
            if is_async and hasattr(original, "aclose"):
                from asgiref.sync import async_to_sync

                async def aclose() -> None:
                    await original.aclose()
                try:
                    async_to_sync(aclose)()  # its finally runs here, inside
                except Exception:
                    log.exception("closing the streamed response failed")
            close()
    response.close = closed_inside  # the handler calls it once the body is done
    return response


async def _async_chunks(carried: Request,
                        content: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    iterator = aiter(content)
    while True:
        with carried.entered():
            try:
                chunk = await anext(iterator)
            except StopAsyncIteration:
                return
        yield chunk
