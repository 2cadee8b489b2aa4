"""Leases: concurrent dispatchers never claim the same account, and dead leases expire."""

from __future__ import annotations

import time
import uuid
from datetime import timedelta

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from models import AwsAccount
from tests.factories import make_account, make_organization
from worker.claims import claim_accounts, claim_due_accounts, release_leases


def _seed(sessions: sessionmaker[Session], count: int) -> list[uuid.UUID]:
    with sessions.begin() as session:
        organization = make_organization(session)
        return [make_account(session, organization=organization).id for _ in range(count)]


def test_two_dispatchers_at_once_claim_each_account_once(
    scratch_sessions: sessionmaker[Session],
) -> None:
    """While one dispatcher's claim is uncommitted, the other skips its rows and takes the rest."""
    ids = _seed(scratch_sessions, 150)
    first = scratch_sessions()
    second = scratch_sessions()
    try:
        with first.begin(), second.begin():
            a = claim_due_accounts(first, limit=100, lease_seconds=60)
            b = claim_due_accounts(second, limit=100, lease_seconds=60)
    finally:
        first.close()
        second.close()
    assert len(a.account_ids) == 100
    assert len(b.account_ids) == 50
    assert set(a.account_ids).isdisjoint(b.account_ids)
    assert set(a.account_ids) | set(b.account_ids) == set(ids)


def test_a_leased_account_is_not_due_until_the_lease_expires(
    scratch_sessions: sessionmaker[Session],
) -> None:
    """A claim holds the account; when the lease runs out (its worker died) it is due again."""
    ids = _seed(scratch_sessions, 3)
    # A 3 s lease: the second claim must come within it even on a loaded machine (1 s did not
    # leave enough), and the third after it (the lease runs from the first claim's transaction
    # start, which is before `claimed`).
    lease = 3
    with scratch_sessions.begin() as session:
        first = claim_due_accounts(session, limit=10, lease_seconds=lease)
    claimed = time.monotonic()
    with scratch_sessions.begin() as session:
        assert claim_due_accounts(session, limit=10, lease_seconds=60).account_ids == []
    time.sleep(max(0.0, claimed + lease + 0.2 - time.monotonic()))
    with scratch_sessions.begin() as session:
        again = claim_due_accounts(session, limit=10, lease_seconds=60)
    assert sorted(first.account_ids) == sorted(ids) == sorted(again.account_ids)
    assert again.lease_id != first.lease_id


def test_claims_take_the_longest_overdue_first(session: Session) -> None:
    """The most overdue accounts are claimed first, and accounts due later are not claimed."""
    organization = make_organization(session)
    old, new, future = (make_account(session, organization=organization) for _ in range(3))
    for account, offset in (
        (old, timedelta(hours=-1)),
        (new, timedelta(minutes=-1)),
        (future, timedelta(hours=1)),
    ):
        session.execute(
            update(AwsAccount)
            .where(AwsAccount.id == account.id)
            .values(next_due_at=func.now() + offset)
        )
    claim = claim_due_accounts(session, limit=1, lease_seconds=60)
    assert claim.account_ids == [old.id]
    rest = claim_due_accounts(session, limit=10, lease_seconds=60)
    assert old.id not in rest.account_ids
    assert new.id in rest.account_ids
    assert future.id not in rest.account_ids


def test_a_request_does_not_lease_an_account_already_in_flight(session: Session) -> None:
    """A re-verify racing a dispatcher's live lease leaves that account to the dispatcher."""
    organization = make_organization(session)
    busy = make_account(session, organization=organization)
    idle = make_account(session, organization=organization)
    session.execute(
        update(AwsAccount).values(next_due_at=func.now() + func.make_interval(0, 0, 0, 0, 1))
    )
    session.execute(
        update(AwsAccount).where(AwsAccount.id == busy.id).values(next_due_at=func.now())
    )
    dispatched = claim_due_accounts(session, limit=10, lease_seconds=60)
    assert busy.id in dispatched.account_ids
    requested = claim_accounts(session, [busy.id, idle.id], lease_seconds=60)
    assert requested.account_ids == [idle.id]


def test_release_lease_makes_the_account_due_again_only_for_its_holder(session: Session) -> None:
    """Releasing with the wrong lease id changes nothing; with the right one, clears the lease."""
    account = make_account(session)
    claim = claim_due_accounts(session, limit=10, lease_seconds=60)
    assert account.id in claim.account_ids
    assert release_leases(session, [account.id], uuid.uuid4(), due_in_seconds=0) == 0
    assert release_leases(session, [account.id], claim.lease_id, due_in_seconds=0) == 1
    row = session.execute(
        select(AwsAccount.lease_id, AwsAccount.next_due_at <= func.now()).where(
            AwsAccount.id == account.id
        )
    ).one()
    assert tuple(row) == (None, True)


def test_a_claim_counts_the_expired_leases_it_takes_over(
    scratch_sessions: sessionmaker[Session],
) -> None:
    """Accounts whose lease expired without a result are claimed like any due account, and the
    claim says how many there were (the metrics' re-claimed leases)."""
    ids = _seed(scratch_sessions, 5)
    with scratch_sessions.begin() as session:
        session.execute(
            update(AwsAccount)
            .where(AwsAccount.id.in_(ids[:2]))
            .values(lease_id=uuid.uuid4(), lease_expires_at=func.now() - timedelta(seconds=1))
        )
        session.execute(
            update(AwsAccount)
            .where(AwsAccount.id == ids[2])
            .values(lease_id=uuid.uuid4(), lease_expires_at=func.now() + timedelta(minutes=5))
        )
    with scratch_sessions.begin() as session:
        claim = claim_due_accounts(session, limit=10, lease_seconds=60)
    assert sorted(claim.account_ids) == sorted([ids[0], ids[1], ids[3], ids[4]])
    assert claim.reclaimed == 2
    with scratch_sessions.begin() as session:
        assert claim_due_accounts(session, limit=10, lease_seconds=60).reclaimed == 0
