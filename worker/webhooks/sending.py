"""Sending one webhook message: sign it, connect only to a checked address, POST it within a hard
time limit, and classify the answer. No database here: the claim hands over everything needed,
and the result is recorded by worker.webhooks.recording.
"""

from __future__ import annotations

import contextlib
import enum
import heapq
import itertools
import os
import re
import socket
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from worker.settings import Settings
from worker.webhooks.addresses import Resolver, UnsafeUrlError, resolve_allowed
from worker.webhooks.claims import Message
from worker.webhooks.signing import sign

USER_AGENT = "account-verifier-webhooks/1"
# Kept of a response body: enough to recognise an error page, never a customer's whole answer.
SNIPPET_CHARS = 200
_READ_AT_MOST = 1024
# A Retry-After beyond this is read as this: the schedule's own longest wait.
MAX_RETRY_AFTER_SECONDS = 24 * 3600


class AttemptKind(enum.StrEnum):
    """How one HTTP attempt ended."""

    DELIVERED = "delivered"  # 2xx
    FAILED = "failed"  # any other answer, a timeout, a refused connection
    GONE = "gone"  # 410: the receiver wants no more
    REFUSED = "refused"  # the URL resolves to an address the worker must not reach
    UNSIGNABLE = "unsignable"  # the endpoint's secret cannot be decrypted with the keys set


@dataclass(frozen=True, slots=True)
class AttemptResult:
    """What one HTTP attempt produced."""

    kind: AttemptKind
    status_code: int | None = None
    error: str | None = None
    retry_after_seconds: float | None = None


def escape_snippet(raw: str, limit: int = SNIPPET_CHARS) -> str:
    """The first `limit` characters with control characters escaped (`\\x1b`, `\\n`, ...)."""
    cut = raw[:limit]
    shown = "".join(
        ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in cut
    )
    return shown + ("…" if len(raw) > limit else "")


def parse_retry_after(value: str | None, *, now: datetime) -> float | None:
    """Seconds to wait from a Retry-After header (seconds or an HTTP date); None if unusable."""
    if not value:
        return None
    value = value.strip()
    # ASCII digits only: str.isdigit() accepts "²" and other digits float() then refuses.
    if re.fullmatch(r"[0-9]{1,10}", value):
        return min(float(value), MAX_RETRY_AFTER_SECONDS)
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return min(max((moment - now).total_seconds(), 0.0), MAX_RETRY_AFTER_SECONDS)


def build_client(settings: Settings) -> httpx.Client:
    """The HTTP client of a worker process: bounded waits, no redirects, no proxies from the
    environment (a proxy would connect to whatever the name resolves to there)."""
    return httpx.Client(
        timeout=httpx.Timeout(
            connect=settings.webhook_connect_timeout_seconds,
            read=settings.webhook_read_timeout_seconds,
            write=settings.webhook_read_timeout_seconds,
            pool=settings.webhook_connect_timeout_seconds,
        ),
        follow_redirects=False,
        trust_env=False,
        # No connection is kept alive: httpcore pools connections by scheme, IP address and port
        # (the requests go to the checked address), not by the TLS server name, so a connection
        # verified for one customer's host could carry another customer's message to the same IP.
        # A fresh connection per attempt also gives the attempt's watchdog its own socket.
        limits=httpx.Limits(
            max_connections=settings.webhook_concurrency * 2,
            max_keepalive_connections=0,
        ),
    )


