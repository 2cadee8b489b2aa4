"""The fleet at a glance: what the database and Redis say, read in a few cheap statements.

Shared by `scripts/status` and the worker's fleet gauges (`worker.scrape`, on scrapes only:
readiness has a cheaper statement of its own). The database part is two statements: one scan
that counts the table and one read of the due accounts (README has the time at a million
accounts); callers that repeat it (the metrics) cache it.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import redis
from sqlalchemy import bindparam, text
from sqlalchemy.orm import Session

from worker.circuit import KEY as CIRCUIT_KEY
from worker.queues import QUEUES
from worker.ratelimit import KEY as RATE_KEY
from worker.ratelimit import RECOVERY_SHARE

# Where the dispatcher writes what its last run did (scripts/status shows it).
LAST_DISPATCH_KEY = "verifier:last-dispatch"

# Two statements. The counts per status and last error: one parallel scan of the table (no index
# of those columns: it would cost every result write an entry; docs/observability.md). The due
# backlog and the leases come from
# the `next_due_at` range that has passed: a leased account is always in it (a claim takes only
# due accounts and leaves `next_due_at` alone; a result or a release clears the lease), so
# only the accounts due now are read, not the fleet. "Due" is the dispatcher's own condition.
_COUNTS = """
SELECT status, last_outcome, last_error_code, count(*) AS accounts
  FROM aws_accounts
 {where}
 GROUP BY status, last_outcome, last_error_code
"""
_BACKLOG = """
SELECT count(*) FILTER (WHERE NOT leased) AS due,
       count(*) FILTER (WHERE NOT leased
                          AND next_due_at <= now() - make_interval(secs => :overdue)) AS overdue,
       min(next_due_at) FILTER (WHERE NOT leased) AS oldest_due_at,
       count(*) FILTER (WHERE leased) AS leased,
       count(*) FILTER (WHERE lease_expires_at <= now()) AS lease_expired,
       now() AS now
  FROM (SELECT next_due_at, lease_expires_at, coalesce(lease_expires_at > now(), false) AS leased
          FROM aws_accounts
         WHERE next_due_at <= now() {also}) AS a
"""
_ORGANIZATIONS = "organization_id = ANY(CAST(:organizations AS uuid[]))"
_COUNTS_ALL = text(_COUNTS.format(where=""))
_COUNTS_ORGANIZATIONS = text(_COUNTS.format(where=f"WHERE {_ORGANIZATIONS}")).bindparams(
    bindparam("organizations")
)
_BACKLOG_ALL = text(_BACKLOG.format(also=""))
_BACKLOG_ORGANIZATIONS = text(_BACKLOG.format(also=f"AND {_ORGANIZATIONS}")).bindparams(
    bindparam("organizations")
)


@dataclass
class FleetSummary:
    """Counts over the accounts selected (all of them, or some organizations')."""

    now: datetime | None = None
    by_status: dict[str, int] = field(default_factory=dict)
    due: int = 0
    overdue: int = 0
    oldest_due_at: datetime | None = None
    leased: int = 0
    lease_expired: int = 0
    # (outcome, error code) -> accounts whose last attempt was not verified
    failures: dict[tuple[str, str], int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """Every account counted."""
        return sum(self.by_status.values())

    @property
    def oldest_due_seconds(self) -> float:
        """How long the longest-waiting due account has been due (0 when none is)."""
        if self.oldest_due_at is None or self.now is None:
            return 0.0
        return max(0.0, (self.now - self.oldest_due_at).total_seconds())


def summarize_fleet(
    session: Session,
    *,
    overdue_seconds: float,
    organizations: Sequence[uuid.UUID] = (),
) -> FleetSummary:
    """Counts per status and last error, the due backlog and the leases."""
    params: dict[str, Any] = {"overdue": overdue_seconds}
    counts, backlog = _COUNTS_ALL, _BACKLOG_ALL
    if organizations:
        params["organizations"] = list(organizations)
        counts, backlog = _COUNTS_ORGANIZATIONS, _BACKLOG_ORGANIZATIONS
    summary = FleetSummary()
    for row in session.execute(counts, params):
        status = str(row.status)
        summary.by_status[status] = summary.by_status.get(status, 0) + row.accounts
        if row.last_outcome not in (None, "verified"):
            key = (str(row.last_outcome), str(row.last_error_code or "unknown"))
            summary.failures[key] = summary.failures.get(key, 0) + row.accounts
    due = session.execute(backlog, params).one()
    summary.now = due.now
    summary.due, summary.overdue = due.due, due.overdue
    summary.oldest_due_at = due.oldest_due_at
    summary.leased, summary.lease_expired = due.leased, due.lease_expired
    return summary


@dataclass(frozen=True, slots=True)
class BrokerState:
    """What Redis says: the circuit breaker, the shared STS rate, the queues, the last dispatch."""

    circuit: dict[str, Any] | None  # None: closed
    sts_rate_per_second: float  # the shared budget's rate now (the ceiling unless cut)
    queues: dict[str, int]
    last_dispatch: dict[str, Any] | None
    # The fleet-wide stall's error code (worker.stall), when the caller asked for it.
    stalled_code: str | None = None


def read_broker_state(client: redis.Redis, *, ceiling_per_second: float) -> BrokerState:
    """One round trip to Redis."""
    pipe = client.pipeline(transaction=False)
    pipe.get(CIRCUIT_KEY)
    pipe.hmget(RATE_KEY, ["ts", "rate"])
    pipe.time()
    for queue in QUEUES:
        pipe.llen(queue)
    pipe.get(LAST_DISPATCH_KEY)
    circuit_raw, (ts, rate), (seconds, micros), *rest = pipe.execute()
    lengths, last_raw = rest[: len(QUEUES)], rest[len(QUEUES)]
    # The rate as the limiter's script would see it now: regained since its last update.
    current = ceiling_per_second
    if ts is not None and rate is not None:
        elapsed = max(0.0, seconds + micros / 1e6 - float(ts))
        current = min(
            ceiling_per_second, float(rate) + elapsed * ceiling_per_second * RECOVERY_SHARE
        )
    return BrokerState(
        circuit=json.loads(circuit_raw) if circuit_raw is not None else None,
        sts_rate_per_second=current,
        queues={queue: int(length) for queue, length in zip(QUEUES, lengths, strict=True)},
        last_dispatch=json.loads(last_raw) if last_raw is not None else None,
    )


def remember_dispatch(client: redis.Redis, *, claimed: int, sent: int, paused: bool) -> None:
    """Remember what this dispatch did and when, for `scripts/status` (kept a day); best effort:
    the dispatch itself is done."""
    payload = {"at": time.time(), "claimed": claimed, "messages": sent, "paused": paused}
    with contextlib.suppress(redis.RedisError):
        client.set(LAST_DISPATCH_KEY, json.dumps(payload), ex=24 * 3600)
