"""worker.sts.transport: the signed calls' HTTP client answers and fails exactly as botocore's.

Each test runs the same request through `FastSession` and through the botocore session it was
made from, against a real socket server whose every connection does one scripted thing.
"""

from __future__ import annotations

import gc
import os
import socket
import ssl
import struct
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import botocore.awsrequest
import botocore.exceptions
import pytest
import urllib3.util.connection
from botocore.config import Config
from botocore.httpsession import URLLib3Session

from tests.tls import tls_contexts
from worker.permissions import CATALOGUE
from worker.sts import transport
from worker.sts.assume_role import build_assume_role_call
from worker.sts.probe_calls import build_probe_call
from worker.sts.signing import _host as signing_host
from worker.sts.transport import FastSession, botocore_session, fast_session

Behaviour = Callable[[socket.socket], None]
ANSWER = b"<Response><Errors><Error><Code>Nope</Code></Error></Errors></Response>"


def _read_request(sock: socket.socket) -> bytes | None:
    """Read one request (headers and its Content-Length body): its head; None at EOF."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        body += sock.recv(65536)
    return head


def _answer(status: str = "403 Forbidden", *, chunked: bool = False) -> bytes:
    head = f"HTTP/1.1 {status}\r\nContent-Type: text/xml\r\nx-amzn-RequestId: r-1\r\n"
    if chunked:
        body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (ANSWER[:10], ANSWER[10:]))
        return head.encode() + b"Transfer-Encoding: chunked\r\n\r\n" + body + b"0\r\n\r\n"
    return head.encode() + f"Content-Length: {len(ANSWER)}\r\n\r\n".encode() + ANSWER


HEADS: list[bytes] = []  # the request heads keep_alive read (tests that read them clear it)


def keep_alive(sock: socket.socket) -> None:
    while (head := _read_request(sock)) is not None:
        HEADS.append(head)
        sock.sendall(_answer())


def chunked(sock: socket.socket) -> None:
    while _read_request(sock) is not None:
        sock.sendall(_answer(chunked=True))


def answer_then_close(sock: socket.socket) -> None:
    """Answer without saying the connection closes, then close it (a keep-alive timeout)."""
    if _read_request(sock) is not None:
        sock.sendall(_answer())


def silent(sock: socket.socket) -> None:
    _read_request(sock)
    time.sleep(10)


def reset(sock: socket.socket) -> None:
    _read_request(sock)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def short_body(sock: socket.socket) -> None:
    """An answer that says 500 bytes and sends 20, then closes."""
    if _read_request(sock) is not None:
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n" + ANSWER[:20])


def silent_from_the_start(sock: socket.socket) -> None:
    """Accepts, reads nothing, says nothing (a TLS handshake never answered)."""
    time.sleep(3)


def reset_in_the_handshake(sock: socket.socket) -> None:
    """Reads the client's first bytes (its TLS ClientHello), then resets the connection: the
    client is in its handshake, whatever the timing."""
    sock.recv(1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def garbage_at_once(sock: socket.socket) -> None:
    """Speaks first, and not TLS (a TLS client gets a record it cannot read)."""
    sock.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
    time.sleep(1)


def not_http(sock: socket.socket) -> None:
    if _read_request(sock) is not None:
        sock.sendall(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")


class Server:
    """127.0.0.1 on a free port; each connection runs `behaviour`, then is closed."""

    def __init__(
        self, behaviour: Behaviour, tls: ssl.SSLContext | None = None, *, raw_tls: bool = False
    ) -> None:
        """`raw_tls`: URLs say https, but the behaviour gets the TCP socket (no handshake)."""
        self.behaviour = behaviour
        self.tls = tls
        self.raw_tls = raw_tls
        self.connections = 0
        self.closed = 0  # connections this server has closed
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, host: str = "127.0.0.1") -> str:
        scheme = "http" if self.tls is None and not self.raw_tls else "https"
        return f"{scheme}://{host}:{self.port}/?Action=Probe"

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        try:
            if self.tls is not None:
                sock = self.tls.wrap_socket(sock, server_side=True)
            self.behaviour(sock)
        except OSError:
            pass
        finally:
            sock.close()
            self.closed += 1

    def close(self) -> None:
        self._listener.close()


@pytest.fixture
def serve() -> Iterator[Callable[..., Server]]:
    servers: list[Server] = []

    def start(
        behaviour: Behaviour, tls: ssl.SSLContext | None = None, *, raw_tls: bool = False
    ) -> Server:
        servers.append(Server(behaviour, tls, raw_tls=raw_tls))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def _request(url: str) -> botocore.awsrequest.AWSPreparedRequest:
    return botocore.awsrequest.AWSPreparedRequest(
        "POST",
        url,
        {"Content-Type": "application/x-www-form-urlencoded", "User-Agent": "test"},  # type: ignore[arg-type]
        b"Action=Probe&Version=2011-06-15",
        stream_output=False,
    )


# Timeouts for tests that wait for one to trip; the others keep seconds of margin, so that a
# loaded machine's pause never turns an answer into a timeout.
SHORT_TIMEOUTS = (1.0, 0.5)


def _sessions(**arguments: object) -> tuple[FastSession, URLLib3Session]:
    options = {"timeout": (5.0, 5.0), **arguments}
    fast = FastSession(URLLib3Session(**options))  # type: ignore[arg-type]
    return fast, URLLib3Session(**options)  # type: ignore[arg-type]


def _failure(session: object, url: str) -> Exception:
    with pytest.raises(botocore.exceptions.BotoCoreError) as caught:
        session.send(_request(url))  # type: ignore[attr-defined]
    return caught.value


@pytest.mark.parametrize("behaviour", [keep_alive, chunked], ids=["length", "chunked"])
def test_an_answer_reads_as_botocore_reads_it(
    serve: Callable[..., Server], behaviour: Behaviour
) -> None:
    server = serve(behaviour)
    fast, botocore_http = _sessions()
    ours = fast.send(_request(server.url()))
    theirs = botocore_http.send(_request(server.url()))
    assert (ours.status_code, ours.content) == (theirs.status_code, theirs.content) == (403, ANSWER)
    assert ours.headers["x-amzn-requestid"] == theirs.headers["X-Amzn-RequestId"] == "r-1"
    assert ours.headers.get("Content-Type") == "text/xml"


def test_a_connection_is_kept_for_the_next_call(serve: Callable[..., Server]) -> None:
    server = serve(keep_alive)
    fast, _ = _sessions()
    for _ in range(3):
        assert fast.send(_request(server.url())).status_code == 403
    assert server.connections == 1


def test_a_kept_connection_the_server_closed_is_not_reused(serve: Callable[..., Server]) -> None:
    """The server closed it while idle (its keep-alive timeout): checked before reuse, as urllib3
    does, so the next call opens a new one instead of failing with ConnectionClosedError."""
    server = serve(answer_then_close)
    fast, _ = _sessions()
    for sent in range(1, 4):
        assert fast.send(_request(server.url())).status_code == 403
        deadline = time.monotonic() + 5
        while server.closed < sent:  # the server has closed it before the next call
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.05)  # and its FIN has reached the client's socket
    assert server.connections == 3


@pytest.mark.parametrize(
    ("behaviour", "expected"),
    [
        (silent, botocore.exceptions.ReadTimeoutError),
        (reset, botocore.exceptions.ConnectionClosedError),
        (not_http, botocore.exceptions.ConnectionClosedError),
    ],
    ids=["no answer", "reset", "not http"],
)
def test_a_failure_raises_what_botocore_raises(
    serve: Callable[..., Server], behaviour: Behaviour, expected: type[Exception]
) -> None:
    server = serve(behaviour)
    fast, botocore_http = _sessions(timeout=SHORT_TIMEOUTS)
    started = time.monotonic()
    ours = _failure(fast, server.url())
    took = time.monotonic() - started
    assert type(ours) is type(_failure(botocore_http, server.url())) is expected
    assert took < 6  # the read timeout (0.5 s), not the server's 10 s


def test_a_refused_connection_raises_what_botocore_raises() -> None:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/"
    fast, botocore_http = _sessions()
    ours = _failure(fast, url)
    assert (
        type(ours)
        is type(_failure(botocore_http, url))
        is (botocore.exceptions.EndpointConnectionError)
    )


def test_tls_is_checked_with_botocores_ca_bundle(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    """verify=<a CA bundle>: trusted, with the certificate checked for the URL's host name;
    the default bundle does not know the test's authority: SSLError, as botocore."""
    server_context, _ = tls_contexts(tmp_path, "localhost")
    server = serve(keep_alive, server_context)
    trusted, _ = _sessions(verify=str(tmp_path / "cert.pem"))
    assert trusted.send(_request(server.url("localhost"))).status_code == 403
    wrong_name = _failure(trusted, server.url("127.0.0.1"))
    assert isinstance(wrong_name, botocore.exceptions.SSLError)
    fast, botocore_http = _sessions()
    ours = _failure(fast, server.url("localhost"))
    assert (
        type(ours)
        is type(_failure(botocore_http, server.url("localhost")))
        is (botocore.exceptions.SSLError)
    )


