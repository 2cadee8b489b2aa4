"""The worker's stdout as on-call sees it: JSON lines only, correlated, and without secrets."""

from __future__ import annotations

import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from models import AccountStatus, AwsAccount
from sandbox.moto_sts import PLATFORM_PRINCIPAL_ARN, SandboxSts, create_customer_role
from tests.factories import make_account, make_organization
from tests.processes import ROOT, running, service_env, start_beat, start_worker, wait_until

pytestmark = pytest.mark.e2e

DB_PASSWORD = "db-pw-Zq81x"
REDIS_USER, REDIS_PASSWORD = "verifier-logtest", "redis-pw-Kx93v"
AWS_SECRET = "aws-secret-Mn47pQ2"


@pytest.fixture
def redis_with_password(redis_url: str) -> Iterator[str]:
    """A Redis user with a password (an ACL user, removed afterwards) and its URL."""
    admin = redis.Redis.from_url(redis_url)
    admin.flushdb()
    admin.acl_setuser(
        REDIS_USER,
        enabled=True,
        passwords=[f"+{REDIS_PASSWORD}"],
        keys=["*"],
        channels=["*"],
        commands=["+@all"],
    )
    host_part = redis_url.partition("://")[2]
    yield f"redis://{REDIS_USER}:{REDIS_PASSWORD}@{host_part}"
    admin.acl_deluser(REDIS_USER)
    admin.close()


def test_every_line_is_json_correlated_and_free_of_secrets(
    scratch_database: str,
    scratch_sessions: sessionmaker[Session],
    redis_with_password: str,
    tmp_path: Path,
) -> None:
    """Celery's lines and ours parse as JSON; a re-verify's correlation id marks its task's lines;
    no password, AWS secret, access key id or external ID appears anywhere."""
    database_url = scratch_database.replace("postgres@", f"postgres:{DB_PASSWORD}@", 1)
    assert DB_PASSWORD in database_url
    external_ids = [f"extid-{uuid.uuid4().hex}" for _ in range(3)]
    with SandboxSts() as sandbox:
        ids = []
        with scratch_sessions.begin() as session:
            organization = make_organization(session)
            for n, external_id in enumerate(external_ids):
                aws_id = f"{uuid.uuid4().int % 10**12:012d}"
                # One working role, one that does not trust us, one without the condition.
                trusted = (
                    PLATFORM_PRINCIPAL_ARN,
                    "arn:aws:iam::999988887777:root",
                    PLATFORM_PRINCIPAL_ARN,
                )[n]
                create_customer_role(
                    sandbox.endpoint_url,
                    aws_id,
                    f"Log{n}",
                    trusted,
                    None if n == 2 else external_id,
                )
                ids.append(
                    make_account(
                        session,
                        organization=organization,
                        aws_account_id=aws_id,
                        role_arn=f"arn:aws:iam::{aws_id}:role/Log{n}",
                        external_id=external_id,
                        role_changed_at=datetime(2026, 1, 1, tzinfo=UTC),
                    ).id
                )
        env = service_env(
            database_url=database_url,
            redis_url=redis_with_password,
            sts_url=sandbox.endpoint_url,
            AWS_SECRET_ACCESS_KEY=AWS_SECRET,
            LOG_LEVEL="DEBUG",
            # The scheduled pass must not get there first: only the request verifies.
            DISPATCH_INTERVAL_SECONDS="3600",
        )
        with running(start_worker(env, tmp_path), start_beat(env, tmp_path)) as (worker, beat):
            wait_until(lambda: worker.events("worker.ready"), timeout=90, what="worker ready")
            request = subprocess.run(
                [str(ROOT / "scripts" / "reverify"), *map(str, ids), "--wait", "--timeout", "90"],
                env=env,
                capture_output=True,
                text=True,
                timeout=150,
                check=False,
            )
            assert request.returncode == 1, request.stderr  # two of three are not connected
            match = re.search(r"correlation id ([0-9a-f-]{36})", request.stdout)
            assert match, request.stdout
            correlation_id = match.group(1)
            wait_until(
                lambda: len(worker.events("verification.completed")) >= 3,
                timeout=90,
                what="three verifications logged",
            )
            time.sleep(0.5)
        worker_records = worker.records()  # raises if any stdout line is not JSON
        beat_records = beat.records()
    with scratch_sessions() as session:
        statuses = {
            row.id: row.status for row in session.execute(select(AwsAccount.id, AwsAccount.status))
        }
    assert [statuses[i] for i in ids] == [
        AccountStatus.CONNECTED,
        AccountStatus.FAILED,
        AccountStatus.FAILED,
    ]

    for record in worker_records + beat_records:
        assert {"event", "level", "logger", "timestamp"} <= set(record), record
    loggers = {str(r["logger"]) for r in worker_records}
    assert any(name.startswith("celery.") for name in loggers), loggers

    task_lines = [r for r in worker_records if r.get("task_name") == "verifier.verify_accounts"]
    correlated = [r for r in task_lines if r.get("correlation_id") == correlation_id]
    assert {r["event"] for r in correlated} >= {"verification.completed", "account.status_changed"}
    assert any(str(r["event"]).startswith("Task verifier.verify_accounts[") for r in correlated)
    assert {r.get("account_id") for r in correlated if r["event"] == "verification.completed"} == {
        str(i) for i in ids
    }
    for r in correlated:
        if r["event"] == "verification.completed":
            assert r["aws_account_id"]
            assert r["organization_id"]
            assert r["task_id"]

    output = (
        worker.output()
        + worker.errors()
        + beat.output()
        + beat.errors()
        + request.stdout
        + request.stderr
    )
    for secret in (DB_PASSWORD, REDIS_PASSWORD, AWS_SECRET, "AKIASANDBOXPLATFORM0", *external_ids):
        assert secret not in output, secret
    ready = worker.events("worker.ready")[0]
    assert ready["database_url"].startswith("postgresql+psycopg://postgres:***@")
    assert ready["redis_url"].startswith(f"redis://{REDIS_USER}:***@")
