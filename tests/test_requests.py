"""`worker.request_verification`: audited, ahead of scheduled work, sent only after commit."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis
from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from models import AccountStatus, AuditEvent, AuditEventType, AwsAccount
from sandbox.moto_sts import PLATFORM_PRINCIPAL_ARN, SandboxSts, create_customer_role
from sandbox.standin import StsStandIn
from tests.factories import make_account, make_organization
from tests.processes import running, service_env, start_beat, start_worker, wait_until
from worker import UnknownAccountsError, request_verification
from worker.claims import claim_due_accounts
from worker.queues import REQUESTED_QUEUE


@pytest.fixture
def api_sessions(
    scratch_database: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[sessionmaker[Session]]:
    """Sessions as the API would have them, and the worker's settings on the same database."""
    from worker import db  # noqa: PLC0415
    from worker.settings import get_settings  # noqa: PLC0415

    monkeypatch.setenv("DATABASE_URL", scratch_database)
    get_settings.cache_clear()
    db.dispose_engine()
    engine = create_engine(f"postgresql+psycopg://{scratch_database.partition('://')[2]}")
    yield sessionmaker(engine, expire_on_commit=False)
    engine.dispose()
    db.dispose_engine()
    get_settings.cache_clear()


def _account(
    sessions: sessionmaker[Session],
    role_arn: str | None = None,
    aws_id: str = "123456789012",
    external_id: str | None = None,
) -> uuid.UUID:
    with sessions.begin() as session:
        fields = {"external_id": external_id} if external_id else {}
        return make_account(
            session,
            organization=make_organization(session),
            aws_account_id=aws_id,
            role_arn=role_arn or f"arn:aws:iam::{aws_id}:role/R",
            **fields,
        ).id


def test_a_rolled_back_request_sends_nothing(
    api_sessions: sessionmaker[Session], broker: redis.Redis
) -> None:
    """Inside a transaction that rolls back: no message, no audit event, no lease."""
    account_id = _account(api_sessions)
    with api_sessions() as session:
        session.begin()
        result = request_verification([account_id], requested_by="api:user:1", session=session)
        assert result.sent == [account_id]
        session.rollback()
    assert broker.llen(REQUESTED_QUEUE) == 0
    with api_sessions() as session:
        assert session.scalars(select(AuditEvent)).all() == []
        assert (
            session.scalar(select(AwsAccount.lease_id).where(AwsAccount.id == account_id)) is None
        )


def test_a_request_is_sent_only_when_the_transaction_commits(
    api_sessions: sessionmaker[Session], broker: redis.Redis
) -> None:
    """Nothing is on the queue before COMMIT; one message is after it."""
    account_id = _account(api_sessions)
    with api_sessions() as session:
        session.begin()
        request_verification(
            [account_id], requested_by="api:user:1", session=session, correlation_id="req-7"
        )
        assert broker.llen(REQUESTED_QUEUE) == 0
        session.commit()
    assert broker.llen(REQUESTED_QUEUE) == 1
    with api_sessions() as session:
        [event] = session.scalars(select(AuditEvent)).all()
    assert (event.event_type, event.actor, event.correlation_id) == (
        AuditEventType.VERIFICATION_REQUESTED,
        "api:user:1",
        "req-7",
    )


def test_an_account_already_in_flight_is_not_sent_again(
    api_sessions: sessionmaker[Session], broker: redis.Redis
) -> None:
    """A dispatcher's live lease means the request is audited but not sent a second time."""
    account_id = _account(api_sessions)
    with api_sessions.begin() as session:
        assert account_id in claim_due_accounts(session, limit=10, lease_seconds=60).account_ids
    result = request_verification([account_id], requested_by="api:user:1")
    assert (result.sent, result.in_flight) == ([], [account_id])
    assert broker.llen(REQUESTED_QUEUE) == 0


def test_unknown_ids_request_nothing(
    api_sessions: sessionmaker[Session], broker: redis.Redis
) -> None:
    """One unknown id refuses the whole request, naming it."""
    known = _account(api_sessions)
    missing = uuid.uuid4()
    with pytest.raises(UnknownAccountsError, match=str(missing)):
        request_verification([known, missing], requested_by="api:user:1")
    assert broker.llen(REQUESTED_QUEUE) == 0


