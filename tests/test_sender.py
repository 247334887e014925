"""The sender against real loopback hosts: headers, TLS verification, redirects,
timeouts, and the API key kept out of errors."""

from __future__ import annotations

import random
import socket
import ssl
import threading

import pytest
import trustme
from conftest import free_port

from kmagent import __version__
from kmagent.sender import Sender, backoff_delay, redact
from kmagent.spool import Claimed
from kmagent.testhost import StandInHost

ITEM = Claimed(1, "e", "_p=bob&_n=Signed%20Up&_t=1700000000&_d=1", None, 0.0, 1)


def sender_for(url: str, **options) -> Sender:
    settings = dict(connect_timeout=2, read_timeout=2, api_key="secret-key")
    settings.update(options)
    return Sender(url, **settings)


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


class ConnectProxy:
    """A minimal HTTPS (CONNECT) proxy on 127.0.0.1 that remembers what it tunnelled."""

    def __init__(self) -> None:
        self.tunnels: list[str] = []
        self.heads: list[bytes] = []  # each CONNECT request, headers included
        self._listener = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}"

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._tunnel, args=(client,), daemon=True).start()

    def _tunnel(self, client: socket.socket) -> None:
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

    def close(self) -> None:
        self._listener.close()


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


def test_one_connection_is_kept_alive_across_requests(host):
    sender = sender_for(host.url)
    try:
        assert sender.send(ITEM).delivered
        first = sender._local.conn
        assert sender.send(ITEM).delivered and sender.send(ITEM).delivered
        assert first is not None and sender._local.conn is first
    finally:
        sender.close()
