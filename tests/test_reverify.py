"""`scripts/reverify` as operators run it: a real subprocess, PostgreSQL, Redis and a worker."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select as io_select
import struct
import subprocess
import termios
import time
import unicodedata
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from models import AccountStatus, AuditEvent, AuditEventType, AwsAccount
from sandbox.moto_sts import PLATFORM_PRINCIPAL_ARN, SandboxSts
from tests.factories import make_organization, make_sandbox_account
from tests.processes import ROOT, Service, free_port, running, service_env, start_worker

pytestmark = pytest.mark.e2e

LONG_AGO = datetime(2026, 1, 1, tzinfo=UTC)
REVERIFY = str(ROOT / "scripts" / "reverify")


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


def reverify_on_terminal(
    env: dict[str, str], *args: str, columns: int = 100, timeout: float = 90
) -> tuple[int, str]:
    """Run the command with stdout and stderr on a pseudo-terminal `columns` wide; returns the
    exit code and what the terminal received (line ends as "\\n")."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    process = subprocess.Popen(
        [REVERIFY, *args],
        env={k: v for k, v in env.items() if k not in {"COLUMNS", "LINES"}},
        stdin=subprocess.DEVNULL,
        stdout=terminal,
        stderr=terminal,
    )
    os.close(terminal)
    received = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = io_select.select([controller], [], [], 1)
            if not ready:
                continue
            try:
                data = os.read(controller, 65536)
            except OSError:  # EIO: the command has exited and closed the terminal
                break
            if not data:
                break
            received += data
        code = process.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if process.poll() is None:
            process.kill()
        os.close(controller)
    return code, received.decode().replace("\r\n", "\n")


