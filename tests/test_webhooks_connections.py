"""Kept-alive webhook connections: reused only for the same host name and checked address, cut at
every attempt's limit, bounded; against a real HTTP server that verifies every signature."""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpcore
import pytest

from sandbox.webhook_receiver import Behaviour, WebhookReceiver
from tests.tls import tls_contexts
from worker.settings import Settings
from worker.webhooks import connections as connections_module
from worker.webhooks.connections import Connections, Watchdog
from worker.webhooks.sending import AttemptKind, AttemptResult, post_signed, signed_headers
from worker.webhooks.signing import generate_secret

SECRET = generate_secret()


@pytest.fixture
def connections() -> Iterator[Connections]:
    """A worker process's connections, with 5 s connect and read timeouts (no test here waits
    for them to trip; they must not trip on a loaded machine either)."""
    made = Connections(
        Settings(webhook_read_timeout_seconds=5.0, webhook_connect_timeout_seconds=5.0)
    )
    yield made
    made.close()


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    """A keep-alive (HTTP/1.1) receiver on every local address, knowing SECRET."""
    with WebhookReceiver(secrets=[SECRET], host="0.0.0.0", keep_alive=True) as running:  # noqa: S104 - loopback test server
        yield running


def _post(
    connections: Connections,
    url: str,
    answers: dict[str, list[str]],
    *,
    message_id: str = "msg_1",
    time_limit: float = 5.0,
) -> AttemptResult:
    """One signed attempt to `url`, its host name resolved by `answers` (the test's DNS)."""
    body = b'{"type":"webhook.test"}'
    return post_signed(
        connections,
        url,
        body=body,
        headers=signed_headers(message_id, body, [SECRET]),
        allow_private=True,
        time_limit=time_limit,
        resolver=lambda host, _port: answers[host],
    )


def _ports(receiver: WebhookReceiver) -> list[int]:
    """The client port of each request the receiver got: one per connection."""
    return [r.peer_port for r in receiver.snapshot()]


def test_a_connection_is_kept_for_the_next_attempt_to_the_same_host(
    connections: Connections, receiver: WebhookReceiver
) -> None:
    """Three attempts to one host and address travel on one connection, each verified."""
    dns = {"hooks.invalid": ["127.0.0.1"]}
    url = f"http://hooks.invalid:{receiver.port}/webhooks"
    results = [_post(connections, url, dns, message_id=f"msg_{n}") for n in range(3)]
    assert [r.kind for r in results] == [AttemptKind.DELIVERED] * 3
    assert [r.verified for r in receiver.snapshot()] == [True] * 3
    assert len(set(_ports(receiver))) == 1
    assert connections.idle_connections() == 1


def test_a_connection_never_carries_another_host_names_message(
    connections: Connections, receiver: WebhookReceiver
) -> None:
    """Two host names on one address: each has its own connection, reused for itself only."""
    dns = {"a.invalid": ["127.0.0.1"], "b.invalid": ["127.0.0.1"]}
    for name in ("a", "b", "a", "b"):
        result = _post(connections, f"http://{name}.invalid:{receiver.port}/webhooks", dns)
        assert result.kind is AttemptKind.DELIVERED
    received = receiver.snapshot()
    assert [r.host.split(":")[0] for r in received] == ["a.invalid", "b.invalid"] * 2
    a_first, b_first, a_again, b_again = _ports(receiver)
    assert (a_first, b_first) == (a_again, b_again)
    assert a_first != b_first


def test_tls_is_verified_for_each_host_name_on_a_shared_address(tmp_path: Path) -> None:
    """Over HTTPS the certificate is checked for the URL's host name (sent as SNI), not the
    address: a second host name on the same address and port, which the certificate does not
    name, fails its handshake instead of reusing the connection verified for the first."""
    server, client = tls_contexts(tmp_path, "hooks.invalid")
    handshakes: list[str | None] = []
    server.sni_callback = lambda _sock, name, _ctx: handshakes.append(name)
    connections = Connections(
        Settings(webhook_read_timeout_seconds=5.0, webhook_connect_timeout_seconds=5.0),
        ssl_context=client,
    )
    dns = {"hooks.invalid": ["127.0.0.1"], "other.invalid": ["127.0.0.1"]}
    try:
        with WebhookReceiver(secrets=[SECRET], keep_alive=True, tls=server) as receiver:
            first = _post(connections, f"https://hooks.invalid:{receiver.port}/webhooks", dns)
            other = _post(connections, f"https://other.invalid:{receiver.port}/webhooks", dns)
            again = _post(connections, f"https://hooks.invalid:{receiver.port}/webhooks", dns)
            ports = _ports(receiver)
    finally:
        connections.close()
    assert (first.kind, again.kind) == (AttemptKind.DELIVERED, AttemptKind.DELIVERED)
    assert other.kind is AttemptKind.FAILED
    assert "certificate is not valid for 'other.invalid'" in (other.error or "")
    assert handshakes == ["hooks.invalid", "other.invalid"]  # the third reused the first's
    assert len(ports) == 2
    assert len(set(ports)) == 1


