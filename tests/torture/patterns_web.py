"""Web app patterns: a person per request (kmagent.web), WSGI and ASGI."""

from __future__ import annotations

import asyncio
import json
import os
import random
import threading
from typing import Callable

from .app import KMAPI, App, construct
from .registry import pattern

# -- web apps: a person per request (kmagent.web) ----------------------------------

WEB_KINDS = ("login", "hook", "anonymous", "stream", "stream_anonymous", "raises")


def web_record(app: App, rng: random.Random, expected: str | None) -> None:
    """One call in a request, for its current person: ``expected`` (the oracle checks
    the event's _p against it) or, in an anonymous request, no one: then KM must refuse,
    and an event recorded for anyone is a leak."""
    from kmagent import KM, InvalidEvent
    if expected is not None:
        app.emit(KMAPI(expected, identify=False), rng, kinds="eeees")
        return
    tid = app.tid()
    try:
        KM.record("Viewed Homepage", {"tid": tid, "who": "no one"})
    except InvalidEvent:
        return
    app.ledger.line("bad", tid, "LeakedPerson", json.dumps(
        "an anonymous request recorded for someone (a previous request's person?)"))


def web_request(app: App, rng: random.Random, kind: str, who: str, start: Callable,
                resume: Callable[[Callable[[], None]], None]) -> None:
    """What the app does for a request of ``kind``; ``start()`` begins the answer and
    ``resume(fn)`` runs ``fn`` later, as the streamed body."""
    from kmagent import KM
    if kind in ("login", "raises"):
        KM.identify(who)  # a sign-in, or the last thing a request that fails does
    if kind == "raises":
        raise RuntimeError("the app failed")
    start()
    expected = None if kind in ("anonymous", "stream_anonymous") else who
    if kind.startswith("stream"):
        resume(lambda: web_record(app, rng, expected))
    else:
        web_record(app, rng, expected)


def web_hook(headers: Callable[[str], str | None]) -> str | None:
    """The identify hook: the person a "hook" or "stream" request names in X-User."""
    return headers("x-user")


def web_visits(app: App, visit: Callable[[str, str, int], None], share: float) -> None:
    """Requests of every kind, one after another, until the app's end."""
    rng = random.Random(f"{app.seed}/{app.proc}/visits")
    n = 0
    while app.running():
        kind = rng.choice(WEB_KINDS)
        visit(kind, f"web-{kind}-{os.getpid()}-{n}", n)
        n += 1
        app.pace(rng, share)


@pattern("web_wsgi", "WSGIMiddleware, a server with one thread: every kind of request")
def pat_web_wsgi(app: App) -> None:
    import http.client
    import wsgiref.simple_server
    from kmagent import KM
    from kmagent.web import WSGIMiddleware
    construct(app, "KM.init()", lambda: KM.init(config=app.config))

    def raw(environ, start_response):
        kind, who = environ["HTTP_X_KIND"], environ["HTTP_X_WHO"]
        rng = random.Random(f"{app.seed}/{app.proc}/{environ['HTTP_X_N']}")
        chunks: list[Callable[[], None]] = []
        web_request(app, rng, kind, who, lambda: start_response("200 OK", []),
                    chunks.append)

        def body():
            yield b"first"
            for chunk in chunks:
                chunk()
                yield b" more"
        return body()

    class Quiet(wsgiref.simple_server.WSGIRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def log_exception(self, *args) -> None:  # "raises" is on purpose
            pass
    hook = WSGIMiddleware(raw, identify=lambda e: web_hook(
        lambda name: e.get("HTTP_" + name.upper().replace("-", "_"))))
    server = wsgiref.simple_server.make_server("127.0.0.1", 0, hook, handler_class=Quiet)
    server.handle_error = lambda *args: None
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def visit(kind: str, who: str, n: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=30)
        headers = {"X-Kind": kind, "X-Who": who, "X-N": str(n)}
        if kind in ("hook", "stream"):
            headers["X-User"] = who
        try:
            conn.request("GET", "/", headers=headers)
            conn.getresponse().read()
        except (http.client.HTTPException, OSError):
            pass  # "raises" answers 500 or drops the connection
        finally:
            conn.close()
    try:
        web_visits(app, visit, 1.0)
    finally:
        server.shutdown()


@pattern("web_asgi", "ASGIMiddleware: concurrent requests in one loop, sync work in a pool")
def pat_web_asgi(app: App) -> None:
    import contextvars
    from kmagent import KM
    from kmagent.web import ASGIMiddleware
    construct(app, "KM.init()", lambda: KM.init(config=app.config))

    async def raw(scope, receive, send):
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        rng = random.Random(f"{app.seed}/{app.proc}/{headers['x-n']}")
        later: list[Callable[[], None]] = []
        loop = asyncio.get_running_loop()

        def request() -> None:
            web_request(app, rng, headers["x-kind"], headers["x-who"], lambda: None,
                        later.append)
        if rng.random() < 0.5:  # a sync endpoint, in a thread pool as Starlette runs it
            await loop.run_in_executor(None, contextvars.copy_context().run, request)
        else:
            request()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for chunk in later:
            await asyncio.sleep(rng.random() / 100)  # other requests run meanwhile
            chunk()
        await send({"type": "http.response.body", "body": b"done"})

    middleware = ASGIMiddleware(raw, identify=lambda scope: web_hook(
        lambda name: dict(scope["headers"]).get(name.encode(), b"").decode() or None))

    async def one(kind: str, who: str, n: int) -> None:
        headers = {"x-kind": kind, "x-who": who, "x-n": str(n)}
        if kind in ("hook", "stream"):
            headers["x-user"] = who
        scope = {"type": "http", "path": "/", "method": "GET",
                 "headers": [(k.encode(), v.encode()) for k, v in headers.items()]}

        async def receive():
            return {"type": "http.request", "body": b""}

        async def send(message):
            pass
        try:
            await middleware(scope, receive, send)
        except RuntimeError:
            pass  # "raises"

    async def main() -> None:
        pending: set[asyncio.Task] = set()

        def visit(kind: str, who: str, n: int) -> None:
            pending.add(asyncio.ensure_future(one(kind, who, n)))
        rng = random.Random(f"{app.seed}/{app.proc}/visits")
        n = 0
        while app.running():
            kind = rng.choice(WEB_KINDS)
            visit(kind, f"web-{kind}-{os.getpid()}-{n}", n)
            n += 1
            await asyncio.sleep(min(0.25, rng.expovariate(max(1.0, app.rate))))
            pending = {task for task in pending if not task.done()}
        await asyncio.gather(*pending)
    asyncio.run(main())
