"""The HTTP transport of the signed STS and probe calls: http.client on kept-alive connections.

A verification makes six signed calls (AssumeRole twice, four permission probes), and sending
them was most of the worker's CPU. botocore sends through urllib3 (`URLLib3Session`), which costs
about twice what http.client's own exchange does (figures in docs/sts-errors.md, from
`python -m scripts.benchmarks.sts` with and without `--transport botocore`). `FastSession` sends
the same prepared request with http.client directly, on connections it keeps per scheme, host
and port, and raises the exceptions botocore raises for the same failures, so everything above
it (the standard retries, the classification of errors) is unchanged:

- a name not resolved, a connection refused: EndpointConnectionError;
- no connection within connect_timeout: ConnectTimeoutError;
- no TLS handshake, or no answer, within read_timeout: ReadTimeoutError;
- a failed TLS handshake or certificate, a bad CA bundle, a TLS error later: SSLError;
- a connection closed or reset (during the handshake too), an answer that is not HTTP, a send
  that failed (but for a reset or a broken pipe, after which the answer is still read):
  ConnectionClosedError;
- anything else: HTTPClientError.
An answer shorter than its Content-Length is returned as it came, as botocore has urllib3 do
(the parser judges it), and its connection is not kept.

What it keeps of botocore's session (`URLLib3Session`, built by botocore for the client's
configuration): the timeouts, the certificate check (`verify`: the CA bundle botocore would use),
the client certificate, the socket options and the pool size (idle connections kept per host).
A request that goes through a proxy (HTTPS_PROXY and the client's `proxies`, NO_PROXY honoured),
that asks for `Expect: 100-continue` or that is sent in chunks goes through botocore's session.
The Host header is the one botocore signed: the port only when it is not the scheme's.

As urllib3 does, a kept connection is checked before it is reused (a readable idle socket means
the server closed it or sent something unasked: it is dropped), and one that fails anyway is
not retried here: the caller's standard retries decide. A forked process forgets the kept
connections it inherited.
"""

from __future__ import annotations

import errno
import http.client
import os
import select
import ssl
import threading
import weakref
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import botocore.awsrequest
import botocore.exceptions
from botocore.httpsession import URLLib3Session, create_urllib3_context, get_cert_path
from urllib3.util.connection import create_connection
from urllib3.util.ssl_ import ALPN_PROTOCOLS

Key = tuple[str, str, int]  # scheme, host, port
# The route of a URL whose requests go through a proxy (botocore's session sends them).
_PROXIED: tuple[Key, str] = (("", "", 0), "")
# URLs whose routes are kept (one per service and region in use: a handful).
_MAX_ROUTES = 256

# The connection failed while the request was sent or its answer read (reset, aborted, broken
# pipe, closed by the server: http.client.RemoteDisconnected), or the answer was not HTTP (a bad
# status line): the connection is of no further use.
_CLOSED = (OSError, http.client.HTTPException)
# Errors while sending after which urllib3 still reads the answer (with BrokenPipeError).
_ANSWER_MAY_FOLLOW = (errno.ECONNRESET, errno.EPROTOTYPE)


@dataclass(frozen=True, slots=True)
class Response:
    """What the callers read of an answer (as of botocore's AWSResponse)."""

    status_code: int
    headers: botocore.awsrequest.HeadersDict
    content: bytes


