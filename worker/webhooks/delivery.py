"""Delivering webhook messages: claim due deliveries, send one signed POST each, record the result.

A claim leases deliveries like the accounts' claims (worker/claims.py): `FOR UPDATE SKIP LOCKED`
so claimers never wait for each other, and a lease that outlives the claim's transaction and
simply expires if the worker dies, making the delivery due again with the same `webhook-id`.
The HTTP request happens outside any transaction; its result is recorded only if the lease is
still the attempt's own.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import random
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from models import AuditEvent, AuditEventType
from models.webhooks import message_id
from worker.logging import get_logger
from worker.settings import Settings
from worker.webhooks.addresses import Resolver, UnsafeUrlError, resolve_allowed, url_host
from worker.webhooks.signing import SecretBox, SecretKeyError, sign

log = get_logger("worker.webhooks")

USER_AGENT = "account-verifier-webhooks/1"
# Kept of a response body: enough to recognise an error page, never a customer's whole answer.
SNIPPET_CHARS = 200
_READ_AT_MOST = 1024
# Fraction of a retry delay added or removed at random, so retries after an outage spread out.
JITTER_RATIO = 0.1
# A Retry-After beyond this is read as this: the schedule's own longest wait.
MAX_RETRY_AFTER_SECONDS = 24 * 3600
WORKER_ACTOR = "worker"
SECRET_UNREADABLE = "secret unreadable"  # noqa: S105 - a reason, not a secret


# Beyond the attempt's hard limit, the time to record its result: the lease never expires while
# its attempt can still be running, so a second attempt never runs beside it.
LEASE_MARGIN_SECONDS = 15


def lease_seconds(settings: Settings) -> int:
    """A delivery's lease: the attempt's hard limit (WEBHOOK_ATTEMPT_TIMEOUT_SECONDS) and a
    margin to record its result."""
    return int(settings.webhook_attempt_timeout_seconds) + 1 + LEASE_MARGIN_SECONDS


# Due deliveries of enabled endpoints, oldest first, at most `per_endpoint` per endpoint counting
# those already in flight: one slow or hanging endpoint can never take every slot of a claim.
# FOR UPDATE cannot sit next to a window function, hence the selection first and the locking
# pass after it. The claim returns everything an attempt needs, so an attempt costs one more
# statement (its result) and no read.
CLAIM_DUE_DELIVERIES = text(
    """
    WITH in_flight AS (
        SELECT endpoint_id, count(*) AS n
          FROM webhook_deliveries
         WHERE next_attempt_at IS NOT NULL AND lease_expires_at > now()
         GROUP BY endpoint_id
    ), candidates AS (
        SELECT id, next_attempt_at
          FROM (SELECT d.id, d.next_attempt_at,
                       row_number() OVER (PARTITION BY d.endpoint_id ORDER BY d.next_attempt_at)
                       + coalesce(f.n, 0) AS place
                  FROM webhook_deliveries AS d
                  JOIN webhook_endpoints AS w ON w.id = d.endpoint_id AND w.enabled
                  LEFT JOIN in_flight AS f ON f.endpoint_id = d.endpoint_id
                 WHERE d.next_attempt_at <= now()
                   AND (d.lease_expires_at IS NULL OR d.lease_expires_at <= now())) AS ranked
         WHERE place <= :per_endpoint
         ORDER BY next_attempt_at
         LIMIT :limit
    )
    UPDATE webhook_deliveries AS d
       SET lease_id = :lease_id,
           lease_expires_at = now() + make_interval(secs => :lease_seconds)
      FROM webhook_endpoints AS w
     WHERE w.id = d.endpoint_id
       AND d.id = ANY(ARRAY(
            SELECT c.id
              FROM webhook_deliveries AS c
             WHERE c.id IN (SELECT id FROM candidates)
               AND c.next_attempt_at <= now()
               AND (c.lease_expires_at IS NULL OR c.lease_expires_at <= now())
               FOR UPDATE SKIP LOCKED))
    RETURNING d.id, d.endpoint_id, d.event_type, d.payload, d.attempts, w.url,
              w.organization_id, w.secret_encrypted,
              CASE WHEN w.previous_secret_expires_at > now()
                   THEN w.previous_secret_encrypted END AS previous_secret_encrypted
    """
)


@dataclass(frozen=True, slots=True)
class Message:
    """A leased delivery ready to send: where, what, and the (encrypted) secrets to sign it with.

    The secrets are decrypted by the attempt, not the claim: one secret that cannot be decrypted
    fails its own endpoint's deliveries, never the whole claim.
    """

    delivery_id: uuid.UUID
    endpoint_id: uuid.UUID
    organization_id: uuid.UUID
    url: str
    event_type: str
    payload: dict[str, Any]
    attempts: int
    stored_secrets: tuple[bytes, ...] = field(repr=False)

    @property
    def message_id(self) -> str:
        """The `webhook-id` header."""
        return message_id(self.delivery_id)

    def body(self) -> bytes:
        """The exact bytes sent and signed: compact JSON, the same on every attempt."""
        return json.dumps(self.payload, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True, slots=True)
class DeliveryClaim:
    """Deliveries leased together under one lease id."""

    lease_id: uuid.UUID
    messages: list[Message]

    @property
    def delivery_ids(self) -> list[uuid.UUID]:
        """The leased deliveries' ids."""
        return [m.delivery_id for m in self.messages]


