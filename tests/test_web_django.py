"""kmagent.web.django.KmagentMiddleware through Django's test clients (sync and
async): the signed-in user is the person, anonymous requests have none, a login
during the request counts from then on, streamed responses keep their person."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import pytest

django = pytest.importorskip("django")
from django.conf import settings  # noqa: E402

if not settings.configured:
    settings.configure(
        DEBUG=False, SECRET_KEY="test", ROOT_URLCONF="web_apps.django_site",
        ALLOWED_HOSTS=["*"], USE_TZ=True,
        DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", 
                             # a file: async views run in other threads
                             "NAME": str(Path(tempfile.mkdtemp()) / "site.db")}},
        INSTALLED_APPS=["django.contrib.auth", "django.contrib.contenttypes",
                        "django.contrib.sessions"],
        MIDDLEWARE=["django.contrib.sessions.middleware.SessionMiddleware",
                    "django.contrib.auth.middleware.AuthenticationMiddleware",
                    "kmagent.web.django.KmagentMiddleware"],
        PASSWORD_HASHERS=["django.contrib.auth.hashers.MD5PasswordHasher"])
    django.setup()

from django.core.exceptions import ImproperlyConfigured  # noqa: E402
from django.test import AsyncClient, Client, override_settings  # noqa: E402

from kmagent import KM  # noqa: E402
from test_web import people  # noqa: E402


@pytest.fixture
def users(spool_path):
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    call_command("migrate", verbosity=0)
    model = get_user_model()
    model.objects.all().delete()
    alice = model.objects.create_user("alice", "alice@example.com", "pw")
    bob = model.objects.create_user("bob", "bob@example.com", "pw")
    saved = KM._client
    with override_settings(KMAGENT={"SPOOL": str(spool_path)}):
        yield alice, bob
    KM.clear_identity()
    current, KM._client = KM._client, saved
    if current is not None and current is not saved:
        current.close()


def test_the_signed_in_user_and_then_an_anonymous_visitor(users, spool_path):
    alice, _ = users
    signed_in, anonymous = Client(), Client()
    signed_in.force_login(alice)
    assert signed_in.get("/view").content == b"recorded"
    assert anonymous.get("/view").content == b"anonymous"
    assert signed_in.get("/view").content == b"recorded"
    assert anonymous.get("/view").content == b"anonymous"
    assert people(spool_path) == [("Viewed Page", str(alice.pk))] * 2


def test_a_login_during_the_request_counts_from_then_on(users, spool_path):
    _, bob = users
    assert Client().get("/login", {"user": "bob"}).content == b"recorded"
    assert people(spool_path) == [("Logged In", str(bob.pk))]


def test_identify_inside_a_request_lasts_for_that_request_only(users, spool_path):
    client = Client()
    assert client.get("/identify", {"person": "visitor-7"}).content == b"recorded"
    assert client.get("/view").content == b"anonymous"
    assert people(spool_path) == [("Identified", "visitor-7")]


def test_a_streamed_response_records_for_its_user(users, spool_path):
    alice, _ = users
    client = Client()
    client.force_login(alice)
    response = client.get("/stream")
    assert b"".join(response.streaming_content) == b"first recorded"
    assert Client().get("/view").content == b"anonymous"
    assert people(spool_path) == [("Streamed", str(alice.pk))]


def test_identify_by_another_attribute(users, spool_path):
    alice, _ = users
    with override_settings(KMAGENT={"SPOOL": str(spool_path), "IDENTIFY_BY": "email"}):
        client = Client()
        client.force_login(alice)
        client.get("/view")
    assert people(spool_path) == [("Viewed Page", "alice@example.com")]


def test_async_requests_and_async_streams(users, spool_path):
    alice, _ = users
    from asgiref.sync import sync_to_async

    async def visit() -> tuple[bytes, bytes, bytes]:
        signed_in, anonymous = AsyncClient(), AsyncClient()
        await sync_to_async(signed_in.force_login)(alice)
        first = (await signed_in.get("/async-view")).content
        second = (await anonymous.get("/async-view")).content
        streamed = await signed_in.get("/async-stream")
        body = b"".join([chunk async for chunk in streamed.streaming_content])
        return first, second, body
    assert asyncio.run(visit()) == (b"recorded", b"anonymous", b"first recorded")
    assert people(spool_path) == [("Viewed Async", str(alice.pk)),
                                  ("Streamed Async", str(alice.pk))]


def test_an_unknown_setting_is_refused_naming_it(users, spool_path):
    with override_settings(KMAGENT={"SPOOL": str(spool_path), "API_KY": "x"}):
        with pytest.raises(ImproperlyConfigured, match="API_KY"):
            Client().get("/view")


def test_identified_in_a_streamed_body_holds_across_its_chunks(users, spool_path):
    response = Client().get("/stream-identified")
    assert b"".join(response.streaming_content) == b"a b c"
    assert people(spool_path) == [("Inside identified", "customer")]


def test_a_stream_closed_early_records_for_its_request(users, spool_path):
    from django.core.handlers.wsgi import WSGIHandler
    from wsgiref.util import setup_testing_defaults
    environ: dict = {}
    setup_testing_defaults(environ)
    environ["PATH_INFO"] = "/download"
    response = WSGIHandler()(environ, lambda *args: None)
    chunks = iter(response)
    next(chunks), next(chunks)
    response.close()  # the client went away: the view's finally runs
    assert people(spool_path) == [("Download ended", "downloader")]


def test_a_logout_during_the_request_counts_from_then_on(users, spool_path):
    alice, _ = users
    client = Client()
    client.force_login(alice)
    assert client.get("/logout").content == b"anonymous"
    assert people(spool_path) == [("Before Logout", str(alice.pk))]


def test_a_file_response_is_left_to_the_server(users):
    from django.core.handlers.wsgi import WSGIHandler
    from wsgiref.util import setup_testing_defaults
    environ: dict = {}
    setup_testing_defaults(environ)
    environ["PATH_INFO"] = "/file"
    sent = []

    class FileWrapper:  # what a server's wsgi.file_wrapper gets, to sendfile() it
        def __init__(self, filelike, block_size=8192):
            sent.append(filelike)
            self.filelike = filelike

        def __iter__(self):
            return iter([self.filelike.read()])
    environ["wsgi.file_wrapper"] = FileWrapper
    response = WSGIHandler()(environ, lambda *args: None)
    assert sent and b"".join(response) == b"file body"


def test_an_async_request_whose_user_cannot_be_found_is_still_served(users, caplog):
    from unittest import mock

    async def broken(*args, **kwargs):
        raise ConnectionError("the session store is down")

    async def visit() -> bytes:
        with mock.patch("django.contrib.auth.aget_user", broken):
            return (await AsyncClient().get("/async-view")).content
    assert asyncio.run(visit()) == b"anonymous"
    assert "could not be found" in caplog.text


def test_sync_mode_under_asgi_still_finds_the_user_for_an_async_view(users, spool_path):
    # A sync-only middleware after ours makes Django run ours in sync mode, under ASGI.
    alice, _ = users
    from django.contrib.sessions.backends.db import SessionStore
    from django.core.handlers.asgi import ASGIHandler

    def sync_only(get_response):
        return lambda request: get_response(request)
    session = SessionStore()
    session["_auth_user_id"] = str(alice.pk)
    session["_auth_user_backend"] = "django.contrib.auth.backends.ModelBackend"
    session["_auth_user_hash"] = alice.get_session_auth_hash()
    session.save()
    chain = [*settings.MIDDLEWARE, "test_web_django.sync_only_middleware"]
    globals()["sync_only_middleware"] = sync_only

    async def visit() -> bytes:
        scope = {"type": "http", "method": "GET", "path": "/async-view", "query_string": b"",
                 "headers": [(b"cookie", f"sessionid={session.session_key}".encode())]}
        sent: list[dict] = []
        requests = [{"type": "http.request", "body": b""}]

        async def receive():
            if requests:
                return requests.pop()
            await asyncio.Event().wait()  # no disconnect: the client waits

        async def send(message):
            sent.append(message)
        await ASGIHandler()(scope, receive, send)
        return b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    with override_settings(MIDDLEWARE=chain, KMAGENT={"SPOOL": str(spool_path)}):
        assert asyncio.run(visit()) == b"recorded"
    assert people(spool_path) == [("Viewed Async", str(alice.pk))]


def test_an_async_stream_cut_off_by_the_client_records_for_its_request(users, spool_path):
    import gc
    from django.core.handlers.asgi import ASGIHandler

    async def visit() -> None:
        gone = asyncio.Event()
        chunks: list[dict] = []
        requests = [{"type": "http.request", "body": b""}]

        async def receive():
            if requests:
                return requests.pop()
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            if message["type"] == "http.response.body":
                chunks.append(message)
                await asyncio.sleep(0.02)  # a slow client
                if len(chunks) == 3:
                    gone.set()
        scope = {"type": "http", "method": "GET", "path": "/async-download",
                 "query_string": b"", "headers": []}
        await asyncio.wait_for(ASGIHandler()(scope, receive, send), 10)
        await asyncio.sleep(0.1)
        gc.collect()
        await asyncio.sleep(0.1)
    asyncio.run(visit())
    assert people(spool_path) == [("Async Download ended", "downloader")]
