"""Flask: ``Kmagent(app)``, or ``kmagent_ext = Kmagent()`` then
``kmagent_ext.init_app(app)`` in an app factory.

It wraps ``app.wsgi_app`` in WSGIMiddleware, so each request starts with no current
person and leaves none behind (streamed responses included), and the request's person
is ``identify()``'s answer (called in the request context, no argument: ``current_user``,
``g`` and ``session`` are there) each time an event is recorded, so a login or logout
during the request counts from then on; a body streamed after the request context is
gone records for the answer at the request's end. Without a hook, Flask-Login's
signed-in user (``current_user.get_id()``) when the app uses Flask-Login.

Configuration, all optional: ``KMAGENT_API_KEY``, ``KMAGENT_CONFIG``, ``KMAGENT_SPOOL``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from ..client import KM
from ..identity import LookedUp, Request
from . import WSGIMiddleware, outer

log = logging.getLogger("kmagent.web")


class Kmagent:
    def __init__(self, app: Any = None, *, identify: Callable[[], Any] | None = None) -> None:
        self.identify = identify
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Any) -> None:
        key, config, spool = (app.config.get(f"KMAGENT_{name}")
                              for name in ("API_KEY", "CONFIG", "SPOOL"))
        if key is not None or config is not None or spool is not None:
            KM.init(key, config=config, spool=spool)
        app.wsgi_app = _FlaskRequests(app.wsgi_app, self)
        app.teardown_request(_last_look)
        app.extensions["kmagent"] = self

    def hook(self) -> Callable[[], Any]:
        return self.identify or _flask_login_user


class _FlaskRequests(WSGIMiddleware):
    """Each request's person is the extension's hook, asked when an event is recorded
    while the request context is there, and afterwards (a streamed body) what it
    answered last, at the latest when the request ended (teardown)."""

    def __init__(self, app: Callable, extension: Kmagent) -> None:
        super().__init__(app)
        self.extension = extension

    def request(self, environ: dict) -> Request:
        from flask import has_request_context
        hook = self.extension.hook()
        last: list[Any] = [None]

        def resolve() -> Any:
            if has_request_context():
                last[0] = hook()
            return last[0]
        environ["kmagent.resolve"] = resolve
        return Request(LookedUp(resolve, outer()))


def _last_look(error: BaseException | None) -> None:
    from flask import request
    resolve = request.environ.get("kmagent.resolve")
    if resolve is not None:
        try:
            resolve()
        except Exception:
            log.exception("the identify hook failed at the end of the request")


def _flask_login_user() -> Any:
    """Flask-Login's signed-in user, if the app uses Flask-Login."""
    from flask import current_app
    if getattr(current_app, "login_manager", None) is None:
        return None
    from flask_login import current_user
    return current_user.get_id() if current_user.is_authenticated else None