class _Connection(http.client.HTTPConnection):
    """An HTTP connection made as urllib3 makes one: the socket options set before connecting,
    the connect timeout for the TCP connection and the TLS handshake, then the read timeout;
    over TLS, the session's context with SNI (the host name without a trailing dot)."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        connect_timeout: float | None,
        read_timeout: float | None,
        socket_options: list[tuple[int, int, int | bytes]],
        tls: ssl.SSLContext | None,
    ) -> None:
        super().__init__(host, port, timeout=connect_timeout)
        # The Host header carries the port only when it is not the scheme's (http.client compares
        # with default_port): the host botocore signed (`signing._host`).
        self.default_port = 443 if tls is not None else 80
        self._read_timeout = read_timeout
        self._socket_options = socket_options
        self._tls = tls

    def connect(self) -> None:
        """Connect; raises botocore's exceptions as urllib3's connection and pool would."""
        url = f"{'https' if self._tls is not None else 'http'}://{self.host}:{self.port}/"
        try:
            sock = create_connection(
                (self.host, self.port), self.timeout, socket_options=self._socket_options
            )
        except TimeoutError as error:
            raise botocore.exceptions.ConnectTimeoutError(endpoint_url=url, error=error) from error
        except OSError as error:  # not resolved, refused, unreachable
            raise botocore.exceptions.EndpointConnectionError(
                endpoint_url=url, error=error
            ) from error
        try:
            if self._tls is not None:
                sock = self._tls.wrap_socket(sock, server_hostname=self.host.rstrip("."))
            sock.settimeout(self._read_timeout)
        except BaseException as error:
            sock.close()
            if isinstance(error, TimeoutError):  # urllib3: a handshake timeout is a read timeout
                raise botocore.exceptions.ReadTimeoutError(endpoint_url=url, error=error) from error
            if isinstance(error, ssl.SSLError):
                raise botocore.exceptions.SSLError(endpoint_url=url, error=error) from error
            if isinstance(error, OSError):  # reset or closed during the handshake
                raise botocore.exceptions.ConnectionClosedError(
                    error=error, endpoint_url=url
                ) from error
            raise
        self.sock = sock


class FastSession:
    """Sends botocore's prepared requests like `URLLib3Session.send`, with http.client."""

    def __init__(self, fallback: URLLib3Session) -> None:
        # Its private attributes are what it was built with (as worker.sts.probe_preload reads).
        built: Any = fallback
        self.fallback: Any = built
        timeout = built._timeout
        if isinstance(timeout, (int, float)):
            self._connect_timeout: float | None = float(timeout)
            self._read_timeout: float | None = float(timeout)
        else:  # urllib3's Timeout
            self._connect_timeout = timeout.connect_timeout
            self._read_timeout = timeout.read_timeout
        self._socket_options: list[tuple[int, int, int | bytes]] = list(built._socket_options or [])
        self._max_idle = max(1, int(built._max_pool_connections))
        self._idle: dict[Key, list[_Connection]] = {}
        self._lock = threading.Lock()
        self._tls_context: ssl.SSLContext | None = None
        self._routes: dict[str, tuple[Key, str]] = {}
        _SESSIONS.add(self)
        # As urllib3's pools: a session dropped closes its idle connections.
        weakref.finalize(self, _close_idle, self._idle)

    def send(self, request: Any) -> Any:
        """Send `request` (botocore's AWSPreparedRequest, read in full): a `Response`, or
        botocore's exceptions for a connection that failed."""
        url = request.url
        route = self._routes.get(url) or self._route(url)
        if route is _PROXIED or _botocores_to_send(request.headers):
            return self.fallback.send(request)
        key, target = route
        try:
            connection = self._take(key) or self._new(key)
        except (OSError, ValueError) as error:  # the TLS context: a bad CA bundle or certificate
            raise botocore.exceptions.SSLError(endpoint_url=url, error=error) from error
        try:
            if connection.sock is None:
                connection.connect()
            answer, content, complete = _exchange(connection, request, target)
        except Exception as error:
            connection.close()
            raise _translated(error, request) from error
        if answer.will_close or not complete:
            connection.close()
        else:
            self._put_back(key, connection)
        return Response(
            status_code=answer.status,
            headers=botocore.awsrequest.HeadersDict(answer.getheaders()),
            content=content,
        )

    def _route(self, url: str) -> tuple[Key, str]:
        """Where a URL's requests go (kept: a signed call's URL is the same on every call)."""
        if self.fallback._proxy_config.proxy_url_for(url):
            route = _PROXIED
        else:
            split = urlsplit(url)
            scheme = split.scheme.lower()
            key = (scheme, split.hostname or "", split.port or (443 if scheme == "https" else 80))
            route = (key, (split.path or "/") + (f"?{split.query}" if split.query else ""))
        with self._lock:
            if len(self._routes) >= _MAX_ROUTES:
                self._routes.clear()
            self._routes[url] = route
        return route

    def _take(self, key: Key) -> _Connection | None:
        while True:
            with self._lock:
                kept = self._idle.get(key)
                if not kept:
                    return None
                connection = kept.pop()
            if not _dropped(connection):
                return connection
            connection.close()

    def _put_back(self, key: Key, connection: _Connection) -> None:
        with self._lock:
            kept = self._idle.setdefault(key, [])
            if len(kept) < self._max_idle:
                kept.append(connection)
                return
        connection.close()  # as urllib3: beyond the pool's size, a connection is not kept

    def _new(self, key: Key) -> _Connection:
        scheme, host, port = key
        return _Connection(
            host,
            port,
            connect_timeout=self._connect_timeout,
            read_timeout=self._read_timeout,
            socket_options=self._socket_options,
            tls=self._tls() if scheme == "https" else None,
        )

    def _tls(self) -> ssl.SSLContext:
        """The TLS context as botocore's session sets up its pools: botocore's defaults, its CA
        bundle (or no check with verify=False), its client certificate."""
        with self._lock:
            if self._tls_context is None:
                context = create_urllib3_context()
                verify = self.fallback._verify
                if verify:
                    context.verify_mode = ssl.CERT_REQUIRED
                    context.check_hostname = True
                    context.load_verify_locations(get_cert_path(verify))
                else:
                    context.check_hostname = False
                    context.verify_mode = ssl.CERT_NONE
                if self.fallback._cert_file:
                    context.load_cert_chain(self.fallback._cert_file, self.fallback._key_file)
                context.set_alpn_protocols(ALPN_PROTOCOLS)  # as urllib3: http/1.1
                self._tls_context = context
            return self._tls_context


