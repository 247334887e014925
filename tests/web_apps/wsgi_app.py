"""A plain WSGI app for the web tests (under gunicorn, and in-process): every path
records for the request's person, as a real app would. Headers: ``X-Req`` names the
request (a property of its event), ``X-User`` is what the identify hook reads,
``X-Login`` who /login and /boom identify."""

import os

from kmagent import KM, InvalidEvent
from kmagent.web import WSGIMiddleware

if os.environ.get("WEB_SPOOL"):
    KM.init(spool=os.environ["WEB_SPOOL"])  # at import: before the fork under --preload


def record(event: str, environ: dict) -> bytes:
    """Record for the current person; an anonymous request records nothing."""
    try:
        KM.record(event, {"req": environ.get("HTTP_X_REQ", "-")})
    except InvalidEvent:
        return b"anonymous"
    return b"recorded"


def raw_app(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/boom":
        KM.identify(environ["HTTP_X_LOGIN"])
        raise RuntimeError("the app failed")
    if path == "/login":
        KM.identify(environ["HTTP_X_LOGIN"])
    if path == "/stream":
        start_response("200 OK", [("Content-Type", "text/plain")])

        def body():
            yield b"first "
            yield record("Streamed", environ)
        return body()
    answer = record("Logged In" if path == "/login" else "Viewed Page", environ)
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(answer)))])
    return [answer]


app = WSGIMiddleware(raw_app, identify=lambda environ: environ.get("HTTP_X_USER"))