def _account(
    sessions: sessionmaker[Session],
    sandbox: SandboxSts,
    *,
    trusted: str | None = None,
    status: AccountStatus = AccountStatus.PENDING,
    alias: str = "Production",
    **fields: Any,
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
            **fields,
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
    assert "pending -> connected  verified" in result.stdout
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
    assert by_id[str(fixed)]["outcome"] == "verified"
    assert (by_id[str(broken)]["newStatus"], by_id[str(broken)]["outcome"]) == (
        "failed",
        "customer_must_fix",
    )
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
    for permission in ("iam:GetAccountSummary", "ec2:DescribeRegions", "s3:ListAllMyBuckets"):
        assert f"probe              {permission} ok" in result.stdout
    assert "pending -> connected" in result.stdout


def test_inline_on_a_role_without_permissions_names_each_denied_probe(
    env: dict[str, str], sandbox: SandboxSts, scratch_sessions: sessionmaker[Session]
) -> None:
    """Assumed, then every probe refused in its service's words; failed with the list; exit 1."""
    account_id = _account(scratch_sessions, sandbox, permissions=())
    result = reverify(env, str(account_id), "--inline")
    assert result.returncode == 1
    assert "AssumeRole         ok" in result.stdout
    assert "probe              ec2:DescribeRegions DENIED (UnauthorizedOperation)" in result.stdout
    assert "probe              cloudtrail:DescribeTrails DENIED (AccessDeniedException)" in (
        result.stdout
    )
    assert "pending -> failed" in result.stdout
    with scratch_sessions() as session:
        account = session.get(AwsAccount, account_id)
        assert account is not None
        assert account.last_error_code == "MissingPermissions"


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
    assert "4  some account not verified" in result.stdout


# Terminal controls a hostile alias or message could carry: clear screen, set the window title,
# C1's single-byte CSI, a right-to-left override.
HOSTILE = "Evil\x1b[2J\x1b]0;pwned\x07\x9b31m\u202egnp.exe"
HOSTILE_SHOWN = "Evil\\x1b[2J\\x1b]0;pwned\\x07\\x9b31m\\u202egnp.exe"


def _without_credentials(env: dict[str, str], tmp_path: Path, **extra: str) -> dict[str, str]:
    """`env` with no AWS credentials anywhere botocore looks."""
    kept = {k: v for k, v in env.items() if k not in {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}}
    nowhere = str(tmp_path / "no-such-file")
    return {**kept, "AWS_SHARED_CREDENTIALS_FILE": nowhere, "AWS_CONFIG_FILE": nowhere, **extra}


def _columns(line: str) -> int:
    """Terminal columns of a line (East Asian wide characters take two)."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in line)


def test_control_characters_in_customer_text_are_escaped(
    env: dict[str, str], sandbox: SandboxSts, scratch_sessions: sessionmaker[Session]
) -> None:
    """An alias and a message carrying terminal controls are printed escaped, in the table and
    in `--inline`'s heading."""
    account_id = _account(
        scratch_sessions,
        sandbox,
        trusted="",
        status=AccountStatus.FAILED,
        alias=HOSTILE,
        error_message=f"Denied: {HOSTILE}",
    )
    listing = reverify(env, str(account_id), "--dry-run")
    inline = reverify(env, str(account_id), "--inline")
    assert (listing.returncode, inline.returncode) == (0, 1), inline.stderr
    for output in (listing.stdout, inline.stdout):
        assert not set("\x1b\x07\x9b\u202e") & set(output)
    assert listing.stdout.count(HOSTILE_SHOWN) == 2  # the alias and the message
    assert (
        inline.stdout.strip().splitlines()[0]
        == f"{HOSTILE_SHOWN} ({_aws_id(scratch_sessions, account_id)}, {account_id})"
    )


def _aws_id(sessions: sessionmaker[Session], account_id: uuid.UUID) -> str:
    with sessions() as session:
        account = session.get(AwsAccount, account_id)
        assert account is not None
        return account.aws_account_id


def test_wait_shows_a_transient_attempt_and_exits_4(
    env: dict[str, str],
    sandbox: SandboxSts,
    scratch_sessions: sessionmaker[Session],
    tmp_path: Path,
) -> None:
    """With a worker that cannot reach STS, `--wait` shows the account unchanged with
    `transient: EndpointConnectionError` (table and --json) and exits 4."""
    account_id = _account(scratch_sessions, sandbox, status=AccountStatus.CONNECTED)
    unreachable = {**env, "AWS_ENDPOINT_URL_STS": f"http://127.0.0.1:{free_port()}"}
    with running(start_worker(unreachable, tmp_path)):
        table = reverify(env, str(account_id), "--wait", "--timeout", "60")
        report = reverify(env, str(account_id), "--wait", "--json", "--timeout", "60")
    assert table.returncode == 4, table.stderr
    [row] = [line for line in table.stdout.splitlines() if str(account_id) in line]
    assert "connected -> connected  transient: EndpointConnectionError" in row
    assert "not verified: 1 of 1 account(s)" in table.stderr
    assert report.returncode == 4, report.stderr
    [account] = json.loads(report.stdout)["accounts"]
    assert (account["newStatus"], account["outcome"], account["errorCode"]) == (
        "connected",
        "transient",
        "EndpointConnectionError",
    )
    assert account["verified"] is False


def test_wait_shows_a_platform_fault_and_the_pause_it_opens(
    env: dict[str, str],
    sandbox: SandboxSts,
    scratch_sessions: sessionmaker[Session],
    tmp_path: Path,
) -> None:
    """Without the worker's own credentials the first attempt is a platform fault, which pauses
    verification, and the next account is skipped: neither is reported verified; exit 4."""
    first = _account(scratch_sessions, sandbox, status=AccountStatus.CONNECTED)
    second = _account(scratch_sessions, sandbox, status=AccountStatus.CONNECTED)
    # One verification at a time: the second account's turn comes after the circuit opened.
    no_credentials = _without_credentials(env, tmp_path, WORKER_CONCURRENCY="1")
    with running(start_worker(no_credentials, tmp_path)):
        result = reverify(env, str(first), str(second), "--wait", "--json", "--timeout", "60")
    assert result.returncode == 4, result.stderr
    by_id = {row["id"]: row for row in json.loads(result.stdout)["accounts"]}
    assert {k: by_id[str(first)][k] for k in ("newStatus", "outcome", "errorCode")} == {
        "newStatus": "connected",
        "outcome": "platform_fault",
        "errorCode": "NoCredentialsError",
    }
    assert {k: by_id[str(second)][k] for k in ("newStatus", "outcome", "notVerified")} == {
        "newStatus": "connected",
        "outcome": None,
        "notVerified": "platform paused (NoCredentialsError)",
    }


def test_inline_platform_fault_on_a_terminal(
    env: dict[str, str],
    sandbox: SandboxSts,
    scratch_sessions: sessionmaker[Session],
    tmp_path: Path,
) -> None:
    """`--inline` without the platform's credentials shows the platform fault and exits 4, with
    no log line (JSON or console) among the steps and the table, whatever LOG_FORMAT says."""
    account_id = _account(scratch_sessions, sandbox, status=AccountStatus.CONNECTED)
    no_credentials = _without_credentials(env, tmp_path, LOG_FORMAT="json")
    code, screen = reverify_on_terminal(no_credentials, str(account_id), "--inline", columns=200)
    assert code == 4, screen
    assert "connected -> connected  platform_fault: NoCredentialsError" in screen
    # Every line is the command's own: no log line repeats a step or an outcome between them.
    assert "verification.completed" not in screen
    assert not [line for line in screen.splitlines() if line.lstrip().startswith("{")]


def test_requested_by_longer_than_its_column_exits_2(
    env: dict[str, str], sandbox: SandboxSts, scratch_sessions: sessionmaker[Session]
) -> None:
    """`--requested-by` past the audit column's 255 characters is a usage error (exit 2), not a
    database traceback; 255 characters are recorded."""
    account_id = _account(scratch_sessions, sandbox)
    too_long = reverify(env, str(account_id), "--requested-by", "x" * 256)
    assert too_long.returncode == 2
    assert too_long.stderr == (
        "reverify: error: --requested-by is 256 characters long; at most 255\n"
    )
    longest = reverify(env, str(account_id), "--requested-by", "y" * 255)
    assert longest.returncode == 0, longest.stderr
    with scratch_sessions() as session:
        actors = list(session.scalars(select(AuditEvent.actor)))
    assert actors == ["y" * 255]


def test_many_unknown_ids_are_named_briefly(env: dict[str, str]) -> None:
    """10,000 unknown ids: the error names the first five given and counts the rest."""
    missing = [str(uuid.uuid4()) for _ in range(10_000)]
    result = reverify(env, *missing)
    assert result.returncode == 2
    assert result.stderr == (
        f"reverify: error: unknown account id(s): {', '.join(missing[:5])} ... and 9,995 more\n"
    )


def test_error_column_fits_the_terminal_and_says_how_to_see_it_whole(
    env: dict[str, str], sandbox: SandboxSts, scratch_sessions: sessionmaker[Session]
) -> None:
    """On a terminal the ERROR column is cut to its width with an ellipsis and a line naming
    --wide; piped, or with --wide, the whole message is printed."""
    message = "Could not assume role " + "x" * 150 + ". Add the platform to its trust policy."
    account_id = _account(
        scratch_sessions,
        sandbox,
        status=AccountStatus.FAILED,
        alias="本番環境 (東京)",
        error_message=message,
    )
    code, screen = reverify_on_terminal(env, str(account_id), "--dry-run", columns=120)
    assert code == 0, screen
    lines = screen.splitlines()
    assert max(_columns(line) for line in lines) == 120
    [row] = [line for line in lines if str(account_id) in line]
    assert row.endswith("x…")
    assert (
        lines[-1] == "(cut to fit the terminal: --wide or --json shows whole aliases and messages)"
    )
    piped = reverify(env, str(account_id), "--dry-run")
    assert piped.stdout.rstrip().endswith(message)
    code, wide = reverify_on_terminal(env, str(account_id), "--dry-run", "--wide", columns=120)
    assert wide.rstrip().endswith(message)
