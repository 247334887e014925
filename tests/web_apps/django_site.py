"""A Django site for the tests: views that record for the request's person, a view
that logs a user in and records after, streamed responses (sync and async)."""

import asyncio

from django.contrib.auth import get_user_model, login
from django.http import HttpResponse, StreamingHttpResponse
from django.urls import path

from kmagent import KM, InvalidEvent


def record(event: str) -> str:
    try:
        KM.record(event)
    except InvalidEvent:
        return "anonymous"
    return "recorded"


def view(request):
    return HttpResponse(record("Viewed Page"))


async def async_view(request):
    return HttpResponse(record("Viewed Async"))


def log_in(request):
    record("Before Login")
    login(request, get_user_model().objects.get(username=request.GET["user"]))
    return HttpResponse(record("Logged In"))


def identify(request):
    KM.identify(request.GET["person"])
    return HttpResponse(record("Identified"))


def stream(request):
    def body():
        yield b"first "
        yield record("Streamed").encode()
    return StreamingHttpResponse(body())


def stream_identified(request):
    def body():
        yield b"a "
        with KM.identified("customer"):
            yield b"b "
            record("Inside identified")  # after the server took a chunk
        yield b"c"
    return StreamingHttpResponse(body())


def download(request):
    KM.identify("downloader")

    def body():
        try:
            for _ in range(100):
                yield b"x" * 10
        finally:
            record("Download ended")  # finished, or the client went away
    return StreamingHttpResponse(body())


def log_out(request):
    from django.contrib.auth import logout
    record("Before Logout")
    logout(request)
    return HttpResponse(record("After Logout"))


def file_download(request):
    import io
    from django.http import FileResponse
    return FileResponse(io.BytesIO(b"file body"))


async def async_download(request):
    KM.identify("downloader")

    async def body():
        try:
            for _ in range(1000):
                yield b"x" * 10
        finally:
            record("Async Download ended")  # finished, or the client went away
    return StreamingHttpResponse(body())


async def async_stream(request):
    async def body():
        yield b"first "
        await asyncio.sleep(0)
        yield record("Streamed Async").encode()
    return StreamingHttpResponse(body())


urlpatterns = [path("view", view), path("async-view", async_view), path("login", log_in),
               path("identify", identify), path("stream", stream),
               path("async-stream", async_stream), path("stream-identified", stream_identified),
               path("download", download), path("logout", log_out),
               path("file", file_download), path("async-download", async_download)]
