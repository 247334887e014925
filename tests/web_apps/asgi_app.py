"""The same app in plain ASGI, for uvicorn (see wsgi_app.py)."""

import asyncio
import os

from kmagent import KM, InvalidEvent
from kmagent.web import ASGIMiddleware

if os.environ.get("WEB_SPOOL"):
    KM.init(spool=os.environ["WEB_SPOOL"])


def header(scope: dict, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode()
    return None


def record(event: str, scope: dict) -> bytes:
    try:
        KM.record(event, {"req": header(scope, b"x-req") or "-"})
    except InvalidEvent:
        return b"anonymous"
    return b"recorded"


async def raw_app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = (await receive())["type"]  # lifespan.startup, lifespan.shutdown
            await send({"type": message + ".complete"})
            if message == "lifespan.shutdown":
                return
    path = scope["path"]
    if path in ("/boom", "/login"):
        KM.identify(header(scope, b"x-login"))
    if path == "/boom":
        raise RuntimeError("the app failed")
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain")]})
    if path == "/stream":
        await send({"type": "http.response.body", "body": b"first ", "more_body": True})
        await asyncio.sleep(0.01)  # other requests run meanwhile
        answer = record("Streamed", scope)
    else:
        answer = record("Logged In" if path == "/login" else "Viewed Page", scope)
    await send({"type": "http.response.body", "body": answer})


app = ASGIMiddleware(raw_app, identify=lambda scope: header(scope, b"x-user"))
