"""`scripts/reverify` as operators run it: a real subprocess, PostgreSQL, Redis and a worker."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from models import AccountStatus, AuditEvent, AuditEventType
from sandbox.moto_sts import PLATFORM_PRINCIPAL_ARN, SandboxSts
from tests.factories import make_organization, make_sandbox_account
from tests.processes import ROOT, Service, running, service_env, start_worker

pytestmark = pytest.mark.e2e

LONG_AGO = datetime(2026, 1, 1, tzinfo=UTC)
REVERIFY = str(ROOT / "scripts" / "reverify")


@pytest.fixture(scope="module")
def sandbox() -> Iterator[SandboxSts]:
    """The moto-based sandbox STS."""
    with SandboxSts() as sts:
        yield sts


@pytest.fixture
def env(sandbox: SandboxSts, scratch_database: str, redis_url: str) -> dict[str, str]:
    """The environment for the command and the worker, on an empty Redis database."""
    redis.Redis.from_url(redis_url).flushdb()
    return service_env(
        database_url=scratch_database,
        redis_url=redis_url,
        sts_url=sandbox.endpoint_url,
        PLATFORM_PRINCIPAL_ARN=PLATFORM_PRINCIPAL_ARN,
    )


@pytest.fixture
def worker(env: dict[str, str], tmp_path: Path) -> Iterator[Service]:
    """A real worker (no beat: only requested verifications run)."""
    with running(start_worker(env, tmp_path)) as (service,):
        yield service


def reverify(
    env: dict[str, str], *args: str, timeout: float = 90
) -> subprocess.CompletedProcess[str]:
    """Run the command as an operator would."""
    return subprocess.run(
        [REVERIFY, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def _account(
    sessions: sessionmaker[Session],
    sandbox: SandboxSts,
    *,
    trusted: str | None = None,
    status: AccountStatus = AccountStatus.PENDING,
    alias: str = "Production",
) -> uuid.UUID:
    with sessions.begin() as session:
        return make_sandbox_account(
            session,
            sandbox.endpoint_url,
            organization=make_organization(session),
            trusted=trusted,
            status=status,
            alias=alias,
            role_changed_at=LONG_AGO,
        ).id


def test_one_id_with_wait_prints_the_result(
    env: dict[str, str],
    worker: Service,
    sandbox: SandboxSts,
    scratch_sessions: sessionmaker[Session],
) -> None:
    """`reverify ID --wait` exits 0 once the account is connected, showing old -> new."""
    account_id = _account(scratch_sessions, sandbox, alias="Payments")
    result = reverify(env, str(account_id), "--wait", "--timeout", "60")
    assert result.returncode == 0, result.stderr
    assert "pending -> connected" in result.stdout
    assert "Payments" in result.stdout
    with scratch_sessions() as session:
        kinds = list(
            session.scalars(
                select(AuditEvent.event_type)
                .where(AuditEvent.account_id == account_id)
                .order_by(AuditEvent.id)
            )
        )
    assert kinds == [AuditEventType.VERIFICATION_REQUESTED, AuditEventType.STATUS_CHANGED]


def test_status_failed_selects_only_failed_accounts(
    env: dict[str, str],
    worker: Service,
    sandbox: SandboxSts,
    scratch_sessions: sessionmaker[Session],
) -> None:
    """`--status failed --wait --json` re-verifies the failed ones; a fixed role reconnects."""
    fixed = _account(scratch_sessions, sandbox, status=AccountStatus.FAILED)
    broken = _account(scratch_sessions, sandbox, trusted="", status=AccountStatus.FAILED)
    untouched = _account(scratch_sessions, sandbox, status=AccountStatus.PENDING)
    result = reverify(env, "--status", "failed", "--wait", "--json", "--yes")
    assert result.returncode == 1, result.stderr  # one is still not connected
    report = json.loads(result.stdout)
    by_id = {row["id"]: row for row in report["accounts"]}
    assert set(by_id) == {str(fixed), str(broken)}
    assert str(untouched) not in by_id
    assert (by_id[str(fixed)]["oldStatus"], by_id[str(fixed)]["newStatus"]) == (
        "failed",
        "connected",
    )
    assert by_id[str(broken)]["newStatus"] == "failed"
    assert "access denied" in by_id[str(broken)]["errorMessage"]


def test_an_unknown_id_is_named_and_exits_2(env: dict[str, str]) -> None:
    """An id that does not exist is refused by name, and nothing is requested."""
    missing = uuid.uuid4()
    result = reverify(env, str(missing))
    assert result.returncode == 2
    assert str(missing) in result.stderr


def test_a_malformed_uuid_exits_2(env: dict[str, str]) -> None:
    """A malformed id is named in the error."""
    result = reverify(env, "not-a-uuid")
    assert result.returncode == 2
    assert "'not-a-uuid' is not a UUID" in result.stderr


def test_inline_on_a_working_role_shows_each_step(
    env: dict[str, str], sandbox: SandboxSts, scratch_sessions: sessionmaker[Session]
) -> None:
    """`--inline` needs no worker, prints every step and exits 0 for a connected account."""
    account_id = _account(scratch_sessions, sandbox)
    result = reverify(env, str(account_id), "--inline")
    assert result.returncode == 0, result.stderr
    for step in ("input check", "AssumeRole", "identity", "external-ID check"):
        assert step in result.stdout
    assert "pending -> connected" in result.stdout


def test_inline_on_a_denying_role_explains_the_failure(
    env: dict[str, str], sandbox: SandboxSts, scratch_sessions: sessionmaker[Session]
) -> None:
    """A role trusting someone else fails at AssumeRole with the customer's message; exit 1."""
    account_id = _account(scratch_sessions, sandbox, trusted="arn:aws:iam::999988887777:root")
    result = reverify(env, str(account_id), "--inline")
    assert result.returncode == 1
    assert "AssumeRole         FAILED AccessDenied" in result.stdout
    assert "pending -> failed" in result.stdout


