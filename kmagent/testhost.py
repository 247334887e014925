"""A stand-in tracking host on 127.0.0.1, for trying kmagent out and for its tests.

It answers like Kissmetrics (200 and a 1x1 GIF whatever the parameters) and keeps every
request target it received, byte for byte. ``status`` and ``delay`` make it fail or be
slow; ``fail_first`` makes the first N requests fail; ``fail_rate`` answers that share
of requests with 503 and ``reset_rate`` resets that share of connections (TCP RST, no
answer), at random. ``outage(seconds)`` fails every request for a while;
``retry_after`` adds that Retry-After header to every failure; ``answer_for`` picks
the status per request target (e.g. 400 for some events). Like Apache (LimitRequestLine),
it answers a request line over 8,190 bytes with ``414 Request-URI Too Long`` and closes
the connection; such a request is kept too, with status 414.
"""

from __future__ import annotations

import random
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass
from functools import cached_property
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import parse_qsl, urlsplit

from .events import MAX_REQUEST_LINE

# The 1x1 transparent GIF the real host answers with.
PIXEL = (b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00"
         b"\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;")


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that hangs up mid-request (e.g. a SIGKILLed agent) is no error here


@dataclass(frozen=True)
class Received:
    """One request as the host saw it."""

    target: str  # the raw request target, e.g. "/e?_k=KEY&_p=bob&..."
    at: float
    status: int  # 0: the connection was reset instead of answered
    user_agent: str | None = None

    @property
    def path(self) -> str:
        return urlsplit(self.target).path.lstrip("/")

    @cached_property  # tests poll it for thousands of requests
    def params(self) -> list[tuple[str, str]]:
        return parse_qsl(urlsplit(self.target).query, keep_blank_values=True)


class StandInHost:
    """``with StandInHost() as host: ... host.url ... host.received``"""

    def __init__(self, port: int = 0, *, status: int = 200, delay: float = 0.0,
                 fail_first: int = 0, fail_rate: float = 0.0, reset_rate: float = 0.0,
                 seed: int | None = None,
                 on_request: Callable[[Received], None] | None = None,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.status = status
        self.delay = delay
        self.fail_first = fail_first
        self.fail_rate = fail_rate
        self.reset_rate = reset_rate
        self._random = random.Random(seed)
        self.received: list[Received] = []
        self.started = 0  # requests begun (``received`` has them once answered)
        self.retry_after: str | None = None
        self.answer_for: Callable[[str], int | None] | None = None
        self.outage_status = 503  # or 0: reset connections during an outage
        self._outage_until = 0.0
        self._lock = threading.Lock()
        self._on_request = on_request
        host = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, like the real host
            # Headers and body go out in separate writes: without TCP_NODELAY, Nagle's
            # algorithm holds the body for the client's delayed ACK (~40 ms a request).
            disable_nagle_algorithm = True

            def do_GET(self) -> None:
                status = host._answer(self.path)
                if status == 0:  # reset: RST instead of an answer
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                               struct.pack("ii", 1, 0))
                    self.close_connection = True
                    host._record(Received(self.path, time.time(), 0,
                                          self.headers.get("User-Agent")))
                    return
                if host.delay:
                    time.sleep(host.delay)
                body = PIXEL if status == 200 else b""
                self.send_response(status)
                self.send_header("Content-Type", "image/gif")
                self.send_header("Content-Length", str(len(body)))
                if status != 200 and host.retry_after is not None:
                    self.send_header("Retry-After", host.retry_after)
                # Recorded before the answer goes out, so that a client that has its
                # answer always finds its request here.
                host._record(Received(self.path, time.time(), status,
                                      self.headers.get("User-Agent")))
                self.end_headers()
                self.wfile.write(body)

            def parse_request(self) -> bool:
                # http.server itself refuses only lines over 64 KiB; real hosts, 8 KiB.
                if len(self.raw_requestline.rstrip(b"\r\n")) > MAX_REQUEST_LINE:
                    self.requestline = self.request_version = self.command = ""
                    self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG)
                    return False
                return super().parse_request()

            def send_error(self, code: int, message: str | None = None,
                           explain: str | None = None) -> None:
                if code == HTTPStatus.REQUEST_URI_TOO_LONG:  # ours, or http.server's
                    words = self.raw_requestline.split(b" ", 2)
                    target = words[1].decode("iso-8859-1") if len(words) > 1 else ""
                    with host._lock:
                        host.started += 1
                    host._record(Received(target, time.time(), int(code)))
                super().send_error(code, message, explain)

            def log_message(self, format: str, *args: object) -> None:
                pass  # requests are reported through on_request instead

        self._server = _QuietServer(("127.0.0.1", port), Handler)
        self._scheme = "http"
        if ssl_context is not None:
            self._server.socket = ssl_context.wrap_socket(self._server.socket, server_side=True)
            self._scheme = "https"
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.1}, daemon=True)

    def outage(self, seconds: float) -> None:
        """Fail every request (``outage_status``) for the next ``seconds``."""
        self._outage_until = time.time() + seconds

    def _answer(self, target: str) -> int:
        with self._lock:
            self.started += 1
            if time.time() < self._outage_until:
                return self.outage_status
            if self.answer_for is not None:
                chosen = self.answer_for(target)
                if chosen is not None:
                    return chosen
            if self.fail_first > 0:
                self.fail_first -= 1
                return 503
            draw = self._random.random()
            if draw < self.reset_rate:
                return 0
            if draw < self.reset_rate + self.fail_rate:
                return 503
            return self.status

    def _record(self, request: Received) -> None:
        with self._lock:
            self.received.append(request)
        if self._on_request:
            self._on_request(request)

    @property
    def url(self) -> str:
        return f"{self._scheme}://127.0.0.1:{self._server.server_address[1]}"

    def delivered(self) -> list[Received]:
        """Requests answered with a 2xx."""
        with self._lock:
            return [r for r in self.received if 200 <= r.status < 300]

    def start(self) -> "StandInHost":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "StandInHost":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
