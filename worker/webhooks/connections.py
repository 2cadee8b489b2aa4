"""The HTTP connections of webhook attempts: kept alive per host name, cut at each attempt's limit.

A connection is kept for the next attempt to the same scheme, host name and port, and reused only
by a request to the address checked for that attempt: each host name has its own small httpcore
pool, whose connections are keyed by the IP address they were made to. So a connection whose TLS
was verified for one host never carries a message for another host on the same address, and a
changed DNS answer never reuses a connection to the old address.

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
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpcore
import httpx

from worker.settings import Settings

# Host names whose pools are kept (least recently used dropped first), and idle connections kept
# per host name: at most 256 idle connections per process.
MAX_HOSTS = 32
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
        # Attempts that used this connection: more than one when it was kept alive.
        self.attempts = 0

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
    answer is closed, which hands a kept connection back to its pool: a watchdog never cuts a
    connection another attempt has taken since.
    """

    def __init__(self, seconds: float) -> None:
        self._lock = threading.Lock()
        self._streams: list[_WatchedStream] = []
        self._finished = False
        self.fired = False
        # Whether a connection of this attempt was kept from an earlier one.
        self.reused = False
        self._seconds = max(seconds, 0.0)

    def watch(self, stream: _WatchedStream) -> None:
        """A connection this attempt uses (once per connection; cut at once after the deadline)."""
        with self._lock:
            if self._finished or stream in self._streams:
                return
            self._streams.append(stream)
            self.reused = self.reused or stream.attempts > 0
            stream.attempts += 1
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


@dataclass(eq=False)
class _HostPool:
    pool: httpcore.ConnectionPool
    users: int = 0
    last_used: float = field(default_factory=time.monotonic)
    dropped: bool = False


class Connections:
    """The webhook connections of a worker process: a small pool per (scheme, host name, port),
    the `MAX_HOSTS` used last kept, each with at most `MAX_IDLE_PER_HOST` idle connections, none
    kept idle longer than `IDLE_SECONDS`.

    Its timeouts are the settings' (connect, read/write, and connect again for a free slot). TLS
    verifies the certificate for the URL's host name (sent as SNI), whichever address. No
    proxy from the environment (a proxy would connect to whatever the name resolves to there),
    no redirects (httpcore follows none).
    """

    def __init__(self, settings: Settings, *, ssl_context: ssl.SSLContext | None = None) -> None:
        # One TLS context for every host (loading the CA certificates costs tens of milliseconds):
        # httpx's, which verifies certificates against certifi's CAs (tests pass their own).
        self._ssl = ssl_context or httpx.create_ssl_context(trust_env=False)
        self._max_connections = settings.webhook_concurrency
        self.connect_timeout = settings.webhook_connect_timeout_seconds
        self.timeouts = {
            "connect": settings.webhook_connect_timeout_seconds,
            "read": settings.webhook_read_timeout_seconds,
            "write": settings.webhook_read_timeout_seconds,
            "pool": settings.webhook_connect_timeout_seconds,
        }
        self._lock = threading.Lock()
        self._pools: OrderedDict[tuple[str, str, int], _HostPool] = OrderedDict()
        self._backend = _Backend()

    @contextlib.contextmanager
    def pool(self, scheme: str, host: str, port: int) -> Iterator[httpcore.ConnectionPool]:
        """The pool of one host name, while a request uses it (not closed meanwhile)."""
        key = (scheme, host, port)
        now = time.monotonic()
        dropped: list[_HostPool] = []
        with self._lock:
            entry = self._pools.pop(key, None)
            if entry is None:
                entry = _HostPool(
                    httpcore.ConnectionPool(
                        ssl_context=self._ssl,
                        max_connections=self._max_connections,
                        max_keepalive_connections=MAX_IDLE_PER_HOST,
                        keepalive_expiry=IDLE_SECONDS,
                        network_backend=self._backend,
                    )
                )
            self._pools[key] = entry  # the most recently used, last
            entry.users += 1
            while self._pools:
                oldest = next(iter(self._pools.values()))
                stale = oldest.users == 0 and now - oldest.last_used > IDLE_SECONDS
                if len(self._pools) <= MAX_HOSTS and not stale:
                    break
                self._pools.popitem(last=False)
                oldest.dropped = True
                if oldest.users == 0:
                    dropped.append(oldest)
        for old in dropped:
            old.pool.close()
        try:
            yield entry.pool
        finally:
            with self._lock:
                entry.users -= 1
                entry.last_used = time.monotonic()
                close = entry.dropped and entry.users == 0
            if close:
                entry.pool.close()

    def idle_connections(self) -> int:
        """Connections kept for a next attempt (tests, and a look at a live process)."""
        with self._lock:
            pools = [entry.pool for entry in self._pools.values()]
        return sum(1 for pool in pools for c in pool.connections if c.is_idle())

    def close(self) -> None:
        """Close every connection (those in use when their requests are done)."""
        with self._lock:
            pools = list(self._pools.values())
            self._pools.clear()
            for entry in pools:
                entry.dropped = True  # one in use is closed when its request is done
            idle = [entry for entry in pools if entry.users == 0]
        for entry in idle:
            entry.pool.close()
