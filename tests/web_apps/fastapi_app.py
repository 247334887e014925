"""FastAPI with sync endpoints (run in Starlette's thread pool) and async ones, wrapped
in ASGIMiddleware the way its README section says (see wsgi_app.py for the paths)."""

import asyncio
import os

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, StreamingResponse

from kmagent import KM, InvalidEvent
from kmagent.web import ASGIMiddleware

if os.environ.get("WEB_SPOOL"):
    KM.init(spool=os.environ["WEB_SPOOL"])

app = FastAPI()
app.add_middleware(ASGIMiddleware, identify=lambda scope: dict(scope["headers"]).get(
    b"x-user", b"").decode() or None)


def record(event: str, request: Request) -> str:
    try:
        KM.record(event, {"req": request.headers.get("x-req", "-")})
    except InvalidEvent:
        return "anonymous"
    return "recorded"


@app.get("/login", response_class=PlainTextResponse)
def login(request: Request) -> str:  # sync: in the thread pool
    KM.identify(request.headers["x-login"])
    return record("Logged In", request)


@app.get("/view", response_class=PlainTextResponse)
def view(request: Request) -> str:
    return record("Viewed Page", request)


@app.get("/boom")
def boom(request: Request) -> None:
    KM.identify(request.headers["x-login"])
    raise RuntimeError("the app failed")


@app.get("/stream")
async def stream(request: Request) -> StreamingResponse:
    async def body():
        yield b"first "
        await asyncio.sleep(0.01)
        yield record("Streamed", request).encode()
    return StreamingResponse(body(), media_type="text/plain")
