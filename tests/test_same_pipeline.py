"""The worker and `reverify --inline` run one pipeline: fed the same STS answers, they leave the
same rows and the same audit events.

The worker's path is its Celery task's function, called in this process (no eager mode): the
chunk read, handed to the window, checked on its threads, written by the last one. The inline
path is `scripts/reverify --inline` as operators run it, a real subprocess. Both ask the same
zero-latency STS stand-in, whose answer depends only on the role's name.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from models import AccountStatus, AuditEvent, AwsAccount
from sandbox.standin import StsStandIn
from tests.factories import make_account, make_organization
from tests.processes import ROOT, service_env
from worker.claims import claim_accounts
from worker.resources import close_process_resources
from worker.settings import get_settings
from worker.tasks import verify_accounts_task

pytestmark = pytest.mark.e2e

ACTOR = "ops:same-pipeline"
LONG_AGO = datetime(2026, 1, 1, tzinfo=UTC)
# (role name, status before): every class of outcome the stand-in gives, and the rules' cases
# (a first success with probes, a first failure, a connected account's confirming attempt).
CASES = [
    ("ok-Works", AccountStatus.PENDING),
    ("deny-Refused", AccountStatus.PENDING),
    ("deny-Revoked", AccountStatus.CONNECTED),
    ("noext-Open", AccountStatus.PENDING),
    ("noperms-Bare", AccountStatus.PENDING),
    ("noec2-Partial", AccountStatus.PENDING),
    ("probeerror-Flaky", AccountStatus.PENDING),
    ("ok-Again", AccountStatus.FAILED),
]


@pytest.fixture
def env(
    sts_standin: StsStandIn, scratch_database: str, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[dict[str, str]]:
    """One environment for both paths: the worker's resources in this process are built from
    it (and torn down after), the subprocess gets it whole."""
    environment = service_env(
        database_url=scratch_database, redis_url=redis_url, sts_url=sts_standin.endpoint_url
    )
    close_process_resources()
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    yield environment
    close_process_resources()
    monkeypatch.undo()
    get_settings.cache_clear()


def _organization(sessions: sessionmaker[Session]) -> uuid.UUID:
    """An organization with one account per case, none of them due (nothing else claims them)."""
    with sessions.begin() as session:
        organization = make_organization(session)
        for n, (role_name, status) in enumerate(CASES):
            aws_account_id = str(200000000000 + n)
            make_account(
                session,
                organization=organization,
                aws_account_id=aws_account_id,
                role_arn=f"arn:aws:iam::{aws_account_id}:role/{role_name}",
                status=status,
                role_changed_at=LONG_AGO,
            )
        session.execute(
            update(AwsAccount)
            .where(AwsAccount.organization_id == organization.id)
            .values(next_due_at=datetime(2100, 1, 1, tzinfo=UTC))
        )
        return organization.id


def _outcomes(sessions: sessionmaker[Session], organization_id: uuid.UUID) -> dict[str, Any]:
    """Per role: the account's row and its audit events, without what differs by nature (ids,
    external ids, times, correlation ids, the jitter in the next due time)."""
    with sessions() as session:
        accounts = session.scalars(
            select(AwsAccount).where(AwsAccount.organization_id == organization_id)
        ).all()
        found: dict[str, Any] = {}
        for account in accounts:
            events = session.scalars(
                select(AuditEvent)
                .where(AuditEvent.account_id == account.id)
                .order_by(AuditEvent.id)
            ).all()
            found[account.role_arn] = {
                "row": (
                    account.status,
                    account.error_message,
                    account.last_outcome,
                    account.last_error_code,
                    account.consecutive_failures,
                    account.lease_id,
                    account.last_attempted_at is not None,
                    account.last_verified_at is not None,
                    account.external_id_checked_at is not None,
                    account.permissions_checked_at is not None,
                    account.permissions_proven,
                    account.permissions_missing,
                ),
                "events": [
                    (e.event_type, e.from_status, e.to_status, e.reason, e.details, e.actor)
                    for e in events
                ],
            }
        return found


def test_the_worker_and_reverify_inline_leave_the_same_rows_and_events(
    env: dict[str, str], scratch_sessions: sessionmaker[Session]
) -> None:
    """The same accounts in two organizations: one verified by the worker's task, one by
    `reverify --inline`; every row and every audit event comes out the same."""
    by_worker, by_inline = _organization(scratch_sessions), _organization(scratch_sessions)
    with scratch_sessions.begin() as session:
        ids = session.scalars(
            select(AwsAccount.id).where(AwsAccount.organization_id == by_worker)
        ).all()
        claim = claim_accounts(session, ids, lease_seconds=60)
    assert sorted(claim.account_ids) == sorted(ids)

    answer = verify_accounts_task([str(i) for i in ids], str(claim.lease_id), ACTOR)
    close_process_resources()  # drains the window: every account is checked and written
    command = [str(ROOT / "scripts" / "reverify"), "--organization", str(by_inline)]
    inline = subprocess.run(
        [*command, "--inline", "--yes", "--json", "--requested-by", ACTOR],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        stdin=subprocess.DEVNULL,
    )

    assert answer == {"accepted": len(CASES), "skipped": 0}
    assert inline.returncode in {0, 1}, inline.stderr
    worker, inline_outcomes = (
        _outcomes(scratch_sessions, by_worker),
        _outcomes(scratch_sessions, by_inline),
    )
    assert len(worker) == len(CASES)
    assert inline_outcomes == worker
    # Not vacuous: every case was verified, and the cases moved the accounts different ways.
    assert all(outcome["row"][6] for outcome in worker.values())
    assert {outcome["row"][0] for outcome in worker.values()} == {
        AccountStatus.CONNECTED,
        AccountStatus.FAILED,
    }
    assert sum(len(outcome["events"]) for outcome in worker.values()) >= len(CASES)
