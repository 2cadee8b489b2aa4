"""End to end: real `celery worker` and `celery beat` processes, PostgreSQL, Redis, sandbox STS."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from models import AccountStatus, AuditEvent, AuditEventType, AwsAccount
from sandbox.moto_sts import (
    PLATFORM_ACCOUNT_ID,
    PLATFORM_PRINCIPAL_ARN,
    SandboxSts,
    create_customer_role,
    sts_calls,
)
from tests.factories import (
    make_account,
    make_organization,
    make_sandbox_account,
    unique_aws_account_id,
)
from tests.processes import running, service_env, start_beat, start_worker, wait_until
from tests.verification import status_events

pytestmark = pytest.mark.e2e

LONG_AGO = datetime(2026, 1, 1, tzinfo=UTC)


def _statuses(sessions: sessionmaker[Session], ids: list[uuid.UUID]) -> dict[uuid.UUID, str]:
    with sessions() as session:
        rows = session.execute(
            select(AwsAccount.id, AwsAccount.status).where(AwsAccount.id.in_(ids))
        ).all()
    return {row.id: row.status.value for row in rows}


def test_a_role_in_the_platforms_own_account_never_connects(
    sandbox: SandboxSts,
    scratch_database: str,
    scratch_sessions: sessionmaker[Session],
    clean_redis: str,
    tmp_path: Path,
) -> None:
    """Rows naming roles in the platform's own account fail with no AssumeRole made for them,
    even roles there that trust the platform and require the row's external ID."""
    endpoint = sandbox.endpoint_url
    platform_roles = {
        "trusts-the-platform": PLATFORM_PRINCIPAL_ARN,
        "trusts-the-account": f"arn:aws:iam::{PLATFORM_ACCOUNT_ID}:root",
    }
    rows: dict[str, uuid.UUID] = {}
    with scratch_sessions.begin() as session:
        organization = make_organization(session)
        for label, trusted in platform_roles.items():
            # One connection per organization and AWS account: one organization each.
            rows[label] = make_sandbox_account(
                session,
                endpoint,
                organization=make_organization(session),
                trusted=trusted,
                aws_account_id=PLATFORM_ACCOUNT_ID,
                role_name=f"Platform-{label}-{uuid.uuid4().hex[:6]}",
                # Inside the grace window: the refusal must not wait for it to end.
                role_changed_at=datetime.now(UTC),
            ).id
        rows["customer"] = make_sandbox_account(
            session, endpoint, organization=organization, role_changed_at=LONG_AGO
        ).id
    with scratch_sessions() as session:
        arns = {
            label: session.get_one(AwsAccount, account_id).role_arn
            for label, account_id in rows.items()
        }
    env = service_env(
        database_url=scratch_database,
        redis_url=clean_redis,
        sts_url=endpoint,
        PLATFORM_PRINCIPAL_ARN=PLATFORM_PRINCIPAL_ARN,
    )
    with running(start_worker(env, tmp_path), start_beat(env, tmp_path)) as (worker, _beat):
        expected = {
            rows["trusts-the-platform"]: "failed",
            rows["trusts-the-account"]: "failed",
            rows["customer"]: "connected",
        }
        wait_until(
            lambda: _statuses(scratch_sessions, list(rows.values())) == expected,
            timeout=120,
            what="the platform's rows to fail and the customer's to connect",
        )
    calls = sts_calls(endpoint)["assume_role"]
    assert calls.get(arns["trusts-the-platform"], 0) == 0
    assert calls.get(arns["trusts-the-account"], 0) == 0
    assert calls[arns["customer"]] >= 1
    with scratch_sessions() as session:
        for label in platform_roles:
            account = session.get_one(AwsAccount, rows[label])
            assert account.last_error_code == "PlatformAccount"
            assert "cannot be connected" in (account.error_message or "")
            assert "assumed" not in (account.error_message or "")
    refused = worker.events("verification.platform_account_refused")
    assert {line["account_id"] for line in refused} == {
        str(rows[label]) for label in platform_roles
    }
    assert all(line["level"] == "warning" for line in refused)