class _Deadlines:
    """One thread per process that fires the attempts' watchdogs at their deadlines: a timer
    thread per attempt would cost a thread start (and its wait for the interpreter lock) each.

    A finished attempt's watchdog stays queued until its deadline and is then ignored.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: list[tuple[float, int, _Watchdog]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None
        self._pid = 0

    def add(self, deadline: float, watchdog: _Watchdog) -> None:
        """Fire `watchdog` at `deadline` (time.monotonic())."""
        with self._cond:
            heapq.heappush(self._queue, (deadline, next(self._order), watchdog))
            if self._thread is None or self._pid != os.getpid():  # none yet, or forked since
                self._pid = os.getpid()
                self._thread = threading.Thread(
                    target=self._run, name="webhook-watchdog", daemon=True
                )
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                while self._queue and self._queue[0][0] <= now:
                    heapq.heappop(self._queue)[2].fire()
                self._cond.wait(self._queue[0][0] - now if self._queue else None)


_DEADLINES = _Deadlines()


class _Watchdog:
    """Ends an attempt at its deadline whatever the server does: httpx's timeouts bound each
    read, so a server trickling one byte at a time would otherwise hold the thread for hours.

    httpx's trace hook hands over the connection's socket when it is made; at the deadline the
    watchdog shuts it down, and the blocked read or write returns at once. It holds a duplicate
    of the socket's descriptor, so the socket it shuts down can only be the attempt's own.
    """

    def __init__(self, seconds: float) -> None:
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._finished = False
        self.fired = False
        self._seconds = max(seconds, 0.0)

    def trace(self, event: str, info: dict[str, Any]) -> None:
        """httpcore's trace callback: keep the connection's socket."""
        if event != "connection.connect_tcp.complete":
            return
        stream = info.get("return_value")
        sock = None if stream is None else stream.get_extra_info("socket")
        if not isinstance(sock, socket.socket):
            return
        copy = socket.socket(fileno=os.dup(sock.fileno()))
        with self._lock:
            if self._finished:
                copy.close()
                return
            self._sockets.append(copy)
            if self.fired:
                self._shutdown(copy)

    @staticmethod
    def _shutdown(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):  # already closed by the peer
            sock.shutdown(socket.SHUT_RDWR)

    def fire(self) -> None:
        """The deadline: shut the connection down, unless the attempt is over."""
        with self._lock:
            if self._finished:
                return
            self.fired = True
            for sock in self._sockets:
                self._shutdown(sock)

    def __enter__(self) -> _Watchdog:
        _DEADLINES.add(time.monotonic() + self._seconds, self)
        return self

    def __exit__(self, *_: object) -> None:
        with self._lock:
            self._finished = True
            for sock in self._sockets:
                sock.close()
            self._sockets.clear()


def post_signed(
    client: httpx.Client,
    url: str,
    *,
    body: bytes,
    headers: dict[str, str],
    allow_private: bool,
    time_limit: float,
    resolver: Resolver | None = None,
) -> AttemptResult:
    """POST `body` to `url`, connecting only to an address checked just now, within `time_limit`
    seconds in all (resolving the name, connecting, sending, reading the answer).

    The request goes to the checked IP address; the URL's ASCII host name still names the server
    for TLS (SNI and certificate check) and in the Host header.
    """
    started = time.monotonic()
    limit = time_limit
    try:
        target = httpx.URL(url)
        host = target.raw_host.decode("ascii")
        dns_limit = min(client.timeout.connect or limit, limit)
        addresses = (
            resolve_allowed(target, allow_private=allow_private, timeout=dns_limit)
            if resolver is None
            else resolve_allowed(
                target, allow_private=allow_private, resolver=resolver, timeout=dns_limit
            )
        )
    except UnsafeUrlError as error:
        return AttemptResult(AttemptKind.REFUSED, error=str(error))
    except (httpx.InvalidURL, UnicodeError, ValueError):
        return AttemptResult(AttemptKind.REFUSED, error="not a valid URL")
    address = addresses[0]
    pinned = target.copy_with(host=str(address))
    request_headers = {
        **headers,
        "host": target.netloc.decode("ascii"),
        # Compressed answers would be inflated before they are counted: a small gzip body can
        # expand to gigabytes. Only the raw bytes are read, and identity is asked for.
        "accept-encoding": "identity",
    }
    watchdog = _Watchdog(limit - (time.monotonic() - started))
    extensions: dict[str, Any] = {"trace": watchdog.trace}
    if target.scheme == "https":
        extensions["sni_hostname"] = host
    try:
        with (
            watchdog,
            client.stream(
                "POST", pinned, content=body, headers=request_headers, extensions=extensions
            ) as response,
        ):
            snippet = b""
            for chunk in response.iter_raw():
                snippet += chunk
                if len(snippet) >= _READ_AT_MOST:
                    break
    except httpx.HTTPError as error:
        if watchdog.fired:
            return AttemptResult(
                AttemptKind.FAILED, error=f"timeout: the attempt took longer than {limit:g} s"
            )
        if isinstance(error, httpx.TimeoutException):
            return AttemptResult(AttemptKind.FAILED, error=f"timeout: {type(error).__name__}")
        return AttemptResult(
            AttemptKind.FAILED, error=escape_snippet(f"{type(error).__name__}: {error}")
        )
    status = response.status_code
    shown = escape_snippet(snippet[:_READ_AT_MOST].decode("utf-8", errors="replace")) or None
    if 200 <= status < 300:
        return AttemptResult(AttemptKind.DELIVERED, status_code=status)
    if status == 410:
        return AttemptResult(AttemptKind.GONE, status_code=status, error=shown)
    retry_after = None
    if status in (429, 503):
        retry_after = parse_retry_after(response.headers.get("retry-after"), now=datetime.now(UTC))
    return AttemptResult(
        AttemptKind.FAILED, status_code=status, error=shown, retry_after_seconds=retry_after
    )


def signed_headers(
    message: Message, secrets: list[str], *, now: float | None = None
) -> dict[str, str]:
    """The Standard Webhooks headers for one attempt (its own timestamp, the same id)."""
    timestamp = int(time.time() if now is None else now)
    return {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        "webhook-id": message.message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(message.message_id, timestamp, message.body(), secrets),
    }