def test_a_changed_dns_answer_gets_a_new_connection(
    connections: Connections, receiver: WebhookReceiver
) -> None:
    """The connection made to the address checked earlier is not reused once the name resolves
    to another address: the request goes to the address checked for this attempt."""
    dns = {"hooks.invalid": ["127.0.0.1"]}
    url = f"http://hooks.invalid:{receiver.port}/webhooks"
    _post(connections, url, dns)
    _post(connections, url, dns)
    dns["hooks.invalid"] = ["127.0.0.2"]
    assert _post(connections, url, dns).kind is AttemptKind.DELIVERED
    first, second, third = _ports(receiver)
    assert first == second != third


def test_a_reused_connection_is_cut_off_at_the_attempt_limit(
    connections: Connections, receiver: WebhookReceiver
) -> None:
    """A server trickling its answer on a kept connection (no connect this time, so nothing new
    to learn the socket from) is still cut off at the attempt's hard limit."""
    dns = {"hooks.invalid": ["127.0.0.1"]}
    url = f"http://hooks.invalid:{receiver.port}/webhooks"
    assert _post(connections, url, dns).kind is AttemptKind.DELIVERED
    receiver.behaviour = Behaviour.TRICKLE
    receiver.hang_seconds = 20
    started = time.monotonic()
    result = _post(connections, url, dns, time_limit=1.5)
    took = time.monotonic() - started
    assert took < 5, f"the attempt took {took:.1f} s"
    assert result.kind is AttemptKind.FAILED
    assert result.error == "timeout: the attempt took longer than 1.5 s"
    first, trickled = _ports(receiver)
    assert first == trickled  # the kept connection carried the trickled request
    assert connections.idle_connections() == 0  # and was not kept after its cut


def test_a_kept_connection_closed_as_it_is_reused_is_sent_once_more(
    connections: Connections, receiver: WebhookReceiver
) -> None:
    """A server closing a kept connection without an answer (its keep-alive timeout ran out as
    the request came) costs no failed attempt: the request goes once more, same webhook-id."""
    receiver.behaviour = Behaviour.CLOSE_KEPT
    dns = {"hooks.invalid": ["127.0.0.1"]}
    url = f"http://hooks.invalid:{receiver.port}/webhooks"
    assert _post(connections, url, dns, message_id="msg_a").kind is AttemptKind.DELIVERED
    assert _post(connections, url, dns, message_id="msg_b").kind is AttemptKind.DELIVERED
    received = receiver.snapshot()
    assert [(r.webhook_id, r.answered) for r in received] == [
        ("msg_a", 204),
        ("msg_b", None),
        ("msg_b", 204),
    ]
    first, closed, again = _ports(receiver)
    assert first == closed != again


def test_a_new_connection_closed_without_an_answer_is_not_sent_again(
    connections: Connections,
) -> None:
    """Only a kept connection's request is sent once more: on a new connection the server read
    the request and chose not to answer, a failed attempt."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted: list[int] = []

    def close_each() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            accepted.append(1)
            request = b""
            while not request.endswith(b"}"):  # the whole request read: a FIN, not a reset
                request += conn.recv(65536)
            conn.close()

    threading.Thread(target=close_each, daemon=True).start()
    try:
        port = server.getsockname()[1]
        result = _post(connections, f"http://127.0.0.1:{port}/w", {})
    finally:
        server.close()
    assert result.kind is AttemptKind.FAILED
    assert result.error == "RemoteProtocolError: Server disconnected without sending a response."
    assert len(accepted) == 1


def test_idle_connections_are_bounded_in_all(
    connections: Connections, receiver: WebhookReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At most MAX_IDLE connections are kept: the least recently used one is closed."""
    monkeypatch.setattr(connections_module, "MAX_IDLE", 2)
    monkeypatch.setattr(connections_module, "IDLE_SECONDS", 60.0)
    dns = {name: ["127.0.0.1"] for name in ("a.invalid", "b.invalid", "c.invalid")}
    for name in ("a", "b", "a", "c", "a"):
        _post(connections, f"http://{name}.invalid:{receiver.port}/webhooks", dns)
    a_first, b_first, a_second, _, a_third = _ports(receiver)
    assert a_first == a_second == a_third  # kept while among the two used last
    assert connections.idle_connections() == 2
    _post(connections, f"http://b.invalid:{receiver.port}/webhooks", dns)
    assert _ports(receiver)[-1] != b_first  # b's was closed when c's was kept
    assert connections.idle_connections() == 2


