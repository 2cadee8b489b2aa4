"""Which accounts are due, and leases that make sure only one worker verifies each.

A claim sets `lease_id` and `lease_expires_at` on the account and moves `next_due_at` to the
lease's expiry. While the lease holds, nobody else claims the account; the verification that
holds it applies its result only if `lease_id` is still its own. If the worker dies, nothing needs
cleaning up: at expiry the account is simply due again, found by the same index scan.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from models import AwsAccount


@dataclass(frozen=True, slots=True)
class Claim:
    """A batch of accounts leased together under one lease id."""

    lease_id: uuid.UUID
    account_ids: list[uuid.UUID]


def claim_due_accounts(session: Session, *, limit: int, lease_seconds: int) -> Claim:
    """Lease up to `limit` accounts that are due now, oldest first.

    `FOR UPDATE SKIP LOCKED` lets dispatchers run at the same time without waiting for, or
    claiming, each other's rows; the lease keeps the claim after this transaction commits.
    """
    lease_id = uuid.uuid4()
    due = (
        select(AwsAccount.id)
        .where(AwsAccount.next_due_at <= func.now())
        .order_by(AwsAccount.next_due_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    expires = func.now() + timedelta(seconds=lease_seconds)
    claimed = session.scalars(
        update(AwsAccount)
        .where(AwsAccount.id.in_(due))
        .values(lease_id=lease_id, lease_expires_at=expires, next_due_at=expires)
        .returning(AwsAccount.id)
        .execution_options(synchronize_session=False)
    ).all()
    return Claim(lease_id=lease_id, account_ids=list(claimed))


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
        .where(
            AwsAccount.id.in_(list(account_ids)),
            or_(AwsAccount.lease_id.is_(None), AwsAccount.lease_expires_at <= func.now()),
        )
        .values(lease_id=lease_id, lease_expires_at=expires, next_due_at=expires)
        .returning(AwsAccount.id)
        .execution_options(synchronize_session=False)
    ).all()
    return Claim(lease_id=lease_id, account_ids=list(claimed))


def release_lease(
    session: Session, account_id: uuid.UUID, lease_id: uuid.UUID, *, due_in_seconds: float
) -> bool:
    """Give a lease back without a result; the account is due again after `due_in_seconds`."""
    released = session.execute(
        update(AwsAccount)
        .where(and_(AwsAccount.id == account_id, AwsAccount.lease_id == lease_id))
        .values(
            lease_id=None,
            lease_expires_at=None,
            next_due_at=func.now() + timedelta(seconds=due_in_seconds),
        )
        .execution_options(synchronize_session=False)
    )
    return bool(released.rowcount)  # type: ignore[attr-defined]