def claim_due_deliveries(
    session: Session, *, limit: int, per_endpoint: int, lease_seconds: int
) -> DeliveryClaim:
    """Lease up to `limit` due deliveries, at most `per_endpoint` in flight per endpoint."""
    lease_id = uuid.uuid4()
    if limit <= 0:
        return DeliveryClaim(lease_id=lease_id, messages=[])
    rows = session.execute(
        CLAIM_DUE_DELIVERIES,
        {
            "lease_id": lease_id,
            "lease_seconds": lease_seconds,
            "limit": limit,
            "per_endpoint": per_endpoint,
        },
    ).all()
    return DeliveryClaim(
        lease_id=lease_id,
        messages=[
            Message(
                delivery_id=row.id,
                endpoint_id=row.endpoint_id,
                organization_id=row.organization_id,
                url=row.url,
                event_type=row.event_type,
                payload=row.payload,
                attempts=row.attempts,
                stored_secrets=(row.secret_encrypted,)
                + (
                    ()
                    if row.previous_secret_encrypted is None
                    else (row.previous_secret_encrypted,)
                ),
            )
            for row in rows
        ],
    )


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
        self._timer = threading.Timer(max(seconds, 0.0), self._fire)
        self._timer.daemon = True

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

    def _fire(self) -> None:
        with self._lock:
            if self._finished:
                return
            self.fired = True
            for sock in self._sockets:
                self._shutdown(sock)

    def __enter__(self) -> _Watchdog:
        self._timer.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._timer.cancel()
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


def retry_delay(
    attempts: int, settings: Settings, *, rng: random.Random, retry_after: float | None = None
) -> float | None:
    """Seconds until the next attempt after `attempts` failed ones; None: give up.

    The schedule's delay with jitter; a Retry-After that asks for longer wins.
    """
    schedule = settings.webhook_retry_schedule_seconds
    if attempts > len(schedule):
        return None
    base = schedule[attempts - 1]
    delay = base * rng.uniform(1 - JITTER_RATIO, 1 + JITTER_RATIO)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return delay


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


# One attempt's result and the endpoint's failing streak, in one statement: the delivery only if
# the lease is still the attempt's own; the streak ends on success and starts (if it had not) on
# a failure. A failure longer after the previous one than any retry waits starts a new streak:
# an endpoint that failed once a week ago and then got no event is not "failing for a week".
# Returns nothing when the lease was lost.
_RECORD = text(
    """
    WITH finished AS (
        UPDATE webhook_deliveries
           SET attempts = attempts + 1,
               last_attempt_at = now(),
               last_status_code = :status_code,
               last_error = :error,
               delivered_at = CASE WHEN :delivered THEN now() END,
               given_up_at = CASE WHEN :given_up THEN now() END,
               next_attempt_at = CASE
                   WHEN :delivered OR :given_up THEN NULL
                   ELSE now() + make_interval(secs => :delay) END,
               lease_id = NULL,
               lease_expires_at = NULL
         WHERE id = :id AND lease_id = :lease_id
        RETURNING endpoint_id
    ), streak AS (
        UPDATE webhook_endpoints AS w
           SET failing_since = CASE
                   WHEN :delivered THEN NULL
                   WHEN w.failing_since IS NULL
                        OR w.last_failure_at < now() - make_interval(secs => :streak_gap)
                   THEN now()
                   ELSE w.failing_since END,
               last_failure_at = CASE WHEN :delivered THEN w.last_failure_at ELSE now() END
          FROM finished
         WHERE w.id = finished.endpoint_id
           AND (NOT :delivered OR w.failing_since IS NOT NULL)
        RETURNING w.failing_since
    )
    SELECT coalesce((SELECT failing_since FROM streak), w.failing_since, now())
           <= now() - make_interval(secs => :disable_after) AS failing_too_long
      FROM finished JOIN webhook_endpoints AS w ON w.id = finished.endpoint_id
    """
)


