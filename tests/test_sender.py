"""The sender against real loopback hosts: headers, TLS verification, redirects,
timeouts, the API key kept out of errors, proxies (test_sender_limit.py: no request
line over 8,190 bytes is sent)."""

from __future__ import annotations

import random
import socket
import ssl
import threading
import time

import pytest
import trustme
from helpers import free_port, sender_for

from kmagent import __version__
from kmagent.sender import PERMANENT, backoff_delay, redact
from kmagent.spool import Claimed
from kmagent.testhost import StandInHost

ITEM = Claimed(1, "e", "_p=bob&_n=Signed%20Up&_t=1700000000&_d=1", None, 0.0, 1)


def test_request_is_the_stored_bytes_with_key_first_and_a_user_agent(host):
    outcome = sender_for(host.url).send(ITEM)
    assert outcome.delivered and outcome.status == 200
    [request] = host.received
    assert request.target == "/e?_k=secret-key&_p=bob&_n=Signed%20Up&_t=1700000000&_d=1"
    assert request.user_agent == f"kmagent/{__version__}"


def test_an_event_with_its_own_key_is_sent_with_it(host):
    own = Claimed(2, "a", "_p=a&_n=b", "own key", 0.0, 1)
    assert sender_for(host.url).send(own).delivered
    assert host.received[0].target == "/a?_k=own%20key&_p=a&_n=b"


@pytest.fixture(scope="module")
def tls(tmp_path_factory) -> tuple[ssl.SSLContext, str]:
    """A server TLS context for 127.0.0.1 and the CA file that vouches for it."""
    authority = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1").configure_cert(context)
    ca_file = tmp_path_factory.mktemp("tls") / "ca.pem"
    authority.cert_pem.write_to_path(ca_file)
    return context, ca_file


def test_tls_is_verified_against_the_configured_ca(tls):
    context, ca_file = tls
    with StandInHost(ssl_context=context) as secure:
        assert secure.url.startswith("https://")
        refused = sender_for(secure.url).send(ITEM)  # system CAs do not know this one
        assert not refused.delivered and "SSL" in refused.error
        assert sender_for(secure.url, ca_file=ca_file).send(ITEM).delivered


def test_redirects_are_never_followed(host):
    host.status = 301
    outcome = sender_for(host.url).send(ITEM)
    assert (outcome.delivered, outcome.status) == (False, 301)
    assert len(host.received) == 1


def test_a_host_that_never_answers_times_out_without_leaking_the_key():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    accepted = []
    threading.Thread(target=lambda: accepted.append(listener.accept()), daemon=True).start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    outcome = sender_for(url, read_timeout=0.3).send(ITEM)
    listener.close()
    assert not outcome.delivered and outcome.status is None
    assert "Timeout" in outcome.error and "secret-key" not in outcome.error
    assert outcome.timed_out  # what adaptive concurrency takes for the host's load


