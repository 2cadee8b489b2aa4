"""Which accounts are due, and leases that make sure only one worker verifies each.

A claim sets `lease_id` and `lease_expires_at` on the account and nothing else. "Due" means
`next_due_at` has passed and no live lease holds the account, so while the lease holds nobody else
claims it; the verification that holds it applies its result only if `lease_id` is still its own.
If the worker dies, nothing needs cleaning up: at expiry the account is simply due again, found by
the same index scan. Leaving the indexed `next_due_at` alone lets PostgreSQL update a claimed row
in place (a HOT update, no index writes), which is most of a claim's cost at scale.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import ColumnElement, and_, func, or_, text, update
from sqlalchemy.orm import Session

from models import AwsAccount


@dataclass(frozen=True, slots=True)
class Claim:
    """A batch of accounts leased together under one lease id."""

    lease_id: uuid.UUID
    account_ids: list[uuid.UUID]
    # How many of them had a lease that expired without a result (a worker died, or lost them).
    reclaimed: int = 0


def _not_leased() -> ColumnElement[bool]:
    return or_(AwsAccount.lease_expires_at.is_(None), AwsAccount.lease_expires_at <= func.now())


# The dispatcher's claim, written out: it is the one statement whose cost grows with the fleet.
# Rows are found again by their physical address (ctid): the subquery locked them, so the address
# cannot change before the UPDATE reaches them, and a TID scan replaces `limit` primary-key
# probes. Only the (unindexed) lease columns change, so the update can stay on the page (HOT).
# The rows are picked in a CTE so that the claim can also say how many of them still carried an
# expired lease (the metrics' re-claimed leases): RETURNING sees only the new values.
CLAIM_DUE = text(
    """
    WITH picked AS MATERIALIZED (
            SELECT ctid, lease_expires_at IS NOT NULL AS expired
              FROM aws_accounts
             WHERE next_due_at <= now()
               AND (lease_expires_at IS NULL OR lease_expires_at <= now())
             ORDER BY next_due_at
             LIMIT :limit
               FOR UPDATE SKIP LOCKED)
    UPDATE aws_accounts
       SET lease_id = :lease_id,
           lease_expires_at = now() + make_interval(secs => :lease_seconds)
     WHERE ctid = ANY(ARRAY(SELECT ctid FROM picked))
    RETURNING id, (SELECT count(*) FROM picked WHERE expired) AS reclaimed
    """
)


def claim_due_accounts(session: Session, *, limit: int, lease_seconds: int) -> Claim:
    """Lease up to `limit` accounts that are due now, oldest first.

    `FOR UPDATE SKIP LOCKED` lets dispatchers run at the same time without waiting for, or
    claiming, each other's rows; the lease keeps the claim after this transaction commits.
    """
    lease_id = uuid.uuid4()
    rows = session.execute(
        CLAIM_DUE,
        {"lease_id": lease_id, "lease_seconds": lease_seconds, "limit": limit},
    ).all()
    return Claim(
        lease_id=lease_id,
        account_ids=[row.id for row in rows],
        reclaimed=int(rows[0].reclaimed) if rows else 0,
    )


def claim_accounts(
    session: Session, account_ids: Sequence[uuid.UUID], *, lease_seconds: int
) -> Claim:
    """Lease the given accounts now, due or not, except those a verification already holds.

    Used for requested re-verifications: an account whose lease is live is being verified right
    now, and a second concurrent verification would only race it.
    """
    lease_id = uuid.uuid4()
    if not account_ids:
        return Claim(lease_id=lease_id, account_ids=[])
    expires = func.now() + timedelta(seconds=lease_seconds)
    claimed = session.scalars(
        update(AwsAccount)
        .where(AwsAccount.id.in_(list(account_ids)), _not_leased())
        # Due now as well: if the verification dies, the account is verified when the lease
        # expires, not at its old schedule.
        .values(
            lease_id=lease_id,
            lease_expires_at=expires,
            next_due_at=func.least(AwsAccount.next_due_at, func.now()),
        )
        .returning(AwsAccount.id)
        .execution_options(synchronize_session=False)
    ).all()
    return Claim(lease_id=lease_id, account_ids=list(claimed))


def release_leases(
    session: Session,
    account_ids: Sequence[uuid.UUID],
    lease_id: uuid.UUID,
    *,
    due_in_seconds: float,
) -> int:
    """Give leases back without a result; the accounts are due again after `due_in_seconds`.

    Only accounts still leased to `lease_id` are touched; returns how many were.
    """
    released = session.execute(
        update(AwsAccount)
        .where(and_(AwsAccount.id.in_(list(account_ids)), AwsAccount.lease_id == lease_id))
        .values(
            lease_id=None,
            lease_expires_at=None,
            next_due_at=func.now() + timedelta(seconds=due_in_seconds),
        )
        .execution_options(synchronize_session=False)
    )
    return int(released.rowcount)  # type: ignore[attr-defined]