def test_a_proxied_request_is_sent_by_botocore() -> None:
    """Proxies (their tunnels, TLS and headers) stay botocore's: with one set, FastSession hands
    the request over; the proxy here refuses, so botocore's own ProxyConnectionError comes back."""
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    fast, _ = _sessions(proxies={"http": f"http://127.0.0.1:{port}"})
    failure = _failure(fast, "http://sts.invalid/")
    assert isinstance(failure, botocore.exceptions.ProxyConnectionError)


def test_the_signed_calls_send_with_fast_session() -> None:
    config = Config(connect_timeout=1, read_timeout=2, max_pool_connections=12)
    probe = build_probe_call(CATALOGUE["ec2:DescribeRegions"], "eu-west-1", config, 1)
    assume = build_assume_role_call("eu-west-1", config, 1)
    for call in (probe, assume):
        assert isinstance(call.http, FastSession)
        built = botocore_session(call.http)
        assert isinstance(built, URLLib3Session)
        assert fast_session(call.http) is call.http  # never wrapped twice
        assert call.http._connect_timeout == 1
        assert call.http._read_timeout == 2
        assert call.http._max_idle == 12


def test_with_the_transport_off_botocores_session_sends(monkeypatch: pytest.MonkeyPatch) -> None:
    """`python -m scripts.benchmarks.sts --transport botocore` compares against this."""
    monkeypatch.setattr(transport, "ENABLED", False)
    config = Config(connect_timeout=1, read_timeout=2)
    probe = build_probe_call(CATALOGUE["ec2:DescribeRegions"], "eu-west-1", config, 1)
    assume = build_assume_role_call("eu-west-1", config, 1)
    assert type(probe.http) is type(assume.http) is URLLib3Session