def test_many_unknown_ids_are_named_briefly() -> None:
    """The error names the first five unknown ids and counts the rest; all are in `missing`."""
    missing = [uuid.uuid4() for _ in range(10_000)]
    error = UnknownAccountsError(missing)
    assert str(error) == (
        "unknown account id(s): " + ", ".join(map(str, missing[:5])) + " ... and 9,995 more"
    )
    assert error.missing == missing


def test_requested_by_is_required(api_sessions: sessionmaker[Session]) -> None:
    """An empty requester is refused: every audit event names who asked."""
    with pytest.raises(ValueError, match="requested_by"):
        request_verification([uuid.uuid4()], requested_by=" ")


@pytest.mark.e2e
def test_a_committed_request_is_verified_by_a_real_worker(
    api_sessions: sessionmaker[Session],
    broker: redis.Redis,
    scratch_database: str,
    redis_url: str,
    tmp_path: Path,
) -> None:
    """Requested inside the API's transaction, verified by a worker once committed."""
    aws_id = f"{uuid.uuid4().int % 10**12:012d}"
    external_id = f"ext-{uuid.uuid4().hex}"
    with SandboxSts() as sandbox:
        create_customer_role(
            sandbox.endpoint_url, aws_id, "ApiRole", PLATFORM_PRINCIPAL_ARN, external_id
        )
        account_id = _account(
            api_sessions,
            f"arn:aws:iam::{aws_id}:role/ApiRole",
            aws_id=aws_id,
            external_id=external_id,
        )
        env = service_env(
            database_url=scratch_database, redis_url=redis_url, sts_url=sandbox.endpoint_url
        )
        with running(start_worker(env, tmp_path)) as (_worker,):
            with api_sessions() as session:
                session.begin()
                request_verification([account_id], requested_by="api:user:9", session=session)
                session.commit()

            def status() -> AccountStatus | None:
                with api_sessions() as session:
                    return session.scalar(
                        select(AwsAccount.status).where(AwsAccount.id == account_id)
                    )

            wait_until(lambda: status() is AccountStatus.CONNECTED, timeout=90, what="connected")
    with api_sessions() as session:
        change = session.scalars(
            select(AuditEvent).where(AuditEvent.event_type == AuditEventType.STATUS_CHANGED)
        ).one()
    assert change.actor == "api:user:9"


@pytest.mark.e2e
@pytest.mark.timeout(180)
def test_a_request_during_a_sweep_is_verified_ahead_of_it(
    api_sessions: sessionmaker[Session],
    broker: redis.Redis,
    scratch_database: str,
    redis_url: str,
    tmp_path: Path,
) -> None:
    """With a sweep filling the worker's window and its STS budget (20 calls/s for 150 new
    accounts: 15 s), a requested account is verified while most of the sweep still waits: the
    scheduled chunk being handed over yields its process to the request."""
    with api_sessions.begin() as session:
        organization = make_organization(session)
        sweep = [make_account(session, organization=organization).id for _ in range(150)]
        # Not due: only the request sends it (the sweep would claim a due one first).
        account_id = make_account(
            session, organization=organization, next_due_at=datetime.now(UTC) + timedelta(days=1)
        ).id
    with StsStandIn(median_ms=20, seed=5) as sts:
        env = service_env(
            database_url=scratch_database,
            redis_url=redis_url,
            sts_url=sts.endpoint_url,
            STS_RATE_LIMIT_PER_SECOND="20",
            WORKER_CONCURRENCY="4",
        )
        with running(start_worker(env, tmp_path), start_beat(env, tmp_path)) as (worker, _beat):

            def connected(ids: list[uuid.UUID]) -> int:
                with api_sessions() as session:
                    return int(
                        session.scalar(
                            select(func.count())
                            .select_from(AwsAccount)
                            .where(
                                AwsAccount.id.in_(ids),
                                AwsAccount.status == AccountStatus.CONNECTED,
                            )
                        )
                        or 0
                    )

            wait_until(lambda: connected(sweep) >= 5, timeout=90, what="the sweep under way")
            request_verification([account_id], requested_by="api:user:7")
            wait_until(lambda: connected([account_id]), timeout=60, what="the request verified")
            assert connected(sweep) <= 100
            yielded = [
                event
                for event in worker.events("verification.deferred")
                if event["reason"] == "requested_waiting"
            ]
            assert yielded
