"""Recording attempts' results: one statement per batch of finished attempts, and what follows
from them (the next attempt's time, giving up, the endpoint's failing streak, disabling it).
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.orm import Session

from models import AuditEvent, AuditEventType
from worker.logging import get_logger
from worker.settings import Settings
from worker.webhooks.addresses import url_host
from worker.webhooks.claims import Message, lease_seconds
from worker.webhooks.sending import AttemptKind, AttemptResult

log = get_logger("worker.webhooks")

# Fraction of a retry delay added or removed at random, so retries after an outage spread out.
JITTER_RATIO = 0.1
WORKER_ACTOR = "worker"
SECRET_UNREADABLE = "secret unreadable"  # noqa: S105 - a reason, not a secret


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


# A batch of attempts' results and their endpoints' failing streaks, in one statement (the
# results as arrays: one statement text whatever the batch's size). A delivery is written only if
# its lease is still the attempt's own. Per endpoint, a success as the batch's last outcome ends
# the streak; a failure starts one unless one is running — a success earlier in the same batch,
# or a failure longer after the previous one than any retry waits, restarts it: an endpoint that
# failed once a week ago and then got no event is not "failing for a week". An endpoint whose
# attempts all succeeded and that had no streak is not written at all. The endpoints written are
# locked first, in id order (`locked`: its rows are locked as they leave the sort), so two
# processes' batches sharing endpoints never wait for each other's locks in opposite orders —
# the update's own order would be the plan's (an aggregate's, a join's). Returns a row for each
# delivery written (none for a lost lease), with whether its endpoint has been failing too long.
_RECORD = text(
    """
    WITH results AS (
        SELECT *
          FROM unnest(CAST(:ids AS uuid[]), CAST(:lease_ids AS uuid[]),
                      CAST(:delivered AS boolean[]), CAST(:given_up AS boolean[]),
                      CAST(:delays AS float8[]), CAST(:status_codes AS integer[]),
                      CAST(:errors AS text[]))
               WITH ORDINALITY
               AS r(id, lease_id, delivered, given_up, delay, status_code, error, seq)
    ), finished AS (
        UPDATE webhook_deliveries AS d
           SET attempts = d.attempts + 1,
               last_attempt_at = now(),
               last_status_code = r.status_code,
               last_error = r.error,
               delivered_at = CASE WHEN r.delivered THEN now() END,
               given_up_at = CASE WHEN r.given_up THEN now() END,
               next_attempt_at = CASE
                   WHEN r.delivered OR r.given_up THEN NULL
                   ELSE now() + make_interval(secs => r.delay) END,
               lease_id = NULL,
               lease_expires_at = NULL
          FROM results AS r
         WHERE d.id = r.id AND d.lease_id = r.lease_id
        RETURNING d.id, d.endpoint_id, r.delivered, r.seq
    ), outcomes AS (
        SELECT endpoint_id,
               bool_or(delivered) AS any_delivered,
               bool_or(NOT delivered) AS any_failed,
               (array_agg(delivered ORDER BY seq DESC))[1] AS delivered_last
          FROM finished
         GROUP BY endpoint_id
    ), locked AS (
        SELECT o.*
          FROM outcomes AS o
          JOIN webhook_endpoints AS w ON w.id = o.endpoint_id
         WHERE o.any_failed OR w.failing_since IS NOT NULL
         ORDER BY w.id
           FOR NO KEY UPDATE OF w
    ), streak AS (
        UPDATE webhook_endpoints AS w
           SET failing_since = CASE
                   WHEN o.delivered_last THEN NULL
                   WHEN o.any_delivered OR w.failing_since IS NULL
                        OR w.last_failure_at < now() - make_interval(secs => :streak_gap)
                   THEN now()
                   ELSE w.failing_since END,
               last_failure_at = CASE WHEN o.any_failed THEN now() ELSE w.last_failure_at END
          FROM locked AS o
         WHERE w.id = o.endpoint_id
        RETURNING w.id, w.failing_since
    )
    SELECT f.id,
           coalesce(s.failing_since, w.failing_since, now())
           <= now() - make_interval(secs => :disable_after) AS failing_too_long
      FROM finished AS f
      JOIN webhook_endpoints AS w ON w.id = f.endpoint_id
      LEFT JOIN streak AS s ON s.id = f.endpoint_id
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


@dataclass(frozen=True, slots=True)
class Finished:
    """One finished attempt of a leased delivery, waiting to be recorded."""

    message: Message
    lease_id: uuid.UUID
    result: AttemptResult


