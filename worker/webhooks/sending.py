"""Sending one webhook message: sign it, connect only to a checked address, POST it within a hard
time limit, and classify the answer. No database here: the claim hands over everything needed,
and the result is recorded by worker.webhooks.recording.
"""

from __future__ import annotations

import enum
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpcore
import httpx

from worker.webhooks.addresses import (
    IpAddress,
    Resolver,
    UnsafeUrlError,
    check_url,
    resolve_allowed,
)
from worker.webhooks.connections import Connections, Key, Watchdog
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


# What a failed request raises (httpcore's errors; anything else is an internal error).
_HTTP_ERRORS = (
    httpcore.TimeoutException,
    httpcore.NetworkError,
    httpcore.ProtocolError,
    httpcore.UnsupportedProtocol,
)
# A kept connection the server closed as it was reused: the request is sent once more.
_STALE_CONNECTION_ERRORS = (httpcore.RemoteProtocolError, httpcore.ReadError, httpcore.WriteError)


def post_signed(
    connections: Connections,
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

    The request goes to the checked IP address, on a connection kept from an earlier attempt to
    the same host name and address or a new one; the URL's ASCII host name still names the
    server for TLS (SNI and certificate check) and in the Host header.
    """
    started = time.monotonic()
    try:
        target = check_url(url, allow_private=allow_private)
        dns_limit = min(connections.connect_timeout, time_limit)
        addresses = (
            resolve_allowed(url, allow_private=allow_private, timeout=dns_limit)
            if resolver is None
            else resolve_allowed(
                url, allow_private=allow_private, resolver=resolver, timeout=dns_limit
            )
        )
    except UnsafeUrlError as error:
        return AttemptResult(AttemptKind.REFUSED, error=str(error))
    except (httpx.InvalidURL, UnicodeError, ValueError):
        return AttemptResult(AttemptKind.REFUSED, error="not a valid URL")
    request = _request(target, addresses[0], body, headers, timeouts=connections.timeouts)
    key = (
        target.scheme,
        target.raw_host.decode("ascii"),
        request.url.origin.port,
        str(addresses[0]),
    )
    with Watchdog(time_limit - (time.monotonic() - started)) as watchdog:
        try:
            status, answer_headers, snippet = _exchange(connections, key, request, watchdog)
        except _HTTP_ERRORS as error:
            if watchdog.fired:
                return AttemptResult(
                    AttemptKind.FAILED,
                    error=f"timeout: the attempt took longer than {time_limit:g} s",
                )
            if isinstance(error, httpcore.TimeoutException):
                return AttemptResult(AttemptKind.FAILED, error=f"timeout: {type(error).__name__}")
            return AttemptResult(
                AttemptKind.FAILED, error=escape_snippet(f"{type(error).__name__}: {error}")
            )
    shown = escape_snippet(snippet[:_READ_AT_MOST].decode("utf-8", errors="replace")) or None
    if 200 <= status < 300:
        return AttemptResult(AttemptKind.DELIVERED, status_code=status)
    if status == 410:
        return AttemptResult(AttemptKind.GONE, status_code=status, error=shown)
    retry_after = None
    if status in (429, 503):
        retry_after = parse_retry_after(
            _header(answer_headers, b"retry-after"), now=datetime.now(UTC)
        )
    return AttemptResult(
        AttemptKind.FAILED, status_code=status, error=shown, retry_after_seconds=retry_after
    )


def _request(
    target: httpx.URL,
    address: IpAddress,
    body: bytes,
    headers: dict[str, str],
    *,
    timeouts: dict[str, float],
) -> httpcore.Request:
    """The POST to the checked `address`, for the URL's host (Host header, and SNI over TLS)."""
    extensions: dict[str, Any] = {"timeout": timeouts}
    if target.scheme == "https":
        extensions["sni_hostname"] = target.raw_host.decode("ascii")
    return httpcore.Request(
        b"POST",
        httpcore.URL(
            scheme=target.raw_scheme,
            host=str(address).encode("ascii"),
            port=target.port or (443 if target.scheme == "https" else 80),
            target=target.raw_path,
        ),
        headers=[
            (b"host", target.netloc),
            (b"content-length", str(len(body)).encode("ascii")),
            # Compressed answers would be inflated before they are counted: a small gzip body
            # can expand to gigabytes. Only the raw bytes are read, and identity is asked for.
            (b"accept-encoding", b"identity"),
            *((name.encode("ascii"), value.encode("ascii")) for name, value in headers.items()),
        ],
        content=body,
        extensions=extensions,
    )


def _exchange(
    connections: Connections, key: Key, request: httpcore.Request, watchdog: Watchdog
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Send the request on a connection kept for `key` or a new one; the answer's status,
    headers and first bytes (at most 1 KiB). The connection is kept again if it can be."""
    kept = connections.take(key)
    connection = connections.new(request.url.origin) if kept is None else kept
    try:
        try:
            response = connection.handle_request(request)
        except _STALE_CONNECTION_ERRORS:
            if kept is None or watchdog.fired:
                raise
            # No answer on a connection kept from an earlier attempt: the server closed it as
            # it was reused (its keep-alive timeout ran out). Once more, on a new connection.
            connection.close()
            connection = connections.new(request.url.origin)
            response = connection.handle_request(request)
        try:
            snippet = b""
            for chunk in response.iter_stream():
                snippet += chunk
                if len(snippet) >= _READ_AT_MOST:
                    break
        finally:
            # The attempt is over before its connection can be another's.
            watchdog.finish()
            response.close()
    except BaseException:
        connection.close()
        raise
    connections.put_back(key, connection)
    return response.status, response.headers, snippet


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    """A header's value (the first one), decoded as Latin-1 like HTTP's bytes."""
    for key, value in headers:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def signed_headers(
    message_id: str, body: bytes, secrets: list[str], *, now: float | None = None
) -> dict[str, str]:
    """The Standard Webhooks headers for one attempt of `body` (its own timestamp, the same id)."""
    timestamp = int(time.time() if now is None else now)
    return {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(message_id, timestamp, body, secrets),
    }
