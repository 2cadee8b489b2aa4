"""`scripts/status`: the fleet at a glance, run as operators run it."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from models import AccountStatus, AwsAccount, OutcomeKind
from tests.factories import make_account, make_organization
from tests.processes import ROOT
from worker.circuit import PlatformCircuit
from worker.fleet import remember_dispatch


def _status(database_url: str, redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "scripts.status", *args],
        cwd=ROOT,
        env={"DATABASE_URL": database_url, "REDIS_URL": redis_url, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _seed(sessions: sessionmaker[Session]) -> dict[str, Any]:
    now = datetime.now(UTC)
    with sessions.begin() as session:
        hostile = make_organization(session, name="Evil \x1b[2J\x1b]0;pwned\x07 Corp")
        other = make_organization(session, name="Other")
        ids = {
            "due_long": make_account(
                session, organization=hostile, next_due_at=now - timedelta(hours=8)
            ).id,
            "due_now": make_account(
                session, organization=hostile, next_due_at=now - timedelta(seconds=30)
            ).id,
            "leased": make_account(session, organization=other, next_due_at=now).id,
            "expired": make_account(
                session, organization=other, next_due_at=now - timedelta(minutes=10)
            ).id,
            "later": make_account(
                session,
                organization=other,
                status=AccountStatus.CONNECTED,
                next_due_at=now + timedelta(hours=5),
            ).id,
            "failed": make_account(
                session,
                organization=hostile,
                status=AccountStatus.FAILED,
                error_message="denied",
                next_due_at=now + timedelta(hours=1),
            ).id,
        }
        session.execute(
            update(AwsAccount)
            .where(AwsAccount.id == ids["leased"])
            .values(lease_id=uuid.uuid4(), lease_expires_at=now + timedelta(minutes=5))
        )
        session.execute(
            update(AwsAccount)
            .where(AwsAccount.id == ids["expired"])
            .values(lease_id=uuid.uuid4(), lease_expires_at=now - timedelta(minutes=1))
        )
        session.execute(
            update(AwsAccount)
            .where(AwsAccount.id == ids["failed"])
            .values(
                last_outcome=OutcomeKind.CUSTOMER_MUST_FIX, last_error_code="Access\x1b[31mDenied"
            )
        )
        session.execute(
            update(AwsAccount)
            .where(AwsAccount.id == ids["due_now"])
            .values(last_outcome=OutcomeKind.TRANSIENT, last_error_code="Throttling")
        )
    return {"hostile": hostile.id, "other": other.id, **ids}


def test_counts_backlog_leases_and_broker_state(
    scratch_database: str, scratch_sessions: sessionmaker[Session], redis_url: str
) -> None:
    """Counts per status, the due backlog (leased accounts are not due, expired leases are),
    failures by error code, the open circuit, the queues and the last dispatch, as JSON."""
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    _seed(scratch_sessions)
    PlatformCircuit(client, pause_seconds=60).trip("InvalidClientTokenId", "our key is refused")
    client.rpush("verifier.scheduled", "a", "b")
    remember_dispatch(client, claimed=7, sent=1, paused=False)
    done = _status(scratch_database, redis_url, "--json", "--overdue", "3600")
    client.flushdb()
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["byStatus"] == {"pending": 4, "connected": 1, "failed": 1}
    assert report["accounts"] == 6
    # due: due_long, due_now, expired (its lease is over); leased is not due.
    assert (report["due"], report["overdue"], report["leased"], report["leaseExpired"]) == (
        3,
        1,
        1,
        1,
    )
    assert 8 * 3600 - 60 < report["oldestDueSeconds"] < 8 * 3600 + 60
    assert report["failures"] == [
        {"outcome": "customer_must_fix", "errorCode": "Access\x1b[31mDenied", "accounts": 1},
        {"outcome": "transient", "errorCode": "Throttling", "accounts": 1},
    ]
    assert report["circuit"]["errorCode"] == "InvalidClientTokenId"
    assert report["queues"]["verifier.scheduled"] == 2
    assert report["lastDispatch"]["claimed"] == 7
    assert report["stsRatePerSecond"] == report["stsRateCeilingPerSecond"]


def test_organizations_shown_one_by_one_with_customer_text_escaped(
    scratch_database: str, scratch_sessions: sessionmaker[Session], redis_url: str
) -> None:
    """--organization narrows the counts to those organizations and shows each; an organization
    name or error code cannot send escape sequences to the operator's terminal."""
    redis.Redis.from_url(redis_url).flushdb()
    seeded = _seed(scratch_sessions)
    done = _status(scratch_database, redis_url, "--organization", str(seeded["hostile"]))
    assert done.returncode == 0, done.stderr
    assert "\x1b" not in done.stdout
    assert "\x07" not in done.stdout
    assert "Evil \\x1b[2J\\x1b]0;pwned\\x07 Corp" in done.stdout
    assert "Access\\x1b[31mDenied" in done.stdout
    assert "accounts         3   pending 2   connected 0   failed 1" in done.stdout
    as_json = json.loads(
        _status(
            scratch_database, redis_url, "--json", "--organization", str(seeded["other"])
        ).stdout
    )
    assert as_json["byStatus"] == {"pending": 2, "connected": 1, "failed": 0}
    assert [org["name"] for org in as_json["organizations"]] == ["Other"]


@pytest.mark.timeout(90)
def test_watch_refreshes_from_the_database(
    scratch_database: str, scratch_sessions: sessionmaker[Session], redis_url: str
) -> None:
    """--watch --json prints a fresh report every SECONDS, one JSON line each, read again from
    the database: an account added between two reports is counted in the later one."""
    redis.Redis.from_url(redis_url).flushdb()
    _seed(scratch_sessions)
    with subprocess.Popen(
        [sys.executable, "-m", "scripts.status", "--watch", "0.5", "--json"],
        cwd=ROOT,
        env={"DATABASE_URL": scratch_database, "REDIS_URL": redis_url, "PATH": "/usr/bin:/bin"},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    ) as watch:
        assert watch.stdout is not None
        try:
            first = json.loads(watch.stdout.readline())
            with scratch_sessions.begin() as session:
                make_account(session, status=AccountStatus.CONNECTED)
            reports = [json.loads(watch.stdout.readline()) for _ in range(3)]
        finally:
            watch.terminate()
    assert first["accounts"] == 6
    # The report being read while the account was added may or may not count it; the last must.
    assert reports[-1]["accounts"] == 7
    assert reports[-1]["byStatus"]["connected"] == 2
    assert len({first["at"], *(report["at"] for report in reports)}) == 4


def test_bad_usage_and_unreachable_database(scratch_database: str, redis_url: str) -> None:
    """A bad organization id is exit 2; a database that does not answer is exit 3, its URL's
    password masked."""
    done = _status(scratch_database, redis_url, "--organization", "nope\x1b[2J")
    assert done.returncode == 2
    assert "\x1b" not in done.stderr
    done = _status("postgresql://u:secret@127.0.0.1:1/x", redis_url)
    assert done.returncode == 3
    assert "secret" not in done.stderr
    assert "***" in done.stderr


def test_status_loads_neither_celery_nor_boto3() -> None:
    """`scripts/status` imports the worker package's light modules only (Celery and boto3 were
    most of its run time)."""
    code = "import sys, scripts.status; print(sorted({'celery', 'boto3'} & set(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