def record_attempts(
    session: Session,
    finished: Sequence[Finished],
    *,
    settings: Settings,
    rng: random.Random,
) -> list[Recorded | None]:
    """Write a batch of attempts' results, each only if its lease is still the attempt's own
    (None for those whose lease was lost, in the batch's order); one statement for the batch.

    Success clears the endpoint's failing streak. A failure schedules the next attempt (or gives
    up after the schedule's last); 410 Gone disables the endpoint; so does an endpoint none of
    whose deliveries succeeded for WEBHOOK_DISABLE_AFTER_SECONDS.
    """
    if not finished:
        return []
    plans = [_plan(item, settings, rng) for item in finished]
    rows = session.execute(
        _RECORD,
        {
            "ids": [item.message.delivery_id for item in finished],
            "lease_ids": [item.lease_id for item in finished],
            "delivered": [plan.delivered for plan in plans],
            "given_up": [plan.given_up for plan in plans],
            "delays": [plan.next_attempt_in or 0.0 for plan in plans],
            "status_codes": [item.result.status_code for item in finished],
            "errors": [item.result.error for item in finished],
            "disable_after": settings.webhook_disable_after_seconds,
            "streak_gap": streak_gap_seconds(settings),
        },
    ).all()
    too_long = {row.id: row.failing_too_long for row in rows}
    disabled: dict[uuid.UUID, bool] = {}  # endpoints handled in this batch
    recorded: list[Recorded | None] = []
    for item, plan in zip(finished, plans, strict=True):
        message = item.message
        if message.delivery_id not in too_long:
            recorded.append(None)
            continue
        _log_outcome(message, plan)
        reason = _disable_reason(
            plan, failing_too_long=too_long[message.delivery_id], settings=settings
        )
        newly_disabled = False
        if reason is not None and message.endpoint_id not in disabled:
            newly_disabled = disabled[message.endpoint_id] = _disable(session, message, reason)
        recorded.append(
            Recorded(
                plan.result, plan.delivered, plan.given_up, plan.next_attempt_in, newly_disabled
            )
        )
    return recorded


def _plan(item: Finished, settings: Settings, rng: random.Random) -> Recorded:
    """What one result makes of its delivery (the endpoint's fate is decided after the write)."""
    result = item.result
    attempts = item.message.attempts + 1
    delivered = result.kind is AttemptKind.DELIVERED
    delay = (
        None
        if delivered or result.kind in (AttemptKind.GONE, AttemptKind.UNSIGNABLE)
        else retry_delay(attempts, settings, rng=rng, retry_after=result.retry_after_seconds)
    )
    return Recorded(result, delivered, not delivered and delay is None, delay, False)


def _fields(message: Message) -> dict[str, object]:
    return {
        "delivery_id": str(message.delivery_id),
        "endpoint_id": str(message.endpoint_id),
        "organization_id": str(message.organization_id),
        "webhook_id": message.message_id,
        "event_type": message.event_type,
        "attempt": message.attempts + 1,
        "host": url_host(message.url),
    }


def _log_outcome(message: Message, plan: Recorded) -> None:
    result = plan.result
    if plan.delivered:
        log.info("webhook.delivered", **_fields(message), status_code=result.status_code)
        return
    delay = plan.next_attempt_in
    (log.warning if plan.given_up else log.info)(
        "webhook.given_up" if plan.given_up else "webhook.attempt_failed",
        **_fields(message),
        status_code=result.status_code,
        outcome=result.kind.value,
        error=result.error,
        next_attempt_in_seconds=None if delay is None else round(delay, 1),
    )


def _disable_reason(plan: Recorded, *, failing_too_long: bool, settings: Settings) -> str | None:
    if plan.delivered:
        return None
    if plan.result.kind is AttemptKind.GONE:
        return "the endpoint answered 410 Gone"
    if plan.result.kind is AttemptKind.UNSIGNABLE:
        return SECRET_UNREADABLE
    if failing_too_long:
        days = settings.webhook_disable_after_seconds / 86400
        return f"no delivery succeeded for {days:g} days"
    return None


def _disable(session: Session, message: Message, reason: str) -> bool:
    disabled = disable_endpoint(session, message.endpoint_id, reason=reason, actor=WORKER_ACTOR)
    if disabled:
        log.warning(
            "webhook.endpoint_disabled",
            endpoint_id=str(message.endpoint_id),
            organization_id=str(message.organization_id),
            host=url_host(message.url),
            reason=reason,
        )
    return disabled