def streak_gap_seconds(settings: Settings) -> float:
    """A pause between two failures longer than this starts a new failing streak: longer than
    the longest retry delay (with its jitter) plus an attempt, so retries never restart it."""
    longest = max(settings.webhook_retry_schedule_seconds, default=0.0)
    return longest * (1 + JITTER_RATIO) + lease_seconds(settings)


def disable_endpoint(session: Session, endpoint_id: uuid.UUID, *, reason: str, actor: str) -> bool:
    """Disable an endpoint, give up its pending deliveries, and record an audit event.

    Returns False if it was already disabled (nothing is recorded twice).
    """
    row = session.execute(
        text(
            """
            UPDATE webhook_endpoints
               SET enabled = false, disabled_reason = :reason, disabled_at = now()
             WHERE id = :id AND enabled
            RETURNING organization_id
            """
        ),
        {"id": endpoint_id, "reason": reason[:255]},
    ).one_or_none()
    if row is None:
        return False
    # Leased deliveries finish their attempt; the rest stop here (a replay can revive them).
    session.execute(
        text(
            """
            UPDATE webhook_deliveries
               SET next_attempt_at = NULL, given_up_at = now(), last_error = 'endpoint disabled'
             WHERE endpoint_id = :id AND next_attempt_at IS NOT NULL
               AND (lease_expires_at IS NULL OR lease_expires_at <= now())
            """
        ),
        {"id": endpoint_id},
    )
    session.add(
        AuditEvent(
            organization_id=row.organization_id,
            account_id=None,
            event_type=AuditEventType.WEBHOOK_ENDPOINT_DISABLED,
            actor=actor,
            reason=reason[:128],
            details={"endpoint_id": str(endpoint_id)},
        )
    )
    session.flush()
    return True


@dataclass(frozen=True, slots=True)
class Recorded:
    """What became of a delivery after one attempt."""

    result: AttemptResult
    delivered: bool
    given_up: bool
    next_attempt_in: float | None
    endpoint_disabled: bool