def test_a_forked_process_never_uses_its_parents_kept_connections(
    serve: Callable[..., Server],
) -> None:
    """The worker's main process keeps the calls (and their sessions) and forks its pool: a
    connection kept before the fork is the parent's socket too, and is never sent on by the
    child."""
    server = serve(keep_alive)
    fast, _ = _sessions()
    assert fast.send(_request(server.url())).status_code == 403
    read, write = os.pipe()
    with warnings.catch_warnings():
        # Python 3.12 warns of fork() in a process with threads (the server's): the child
        # here only sends one request and leaves.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: its own connection, the parent's left alone
        try:
            status = fast.send(_request(server.url())).status_code
            os.write(write, str(status).encode())
        finally:
            os._exit(0)
    os.close(write)
    answer = os.read(read, 16)
    os.waitpid(pid, 0)
    os.close(read)
    assert answer == b"403"
    assert server.connections == 2
    assert fast.send(_request(server.url())).status_code == 403  # the parent's, still kept
    assert server.connections == 2


@pytest.mark.parametrize(
    ("behaviour", "expected"),
    [
        (silent_from_the_start, botocore.exceptions.ReadTimeoutError),
        (reset_in_the_handshake, botocore.exceptions.ConnectionClosedError),
        (garbage_at_once, botocore.exceptions.SSLError),
    ],
    ids=["no handshake", "reset in the handshake", "not tls"],
)
def test_a_tls_handshake_failure_raises_what_botocore_raises(
    serve: Callable[..., Server], behaviour: Behaviour, expected: type[Exception]
) -> None:
    server = serve(behaviour, raw_tls=True)
    fast, botocore_http = _sessions(timeout=SHORT_TIMEOUTS)
    ours = type(_failure(fast, server.url()))
    theirs = type(_failure(botocore_http, server.url()))
    with warnings.catch_warnings():
        # urllib3 leaves the socket of a handshake the server reset unclosed: collected here,
        # not in whichever test runs next. (FastSession closes its own.)
        warnings.simplefilter("ignore", ResourceWarning)
        del botocore_http
        gc.collect()
    assert ours is theirs is expected