def test_accounts_reach_the_status_their_roles_imply(
    sandbox: SandboxSts,
    scratch_database: str,
    scratch_sessions: sessionmaker[Session],
    clean_redis: str,
    tmp_path: Path,
) -> None:
    """Working, denying, unenforced and late-created roles each end where they should."""
    endpoint = sandbox.endpoint_url
    accounts: dict[str, tuple[str, str, str]] = {}
    for label in ("works", "denies", "unenforced", "delayed"):
        aws_id = unique_aws_account_id()
        accounts[label] = (aws_id, f"Verifier-{label}", f"ext-{uuid.uuid4().hex}")
    create_customer_role(
        endpoint, *accounts["works"][:2], PLATFORM_PRINCIPAL_ARN, accounts["works"][2]
    )
    create_customer_role(
        endpoint, *accounts["denies"][:2], "arn:aws:iam::999988887777:root", accounts["denies"][2]
    )
    create_customer_role(endpoint, *accounts["unenforced"][:2], PLATFORM_PRINCIPAL_ARN, None)
    ids: dict[str, uuid.UUID] = {}
    with scratch_sessions.begin() as session:
        organization = make_organization(session)
        for label, (aws_id, role_name, external_id) in accounts.items():
            ids[label] = make_account(
                session,
                organization=organization,
                aws_account_id=aws_id,
                role_arn=f"arn:aws:iam::{aws_id}:role/{role_name}",
                external_id=external_id,
                # Old roles are past the IAM propagation grace window; the delayed one is new.
                role_changed_at=datetime.now(UTC) if label == "delayed" else LONG_AGO,
            ).id
    env = service_env(
        database_url=scratch_database,
        redis_url=clean_redis,
        sts_url=endpoint,
        PENDING_GRACE_SECONDS="60",
    )
    with running(start_worker(env, tmp_path), start_beat(env, tmp_path)) as (worker, _beat):
        # The delayed role appears a few seconds after its account was inserted.
        timer = threading.Timer(
            3.0,
            create_customer_role,
            args=(
                endpoint,
                *accounts["delayed"][:2],
                PLATFORM_PRINCIPAL_ARN,
                accounts["delayed"][2],
            ),
        )
        timer.start()
        expected = {
            ids["works"]: "connected",
            ids["denies"]: "failed",
            ids["unenforced"]: "failed",
            ids["delayed"]: "connected",
        }
        wait_until(
            lambda: _statuses(scratch_sessions, list(ids.values())) == expected,
            timeout=120,
            what="every account to reach its status",
        )
        timer.join()
        assert worker.process.poll() is None
    with scratch_sessions() as session:
        by_id = {a.id: a for a in session.scalars(select(AwsAccount))}
        events = list(session.scalars(select(AuditEvent).order_by(AuditEvent.id)))
    assert "sts:ExternalId" in (by_id[ids["unenforced"]].error_message or "")
    assert "access denied" in (by_id[ids["denies"]].error_message or "")
    transitions = {(e.account_id, e.event_type, e.from_status, e.to_status) for e in events}
    assert transitions == {
        (
            ids["works"],
            AuditEventType.STATUS_CHANGED,
            AccountStatus.PENDING,
            AccountStatus.CONNECTED,
        ),
        (ids["denies"], AuditEventType.STATUS_CHANGED, AccountStatus.PENDING, AccountStatus.FAILED),
        (
            ids["unenforced"],
            AuditEventType.STATUS_CHANGED,
            AccountStatus.PENDING,
            AccountStatus.FAILED,
        ),
        (ids["unenforced"], AuditEventType.EXTERNAL_ID_NOT_ENFORCED, None, None),
        (
            ids["delayed"],
            AuditEventType.STATUS_CHANGED,
            AccountStatus.PENDING,
            AccountStatus.CONNECTED,
        ),
    }
    assert len(events) == len(transitions)
    # The delayed account was refused first (inside its grace window) and never failed.
    assert by_id[ids["delayed"]].consecutive_failures == 0
    assert by_id[ids["delayed"]].last_verified_at is not None


