"""Bad input: rows malformed every way the schema allows (and ways it cannot stop), accounts
deleted or edited while their verification is in flight.

A bad row is a customer-fixable failure with a precise message, never a crashed task; an edit
in flight discards the result about the old role and verifies the new one; a deleted account
leaves nothing behind.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypedDict

import pytest
from kombu.connection import Connection
from sqlalchemy import select

from models import AccountStatus, AuditEvent, AuditEventType
from tests.faults.fleet import Fleet, Planned, unique_aws_account_id
from tests.faults.harness import StandInProcess, log_events, running
from tests.faults.invariants import check_invariants, wait_for
from tests.processes import RedisServer, Service, start_beat, start_worker, wait_until
from worker.app import app
from worker.claims import claim_accounts
from worker.queues import SCHEDULED_QUEUE

pytestmark = pytest.mark.faults

CONNECTED, FAILED, PENDING = AccountStatus.CONNECTED, AccountStatus.FAILED, AccountStatus.PENDING


def _status_events(fleet: Fleet, account_id: uuid.UUID) -> list[AuditEvent]:
    with fleet.sessions() as session:
        return list(
            session.scalars(
                select(AuditEvent)
                .where(
                    AuditEvent.account_id == account_id,
                    AuditEvent.event_type == AuditEventType.STATUS_CHANGED,
                )
                .order_by(AuditEvent.id)
            )
        )


def _check_error_messages(fleet: Fleet) -> None:
    """Failed accounts say why in a customer's words: no external ID, request id or traceback,
    and not the seeded message any more (a failed account's message is refreshed)."""
    rows = fleet.rows()
    for planned in fleet.live():
        row = rows[planned.id]
        if row.status is not FAILED:
            continue
        message = row.error_message or ""
        assert message, planned.label
        assert "(seeded)" not in message, f"{planned.label}: message not refreshed"
        assert planned.external_id not in message, f"{planned.label}: external ID in {message!r}"
        for leak in ("Traceback", "RequestId", "request id", "botocore"):
            assert leak not in message, f"{planned.label}: {leak} in {message!r}"
        assert len(message) < 1000, f"{planned.label}: a {len(message)}-character message"


def _bad(
    fleet: Fleet,
    label: str,
    reason: str,
    *,
    initial: AccountStatus = PENDING,
    role_arn: str | None = None,
    aws_account_id: str | None = None,
    external_id: str | None = None,
) -> Planned:
    """An account the worker must fail for `reason` (a local check's code)."""
    return fleet.add(
        label,
        initial=initial,
        expected=FAILED,
        reason=None if initial is FAILED else reason,
        role_arn=role_arn,
        aws_account_id=aws_account_id,
        external_id=external_id,
    )


class _ArnRow(TypedDict):
    aws_account_id: str
    role_arn: str


def _arn(template: str) -> _ArnRow:
    """A role ARN made from `template` with a fresh `{account}`, and that account's id."""
    account = unique_aws_account_id()
    return {"aws_account_id": account, "role_arn": template.format(account=account)}


@pytest.mark.timeout(120)
def test_malformed_rows_fail_precisely_or_connect(
    services_env: Callable[..., dict[str, str]],
    fleet: Fleet,
    standin: StandInProcess,
    tmp_path: Path,
) -> None:
    """Every row the constraints let through either connects (paths, unicode aliases, limits
    reached exactly, stale leases) or fails with the local check's precise reason before any
    STS call; no task crashes, nothing is stuck."""
    long_path = "p/" * ((2048 - len("arn:aws:iam::123456789012:role/") - 2) // 2)
    good = [
        fleet.add("ok-path", **_arn("arn:aws:iam::{account}:role/team/ops/ok-path")),
        fleet.add("ok-unicode-alias", alias="Produção — 生産 🚀 \u202egnp.exe\u202c\n\tend"),
        fleet.add("ok-long-alias", alias="A" * 255),
        fleet.add("ok-1224-external-id", external_id="e" * 1200 + uuid.uuid4().hex[:24]),
        fleet.add("ok-2-char-external-id", external_id=uuid.uuid4().hex[:2]),
        fleet.add("ok-odd-external-id", external_id=f"+=,.@:/-_{uuid.uuid4().hex}"),
        fleet.add("ok" + "x" * 62),  # a role name at IAM's 64-character limit
        fleet.add("ok-zero-account", aws_account_id="000000000000"),
        fleet.add(
            "ok-stale-lease",
            lease_id=uuid.uuid4(),
            lease_expires_at=datetime.now(UTC) - timedelta(hours=1),
            next_due_at=datetime.now(UTC) - timedelta(hours=1),
        ),
        fleet.add("ok-due-in-1970", next_due_at=datetime(1970, 1, 1, tzinfo=UTC)),
    ]
    assert len(good[3].external_id) == 1224
    cn = "arn:aws-cn:iam::{account}:role/ok-cn"
    bad = [
        _bad(fleet, "ok-cn", "UnsupportedPartition", **_arn(cn)),
        _bad(
            fleet, "ok-gov", "UnsupportedPartition", **_arn("arn:aws-us-gov:iam::{account}:role/ok")
        ),
        _bad(fleet, "ok" + "x" * 63, "InvalidRoleArn"),  # a 65-character role name
        _bad(
            fleet,
            "ok-other-account",
            "RoleAccountMismatch",
            role_arn=f"arn:aws:iam::{unique_aws_account_id()}:role/ok-other-account",
        ),
        _bad(
            fleet,
            "ok-spaced-external-id",
            "InvalidExternalId",
            external_id=f"ext id {uuid.uuid4().hex}",
        ),
        _bad(fleet, "not-an-arn", "InvalidRoleArn", role_arn="this is not an ARN, honestly"),
        _bad(fleet, "user-arn", "InvalidRoleArn", **_arn("arn:aws:iam::{account}:user/ok-user")),
        _bad(fleet, "s3-arn", "InvalidRoleArn", role_arn="arn:aws:s3:::ok-bucket-of-mine"),
        _bad(fleet, "empty-role-name", "InvalidRoleArn", **_arn("arn:aws:iam::{account}:role/")),
        _bad(
            fleet,
            "2048-char-arn",
            "InvalidRoleArn",
            **_arn("arn:aws:iam::{account}:role/" + long_path + "ok"),
        ),
        _bad(fleet, "leading-space", "InvalidRoleArn", **_arn(" arn:aws:iam::{account}:role/ok")),
        _bad(fleet, "connected-cn", "UnsupportedPartition", initial=CONNECTED, **_arn(cn)),
        _bad(fleet, "failed-cn", "UnsupportedPartition", initial=FAILED, **_arn(cn)),
    ]
    env = services_env()
    worker, beat = start_worker(env, tmp_path), start_beat(env, tmp_path)
    with running(worker, beat):
        wait_for(fleet, timeout=60)
        for planned in bad:
            assert standin.calls_for(planned.role_arn) == 0, f"{planned.label} was sent to STS"
        for planned in good:
            assert standin.calls_for(planned.role_arn) == 2, planned.label
        _check_error_messages(fleet)
        assert "raised unexpected" not in worker.output()
        check_invariants(fleet, services=[worker, beat], workers=[worker], exact_logs=True)


def _in_flight(standin: StandInProcess, planned: list[Planned]) -> bool:
    """Every one of these accounts has an AssumeRole call under way (or answered)."""
    by_role: dict[str, int] = standin.stats()["by_role"]
    return all(by_role.get(p.role_arn, 0) >= 1 for p in planned)


def _discarded(worker: Service) -> set[str]:
    return {str(r.get("account_id")) for r in log_events(worker, "verification.discarded")}


# `slow…` roles answer (successfully) after SLOW_SECONDS: long enough to change rows meanwhile,
# even on a loaded machine (the edits must land before the answers do).
SLOW_SECONDS = 6.0
IN_FLIGHT = {
    "STS_READ_TIMEOUT_SECONDS": "10",
    "VERIFY_TIME_LIMIT_SECONDS": "20",
    "LEASE_SECONDS": "40",
    "WORKER_CONCURRENCY": "8",
}


@pytest.mark.timeout(120)
def test_account_deleted_while_its_verification_is_in_flight(
    services_env: Callable[..., dict[str, str]],
    fleet: Fleet,
    standin: StandInProcess,
    tmp_path: Path,
) -> None:
    """The result about a deleted account is discarded: no row comes back, no audit event is
    written, the task does not fail, and the others are verified as usual."""
    standin.configure(slow_seconds=SLOW_SECONDS)
    doomed = [
        fleet.add(f"slow-doomed-{n}", expected=CONNECTED, reason="verified") for n in range(3)
    ]
    fleet.add_mix(copies=1)
    env = services_env(**IN_FLIGHT)
    worker, beat = start_worker(env, tmp_path), start_beat(env, tmp_path)
    with running(worker, beat):
        wait_until(lambda: _in_flight(standin, doomed), timeout=30, what="calls in flight")
        for planned in doomed:
            fleet.forget(planned.id, in_flight=True)
        wait_for(fleet, timeout=60)
        wait_until(
            lambda: {str(p.id) for p in doomed} <= _discarded(worker),
            timeout=20,
            what="the deleted accounts' results to be discarded",
        )
        for planned in doomed:
            assert _status_events(fleet, planned.id) == [], planned.label
        assert "raised unexpected" not in worker.output()
        check_invariants(fleet, services=[worker, beat], workers=[worker], exact_logs=True)


@pytest.mark.timeout(120)
def test_account_edited_while_its_verification_is_in_flight(
    services_env: Callable[..., dict[str, str]],
    fleet: Fleet,
    standin: StandInProcess,
    tmp_path: Path,
) -> None:
    """A result about role details that changed meanwhile is discarded and the new details are
    verified at once; an edit of the alias alone does not discard anything."""
    standin.configure(slow_seconds=SLOW_SECONDS)
    to_deny = fleet.add("slow-then-deny", expected=FAILED, reason="AccessDenied")
    to_new_external_id = fleet.add("slow-new-external-id", expected=CONNECTED, reason="verified")
    to_noext = fleet.add(
        "slow-then-noext", initial=CONNECTED, expected=FAILED, reason="ExternalIdNotEnforced"
    )
    to_new_account = fleet.add("slow-new-account", expected=CONNECTED, reason="verified")
    alias_only = fleet.add("slow-alias-only", expected=CONNECTED, reason="verified")
    edited = [to_deny, to_new_external_id, to_noext, to_new_account]
    fleet.add_mix(copies=1)
    env = services_env(**IN_FLIGHT)
    worker, beat = start_worker(env, tmp_path), start_beat(env, tmp_path)
    with running(worker, beat):
        wait_until(
            lambda: _in_flight(standin, [*edited, alias_only]),
            timeout=30,
            what="calls in flight",
        )
        to_deny.role_arn = f"arn:aws:iam::{to_deny.aws_account_id}:role/deny-edited"
        fleet.edit(to_deny.id, in_flight=True, role_arn=to_deny.role_arn)
        # The role now trusts only the new external ID: the answer in flight (about the old
        # one) must not connect the account.
        new_external_id = f"ext-new-{uuid.uuid4().hex}"
        standin.configure(expected_external_ids={to_new_external_id.role_arn: new_external_id})
        fleet.edit(to_new_external_id.id, in_flight=True, external_id=new_external_id)
        to_new_external_id.external_id = new_external_id
        to_noext.role_arn = f"arn:aws:iam::{to_noext.aws_account_id}:role/noext-edited"
        fleet.edit(to_noext.id, in_flight=True, role_arn=to_noext.role_arn)
        account = unique_aws_account_id()
        to_new_account.role_arn = f"arn:aws:iam::{account}:role/ok-new-account"
        fleet.edit(
            to_new_account.id,
            in_flight=True,
            aws_account_id=account,
            role_arn=to_new_account.role_arn,
        )
        to_new_account.aws_account_id = account
        fleet.edit(alias_only.id, in_flight=True, alias="Renamed while in flight")
        wait_for(fleet, timeout=60)
        wait_until(
            lambda: {str(p.id) for p in edited} <= _discarded(worker),
            timeout=20,
            what="the results about old role details to be discarded",
        )
        assert str(alias_only.id) not in _discarded(worker), "an alias edit discarded a result"
        for planned in [*edited, alias_only]:
            events = _status_events(fleet, planned.id)
            assert len(events) == 1, (
                f"{planned.label}: {[(e.from_status, e.to_status) for e in events]}"
            )
        assert "raised unexpected" not in worker.output()
        check_invariants(fleet, services=[worker, beat], workers=[worker], exact_logs=True)


@pytest.mark.timeout(120)
def test_rows_sts_would_refuse_are_refused_locally(
    services_env: Callable[..., dict[str, str]],
    fleet: Fleet,
    standin: StandInProcess,
    tmp_path: Path,
) -> None:
    """A non-ASCII letter or a trailing newline in the external ID or the role name is bad input
    by STS's own (ASCII) patterns: it must fail locally with a precise reason, never reach STS,
    and never have its external ID shown back in the message."""
    bad = [
        _bad(
            fleet,
            "ok-unicode-external-id",
            "InvalidExternalId",
            external_id=f"extérieur-ñandú-{uuid.uuid4().hex[:8]}",
        ),
        _bad(
            fleet,
            "ok-newline-external-id",
            "InvalidExternalId",
            external_id=f"ext-{uuid.uuid4().hex}\n",
        ),
        _bad(fleet, "ok-rôle", "InvalidRoleArn"),
        _bad(fleet, "ok-newline-arn", "InvalidRoleArn", **_arn("arn:aws:iam::{account}:role/ok\n")),
    ]
    fleet.add("ok-control")
    env = services_env()
    worker, beat = start_worker(env, tmp_path), start_beat(env, tmp_path)
    with running(worker, beat):
        wait_for(fleet, timeout=60)
        _check_error_messages(fleet)
        sent = {p.label: standin.calls_for(p.role_arn) for p in bad}
        assert not any(sent.values()), f"sent to STS: {sent}"
        check_invariants(fleet, services=[worker, beat], workers=[worker], exact_logs=True)


@pytest.mark.timeout(120)
def test_failure_counter_at_its_limit(
    services_env: Callable[..., dict[str, str]],
    fleet: Fleet,
    tmp_path: Path,
) -> None:
    """A counter at 2**31 - 1 is a value the schema accepts: the next failure must not crash."""
    fleet.add("deny-max-counter", consecutive_failures=2**31 - 1)
    fleet.add("throttle-max-counter", consecutive_failures=2**31 - 1)
    env = services_env()
    worker, beat = start_worker(env, tmp_path), start_beat(env, tmp_path)
    with running(worker, beat):
        wait_for(fleet, timeout=15)
        assert "raised unexpected" not in worker.output()
        check_invariants(fleet, services=[worker, beat], workers=[worker], exact_logs=True)


@pytest.mark.timeout(150)
def test_poison_messages_are_refused_in_one_line_each(
    services_env: Callable[..., dict[str, str]],
    fleet: Fleet,
    private_redis: RedisServer,
    tmp_path: Path,
) -> None:
    """Messages with 10,000 ids, ids that are not UUIDs, a bad lease or actor, or the wrong
    arguments are each refused with one `task.rejected` line (no line per id, no traceback, no
    work), and the worker then verifies a normal message."""
    control = fleet.add("ok-after-poison")
    some_id = str(uuid.uuid4())
    lease = str(uuid.uuid4())
    poison: list[tuple[str, list[object], dict[str, object]]] = [
        ("too many accounts", [[str(uuid.uuid4()) for _ in range(10_000)], lease], {}),
        ("account ids are not a list", ["not a list", lease], {}),
        ("1 account id(s) are not UUIDs", [[some_id, "\x1b[2Jnope"], lease], {}),
        ("the lease id is not a UUID", [[some_id], "not-a-lease"], {}),
        ("the actor is not a string", [[some_id], lease], {"actor": 12345}),
        ("the actor is not a string", [[some_id], lease, "x" * 100_000], {}),
        ("the lease id is not a UUID", [[some_id]], {}),
        ("unexpected arguments", [[some_id], lease, "worker", "surplus"], {}),
        ("unexpected arguments", [[some_id], lease], {"priority": 9}),
    ]
    env = services_env()
    worker = start_worker(env, tmp_path)
    with running(worker), Connection(private_redis.url) as connection:  # type: ignore[no-untyped-call]
        wait_until(lambda: worker.events("worker.ready"), timeout=60, what="worker.ready")
        for _, args, kwargs in poison:
            app.send_task(
                "verifier.verify_accounts",
                args=args,
                kwargs=kwargs,
                queue=SCHEDULED_QUEUE,
                connection=connection,
            )
        with fleet.sessions.begin() as session:
            claim = claim_accounts(session, [control.id], lease_seconds=60)
        app.send_task(
            "verifier.verify_accounts",
            args=[[str(control.id)], str(claim.lease_id)],
            queue=SCHEDULED_QUEUE,
            connection=connection,
        )
        wait_until(
            lambda: fleet.statuses()[control.id] is CONNECTED,
            timeout=60,
            what="the normal message after the poison to be verified",
        )
        rejected = worker.events("task.rejected")
        # Prefork processes take the messages concurrently: the order of the lines is not fixed.
        by_reason = {
            expected: [r for r in rejected if r["reason"].startswith(expected)]
            for expected, _, _ in poison
        }
        assert {reason: len(lines) for reason, lines in by_reason.items()} == dict(
            Counter(expected for expected, _, _ in poison)
        ), [r["reason"] for r in rejected]
        assert len(rejected) == len(poison)
        assert {line["level"] for line in rejected} == {"error"}
        assert [line["accounts"] for line in by_reason["too many accounts"]] == [10_000]
        assert [line["example"] for line in by_reason["1 account id(s) are not UUIDs"]] == [
            r"'\x1b[2Jnope'"
        ]
        output = worker.output()
        assert "Traceback" not in output
        assert "raised unexpected" not in output
        assert worker.events("verification.skipped") == []
        assert len(output.splitlines()) < 100, f"{len(output.splitlines())} lines"
        assert worker.process.poll() is None
