"""The HTTP transport of the signed STS and probe calls: http.client on kept-alive connections.

A verification makes six signed calls (AssumeRole twice, four permission probes), and sending
them was most of the worker's CPU. botocore sends through urllib3 (`URLLib3Session`), which costs
about twice what http.client's own exchange does (figures in docs/sts-errors.md, from
`python -m scripts.benchmarks.sts` with and without `--transport botocore`). `FastSession` sends
the same prepared request with http.client directly, on connections it keeps per scheme, host
and port, and raises the exceptions botocore raises for the same failures, so everything above
it (the standard retries, the classification of errors) is unchanged:

- a TLS handshake or certificate that fails: SSLError;
- a name not resolved, a connection refused: EndpointConnectionError;
- no connection within connect_timeout: ConnectTimeoutError;
- no answer within read_timeout: ReadTimeoutError;
- a connection closed or reset, an answer that is not HTTP: ConnectionClosedError;
- anything else: HTTPClientError.

What it keeps of botocore's session (`URLLib3Session`, built by botocore for the client's
configuration): the timeouts, the certificate check (`verify`: the CA bundle botocore would use),
the client certificate, the socket options and the pool size (idle connections kept per host).
A request that goes through a proxy (HTTPS_PROXY and the client's `proxies`, NO_PROXY honoured)
or that asks for `Expect: 100-continue` is sent by botocore's session itself.

As urllib3 does, a kept connection is checked before it is reused (a readable idle socket means
the server closed it or sent something unasked: it is dropped), and one that fails anyway is
not retried here: the caller's standard retries decide.
"""

from __future__ import annotations

import http.client
import os
import select
import socket
import ssl
import threading
import weakref
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import botocore.awsrequest
import botocore.exceptions
from botocore.httpsession import URLLib3Session, create_urllib3_context, get_cert_path

Key = tuple[str, str, int]  # scheme, host, port
# The route of a URL whose requests go through a proxy (botocore's session sends them).
_PROXIED: tuple[Key, str] = (("", "", 0), "")
# URLs whose routes are kept (one per service and region in use: a handful).
_MAX_ROUTES = 256

# The connection failed while the request was sent or its answer read (reset, aborted, broken
# pipe, closed by the server: http.client.RemoteDisconnected), or the answer was not HTTP (a bad
# status line, an incomplete read): the connection is of no further use.
_CLOSED = (OSError, http.client.HTTPException)


@dataclass(frozen=True, slots=True)
class Response:
    """What the callers read of an answer (as of botocore's AWSResponse)."""

    status_code: int
    headers: botocore.awsrequest.HeadersDict
    content: bytes


class _Connection(http.client.HTTPConnection):
    """An HTTP connection whose connect uses the session's connect timeout and socket options,
    then reads with its read timeout; over TLS, with the session's context and SNI."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        connect_timeout: float | None,
        read_timeout: float | None,
        socket_options: list[tuple[int, int, int]],
        tls: ssl.SSLContext | None,
    ) -> None:
        super().__init__(host, port, timeout=connect_timeout)
        self._read_timeout = read_timeout
        self._socket_options = socket_options
        self._tls = tls

    def connect(self) -> None:
        sock = socket.create_connection((self.host, self.port), self.timeout)
        try:
            for level, option, value in self._socket_options:
                sock.setsockopt(level, option, value)
            if self._tls is not None:
                sock = self._tls.wrap_socket(sock, server_hostname=self.host)
            sock.settimeout(self._read_timeout)
        except BaseException:
            sock.close()
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
        self._socket_options: list[tuple[int, int, int]] = list(built._socket_options or [])
        self._max_idle = max(1, int(built._max_pool_connections))
        self._idle: dict[Key, list[_Connection]] = {}
        self._lock = threading.Lock()
        self._tls_context: ssl.SSLContext | None = None
        self._routes: dict[str, tuple[Key, str]] = {}
        self._pid = os.getpid()
        # As urllib3's pools: a session dropped closes its idle connections.
        weakref.finalize(self, _close_idle, self._idle)

    def send(self, request: Any) -> Any:
        """Send `request` (botocore's AWSPreparedRequest, read in full): a `Response`, or
        botocore's exceptions for a connection that failed."""
        url = request.url
        route = self._routes.get(url) or self._route(url)
        if route is _PROXIED or _expects_continue(request.headers):
            return self.fallback.send(request)
        key, target = route
        try:
            connection = self._take(key) or self._new(key)
        except Exception as error:  # building the TLS context: a bad CA bundle or certificate
            raise botocore.exceptions.HTTPClientError(error=error) from error
        try:
            if connection.sock is None:
                _connect(connection, url)
            answer, content = _exchange(connection, request, target)
        except Exception as error:
            connection.close()
            raise _translated(error, request) from error
        if answer.will_close:
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

    def close(self) -> None:
        """Close the idle connections."""
        with self._lock:
            _close_idle(self._idle)

    def _take(self, key: Key) -> _Connection | None:
        while True:
            with self._lock:
                if self._pid != os.getpid():
                    # A process forked with kept connections: they are the parent's sockets
                    # too, never to be shared. Forgotten, not closed (the parent's stay open).
                    self._idle.clear()
                    self._pid = os.getpid()
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
                self._tls_context = context
            return self._tls_context


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


def _connect(connection: _Connection, url: str) -> None:
    try:
        connection.connect()
    except ssl.SSLError as error:
        connection.close()
        raise botocore.exceptions.SSLError(endpoint_url=url, error=error) from error
    except TimeoutError as error:
        connection.close()
        raise botocore.exceptions.ConnectTimeoutError(endpoint_url=url, error=error) from error
    except OSError as error:  # not resolved, refused, unreachable
        connection.close()
        raise botocore.exceptions.EndpointConnectionError(endpoint_url=url, error=error) from error


def _exchange(
    connection: _Connection, request: Any, target: str
) -> tuple[http.client.HTTPResponse, bytes]:
    """Send the request on the connected `connection`; its answer, read in full."""
    # As urllib3 sends: Host and Accept-Encoding added unless the request has them.
    names = _lower_names(request.headers)
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
    answer = connection.getresponse()
    return answer, answer.read()


def _translated(error: Exception, request: Any) -> Exception:
    """botocore's exception for a failure while sending or reading (see the module's table)."""
    url = request.url
    if isinstance(error, botocore.exceptions.BotoCoreError):  # from _connect
        return error
    if isinstance(error, TimeoutError):
        return botocore.exceptions.ReadTimeoutError(endpoint_url=url, error=error)
    if isinstance(error, ssl.SSLError) and not isinstance(error, ssl.SSLEOFError):
        return botocore.exceptions.SSLError(endpoint_url=url, error=error)
    if isinstance(error, _CLOSED):  # an SSLEOFError too: the server closed it mid-answer
        return botocore.exceptions.ConnectionClosedError(
            error=error, request=request, endpoint_url=url
        )
    return botocore.exceptions.HTTPClientError(error=error)


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


def _expects_continue(headers: Any) -> bool:
    return any(
        str(name).lower() == "expect" and str(value).lower() == "100-continue"
        for name, value in headers.items()
    )