# Every session, for the child of a fork (below).
_SESSIONS: weakref.WeakSet[FastSession] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """A forked process forgets its parent's kept connections: they are the parent's sockets
    too, never to be shared (forgotten, not closed: the parent's stay open). Its locks are new:
    one held by a parent's thread at the fork would never be released here."""
    for session in list(_SESSIONS):
        session._lock = threading.Lock()
        session._idle.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)

# False: the signed calls built from now on send through botocore's session itself (for
# `python -m scripts.benchmarks.sts --transport botocore`).
ENABLED = True


def fast_session(http: Any) -> Any:
    """`http` (botocore's session for a client) wrapped in a `FastSession`; anything else (a
    test's stand-in session, one already wrapped) as it is."""
    return FastSession(http) if ENABLED and type(http) is URLLib3Session else http


def botocore_session(http: Any) -> Any:
    """The botocore session a `FastSession` sends with when it does not send itself."""
    return http.fallback if isinstance(http, FastSession) else http


def _close_idle(idle: dict[Key, list[_Connection]]) -> None:
    for connection in [c for kept in idle.values() for c in kept]:
        connection.close()
    idle.clear()


def _exchange(
    connection: _Connection, request: Any, target: str
) -> tuple[http.client.HTTPResponse, bytes, bool]:
    """Send the request on the connected `connection`; its answer, its body and whether the body
    came whole (as botocore asks urllib3: a body shorter than its Content-Length is returned as
    it came, for the parser to judge, and its connection is not kept)."""
    # As urllib3 sends: Host and Accept-Encoding added unless the request has them.
    names = _lower_names(request.headers)
    try:
        connection.putrequest(
            request.method,
            target,
            skip_host="host" in names,
            skip_accept_encoding="accept-encoding" in names,
        )
        for name, value in request.headers.items():
            connection.putheader(name, value)
        body = request.body
        if body is not None and "content-length" not in names:
            connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body)
    except OSError as error:
        # As urllib3: a server may answer and close before it has read the whole request; the
        # answer is still read. Anything else failing while sending is the connection's end.
        if not isinstance(error, BrokenPipeError) and error.errno not in _ANSWER_MAY_FOLLOW:
            raise _SendError(error) from error
    try:
        answer = connection.getresponse()
    except TimeoutError as error:
        raise _ReadTimeoutError(error) from error
    try:
        return answer, answer.read(), True
    except http.client.IncompleteRead as short:
        return answer, short.partial, False
    except TimeoutError as error:
        raise _ReadTimeoutError(error) from error


class _SendError(Exception):
    """Sending the request failed (not a timeout of the answer)."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


class _ReadTimeoutError(Exception):
    """No answer (or not all of it) within the read timeout."""

    def __init__(self, error: TimeoutError) -> None:
        super().__init__(str(error))
        self.error = error


def _translated(error: Exception, request: Any) -> Exception:
    """botocore's exception for a failure while sending or reading, as botocore's session maps
    urllib3's (see the module's list)."""
    url = request.url
    if isinstance(error, botocore.exceptions.BotoCoreError):  # from connect
        return error
    if isinstance(error, _ReadTimeoutError):
        return botocore.exceptions.ReadTimeoutError(endpoint_url=url, error=error.error)
    cause = error.error if isinstance(error, _SendError) else error
    if isinstance(cause, ssl.SSLError):
        return botocore.exceptions.SSLError(endpoint_url=url, error=cause)
    if isinstance(cause, _CLOSED):
        return botocore.exceptions.ConnectionClosedError(
            error=cause, request=request, endpoint_url=url
        )
    return botocore.exceptions.HTTPClientError(error=cause)


def _dropped(connection: _Connection) -> bool:
    """Whether an idle connection is unusable: closed, or readable (EOF or unasked bytes)."""
    sock = connection.sock
    if sock is None:
        return True
    try:
        poller = select.poll()  # not select(): no limit on the descriptor's number
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True


def _lower_names(headers: Any) -> set[str]:
    return {str(name).lower() for name in headers}


def _botocores_to_send(headers: Any) -> bool:
    """Requests whose body botocore's connection sends itself: after `100 Continue`, or in
    chunks."""
    for name, value in headers.items():
        lowered = str(name).lower()
        if lowered == "expect" and str(value).lower() == "100-continue":
            return True
        if lowered == "transfer-encoding":
            return True
    return False