def test_a_bad_ca_bundle_raises_what_botocore_raises(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    server_context, _ = tls_contexts(tmp_path, "localhost")
    server = serve(keep_alive, server_context)
    missing = str(tmp_path / "no-such-bundle.pem")
    fast, botocore_http = _sessions(verify=missing)
    ours = _failure(fast, server.url("localhost"))
    assert (
        type(ours)
        is type(_failure(botocore_http, server.url("localhost")))
        is (botocore.exceptions.SSLError)
    )


def test_a_short_answer_is_returned_as_it_came(serve: Callable[..., Server]) -> None:
    """A body shorter than its Content-Length: botocore has urllib3 return it as it came (the
    parser judges it), and so does FastSession; that connection is not kept."""
    server = serve(short_body)
    fast, botocore_http = _sessions()
    ours = fast.send(_request(server.url()))
    theirs = botocore_http.send(_request(server.url()))
    assert (ours.status_code, ours.content) == (theirs.status_code, theirs.content)
    assert ours.content == ANSWER[:20]
    assert fast._idle == {} or all(not kept for kept in fast._idle.values())


@pytest.mark.parametrize(
    ("url", "host"),
    [
        ("http://sts.example.test/", "sts.example.test"),
        ("http://sts.example.test:80/", "sts.example.test"),
        ("http://sts.example.test:8080/", "sts.example.test:8080"),
        ("https://localhost/", "localhost"),
        ("https://localhost:443/", "localhost"),
    ],
)
def test_the_host_header_is_the_one_botocore_signed(
    serve: Callable[..., Server],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    url: str,
    host: str,
) -> None:
    """The signature covers `host` as `signing._host` writes it: the port only when it is not
    the scheme's. Sent to AWS's default ports, any other Host header fails every signature.
    (The connection is redirected to the test's server, which records what it got.)"""
    server_context, _ = tls_contexts(tmp_path, "localhost")
    server = serve(keep_alive, server_context if url.startswith("https") else None)
    connect = urllib3.util.connection.create_connection
    monkeypatch.setattr(
        transport,
        "create_connection",
        lambda _address, *args, **kwargs: connect(("127.0.0.1", server.port), *args, **kwargs),
    )
    fast, _ = _sessions(verify=str(tmp_path / "cert.pem"))
    HEADS.clear()
    assert fast.send(_request(url)).status_code == 403
    (head,) = HEADS
    sent = [
        line.partition(b":")[2].strip().decode()
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"host:")
    ]
    assert sent == [host] == [signing_host(url)]