def test_a_killed_worker_loses_nothing(
    sandbox: SandboxSts,
    scratch_database: str,
    scratch_sessions: sessionmaker[Session],
    clean_redis: str,
    tmp_path: Path,
) -> None:
    """SIGKILL while holding leases: after they expire every account is verified exactly once."""
    endpoint = sandbox.endpoint_url
    with scratch_sessions.begin() as session:
        organization = make_organization(session)
        ids = [
            make_sandbox_account(session, endpoint, organization=organization).id for _ in range(30)
        ]
    env = service_env(
        database_url=scratch_database,
        redis_url=clean_redis,
        sts_url=endpoint,
        LEASE_SECONDS="6",
        VERIFY_TIME_LIMIT_SECONDS="4",
        WORKER_CONCURRENCY="2",
        DISPATCH_BATCH_SIZE="10",
    )
    beat = start_beat(env, tmp_path)
    first = start_worker(env, tmp_path, name="first")
    with running(beat, first):
        wait_until(
            lambda: 0 < list(_statuses(scratch_sessions, ids).values()).count("connected") < 30,
            timeout=120,
            interval=0.05,
            what="some but not all accounts verified",
        )
        first.kill()
        with scratch_sessions() as session:
            leased = session.scalar(
                select(func.count()).where(AwsAccount.id.in_(ids), AwsAccount.lease_id.is_not(None))
            )
        assert leased, "the killed worker held leases"
        second = start_worker(env, tmp_path, name="second")
        with running(second):
            wait_until(
                lambda: set(_statuses(scratch_sessions, ids).values()) == {"connected"},
                timeout=90,
                what="every account connected after the leases expired",
            )
    events = status_events(scratch_sessions)
    assert sorted(e.account_id for e in events) == sorted(ids)
    assert {(e.from_status, e.to_status) for e in events} == {
        (AccountStatus.PENDING, AccountStatus.CONNECTED)
    }


def test_rejected_platform_credentials_pause_verification_until_they_work(
    sandbox: SandboxSts,
    scratch_database: str,
    scratch_sessions: sessionmaker[Session],
    clean_redis: str,
    tmp_path: Path,
) -> None:
    """With our credentials refused nothing changes status and a critical line is logged."""
    endpoint = sandbox.endpoint_url
    with scratch_sessions.begin() as session:
        organization = make_organization(session)
        ids = [
            make_sandbox_account(
                session,
                endpoint,
                organization=organization,
                status=status,
                role_changed_at=LONG_AGO,
            ).id
            for status in (AccountStatus.CONNECTED, AccountStatus.PENDING)
        ]
    env = service_env(database_url=scratch_database, redis_url=clean_redis, sts_url=endpoint)
    sandbox.revoke_platform_credentials()
    try:
        with running(start_worker(env, tmp_path), start_beat(env, tmp_path)) as (worker, _beat):
            wait_until(
                lambda: worker.events("platform.fault"), timeout=90, what="a platform.fault line"
            )
            [first_fault, *_] = worker.events("platform.fault")
            assert first_fault["level"] == "critical"
            time.sleep(3)  # several dispatch ticks and probes while the credentials stay bad
            assert _statuses(scratch_sessions, ids) == {
                ids[0]: "connected",
                ids[1]: "pending",
            }
            assert status_events(scratch_sessions) == []
            sandbox.restore_platform_credentials()
            wait_until(lambda: worker.events("platform.recovered"), timeout=90, what="recovery")
            wait_until(
                lambda: set(_statuses(scratch_sessions, ids).values()) == {"connected"},
                timeout=90,
                what="verification to resume",
            )
    finally:
        sandbox.restore_platform_credentials()
    events = status_events(scratch_sessions)
    assert [(e.account_id, e.to_status) for e in events] == [(ids[1], AccountStatus.CONNECTED)]
    assert datetime.now(UTC) - events[0].occurred_at < timedelta(minutes=5)


def _accounts(sessions: sessionmaker[Session], ids: list[uuid.UUID]) -> dict[uuid.UUID, AwsAccount]:
    with sessions() as session:
        rows = session.scalars(select(AwsAccount).where(AwsAccount.id.in_(ids))).all()
        session.expunge_all()
    return {row.id: row for row in rows}


