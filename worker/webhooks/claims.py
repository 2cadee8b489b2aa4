"""Claiming due webhook deliveries: one statement leases a batch, fairly across endpoints.

A claim leases deliveries like the accounts' claims (worker/claims.py): `FOR UPDATE SKIP LOCKED`
so a claim never waits for a row another transaction holds, and a lease that outlives the
claim's transaction and simply expires if the worker dies, making the delivery due again with
the same `webhook-id`. Claims themselves run one at a time (`CLAIM_LOCK`), so that the
per-endpoint limit holds across processes.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from models.webhooks import message_id
from worker.settings import Settings

# Beyond the attempt's hard limit, the time to record its result: the lease never expires while
# its attempt can still be running, so a second attempt never runs beside it. A result waits
# only for the write of the batch before it (the recorder thread writes results and nothing
# else: the claims run on a thread of their own, see runner.py).
LEASE_MARGIN_SECONDS = 15


def lease_seconds(settings: Settings) -> int:
    """A delivery's lease: the attempt's hard limit (WEBHOOK_ATTEMPT_TIMEOUT_SECONDS) and a
    margin to record its result."""
    return int(settings.webhook_attempt_timeout_seconds) + 1 + LEASE_MARGIN_SECONDS


# Due deliveries of enabled endpoints, oldest first, at most `per_endpoint` per endpoint counting
# those already in flight: one slow or hanging endpoint can never take every slot of a claim.
# The cost does not grow with the backlog: the endpoints with pending deliveries are found by a
# skip scan of (endpoint_id, next_attempt_at) (one index probe per endpoint), each endpoint's
# leases are counted from the small index of leased rows, and each endpoint's oldest due
# deliveries are read from the front of its index range — at most `per_endpoint` of them.
# FOR UPDATE cannot lock rows read through a recursive scan and aggregates, hence the selection
# first and the locking pass (SKIP LOCKED: rows a recorder or a replay holds are left for later)
# after it. The lease runs from the claim statement's start, not its transaction's: the wait for
# `CLAIM_LOCK` does not shorten it. The claim returns everything an attempt needs, so an attempt
# costs no read of its own.
CLAIM_DUE_DELIVERIES = text(
    """
    WITH RECURSIVE pending AS (
        (SELECT endpoint_id FROM webhook_deliveries
          WHERE next_attempt_at IS NOT NULL ORDER BY endpoint_id LIMIT 1)
        UNION ALL
        SELECT (SELECT d.endpoint_id FROM webhook_deliveries AS d
                 WHERE d.next_attempt_at IS NOT NULL AND d.endpoint_id > p.endpoint_id
                 ORDER BY d.endpoint_id LIMIT 1)
          FROM pending AS p
         WHERE p.endpoint_id IS NOT NULL
    ), room AS (
        SELECT w.id AS endpoint_id,
               :per_endpoint - (SELECT count(*) FROM webhook_deliveries AS f
                                 WHERE f.endpoint_id = w.id AND f.lease_id IS NOT NULL
                                   AND f.next_attempt_at IS NOT NULL
                                   AND f.lease_expires_at > now()) AS free
          FROM pending AS p
          JOIN webhook_endpoints AS w ON w.id = p.endpoint_id AND w.enabled
    ), candidates AS (
        SELECT c.id, c.next_attempt_at
          FROM room AS r
         CROSS JOIN LATERAL (
              SELECT d.id, d.next_attempt_at
                FROM webhook_deliveries AS d
               WHERE d.endpoint_id = r.endpoint_id
                 AND d.next_attempt_at <= now()
                 AND (d.lease_expires_at IS NULL OR d.lease_expires_at <= now())
               ORDER BY d.next_attempt_at
               LIMIT greatest(r.free, 0)) AS c
         ORDER BY c.next_attempt_at
         LIMIT :limit
    )
    UPDATE webhook_deliveries AS d
       SET lease_id = :lease_id,
           lease_expires_at = statement_timestamp() + make_interval(secs => :lease_seconds)
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


# One claim at a time, fleet-wide, until its transaction ends. A claim counts each endpoint's free
# slots from its own snapshot: claims running at once cannot see each other's leases, so under
# churn (leases expiring, results recorded meanwhile) they could together lease more than
# `per_endpoint` for one endpoint, and claims picking the same candidates skip each other's rows
# and come back (nearly) empty while slots are free. Taken by a statement of its own, before the
# claim: the claim's snapshot is taken once the previous claim has committed, so it counts that
# claim's leases. Claims take milliseconds, so claimers wait for each other briefly; a wait is
# bounded by lock_timeout.
CLAIM_LOCK = text("SELECT pg_advisory_xact_lock(CAST(:namespace AS integer), 0)").bindparams(
    namespace=0x484F4F4B  # "HOOK": keeps this lock apart from any other advisory lock
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
    """Lease up to `limit` due deliveries, at most `per_endpoint` in flight per endpoint.

    Takes the claims' lock until the session's transaction ends: commit promptly.
    """
    lease_id = uuid.uuid4()
    if limit <= 0:
        return DeliveryClaim(lease_id=lease_id, messages=[])
    session.execute(CLAIM_LOCK)
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