def test_a_kept_alive_connection_the_host_closed_is_replaced_not_failed():
    """A host that closes each connection after one answer, without saying so: the
    next request on the stale connection is sent again on a fresh one."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    connections = []

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            connections.append(conn)
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    sender = sender_for(f"http://127.0.0.1:{listener.getsockname()[1]}")
    try:
        assert [sender.send(ITEM).delivered for _ in range(3)] == [True, True, True]
        assert len(connections) == 3
    finally:
        sender.close()
        listener.close()


def test_refused_connection_is_a_failure_not_an_exception():
    outcome = sender_for(f"http://127.0.0.1:{free_port()}").send(ITEM)
    assert not outcome.delivered and "secret-key" not in outcome.error


def test_redact_hides_raw_and_encoded_keys():
    assert redact("url /e?_k=a%20b&x=a b", ("a b",)) == "url /e?_k=***&x=***"


def test_backoff_is_capped_exponential_with_full_jitter():
    rng = random.Random(7)
    for attempts, ceiling in [(1, 1), (2, 2), (3, 4), (10, 60), (500, 60)]:
        delays = [backoff_delay(attempts, 60, rng) for _ in range(200)]
        assert 0 <= min(delays) and max(delays) <= ceiling
        assert max(delays) > ceiling * 0.8  # spread over the whole range


class LoopbackServer:
    """A TCP server on 127.0.0.1: each connection handled by ``_handle`` in a thread of
    its own, and counted."""

    def __init__(self) -> None:
        self.connections = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self._listener.close()


class ConnectProxy(LoopbackServer):
    """A minimal HTTPS (CONNECT) proxy on 127.0.0.1 that remembers what it tunnelled."""

    def __init__(self) -> None:
        self.tunnels: list[str] = []
        self.heads: list[bytes] = []  # each CONNECT request, headers included
        super().__init__()

    def _handle(self, client: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            head += client.recv(4096)
        target = head.split()[1].decode()
        self.heads.append(head)
        self.tunnels.append(target)
        host, port = target.rsplit(":", 1)
        upstream = socket.create_connection((host, int(port)))
        client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            sink.close()


def test_https_goes_through_the_configured_proxy(tls):
    context, ca_file = tls
    proxy = ConnectProxy()
    try:
        with StandInHost(ssl_context=context) as secure:
            sender = sender_for(secure.url, ca_file=ca_file, proxy=proxy.url)
            assert sender.send(ITEM).delivered
            assert proxy.tunnels == [secure.url.removeprefix("https://")]
            assert secure.received[0].target.startswith("/e?_k=secret-key&_p=bob")
    finally:
        proxy.close()


def test_proxy_credentials_in_the_url_are_sent_to_the_proxy(tls):
    context, ca_file = tls
    proxy = ConnectProxy()
    try:
        with StandInHost(ssl_context=context) as secure:
            url = proxy.url.replace("http://", "http://ann:s%40cret@")
            assert sender_for(secure.url, ca_file=ca_file, proxy=url).send(ITEM).delivered
        # base64("ann:s@cret")
        assert b"Proxy-Authorization: Basic YW5uOnNAY3JldA==" in proxy.heads[0]
    finally:
        proxy.close()


class RawHost(LoopbackServer):
    """A loopback host that answers every request on a connection with ``answer`` (bytes,
    or a callable of the request head) and counts connections and requests. ``hang``:
    read requests after the first ``hang`` and never answer them. ``per_connection``:
    answer that many on a connection, then hang up on the next request unanswered."""

    def __init__(self, answer=b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
                 hang: int | None = None, per_connection: int | None = None) -> None:
        self.answer, self.hang, self.per_connection = answer, hang, per_connection
        self.heads: list[bytes] = []
        self.write_failed = threading.Event()  # a send to a client that hung up failed
        super().__init__()

    def _handle(self, conn: socket.socket) -> None:
        buffer, answered = b"", 0
        try:
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buffer += data
                head, buffer = buffer.split(b"\r\n\r\n", 1)
                self.heads.append(head)
                if self.hang is not None and len(self.heads) > self.hang:
                    time.sleep(5)
                    return
                if self.per_connection is not None and answered >= self.per_connection:
                    return
                answered += 1
                answer = self.answer(head) if callable(self.answer) else self.answer
                for part in ([answer] if isinstance(answer, bytes) else answer):
                    conn.sendall(part)
        except OSError:
            self.write_failed.set()
        finally:
            conn.close()


@pytest.fixture
def raw():
    hosts: list[RawHost] = []

    def make(*args, **kwargs) -> RawHost:
        hosts.append(RawHost(*args, **kwargs))
        return hosts[-1]

    yield make
    for made in hosts:
        made.close()


def test_one_connection_is_kept_alive_across_requests(raw):
    server = raw()
    sender = sender_for(server.url)
    try:
        assert [sender.send(ITEM).delivered for _ in range(3)] == [True] * 3
        assert (server.connections, len(server.heads)) == (1, 3)
    finally:
        sender.close()


def test_a_request_the_host_hangs_up_on_after_keep_alive_is_sent_once_more(raw):
    """The race urllib3's check for a dropped connection cannot see: the host closes the
    kept-alive connection as the next request arrives. Sent again on a fresh one, once."""
    server = raw(per_connection=1)
    sender = sender_for(server.url)
    try:
        assert [sender.send(ITEM).delivered for _ in range(3)] == [True] * 3
        assert (server.connections, len(server.heads)) == (3, 5)
    finally:
        sender.close()


def test_a_fresh_connection_the_host_hangs_up_on_is_not_sent_again(raw):
    server = raw(per_connection=0)
    outcome = sender_for(server.url).send(ITEM)
    assert not outcome.delivered and not outcome.timed_out
    assert "RemoteDisconnected" in outcome.error or "reset" in outcome.error.lower()
    assert (server.connections, len(server.heads)) == (1, 1)


def test_the_request_carries_exactly_the_agent_headers(raw):
    server = raw()
    assert sender_for(server.url).send(ITEM).delivered
    lines = server.heads[0].decode().split("\r\n")
    assert lines[0] == ("GET /e?_k=secret-key&_p=bob&_n=Signed%20Up&_t=1700000000&_d=1 "
                        "HTTP/1.1")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    assert headers == {"Host": server.url.removeprefix("http://"),
                       "User-Agent": f"kmagent/{__version__}", "Accept": "*/*",
                       "Accept-Encoding": "identity"}


def test_a_redirect_is_not_followed_and_says_so(raw):
    elsewhere = raw()
    server = raw(f"HTTP/1.1 302 Found\r\nLocation: {elsewhere.url}/e?_k=secret-key\r\n"
                 "Content-Length: 0\r\n\r\n".encode())
    outcome = sender_for(server.url).send(ITEM)
    assert (outcome.kind, outcome.status) == (PERMANENT, 302)
    assert outcome.error == "HTTP 302 Found (redirects are never followed)"
    assert len(server.heads) == 1 and elsewhere.connections == 0


def test_a_big_body_is_not_read_past_the_limit_and_its_connection_goes(raw):
    """A host that streams a body without end: the answer counts, the read stops at
    MAX_BODY, the connection is closed (not kept) and the next request opens another."""
    def endless(head: bytes):
        yield b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000\r\n\r\n"
        for _ in range(100_000):
            yield b"x" * 65536

    server = raw(endless)
    sender = sender_for(server.url)
    try:
        started = time.monotonic()
        assert sender.send(ITEM).delivered
        assert server.write_failed.wait(5)  # the agent hung up on the rest
        assert sender.send(ITEM).delivered
        assert time.monotonic() - started < 10
        assert server.connections == 2
    finally:
        sender.close()


def test_a_read_timeout_is_never_sent_again(raw):
    """A stale keep-alive connection is retried once; a request the host took but did
    not answer in time is not (it may have counted it)."""
    server = raw(hang=1)
    sender = sender_for(server.url, read_timeout=0.3)
    try:
        assert sender.send(ITEM).delivered
        outcome = sender.send(ITEM)
        assert not outcome.delivered and outcome.timed_out
        time.sleep(0.2)
        assert len(server.heads) == 2
    finally:
        sender.close()


def test_the_api_key_is_never_in_an_error(raw, tls):
    context, ca_file = tls
    reason = raw(b"HTTP/1.1 400 Bad key secret-key\r\nContent-Length: 0\r\n\r\n")
    reset = raw(lambda head: b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort")
    listener = socket.create_server(("127.0.0.1", 0))  # takes the connection, never answers
    silent = f"http://127.0.0.1:{listener.getsockname()[1]}"
    proxy = ConnectProxy()
    try:
        with StandInHost(ssl_context=context) as secure:
            cases = {
                "status reason": sender_for(reason.url),
                "short body": sender_for(reset.url),
                "refused": sender_for(f"http://127.0.0.1:{free_port()}"),
                "read timeout": sender_for(silent, read_timeout=0.2),
                "unknown CA": sender_for(secure.url),
                "proxy refused": sender_for(secure.url, ca_file=ca_file,
                                            proxy=f"http://127.0.0.1:{free_port()}"),
                "own key": sender_for(f"http://127.0.0.1:{free_port()}", api_key=None),
            }
            for what, sender in cases.items():
                item = Claimed(1, "e", ITEM.query, "secret-key", 0.0, 1) \
                    if what == "own key" else ITEM
                outcome = sender.send(item)
                sender.close()
                assert not outcome.delivered and outcome.error, what
                assert "secret-key" not in outcome.error, (what, outcome.error)
                assert "Max retries" not in outcome.error, (what, outcome.error)
    finally:
        listener.close()
        proxy.close()


# --- the environment, as requests reads it: once, when the Sender is made ---------------

def test_https_proxy_from_the_environment_is_used(tls, monkeypatch):
    context, ca_file = tls
    proxy = ConnectProxy()
    try:
        monkeypatch.setenv("HTTPS_PROXY", proxy.url.replace("http://", "http://ann:pw@"))
        with StandInHost(ssl_context=context) as secure:
            assert sender_for(secure.url, ca_file=ca_file).send(ITEM).delivered
        assert proxy.tunnels == [secure.url.removeprefix("https://")]
        assert b"Proxy-Authorization: Basic YW5uOnB3" in proxy.heads[0]  # ann:pw
    finally:
        proxy.close()


def test_no_proxy_bypasses_the_environment_proxy(tls, monkeypatch):
    context, ca_file = tls
    proxy = ConnectProxy()
    try:
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        with StandInHost(ssl_context=context) as secure:
            sender = sender_for(secure.url, ca_file=ca_file)
            assert sender.proxy is None
            assert sender.send(ITEM).delivered
            assert len(secure.received) == 1
        assert proxy.tunnels == [] and proxy.heads == []
    finally:
        proxy.close()


def test_a_loopback_endpoint_never_goes_through_the_environment_proxy(raw, monkeypatch):
    """http endpoints are loopback only (kmagent testhost, a local relay), which no
    proxy could reach: HTTP_PROXY and ALL_PROXY, set for other programs, are passed by."""
    proxy = raw()
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    monkeypatch.setenv("ALL_PROXY", proxy.url)
    with StandInHost() as local:
        sender = sender_for(local.url)
        assert sender.proxy is None and sender.send(ITEM).delivered
        assert len(local.received) == 1
    assert proxy.heads == []


def test_requests_ca_bundle_is_honoured_and_read_once(tls, monkeypatch, tmp_path):
    context, ca_file = tls
    with StandInHost(ssl_context=context) as secure:
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ca_file))
        sender = sender_for(secure.url)
        monkeypatch.delenv("REQUESTS_CA_BUNDLE")  # read when the Sender was made
        assert sender.send(ITEM).delivered
        monkeypatch.setenv("CURL_CA_BUNDLE", str(ca_file))
        assert sender_for(secure.url).send(ITEM).delivered
        # ca_file, when configured, wins over the environment
        other = tmp_path / "other.pem"
        trustme.CA().cert_pem.write_to_path(other)
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(other))
        assert not sender_for(secure.url).send(ITEM).delivered
        assert sender_for(secure.url, ca_file=ca_file).send(ITEM).delivered


def test_a_url_the_origin_does_not_prefix_is_left_to_requests():
    # The trimmed adapter slices the target off its origin only when the URL starts
    # with it; any other URL is parsed by requests, as a plain HTTPAdapter would.
    import requests
    from kmagent.sender import Transport
    transport = Transport("https://trk.kissmetrics.io")
    request = requests.PreparedRequest()
    request.url = "https://trk.kiss\tmetrics.io:8443/km/e?_k=x"
    assert transport.request_url(request, None) == "/km/e?_k=x"
    request.url = "https://trk.kissmetrics.io/e?_k=x"
    assert transport.request_url(request, None) == "/e?_k=x"
