"""Flask: ``Kmagent(app)``, or ``kmagent_ext = Kmagent()`` then
``kmagent_ext.init_app(app)`` in an app factory.

It wraps ``app.wsgi_app`` in WSGIMiddleware, so each request starts with no current
person and leaves none behind (streamed responses included), and before each request
calls ``identify()`` (in the request context, no argument: ``current_user``, ``g`` and
``session`` are there) for the request's person. Without a hook, Flask-Login's signed-in
user (``current_user.get_id()``) is the person when the app uses Flask-Login.

Configuration, all optional: ``KMAGENT_API_KEY``, ``KMAGENT_CONFIG``, ``KMAGENT_SPOOL``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from ..client import KM
from . import WSGIMiddleware

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
        app.wsgi_app = WSGIMiddleware(app.wsgi_app)
        app.before_request(self._identify_request)
        app.extensions["kmagent"] = self

    def _identify_request(self) -> None:
        hook = self.identify or _flask_login_user
        try:
            person = hook()
            if person is not None:
                KM.identify(person)  # this request's scope: for the rest of it only
        except Exception:
            log.exception("the identify hook failed; this request has no current person")


def _flask_login_user() -> Any:
    """Flask-Login's signed-in user, if the app uses Flask-Login."""
    from flask import current_app
    if getattr(current_app, "login_manager", None) is None:
        return None
    from flask_login import current_user
    return current_user.get_id() if current_user.is_authenticated else None
