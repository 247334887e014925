"""An identity per web request (kmagent.web) and KM.identified, in-process: a real
WSGI server with one thread (wsgiref, so every request reuses it), ASGI apps driven
by hand, and the framework helpers through Django's, Flask's and Starlette's test
clients. Real gunicorn and uvicorn: test_web_servers.py."""

from __future__ import annotations

import asyncio
import threading
import wsgiref.simple_server

import pytest

import web_scenario
from kmagent import KM, InvalidEvent
from kmagent.web import ASGIMiddleware, WSGIMiddleware


def people(spool_path) -> list[tuple[str, str]]:
    """(event name, person) of every event recorded, oldest first."""
    return [pair for pairs in web_scenario.recorded(spool_path).values() for pair in pairs]


# --- KM.identified ---------------------------------------------------------------------

def test_identified_holds_inside_the_block_and_restores_what_was_before(km, spool_path):
    km.identify("outer")
    with km.identified("inner"):
        km.record("Inside")
        km.identify("changed inside")  # undone with the block, too
        km.record("Changed")
    km.record("After")
    assert people(spool_path) == [("Inside", "inner"), ("Changed", "changed inside"),
                                  ("After", "outer")]


def test_identified_restores_no_one_even_when_the_block_raises(km):
    with pytest.raises(RuntimeError):
        with km.identified("alice"):
            raise RuntimeError("boom")
    with pytest.raises(InvalidEvent, match="identify"):
        km.record("After")


def test_identified_refuses_what_is_not_a_person(km):
    with pytest.raises(InvalidEvent, match="person"):
        with km.identified(""):
            pass


def test_identified_is_per_thread_and_per_task(km, spool_path):
    async def task(person: str) -> None:
        with km.identified(person):
            await asyncio.sleep(0.01)  # the other task enters its block meanwhile
            km.record(f"Task {person}")

    async def both() -> None:
        await asyncio.gather(task("t1"), task("t2"))

    with km.identified("main"):
        worker = threading.Thread(target=lambda: asyncio.run(both()))
        worker.start()
        worker.join()
        km.record("Main")
    assert sorted(people(spool_path)) == [("Main", "main"), ("Task t1", "t1"),
                                          ("Task t2", "t2")]


# --- WSGI -----------------------------------------------------------------------------

class QuietHandler(wsgiref.simple_server.WSGIRequestHandler):
    def log_message(self, *args) -> None:
        pass


def test_wsgi_one_thread_serving_every_kind_of_request_leaks_no_one(km, spool_path):
    from web_apps.wsgi_app import app
    server = wsgiref.simple_server.make_server("127.0.0.1", 0, app,
                                               handler_class=QuietHandler)
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    steps = web_scenario.scenario()
    try:
        web_scenario.send_all(server.server_port, steps)
    finally:
        server.shutdown()
        server.server_close()
    web_scenario.check(spool_path, steps)


def call_wsgi(app, path="/", **headers) -> tuple[str, bytes]:
    environ = {"PATH_INFO": path, "REQUEST_METHOD": "GET",
               **{f"HTTP_{k.upper()}": v for k, v in headers.items()}}
    started = []
    body = app(environ, lambda status, headers, exc_info=None: started.append(status))
    try:
        return started[0], b"".join(body)
    finally:
        getattr(body, "close", lambda: None)()


def test_wsgi_a_streamed_body_keeps_its_person_until_closed(km, spool_path):
    closed = []

    def app(environ, start_response):
        KM.identify("streamer")
        start_response("200 OK", [])

        class Body:
            def __iter__(self):
                KM.record("Chunk")
                yield b"x"

            def close(self):
                KM.record("Closed")
                closed.append(True)
        return Body()

    environ = {"PATH_INFO": "/", "REQUEST_METHOD": "GET"}
    body = WSGIMiddleware(app)(environ, lambda *a: None)
    # Between the app's return and its body, the server records nothing of its own:
    with pytest.raises(InvalidEvent):
        KM.record("Server side")
    assert b"".join(body) == b"x"
    body.close()
    assert closed and people(spool_path) == [("Chunk", "streamer"), ("Closed", "streamer")]
    with pytest.raises(InvalidEvent):
        KM.record("After the request")


def records_inside(environ, start_response):
    """A WSGI app answering whether its request has a current person."""
    start_response("200 OK", [])
    try:
        KM.record("Inside")
    except InvalidEvent:
        return [b"anonymous"]
    return [b"recorded"]


def test_wsgi_a_request_starts_with_no_one_even_after_a_thread_identified(km, spool_path):
    km.identify("left over")  # by code outside any request, on this thread
    assert call_wsgi(WSGIMiddleware(records_inside)) == ("200 OK", b"anonymous")
    km.record("Outside")  # the thread's own person is back
    assert people(spool_path) == [("Outside", "left over")]


@pytest.mark.parametrize("hook", [lambda environ: 1 / 0, lambda environ: "",
                                  lambda environ: ["not", "a", "person"]])
def test_wsgi_a_failing_hook_costs_the_person_not_the_request(km, hook, caplog):
    assert call_wsgi(WSGIMiddleware(records_inside, identify=hook)) == ("200 OK", b"anonymous")
    assert "no current person" in caplog.text