def record_attempt(
    session: Session,
    message: Message,
    lease_id: uuid.UUID,
    result: AttemptResult,
    *,
    settings: Settings,
    rng: random.Random,
) -> Recorded | None:
    """Write one attempt's result, if the lease is still ours; None otherwise.

    Success clears the endpoint's failing streak. A failure schedules the next attempt (or gives
    up after the schedule's last); 410 Gone disables the endpoint; so does an endpoint none of
    whose deliveries succeeded for WEBHOOK_DISABLE_AFTER_SECONDS.
    """
    attempts = message.attempts + 1
    fields = {
        "delivery_id": str(message.delivery_id),
        "endpoint_id": str(message.endpoint_id),
        "organization_id": str(message.organization_id),
        "webhook_id": message.message_id,
        "event_type": message.event_type,
        "attempt": attempts,
        "host": url_host(message.url),
    }
    delivered = result.kind is AttemptKind.DELIVERED
    delay = (
        None
        if delivered or result.kind in (AttemptKind.GONE, AttemptKind.UNSIGNABLE)
        else retry_delay(attempts, settings, rng=rng, retry_after=result.retry_after_seconds)
    )
    given_up = not delivered and delay is None
    row = session.execute(
        _RECORD,
        {
            "id": message.delivery_id,
            "lease_id": lease_id,
            "delivered": delivered,
            "given_up": given_up,
            "delay": delay or 0.0,
            "status_code": result.status_code,
            "error": result.error,
            "disable_after": settings.webhook_disable_after_seconds,
            "streak_gap": streak_gap_seconds(settings),
        },
    ).one_or_none()
    if row is None:
        return None
    if delivered:
        log.info("webhook.delivered", **fields, status_code=result.status_code)
        return Recorded(result, True, False, None, False)
    (log.warning if given_up else log.info)(
        "webhook.given_up" if given_up else "webhook.attempt_failed",
        **fields,
        status_code=result.status_code,
        outcome=result.kind.value,
        error=result.error,
        next_attempt_in_seconds=None if delay is None else round(delay, 1),
    )
    reason = None
    if result.kind is AttemptKind.GONE:
        reason = "the endpoint answered 410 Gone"
    elif result.kind is AttemptKind.UNSIGNABLE:
        reason = SECRET_UNREADABLE
    elif row.failing_too_long:
        days = settings.webhook_disable_after_seconds / 86400
        reason = f"no delivery succeeded for {days:g} days"
    disabled = False
    if reason is not None:
        disabled = disable_endpoint(session, message.endpoint_id, reason=reason, actor=WORKER_ACTOR)
        if disabled:
            log.warning(
                "webhook.endpoint_disabled",
                endpoint_id=str(message.endpoint_id),
                organization_id=str(message.organization_id),
                host=fields["host"],
                reason=reason,
            )
    return Recorded(result, False, given_up, delay, disabled)


@dataclass
class Deliverer:
    """Everything a worker process needs to deliver: sessions, key, HTTP client, settings."""

    sessions: sessionmaker[Session]
    settings: Settings
    box: SecretBox
    client: httpx.Client
    rng: random.Random
    resolver: Resolver | None = None

    def deliver(self, message: Message, lease_id: uuid.UUID) -> Recorded | None:
        """One attempt of one leased delivery; None if the lease was lost meanwhile (logged)."""
        result = self.attempt(message)
        with self.sessions.begin() as session:
            recorded = record_attempt(
                session, message, lease_id, result, settings=self.settings, rng=self.rng
            )
        if recorded is None:
            # Another attempt holds the delivery now (the lease expired or a replay reset it):
            # its result is the one recorded.
            log.warning(
                "webhook.lease_lost",
                delivery_id=str(message.delivery_id),
                endpoint_id=str(message.endpoint_id),
                organization_id=str(message.organization_id),
                outcome=result.kind.value,
                status_code=result.status_code,
            )
        return recorded

    def attempt(self, message: Message) -> AttemptResult:
        """Sign and send one message; every error becomes a failed result, never an exception
        (an exception would leave the delivery leased and retried, unrecorded, forever)."""
        try:
            secrets = [self.box.decrypt(stored) for stored in message.stored_secrets]
        except SecretKeyError as error:
            return AttemptResult(AttemptKind.UNSIGNABLE, error=str(error))
        try:
            return post_signed(
                self.client,
                message.url,
                body=message.body(),
                headers=signed_headers(message, secrets),
                allow_private=self.settings.webhook_allow_private_networks,
                resolver=self.resolver,
                time_limit=self.settings.webhook_attempt_timeout_seconds,
            )
        except Exception as error:
            log.exception("webhook.attempt_error", delivery_id=str(message.delivery_id))
            return AttemptResult(
                AttemptKind.FAILED, error=f"internal error ({type(error).__name__})"
            )

    def claim(self, limit: int) -> DeliveryClaim:
        """Lease due deliveries (its own short transaction)."""
        with self.sessions.begin() as session:
            return claim_due_deliveries(
                session,
                limit=limit,
                per_endpoint=self.settings.webhook_per_endpoint_limit,
                lease_seconds=lease_seconds(self.settings),
            )

    def deliver_due(self) -> list[Recorded | None]:
        """Claim due deliveries and attempt each, one after the other (scripts and tests; the
        worker attempts them concurrently)."""
        claim = self.claim(self.settings.webhook_batch_size)
        return [self.deliver(m, claim.lease_id) for m in claim.messages]