def test_connected_means_the_role_can_do_what_scans_need(
    sandbox: SandboxSts,
    scratch_database: str,
    scratch_sessions: sessionmaker[Session],
    clean_redis: str,
    tmp_path: Path,
) -> None:
    """SecurityAudit connects; no policy fails naming all four probed permissions; a policy
    missing one fails naming it; an EC2 outage during the probes does not hold a pending account
    back (connected, permissions unknown) and the next attempt proves them.
    """
    endpoint = sandbox.endpoint_url
    roles: dict[str, dict[str, Any]] = {
        "audit": {"permissions": (), "security_audit": True},
        "bare": {"permissions": ()},
        "partial": {"permissions": ["iam:GetAccountSummary", "ec2:DescribeRegions", "s3:*"]},
        "flaky": {},
    }
    ids: dict[str, uuid.UUID] = {}
    with scratch_sessions.begin() as session:
        organization = make_organization(session)
        for label, policies in roles.items():
            aws_id = unique_aws_account_id()
            role_name = f"Scanner-{label}"
            external_id = f"ext-{uuid.uuid4().hex}"
            create_customer_role(
                endpoint, aws_id, role_name, PLATFORM_PRINCIPAL_ARN, external_id, **policies
            )
            ids[label] = make_account(
                session,
                organization=organization,
                aws_account_id=aws_id,
                role_arn=f"arn:aws:iam::{aws_id}:role/{role_name}",
                external_id=external_id,
                role_changed_at=LONG_AGO,
                # The flaky one (pending, never probed) waits until EC2 is down.
                **(
                    {"next_due_at": datetime.now(UTC) + timedelta(days=1)}
                    if label == "flaky"
                    else {}
                ),
            ).id
    env = service_env(database_url=scratch_database, redis_url=clean_redis, sts_url=endpoint)
    first = [ids["audit"], ids["bare"], ids["partial"]]
    with running(start_worker(env, tmp_path), start_beat(env, tmp_path)) as (worker, _beat):
        wait_until(
            lambda: (
                _statuses(scratch_sessions, first)
                == {ids["audit"]: "connected", ids["bare"]: "failed", ids["partial"]: "failed"}
            ),
            timeout=120,
            what="the three accounts to reach their status",
        )
        sandbox.set_probe_fault("ec2", "Unavailable")
        try:
            with scratch_sessions.begin() as session:
                session.execute(
                    update(AwsAccount)
                    .where(AwsAccount.id == ids["flaky"])
                    .values(next_due_at=func.now())
                )
            flaky = wait_until(
                lambda: (
                    row
                    if (row := _accounts(scratch_sessions, [ids["flaky"]])[ids["flaky"]]).status
                    is AccountStatus.CONNECTED
                    else None
                ),
                timeout=60,
                what="the flaky account to connect during the EC2 outage",
            )
        finally:
            sandbox.set_probe_fault("ec2", None)
        assert (flaky.permissions_checked_at, flaky.external_id_checked_at) == (
            None,
            flaky.last_verified_at,
        )
        # The probes are still due: the next attempt (made due now) proves the permissions.
        with scratch_sessions.begin() as session:
            session.execute(
                update(AwsAccount)
                .where(AwsAccount.id == ids["flaky"])
                .values(next_due_at=func.now())
            )
        wait_until(
            lambda: (
                _accounts(scratch_sessions, [ids["flaky"]])[ids["flaky"]].permissions_missing == []
            ),
            timeout=60,
            what="the flaky account's permissions to be proven once EC2 is back",
        )
        outage = [
            record
            for record in worker.events("verification.completed")
            if record.get("account_id") == str(ids["flaky"])
            and record.get("permissions_unknown") == "Unavailable"
        ]
        assert [(r["outcome"], r["service"]) for r in outage] == [("verified", "ec2")]
    accounts = _accounts(scratch_sessions, list(ids.values()))
    assert accounts[ids["audit"]].permissions_proven == [
        "iam:GetAccountSummary",
        "ec2:DescribeRegions",
        "s3:ListAllMyBuckets",
        "cloudtrail:DescribeTrails",
    ]
    assert accounts[ids["bare"]].error_message == (
        f"Role {accounts[ids['bare']].role_arn} can be assumed, but it is not allowed: "
        "cloudtrail:DescribeTrails, ec2:DescribeRegions, iam:GetAccountSummary, "
        "s3:ListAllMyBuckets. Attach the AWS managed policy SecurityAudit to the role, or a "
        "policy that allows these actions. If it is attached, a service control policy may "
        "deny them."
    )
    partial = accounts[ids["partial"]]
    assert partial.error_message is not None
    assert "it is not allowed: cloudtrail:DescribeTrails. Attach" in partial.error_message
    assert partial.permissions_missing == ["cloudtrail:DescribeTrails"]
    assert accounts[ids["flaky"]].status is AccountStatus.CONNECTED