def test_database_down_exits_3_with_the_url_masked(env: dict[str, str]) -> None:
    """An unreachable database is exit 3, naming the URL without its password."""
    down = {**env, "DATABASE_URL": "postgresql://app:hunter2@127.0.0.1:9/nowhere"}
    result = reverify(down, "--all", "--dry-run")
    assert result.returncode == 3
    assert "postgresql+psycopg://app:***@127.0.0.1:9/nowhere" in result.stderr
    assert "hunter2" not in result.stderr + result.stdout


def test_broker_down_exits_3(
    env: dict[str, str], sandbox: SandboxSts, scratch_sessions: sessionmaker[Session]
) -> None:
    """An unreachable Redis is exit 3 before anything is written."""
    account_id = _account(scratch_sessions, sandbox)
    down = {**env, "REDIS_URL": "redis://:pw@127.0.0.1:9/0"}
    result = reverify(down, str(account_id))
    assert result.returncode == 3
    assert "redis://:***@127.0.0.1:9/0" in result.stderr
    with scratch_sessions() as session:
        assert (
            session.scalars(select(AuditEvent).where(AuditEvent.account_id == account_id)).all()
            == []
        )


def test_many_accounts_need_confirmation(
    env: dict[str, str], sandbox: SandboxSts, scratch_sessions: sessionmaker[Session]
) -> None:
    """Past the threshold, a non-interactive run without --yes is refused with exit 2."""
    for _ in range(3):
        _account(scratch_sessions, sandbox, trusted="")
    result = reverify(env, "--all", "--confirm-over", "2")
    assert result.returncode == 2
    assert "--yes" in result.stderr


def test_dry_run_lists_and_changes_nothing(
    env: dict[str, str], sandbox: SandboxSts, scratch_sessions: sessionmaker[Session]
) -> None:
    """`--dry-run` lists the selection and writes no audit event."""
    account_id = _account(scratch_sessions, sandbox, alias="Ledger")
    result = reverify(env, str(account_id), "--dry-run")
    assert result.returncode == 0
    assert "would re-verify 1 account(s)" in result.stdout
    assert "Ledger" in result.stdout
    with scratch_sessions() as session:
        assert session.scalars(select(AuditEvent)).all() == []


def test_help_is_available() -> None:
    """`--help` describes the command and its exit codes."""
    result = subprocess.run(
        [REVERIFY, "--help"], capture_output=True, text=True, check=False, env=os.environ.copy()
    )
    assert result.returncode == 0
    assert "Exit codes" in result.stdout
