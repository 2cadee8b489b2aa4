"""The HTTP connections of webhook attempts: kept alive per host name and address, and cut at
each attempt's limit.

A connection is kept for the next attempt to the same scheme, host name, port and IP address:
a connection whose TLS was verified for one host never carries a message for another host on
the same address, and a request reuses a connection only if it goes to the address checked for
its own attempt (a changed DNS answer gets a new connection). A kept connection belongs to
nobody while idle and to one attempt while used: taken out of the idle ones and put back under
one lock, never closed by anyone else meanwhile.

Every attempt has a hard deadline (a server trickling its answer a byte at a time passes every
read timeout). One thread per process keeps the deadlines; at an attempt's deadline its watchdog
shuts down the socket of each connection the attempt used, a reused one included: the streams
here tell the watchdog of the thread using them which connection it is.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import os
import socket
import ssl
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import httpcore
import httpx

from worker.settings import Settings

# Idle connections kept per process, and per host name and address (the least recently used
# are closed first).
MAX_IDLE = 64
MAX_IDLE_PER_HOST = 8
# An idle connection is reused for at most this long: shorter than the keep-alive timeouts of
# common servers (2 s and more), so the server rarely closes one just as it is reused.
IDLE_SECONDS = 1.0

# The watchdog of the attempt running on this thread (httpcore reads and writes on the thread of
# the request).
_current = threading.local()


class _WatchedStream(httpcore.NetworkStream):
    """A connection's stream, which the watchdog of the attempt using it can cut.

    It holds a duplicate of the socket's descriptor: shutting it down ends the connection's
    blocked read or write (during the TLS handshake too), and its number cannot be given to
    another socket before the stream is closed. Cutting and closing take one lock, so a cut never
    reaches a closed stream.
    """

    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner
        sock = inner.get_extra_info("socket")
        self._handle = socket.socket(fileno=os.dup(sock.fileno()))
        self._lock = threading.Lock()
        self._closed = False
        self.cut_off = False

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        _watch(self)
        return self._inner.read(max_bytes, timeout)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        _watch(self)
        self._inner.write(buffer, timeout)

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        try:
            self._inner = self._inner.start_tls(ssl_context, server_hostname, timeout)
        except BaseException:
            self.close()
            raise
        return self

    def get_extra_info(self, info: str) -> Any:
        # A connection cut at a deadline reads as closed by the server: the pool drops it.
        if info == "is_readable" and self.cut_off:
            return True
        return self._inner.get_extra_info(info)

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._handle.close()
        self._inner.close()

    def cut(self) -> None:
        """Shut the connection down: its blocked read or write returns at once."""
        with self._lock:
            if self._closed:
                return
            self.cut_off = True
            with contextlib.suppress(OSError):  # already closed by the peer
                self._handle.shutdown(socket.SHUT_RDWR)


class _Backend(httpcore.SyncBackend):
    """httpcore's sockets, each as a `_WatchedStream` that the attempt making it watches at once
    (its TLS handshake included)."""

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        stream = _WatchedStream(
            super().connect_tcp(host, port, timeout, local_address, socket_options)
        )
        _watch(stream)
        return stream


def _watch(stream: _WatchedStream) -> None:
    watchdog: Watchdog | None = getattr(_current, "watchdog", None)
    if watchdog is not None:
        watchdog.watch(stream)


class _Deadlines:
    """One thread per process that fires the attempts' watchdogs at their deadlines: a timer
    thread per attempt would cost a thread start (and its wait for the interpreter lock) each.

    A finished attempt's watchdog stays queued until its deadline and is then ignored. The
    thread is woken only when a deadline comes before every queued one (rarely: every attempt
    has the same limit), not once per attempt.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: list[tuple[float, int, Watchdog]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None
        self._pid = 0

    def add(self, deadline: float, watchdog: Watchdog) -> None:
        """Fire `watchdog` at `deadline` (time.monotonic())."""
        with self._cond:
            heapq.heappush(self._queue, (deadline, next(self._order), watchdog))
            if self._thread is None or self._pid != os.getpid():  # none yet, or forked since
                self._pid = os.getpid()
                self._thread = threading.Thread(
                    target=self._run, name="webhook-watchdog", daemon=True
                )
                self._thread.start()
            elif self._queue[0][2] is watchdog:
                self._cond.notify()

    def _run(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                while self._queue and self._queue[0][0] <= now:
                    heapq.heappop(self._queue)[2].fire()
                self._cond.wait(self._queue[0][0] - now if self._queue else None)


_DEADLINES = _Deadlines()


class Watchdog:
    """Ends an attempt at its deadline whatever the server does: httpx's timeouts bound each
    read, so a server trickling one byte at a time would otherwise hold the thread for hours.

    While the attempt runs (between entering and `finish`), every connection its thread makes or
    reads from or writes to is watched; at the deadline each is cut. `finish` comes before the
    connection is put back with the idle ones: a watchdog never cuts a connection another
    attempt has taken since.
    """

    def __init__(self, seconds: float) -> None:
        self._lock = threading.Lock()
        self._streams: list[_WatchedStream] = []
        self._finished = False
        self.fired = False
        self._seconds = max(seconds, 0.0)

    def watch(self, stream: _WatchedStream) -> None:
        """A connection this attempt uses (once per connection; cut at once after the deadline)."""
        with self._lock:
            if self._finished or stream in self._streams:
                return
            self._streams.append(stream)
            if self.fired:
                stream.cut()

    def fire(self) -> None:
        """The deadline: cut the attempt's connections, unless the attempt is over."""
        with self._lock:
            if self._finished:
                return
            self.fired = True
            for stream in self._streams:
                stream.cut()

    def finish(self) -> None:
        """The attempt is over: its connections are no longer its own."""
        with self._lock:
            self._finished = True
            self._streams.clear()
        if getattr(_current, "watchdog", None) is self:
            _current.watchdog = None

    def __enter__(self) -> Watchdog:
        _current.watchdog = self
        _DEADLINES.add(time.monotonic() + self._seconds, self)
        return self

    def __exit__(self, *_: object) -> None:
        self.finish()


Key = tuple[str, str, int, str]  # scheme, host name, port, IP address


@dataclass(eq=False, slots=True)  # hashed by identity
class _Idle:
    key: Key
    connection: httpcore.HTTPConnection
    since: float


class Connections:
    """The webhook connections of a worker process: new ones, and idle ones kept for the next
    request to the same (scheme, host name, port, address) — at most `MAX_IDLE_PER_HOST` each,
    `MAX_IDLE` in all, none idle longer than `IDLE_SECONDS`.

    Its timeouts are the settings' (connect, read/write). TLS verifies the certificate for the
    URL's host name (sent as SNI), whichever address. No proxy from the environment (a proxy
    would connect to whatever the name resolves to there), no redirects (httpcore follows none).
    """

    def __init__(self, settings: Settings, *, ssl_context: ssl.SSLContext | None = None) -> None:
        # One TLS context for every host (loading the CA certificates costs tens of milliseconds):
        # httpx's, which verifies certificates against certifi's CAs (tests pass their own).
        self._ssl = ssl_context or httpx.create_ssl_context(trust_env=False)
        self.connect_timeout = settings.webhook_connect_timeout_seconds
        self.timeouts = {
            "connect": settings.webhook_connect_timeout_seconds,
            "read": settings.webhook_read_timeout_seconds,
            "write": settings.webhook_read_timeout_seconds,
        }
        self._lock = threading.Lock()
        self._idle: dict[Key, list[_Idle]] = {}  # per key, the most recently used last
        self._order: dict[_Idle, None] = {}  # every idle one, the least recently used first
        self._backend = _Backend()

    def new(self, origin: httpcore.Origin) -> httpcore.HTTPConnection:
        """A connection to `origin` (the IP address), made by its first request."""
        return httpcore.HTTPConnection(
            origin=origin, ssl_context=self._ssl, network_backend=self._backend
        )

    def take(self, key: Key) -> httpcore.HTTPConnection | None:
        """The most recently used idle connection for `key`, now the caller's alone; None if
        there is none (or none the server has not closed meanwhile)."""
        while True:
            closing: list[httpcore.HTTPConnection] = []
            with self._lock:
                self._expire(time.monotonic(), closing)
                stack = self._idle.get(key)
                entry = stack[-1] if stack else None
                if entry is not None:
                    self._remove(entry)
            _close(closing)
            if entry is None:
                return None
            if not entry.connection.has_expired():  # not closed by the server, nor cut
                return entry.connection
            entry.connection.close()

    def put_back(self, key: Key, connection: httpcore.HTTPConnection) -> None:
        """Keep a connection whose request is over for the next one to `key`, if it can take
        one (its answer was read to the end and the server keeps it open); else close it."""
        if not connection.is_available():
            connection.close()
            return
        now = time.monotonic()
        closing: list[httpcore.HTTPConnection] = []
        with self._lock:
            entry = _Idle(key, connection, now)
            stack = self._idle.setdefault(key, [])
            stack.append(entry)
            self._order[entry] = None
            if len(stack) > MAX_IDLE_PER_HOST:
                closing.append(self._remove(stack[0]))
            while len(self._order) > MAX_IDLE:
                closing.append(self._remove(next(iter(self._order))))
            self._expire(now, closing)
        _close(closing)

    def _remove(self, entry: _Idle) -> httpcore.HTTPConnection:
        del self._order[entry]
        stack = self._idle[entry.key]
        stack.remove(entry)
        if not stack:
            del self._idle[entry.key]
        return entry.connection

    def _expire(self, now: float, closing: list[httpcore.HTTPConnection]) -> None:
        while self._order:
            oldest = next(iter(self._order))
            if now - oldest.since <= IDLE_SECONDS:
                return
            closing.append(self._remove(oldest))

    def idle_connections(self) -> int:
        """Connections kept for a next request (tests, and a look at a live process)."""
        with self._lock:
            return len(self._order)

    def close(self) -> None:
        """Close every idle connection (those in use are closed or kept by their requests)."""
        with self._lock:
            closing = [entry.connection for entry in self._order]
            self._idle.clear()
            self._order.clear()
        _close(closing)


def _close(connections: list[httpcore.HTTPConnection]) -> None:
    for connection in connections:
        connection.close()