def test_wsgi_an_integer_person_from_the_hook(km, spool_path):
    def app(environ, start_response):
        KM.record("Viewed")
        start_response("200 OK", [])
        return [b""]
    call_wsgi(WSGIMiddleware(app, identify=lambda environ: 42))
    assert people(spool_path) == [("Viewed", "42")]


# --- ASGI -----------------------------------------------------------------------------

async def call_asgi(app, path: str, headers: dict) -> list[dict]:
    scope = {"type": "http", "path": path, "method": "GET",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)
    await app(scope, receive, send)
    return sent


def test_asgi_concurrent_requests_in_one_loop_leak_no_one(km, spool_path):
    from web_apps.asgi_app import app
    steps = web_scenario.scenario()

    async def one(request_id, step) -> None:
        headers = {**step.headers, "X-Req": request_id}
        if step.status == 500:
            with pytest.raises(RuntimeError):
                await call_asgi(app, step.path, headers)
        else:
            await call_asgi(app, step.path, headers)

    async def together() -> None:
        await asyncio.gather(*(one(*s) for s in steps))
        with pytest.raises(InvalidEvent):  # nothing is left in the loop's own context
            KM.record("After")
    asyncio.run(together())
    web_scenario.check(spool_path, steps)


def test_asgi_identify_in_a_thread_pool_holds_for_the_rest_of_the_request(
        km, spool_path):
    async def app(scope, receive, send):
        loop = asyncio.get_running_loop()
        # What Starlette does for a sync endpoint: the context is copied into a thread.
        import contextvars

        def endpoint() -> None:
            KM.record("In the pool")
            KM.identify("pooled")  # a sync dependency finding the user, say
            KM.record("Identified in the pool")
        await loop.run_in_executor(None, contextvars.copy_context().run, endpoint)
        KM.record("After the pool")  # the async endpoint, in the request's own task
    hooked = ASGIMiddleware(app, identify=lambda scope: "visitor")
    asyncio.run(call_asgi(hooked, "/", {}))
    with pytest.raises(InvalidEvent):
        KM.record("After the request")
    assert people(spool_path) == [("In the pool", "visitor"),
                                  ("Identified in the pool", "pooled"),
                                  ("After the pool", "pooled")]


def test_identified_left_in_another_copy_of_the_context_does_not_raise(km, spool_path):
    # Starlette runs each half of a sync yield dependency (and each chunk of a sync
    # body) in a fresh copy of the request's context: the block is left in another.
    import contextvars

    def dependency():
        with KM.identified("dependency"):
            yield
    steps = dependency()
    with km.identified("request"):
        contextvars.copy_context().run(next, steps)
        contextvars.copy_context().run(next, steps, None)  # closes the block: no error
        KM.record("After")
    assert people(spool_path) == [("After", "request")]


def test_asgi_tasks_of_one_request_identify_each_their_own(km, spool_path):
    async def notify(person: str) -> None:
        KM.identify(person)
        await asyncio.sleep(0.01)  # the others identify meanwhile
        KM.record(f"Notified {person}")

    async def app(scope, receive, send):
        await asyncio.gather(*(notify(p) for p in ("ann", "ben", "cat")))
        KM.record("Fanned out")
    asyncio.run(call_asgi(ASGIMiddleware(app, identify=lambda s: "admin"), "/", {}))
    assert sorted(people(spool_path)) == [("Fanned out", "admin"), ("Notified ann", "ann"),
                                          ("Notified ben", "ben"), ("Notified cat", "cat")]


def test_wsgi_identified_in_a_streamed_body_holds_across_its_chunks(km, spool_path):
    def app(environ, start_response):
        start_response("200 OK", [])

        def body():
            yield b"a"
            with KM.identified("customer"):
                KM.record("First")
                yield b"b"
                KM.record("Second")  # after the server took a chunk
            KM.record("Outside the block")
            yield b"c"
        return body()
    hooked = WSGIMiddleware(app, identify=lambda environ: "staff")
    assert call_wsgi(hooked) == ("200 OK", b"abc")
    assert people(spool_path) == [("First", "customer"), ("Second", "customer"),
                                  ("Outside the block", "staff")]


def test_wsgi_nested_middleware_keeps_the_outer_person(km, spool_path):
    def app(environ, start_response):
        KM.record("Viewed")
        start_response("200 OK", [])
        return [b""]
    inner = WSGIMiddleware(app)  # a framework's, with no hook of its own
    outer = WSGIMiddleware(inner, identify=lambda environ: "from-the-gateway")
    call_wsgi(outer)
    assert people(spool_path) == [("Viewed", "from-the-gateway")]


def test_asgi_lifespan_passes_through(km):
    seen = []

    async def app(scope, receive, send):
        seen.append(scope["type"])
    asyncio.run(ASGIMiddleware(app)({"type": "lifespan"}, None, None))
    assert seen == ["lifespan"]


def test_the_web_helpers_import_no_framework_and_no_http_stack():
    import subprocess
    import sys
    from pathlib import Path
    code = ("import sys, kmagent.web, kmagent.web.django, kmagent.web.flask, "
            "kmagent.web.celery\n"
            "print(sorted(m for m in ('django', 'flask', 'celery', 'requests', 'http.client',"
            " 'watchdog', 'click') if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=Path(__file__).parent.parent, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
