"""Fixtures and helpers shared by the tests of a verification's steps (no Celery): a zero-latency
STS stand-in, a circuit breaker on the test Redis, dependencies built for the scratch database,
and accounts leased one by one or as a chunk.

A pytest plugin (`tests/conftest.py` loads it): the fixtures are there for every test; the
helpers are imported.
"""

from __future__ import annotations

import contextlib
import random
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta

import pytest
import redis
from sqlalchemy import event, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from models import AuditEvent, AuditEventType, AwsAccount
from sandbox.standin import StsStandIn
from tests.factories import make_account, make_organization
from worker.circuit import PlatformCircuit
from worker.claims import claim_due_accounts
from worker.settings import Settings
from worker.sts.verifier import StsVerifier
from worker.verify import VerificationDeps

MakeDeps = Callable[..., VerificationDeps]


@pytest.fixture(scope="module")
def sts_standin() -> Iterator[StsStandIn]:
    """A zero-latency STS stand-in in this process (`standin` is the stand-in as a process)."""
    with StsStandIn(median_ms=0, seed=3) as sts:
        yield sts


@pytest.fixture
def circuit(redis_url: str) -> Iterator[PlatformCircuit]:
    """A closed circuit breaker on the test Redis, with no local caching."""
    client = redis.Redis.from_url(redis_url)
    breaker = PlatformCircuit(client, pause_seconds=60, cache_seconds=0)
    breaker.close()
    yield breaker
    breaker.close()
    client.close()


@pytest.fixture
def make_deps(
    scratch_sessions: sessionmaker[Session],
    circuit: PlatformCircuit,
    sts_standin: StsStandIn,
    monkeypatch: pytest.MonkeyPatch,
) -> MakeDeps:
    """Build a verification's dependencies; keyword arguments override settings."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", sts_standin.endpoint_url)
    monkeypatch.setenv("AWS_ENDPOINT_URL", sts_standin.endpoint_url)  # the permission probes'
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAPLATFORMTESTKEY1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret")

    def build(
        before_call: Callable[[], None] | None = None, **overrides: object
    ) -> VerificationDeps:
        settings = Settings(sts_max_attempts=1, jitter_ratio=0, **overrides)  # type: ignore[arg-type]
        return VerificationDeps(
            sessions=scratch_sessions,
            verifier=StsVerifier(settings, before_call=before_call),
            circuit=circuit,
            settings=settings,
            rng=random.Random(0),
        )

    return build


def lease_one(
    sessions: sessionmaker[Session], role_name: str, **fields: object
) -> tuple[uuid.UUID, uuid.UUID]:
    """Insert an account for a stand-in role and lease it; returns (account id, lease id)."""
    with sessions.begin() as session:
        organization = make_organization(session)
        account = make_account(
            session,
            organization=organization,
            aws_account_id="123456789012",
            role_arn=f"arn:aws:iam::123456789012:role/{role_name}",
            **fields,
        )
        session.execute(
            update(AwsAccount)
            .where(AwsAccount.id != account.id)
            .values(next_due_at=func.now() + timedelta(days=1))
        )
        claim = claim_due_accounts(session, limit=1, lease_seconds=60)
        assert claim.account_ids == [account.id]
        return account.id, claim.lease_id


def read_account(sessions: sessionmaker[Session], account_id: uuid.UUID) -> AwsAccount:
    """The account's row as it is now."""
    with sessions() as session:
        return session.scalars(select(AwsAccount).where(AwsAccount.id == account_id)).one()


def events_of(sessions: sessionmaker[Session], account_id: uuid.UUID) -> list[AuditEvent]:
    """The account's audit events, oldest first."""
    with sessions() as session:
        return list(
            session.scalars(
                select(AuditEvent)
                .where(AuditEvent.account_id == account_id)
                .order_by(AuditEvent.id)
            )
        )


def status_events(sessions: sessionmaker[Session]) -> list[AuditEvent]:
    """Every account's status changes, oldest first."""
    with sessions() as session:
        return list(
            session.scalars(
                select(AuditEvent)
                .where(AuditEvent.event_type == AuditEventType.STATUS_CHANGED)
                .order_by(AuditEvent.id)
            )
        )


def lease_chunk(
    sessions: sessionmaker[Session], role_names: Sequence[str], **fields: object
) -> tuple[list[uuid.UUID], uuid.UUID]:
    """Insert one account per stand-in role and lease them together; returns (ids, lease id)."""
    with sessions.begin() as session:
        organization = make_organization(session)
        ids = [
            make_account(
                session,
                organization=organization,
                role_arn=f"arn:aws:iam::{n + 100000000000}:role/{role_name}",
                aws_account_id=str(n + 100000000000),
                **fields,
            ).id
            for n, role_name in enumerate(role_names)
        ]
        session.execute(
            update(AwsAccount)
            .where(AwsAccount.id.not_in(ids))
            .values(next_due_at=func.now() + timedelta(days=1))
        )
        claim = claim_due_accounts(session, limit=len(ids), lease_seconds=60)
        assert sorted(claim.account_ids) == sorted(ids)
        return ids, claim.lease_id


@contextlib.contextmanager
def statements(sessions: sessionmaker[Session]) -> Iterator[list[str]]:
    """Record the first word of every SQL statement the scratch engine runs."""
    engine = sessions.kw["bind"]
    seen: list[str] = []

    def record(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        seen.append(statement.split(None, 1)[0].upper())

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)