def test_idle_connections_are_bounded_per_host_and_address(
    connections: Connections, receiver: WebhookReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two connections to one host and address, both done: with MAX_IDLE_PER_HOST 1 only the
    one used last is kept, and the next request takes it."""
    monkeypatch.setattr(connections_module, "MAX_IDLE_PER_HOST", 1)
    key = ("http", "hooks.invalid", receiver.port, "127.0.0.1")
    origin = httpcore.Origin(b"http", b"127.0.0.1", receiver.port)
    one, two = connections.new(origin), connections.new(origin)
    for connection in (one, two):
        connection.request(
            "POST",
            f"http://127.0.0.1:{receiver.port}/webhooks",
            headers={"host": f"hooks.invalid:{receiver.port}"},
            content=b"{}",
        )
        connections.put_back(key, connection)
    assert connections.idle_connections() == 1
    assert one.is_closed()
    taken = connections.take(key)
    assert taken is two
    two.close()


def test_an_idle_connection_is_not_kept_past_its_time(
    connections: Connections, receiver: WebhookReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection idle for IDLE_SECONDS is closed, not reused; so is a host name's pool."""
    monkeypatch.setattr(connections_module, "IDLE_SECONDS", 0.2)
    dns = {name: ["127.0.0.1"] for name in ("a.invalid", "b.invalid")}
    _post(connections, f"http://a.invalid:{receiver.port}/webhooks", dns)
    _post(connections, f"http://b.invalid:{receiver.port}/webhooks", dns)
    time.sleep(0.5)
    _post(connections, f"http://a.invalid:{receiver.port}/webhooks", dns)
    a_first, _, a_again = _ports(receiver)
    assert a_first != a_again
    assert connections.idle_connections() == 1  # b's idle pool closed on the way


def test_a_kept_connection_the_server_closed_is_not_taken(connections: Connections) -> None:
    """A server that answers and then closes the connection (its keep-alive timeout ran out
    while the connection was idle): the next request does not take it."""
    server = socket.create_server(("127.0.0.1", 0))

    def answer_then_close() -> None:
        conn, _ = server.accept()
        request = b""
        while not request.endswith(b"{}"):
            request += conn.recv(65536)
        conn.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")
        time.sleep(0.1)
        conn.close()

    thread = threading.Thread(target=answer_then_close, daemon=True)
    thread.start()
    port = server.getsockname()[1]
    key = ("http", "hooks.invalid", port, "127.0.0.1")
    connection = connections.new(httpcore.Origin(b"http", b"127.0.0.1", port))
    try:
        answer = connection.request(
            "POST", f"http://127.0.0.1:{port}/w", headers={"host": "hooks.invalid"}, content=b"{}"
        )
        assert answer.status == 204
        connections.put_back(key, connection)
        assert connections.idle_connections() == 1
        thread.join(timeout=5)
        time.sleep(0.1)  # the server's FIN has arrived
        assert connections.take(key) is None
        assert connection.is_closed()
    finally:
        server.close()
        connection.close()


def test_a_deadline_earlier_than_those_queued_is_kept() -> None:
    """The deadline thread, waiting for a late deadline, is woken for an earlier one."""
    with Watchdog(60) as late:
        time.sleep(0.3)  # the thread waits for the late one now
        with Watchdog(0.2) as early:
            deadline = time.monotonic() + 10  # well before the late one's 60 s
            while not early.fired:
                assert time.monotonic() < deadline, "the early deadline was not kept"
                time.sleep(0.01)
        assert not late.fired


def test_concurrent_attempts_never_share_nor_lose_a_kept_connection(
    connections: Connections, receiver: WebhookReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many attempts at once on few kept connections: each is delivered once, none fails. A
    kept connection is one attempt's alone: nothing closes it while it is used. (With one
    httpcore pool per host, whose upkeep could close a connection just handed to a request,
    about one run in three sent a message twice.)"""
    monkeypatch.setattr(connections_module, "MAX_IDLE_PER_HOST", 1)
    dns = {"hooks.invalid": ["127.0.0.1"]}
    url = f"http://hooks.invalid:{receiver.port}/webhooks"
    with ThreadPoolExecutor(32) as pool:
        results = list(
            pool.map(lambda n: _post(connections, url, dns, message_id=f"msg_{n}"), range(3000))
        )
    assert [r for r in results if r.kind is not AttemptKind.DELIVERED] == []
    assert receiver.accepted_ids() == Counter(f"msg_{n}" for n in range(3000))
